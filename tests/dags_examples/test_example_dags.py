"""The DAGs users copy (``dags/``) and the demo that runs them (``make demo``).

* every file in ``dags/`` imports, with no import error and no network;
* each DAG has the shape its docs promise;
* ``flux_content_pipeline`` runs end to end through :func:`demo.run_demo.run_demo`, the very
  function ``make demo`` calls (emulator and moto S3 as processes, Airflow in a child
  process with its own environment), and leaves no process behind, Ctrl-C included.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from demo.run_demo import run_demo
from demo.services import group_members
from demo.summary import MARKER, prepare_output
from tests.helpers import REPO

DAGS = REPO / "dags"
PROMPTS = [
    line.strip()
    for line in (DAGS / "prompts" / "daily.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


@pytest.fixture(scope="module")
def bag():
    """dags/ parsed with every outgoing connection refused: parsing must not touch the network."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access while parsing DAGs: {args[1:]!r}")

    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket.socket, "connect_ex", no_network)
        mp.setattr(socket, "create_connection", no_network)
        return DagBag(dag_folder=DAGS)


def test_every_dag_file_imports_without_errors_or_network(bag):
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"flux_kontext_to_s3", "flux_content_pipeline", "flux_generate_one_task"}
    assert {Path(dag.fileloc).name for dag in bag.dags.values()} == {p.name for p in DAGS.glob("*.py")}
    for dag in bag.dags.values():
        assert dag.doc_md, f"{dag.dag_id}: no doc_md for the UI"
        assert "flux" in dag.tags


def _upstream(dag, task_id: str) -> set[str]:
    return set(dag.get_task(task_id).upstream_task_ids)


def test_flux_kontext_to_s3_is_submit_sensor_transfer(bag):
    dag = bag.dags.get("flux_kontext_to_s3")
    assert set(dag.task_ids) == {"submit", "wait", "to_s3"}
    assert _upstream(dag, "wait") == {"submit"}
    assert _upstream(dag, "to_s3") == {"wait"}
    assert dag.get_task("wait").deferrable
    assert dag.schedule is None  # manual runs only
    assert "prompt" in dag.params


def test_flux_generate_one_task_is_generate_then_transfer(bag):
    dag = bag.dags.get("flux_generate_one_task")
    assert set(dag.task_ids) == {"generate", "to_s3"}
    assert _upstream(dag, "to_s3") == {"generate"}
    generate = dag.get_task("generate")
    assert generate.deferrable
    assert generate.max_active_tis_per_dag


def test_flux_content_pipeline_shape(bag):
    from airflow.sdk import Asset

    dag = bag.dags.get("flux_content_pipeline")
    assert set(dag.task_ids) == {"load_prompts", "submit", "wait", "to_s3"}
    assert _upstream(dag, "submit") == {"load_prompts"}
    assert _upstream(dag, "wait") == {"submit"}
    assert _upstream(dag, "to_s3") == {"wait"}
    assert dag.catchup is False
    assert dag.schedule == "@daily"
    submit, wait, to_s3 = (dag.get_task(t) for t in ("submit", "wait", "to_s3"))
    # Mapped over the prompts, concurrency-limited for the API, retried, deferred waits.
    for mapped in (submit, wait):
        assert type(mapped).__name__ == "MappedOperator"
        assert mapped.partial_kwargs["max_active_tis_per_dag"] >= 1
        assert mapped.partial_kwargs["retries"] >= 1
    assert wait.partial_kwargs.get("deferrable", True)
    # One transfer of the whole batch, a per-run prefix, the bucket read when the task runs.
    assert "run_id" in to_s3.s3_key_prefix
    assert "var.value" in to_s3.s3_bucket
    assert to_s3.manifest_name == "manifest.json"
    assert to_s3.retries >= 1
    assert Asset("flux_daily_images") in to_s3.outlets


def test_load_prompts_reads_params_or_the_file(bag):
    load = bag.dags.get("flux_content_pipeline").get_task("load_prompts").python_callable
    assert load(params={"prompts": []}) == PROMPTS
    assert 3 <= len(PROMPTS) <= 10
    assert load(params={"prompts": ["  a red fox ", "", "a blue bird"]}) == ["a red fox", "a blue bird"]
    with pytest.raises(ValueError, match="MAX_PROMPTS"):
        load(params={"prompts": [f"prompt {i}" for i in range(51)]})


def test_output_folder_is_only_emptied_when_the_demo_made_it(tmp_path):
    mine = tmp_path / "theirs"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not made by the demo"):
        prepare_output(mine)
    assert (mine / "holiday.jpg").exists()

    out = tmp_path / "out"
    prepare_output(out)
    (out / "01-old.jpg").write_bytes(b"old")
    prepare_output(out)  # a second run replaces the first one's images
    assert sorted(p.name for p in out.iterdir()) == [MARKER]


def test_demo_runs_flux_content_pipeline_end_to_end(tmp_path):
    """``make demo``'s code path: emulator + moto + dag.test() in a child process; images on disk."""
    log = io.StringIO()
    out = tmp_path / "demo-output"
    summary = run_demo(out, out=log)
    printed = log.getvalue()

    assert summary.ok, summary.render() + "\n" + printed
    assert summary.state == "success"
    assert summary.expected == len(PROMPTS) == summary.landed == len(summary.images)
    assert sorted(row.prompt for row in summary.images) == sorted(PROMPTS)
    assert len({row.request_id for row in summary.images}) == len(PROMPTS)
    assert summary.manifest_uri and summary.manifest_uri.endswith("/manifest.json")
    for row in summary.images:
        assert row.s3_uri and row.s3_uri.startswith("s3://flux-demo/flux/daily/")
        assert row.size and row.size > 1000
        assert row.waited_seconds is not None and row.waited_seconds >= 0
        with Image.open(row.local_path) as picture:
            picture.load()
            assert picture.format == "JPEG"
            assert picture.width > picture.height  # 16:9
        assert Path(row.local_path).stat().st_size == row.size
    # The waits really were deferred (triggers ran), at least where the image was not ready yet.
    assert any(row.deferred_seconds for row in summary.images), printed
    assert (out / "summary.json").exists()

    # Progress was shown while it ran, and the summary reads well.
    assert "Submitted FLUX request" in printed
    assert "Wrote manifest s3://flux-demo/" in printed
    assert f"Stopped {len(summary.pids)} process(es)" in printed
    rendered = summary.render()
    assert "OK: every image landed." in rendered
    assert all(row.request_id in rendered and row.s3_uri in rendered for row in summary.images)

    # Every process the demo started (emulator, moto, the Airflow child and its children) is gone.
    assert len(summary.pids) == 3
    assert group_members(summary.pids) == []


def test_demo_real_mode_uses_the_api_from_the_environment(tmp_path, emulator, monkeypatch):
    """FLUX_DEMO_REAL's path: the connection is built from FLUX_API_BASE/FLUX_API_TOKEN (here an emulator)."""
    monkeypatch.setenv("FLUX_API_BASE", emulator.base_url)
    monkeypatch.setenv("FLUX_API_TOKEN", "real-mode-token-3f9a")
    monkeypatch.delenv("FLUX_API_AUTH", raising=False)
    log = io.StringIO()
    summary = run_demo(tmp_path / "out", real=True, prompts=["a single real-mode fox"], out=log)

    assert summary.ok, summary.render() + "\n" + log.getvalue()
    assert summary.mode == f"real API at {emulator.base_url}"
    assert [row.prompt for row in summary.images] == ["a single real-mode fox"]
    (submit,) = emulator.calls(kind="submit")
    assert submit.authorization == "Bearer real-mode-token-3f9a"  # not fal's host: an aggregator
    assert "real-mode-token-3f9a" not in log.getvalue()
    assert group_members(summary.pids) == []


def test_demo_real_mode_without_a_token_explains_and_starts_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "AIRFLOW"))}
    env["FLUX_DEMO_REAL"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "demo.run_demo", "--output", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "FLUX_API_TOKEN" in out.stderr


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_demo_interrupted_stops_every_process_it_started(tmp_path, sig, code):
    """Ctrl-C (SIGINT) or SIGTERM while Airflow runs: exit code 128+n, no process left behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "demo.run_demo", "--output", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    pids: list[int] = []
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            lines.append(line)
            pids += [int(p) for p in re.findall(r"\(pid (\d+)\)", line)]
            if "running flux_content_pipeline" in line or time.monotonic() > deadline:
                break
        assert len(pids) == 3, "".join(lines)  # emulator, moto, the Airflow child
        assert group_members(pids), "the demo's children should be running now"
        os.kill(proc.pid, sig)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
        assert proc.returncode == code, "".join(lines)
        assert "every process it started is stopped" in rest
        assert group_members(pids) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pgid in pids:
            for pid in group_members([pgid]):
                os.kill(pid, signal.SIGKILL)
