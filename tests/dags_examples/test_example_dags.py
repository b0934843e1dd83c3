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
from demo.summary import MARKER, ImageRow, Summary, prepare_output
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

    from tests.helpers import dag_bag

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket.socket, "connect_ex", no_network)
        mp.setattr(socket, "create_connection", no_network)
        return dag_bag(str(DAGS))


def test_every_dag_file_imports_without_errors_or_network(bag):
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {
        "flux_kontext_to_s3",
        "flux_content_pipeline",
        "flux_generate_one_task",
        "flux_edit_from_s3",
        "flux_batch_pipeline",
        "flux_review_and_publish",
        "flux2_product_shots",
    }
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


def test_flux_batch_pipeline_is_one_batch_task_then_the_copy(bag):
    from airflow_flux.operators import FluxBatchGenerateOperator

    dag = bag.dags.get("flux_batch_pipeline")
    assert set(dag.task_ids) == {"load_prompts", "generate", "to_s3"}
    assert _upstream(dag, "generate") == {"load_prompts"}
    assert _upstream(dag, "to_s3") == {"generate"}
    generate = dag.get_task("generate")
    assert isinstance(generate, FluxBatchGenerateOperator)
    assert generate.deferrable and generate.retries >= 1
    assert generate.max_images <= 500 and generate.allow_failures >= 0
    assert "run_id" in dag.get_task("to_s3").s3_key_prefix


def test_flux_edit_from_s3_shape(bag):
    from airflow_flux.models import KONTEXT_EDIT

    dag = bag.dags.get("flux_edit_from_s3")
    assert set(dag.task_ids) == {"list_inputs", "input_uris", "edit", "to_s3"}
    assert _upstream(dag, "input_uris") == {"list_inputs"}
    assert _upstream(dag, "edit") == {"input_uris"}
    assert _upstream(dag, "to_s3") == {"edit"}
    edit = dag.get_task("edit")
    assert type(edit).__name__ == "MappedOperator"
    assert edit.partial_kwargs["endpoint"] == KONTEXT_EDIT
    assert edit.partial_kwargs["max_active_tis_per_dag"] >= 1 and edit.partial_kwargs["retries"] >= 1
    uris = dag.get_task("input_uris").python_callable
    assert uris(["p/a.png", "p/", "p/notes.txt", "p/b.JPG"], "shop", 5) == ["s3://shop/p/a.png", "s3://shop/p/b.JPG"]
    with pytest.raises(ValueError, match="max_images"):
        uris([f"p/{i}.png" for i in range(3)], "shop", 2)


def test_flux2_product_shots_is_one_batch_of_flux2_edits_then_the_copy(bag):
    dag = bag.dags.get("flux2_product_shots")
    assert set(dag.task_ids) == {"shots", "to_s3"}
    assert _upstream(dag, "to_s3") == {"shots"}
    assert dag.get_task("shots").endpoint == "fal-ai/flux-2-pro/edit"


def test_flux_review_and_publish_shape(bag):
    from airflow.providers.standard.operators.hitl import HITLOperator

    dag = bag.dags.get("flux_review_and_publish")
    assert set(dag.task_ids) == {"load_prompts", "generate", "stage", "review_request", "review", "publish"}
    assert _upstream(dag, "generate") == {"load_prompts"}
    assert _upstream(dag, "stage") == {"generate"}
    assert _upstream(dag, "review_request") == {"stage"}
    assert _upstream(dag, "review") == {"review_request"}
    assert _upstream(dag, "publish") == {"review", "stage"}  # the answer, and the staging manifest's URI
    assert dag.schedule is None
    assert {"prompts", "bucket", "staging_prefix", "published_prefix", "flux_conn_id"} <= set(dag.params)
    generate = dag.get_task("generate")
    assert type(generate).__name__ == "MappedOperator"
    assert generate.partial_kwargs["max_active_tis_per_dag"] >= 1 and generate.partial_kwargs["retries"] >= 1
    stage = dag.get_task("stage")
    assert "params.staging_prefix" in stage.s3_key_prefix and "run_id" in stage.s3_key_prefix
    assert stage.manifest_name == "manifest.json"
    # One choice per image (templated: known at run time), several allowed, none picked for the
    # reviewer and none taken on a timeout: nothing is published unless someone picks it.
    review = dag.get_task("review")
    assert isinstance(review, HITLOperator)
    assert review.multiple and "options" in review.template_fields
    assert review.defaults is None and review.response_timeout and review.retries == 0
    assert dag.get_task("publish").retries >= 1

    helpers = dag.get_task("publish").python_callable.__globals__
    chosen, label, none = helpers["chosen_numbers"], helpers["image_label"], helpers["PUBLISH_NONE"]
    assert chosen(["3: a fox", "1: a boat"]) == [1, 3]
    assert chosen([none]) == []
    with pytest.raises(ValueError, match="picks images and"):
        chosen(["2: a fox", none])
    assert label(12, "a  red\nfox " * 20).startswith("12: a red fox a red fox")
    assert len(label(12, "x" * 500)) <= 75 and label(1, None) == "1: (no prompt)"
    assert helpers["_md"]("[click](http://x) *bold*") == "\\[click\\](http://x) \\*bold\\*"


def test_flux_edit_from_s3_edits_every_image_under_the_prefix(tmp_path, emulator, moto_server):
    """The example DAG end to end (dag.test() in a child process, as ``make demo`` runs DAGs):
    the listed images are edited from presigned URLs and copied back with their manifest."""
    import json

    from tests.helpers import TOKEN, moto_aws_conn, moto_s3_client

    s3 = moto_s3_client(moto_server)
    bucket = f"edit-example-{os.getpid()}-{int(time.time())}"
    s3.create_bucket(Bucket=bucket)
    colours = {"products/red.png": (220, 20, 20), "products/blue.png": (20, 20, 220)}
    for key, colour in colours.items():
        body = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(body, format="PNG")
        s3.put_object(Bucket=bucket, Key=key, Body=body.getvalue(), ContentType="image/png")
    s3.put_object(Bucket=bucket, Key="products/readme.txt", Body=b"not an image")

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW_CONN_FLUX_DEFAULT": json.dumps(
                {"conn_type": "flux", "host": emulator.base_url, "password": TOKEN}
            ),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(moto_aws_conn(moto_server)),
        }
    )
    result = tmp_path / "result.json"
    conf = {"bucket": bucket, "prefix": "products/", "prompt": "the same product in winter"}
    command = ["-m", "demo.pipeline", "--dag-id", "flux_edit_from_s3", "--conf", json.dumps(conf)]
    proc = subprocess.run(
        [sys.executable, *command, "--result", str(result)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    outcome = json.loads(result.read_text()) if result.exists() else {}
    assert outcome.get("state") == "success", (proc.stdout[-3000:], proc.stderr[-3000:])
    states = {(t["task_id"], t["map_index"]): t["state"] for t in outcome["task_instances"]}
    assert states == {
        ("list_inputs", -1): "success",
        ("input_uris", -1): "success",
        ("edit", 0): "success",
        ("edit", 1): "success",
        ("to_s3", -1): "success",
    }
    # Each listed image was fetched by "fal" from a presigned URL, never with our token.
    assert len(emulator.jobs) == 2
    for job in emulator.jobs.values():
        assert "Signature=" in job.input["image_url"]  # presigned (SigV4 or SigV2, as the connection says)
        assert [f.status for f in job.input_fetches] == [200] and not job.input_fetches[0].authorization_sent
    # The manifest lists both edits, each with its own input, and each output keeps its input's colour.
    prefix = f"flux/edits/{outcome['run_id']}"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    # Each input recorded pinned to the object that was edited (s3://bucket/key?etag=...).
    assert sorted(i["inputs"][0].split("?etag=")[0] for i in manifest["images"]) == sorted(
        f"s3://{bucket}/{k}" for k in colours
    )
    for image in manifest["images"]:
        key = image["inputs"][0].split("/", 3)[3].split("?")[0]
        etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        assert image["inputs"][0] == f"s3://{bucket}/{key}?etag={etag}"
    for image in manifest["images"]:
        data = s3.get_object(Bucket=bucket, Key=image["key"])["Body"].read()
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        centre = picture.getpixel((picture.width // 2, picture.height // 2))
        expected = colours[image["inputs"][0].split("/", 3)[3].split("?")[0]]
        assert all(abs(c - e) < 70 for c, e in zip(centre, expected, strict=True)), (centre, expected)
    assert manifest["cost_usd"] == pytest.approx(0.08)
    assert "Signature=" not in json.dumps(manifest) + proc.stdout + proc.stderr


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


@pytest.mark.parametrize("emulator", [True, False])
def test_the_summary_says_when_the_images_are_the_emulators_placeholders(emulator):
    image = ImageRow(number=1, prompt="a red fox", request_id="r1", status="copied", s3_uri="s3://b/k", size=9)
    summary = Summary(
        mode="x", dag_id="d", run_id="r", state="success", bucket="b", expected=1, images=[image], emulator=emulator
    )
    rendered = summary.render()
    assert ("labelled placeholders" in rendered) is emulator
    assert ('FLUX_DEMO_REAL=1 FLUX_API_TOKEN="$FAL_KEY" make demo' in rendered) is emulator
    assert rendered.splitlines()[-1].startswith("NOT OK")  # the verdict stays the last line (no local file)


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
    # Nobody should mistake the emulator's placeholders for FLUX's work, nor miss how to get the real thing.
    assert summary.emulator
    assert "labelled placeholders" in rendered and "FLUX_DEMO_REAL=1" in rendered

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
    assert not summary.emulator and "placeholders" not in summary.render()
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


def test_make_demo_ui_prints_both_urls_tests_connections_and_stops_on_ctrl_c_without_an_error(tmp_path):
    """``make demo-ui`` as a terminal runs it: the banner's DAG and gallery URLs answer, the
    connection Test button works, and Ctrl-C (SIGINT to the whole foreground process group,
    make included) stops every process with no "make: *** ... Error 130"."""
    import requests

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "demo-ui", f"DEMO_ARGS=--port 0 --output {tmp_path / 'out'}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # make leads the group, as the foreground job of a terminal
    )
    pids: list[int] = []
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            lines.append(line)
            pids += [int(p) for p in re.findall(r"\(pid (\d+)\)", line)]
            pids += [int(p) for p in re.findall(r"(?:scheduler|dag-processor|triggerer|api-server) (\d+)", line)]
            if "Press Ctrl-C to stop everything." in line or time.monotonic() > deadline:
                break
        printed = "".join(lines)
        assert "Press Ctrl-C" in printed, printed
        assert len(pids) == 6, printed  # emulator, moto, scheduler, dag-processor, triggerer, api-server
        (emulator_url,) = re.findall(r"fal queue emulator (http://\S+)", printed)
        (dag_url,) = re.findall(r"Airflow UI: +(\S+)", printed)
        (gallery_url,) = re.findall(r"Flux gallery: +(\S+)", printed)
        base = dag_url.split("/dags/")[0]
        assert gallery_url == f"{base}/flux-gallery/dags/flux_content_pipeline", printed

        http = requests.Session()
        http.trust_env = False
        assert http.get(dag_url, timeout=30).status_code == 200
        gallery = http.get(gallery_url, timeout=30)
        assert gallery.status_code == 200 and "text/html" in gallery.headers["content-type"], gallery.text[:500]
        assert "flux_content_pipeline" in gallery.text
        # The Test button's call: enabled, and run by the hook on the api-server. flux_default
        # lives in the demo's environment; the form sends no password, so its own is used.
        tested = http.post(
            f"{base}/api/v2/connections/test",
            json={"connection_id": "flux_default", "conn_type": "flux", "host": emulator_url},
            timeout=60,
        )
        assert tested.status_code == 200, tested.text
        assert tested.json()["status"] is True and "accepted" in tested.json()["message"], tested.json()
        wrong = http.post(
            f"{base}/api/v2/connections/test",
            json={"connection_id": "flux_try", "conn_type": "flux", "host": emulator_url, "password": "wrong"},
            timeout=60,
        )
        assert wrong.json()["status"] is False and "refused the token" in wrong.json()["message"], wrong.json()

        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
        assert "Stopped " in rest and "process(es) the demo started" in rest, "".join(lines)
        # make reports a recipe's non-zero exit as "make: *** [...] Error N": none here, so
        # demo-ui exited 0. make itself was interrupted too and re-raises SIGINT once its
        # recipe is done (GNU make), which the shell reports silently.
        assert "make: ***" not in rest, "".join(lines)
        assert proc.returncode in (0, -signal.SIGINT), "".join(lines)
        assert group_members(pids) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pgid in pids:
            for pid in group_members([pgid]):
                os.kill(pid, signal.SIGKILL)


def test_the_summary_reads_only_its_runs_entries_of_a_shared_manifest(s3):
    from airflow_flux.manifest import Manifest, ManifestImage
    from airflow_flux.manifest_store import merge_manifest
    from demo.summary import find_manifest

    for run_id in ("run1", "run2", "run3"):
        image = ManifestImage(status="copied", key=f"shared/{run_id}.jpg", index=0, sha256=run_id[-1] * 64)
        own = Manifest(
            created_at="2026-12-01T00:00:00+00:00",
            dag_id="demo",
            run_id=run_id,
            task_id="to_s3",
            map_index=-1,
            bucket=s3.bucket,
            prefix="shared",
            images=[image],
        )
        merge_manifest(s3, own, "shared/manifest.json")
    # run3 wrote last; run2's images are still found, and only them.
    key, manifest = find_manifest(s3, s3.bucket, "demo", "run2")
    assert key == "shared/manifest.json"
    assert [e["key"] for e in manifest["images"]] == ["shared/run2.jpg"]
    assert find_manifest(s3, s3.bucket, "demo", "run4") is None
