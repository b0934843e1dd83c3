"""Fixtures of the gallery tests: a real api-server with real runs to show, and headless Chromium.

The api-server runs as a subprocess on *this* test session's metadata DB (same
``AIRFLOW_HOME``, SQLite), so the runs made here with ``dag.test()`` (real operators: the
copy task writes its manifest to moto S3 and pushes the ``flux_manifest`` XCom; the task
runner computes the extra links) are what it serves. No scheduler is needed. The tasks here
get ``aws_default`` from the environment; the api-server from the metadata DB.

Auth is the simple auth manager in multi-team mode, which can deny one DAG to a user:
the test DAGs' bundle belongs to team ``red``; ``alice`` (viewer, team red) may read the
DAG, ``bob`` (viewer, team blue) may not.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from airflow_flux.emulator import FluxEmulator, Scenario
from tests.helpers import TOKEN, free_port, moto_aws_conn, moto_s3_client, port_taken
from tests.plugins.cdp import find_chromium

AIRFLOW = Path(sys.executable).with_name("airflow")
DAG_ID = "flux_test_to_s3"
EDIT_DAG_ID = "flux_test_edit_from_s3"
EDIT_INPUT = "inputs/gallery-red.png"
BUNDLE = "dags-folder"
USERS = {"admin": "admin", "alice": "viewer:red", "bob": "viewer:blue"}
PASSWORDS = {name: f"{name}-pw-{uuid.uuid4().hex[:8]}" for name in USERS}


@dataclass
class GalleryEnv:
    """The api-server, the runs it can show, and what the test needs to check them."""

    api: str
    home: Path
    bucket: str
    s3: Any
    runs: dict[str, str] = field(default_factory=dict)  # label -> run_id
    tokens: dict[str, str] = field(default_factory=dict)
    timings: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.api}{path}"

    def get(self, path: str, user: str | None = None, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if user:
            headers["Authorization"] = f"Bearer {self.tokens[user]}"
        return requests.get(self.url(path), headers=headers, timeout=30, allow_redirects=False, **kwargs)

    def manifest(self, run: str) -> dict[str, Any]:
        # The test DAG's default prefix is flux/<run_id>; the edit DAG's is "edits".
        key = "edits/manifest.json" if run == "edit" else f"flux/{self.runs[run]}/manifest.json"
        return json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())


def png(width: int, height: int, colour: str) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def simple_auth_env(passwords_file: Path) -> dict[str, str]:
    """The simple auth manager in multi-team mode, with :data:`USERS` and their passwords."""
    return {
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
        "AIRFLOW__CORE__MULTI_TEAM": "True",
    }


def api_server_env(port: int, auth_env: dict[str, str]) -> dict[str, str]:
    """This process's environment (AIRFLOW_HOME, DAGS_FOLDER) for an api-server on ``port``."""
    env = dict(os.environ)
    # The api-server reads aws_default from the metadata DB, as for a connection made in the UI.
    env.pop("AIRFLOW_CONN_AWS_DEFAULT", None)
    env.update(
        {
            **auth_env,
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": uuid.uuid4().hex,
            "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
        }
    )
    return env


def start_api_server(work: Path, auth_env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """``airflow api-server`` on a port that was free (it cannot bind port 0 and say which it got)."""
    port = free_port()
    with (work / "api-server.log").open("wb") as out:
        proc = subprocess.Popen(
            [str(AIRFLOW), "api-server", "--apps", "core", "--host", "127.0.0.1", "--port", str(port)],
            env=api_server_env(port, auth_env),
            cwd=work,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, port


def wait_healthy(api: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> bool:
    """Wait for the api-server's health; False if it exited because its port was taken meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{api}/api/v2/monitor/health", timeout=2).status_code == 200:
                return True
        if proc.poll() is not None and port_taken(log.read_text(errors="replace")):
            return False
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"api-server did not start:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)


def healthy_api_server(
    work: Path, auth_env: dict[str, str], proc: subprocess.Popen[bytes], api: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The api-server ``proc`` (at ``api``) once healthy; started again on another port if its
    port was taken meanwhile, up to 3 times. Returns the one that serves, and its URL.

    :param work: where its log is (``api-server.log``).
    :param auth_env: its auth manager's settings, for a restart.
    :param proc: the api-server :func:`start_api_server` started.
    :param api: its URL.
    """
    for _ in range(3):
        if wait_healthy(api, proc, work / "api-server.log"):
            return proc, api
        proc, port = start_api_server(work, auth_env)  # its port was taken: another
        api = f"http://127.0.0.1:{port}"
    stop(proc)
    raise RuntimeError("api-server: no free port in 3 tries")


def api_tokens(api: str, passwords: dict[str, str]) -> dict[str, str]:
    """A JWT for each user, from the auth manager's ``/auth/token`` (simple and FAB alike)."""
    tokens = {}
    for user, password in passwords.items():
        resp = requests.post(f"{api}/auth/token", json={"username": user, "password": password}, timeout=30)
        assert resp.status_code == 201, resp.text
        tokens[user] = resp.json()["access_token"]
    return tokens


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


TEAMS = ("red", "blue")


def _create_teams() -> None:
    """Teams must exist before the api-server starts (the auth manager checks its users' teams)."""
    from airflow.models.team import Team
    from airflow.utils.session import create_session

    with create_session() as session:
        for team in TEAMS:
            if session.get(Team, team) is None:
                session.add(Team(name=team))


def _assign_bundle_to_team(team: str) -> None:
    """The test DAGs' bundle (so every DAG in it) belongs to ``team``."""
    from airflow.models.team import dag_bundle_team_association_table as association
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(association.delete().where(association.c.dag_bundle_name == BUNDLE))
        session.execute(association.insert().values(dag_bundle_name=BUNDLE, team_name=team))


def store_connection(conn_id: str, conn: dict[str, Any]) -> None:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == conn_id).delete(synchronize_session=False)
        session.add(Connection(conn_id=conn_id, **{k: json.dumps(v) if k == "extra" else v for k, v in conn.items()}))


def delete_connection(conn_id: str) -> None:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == conn_id).delete(synchronize_session=False)


def _remove_teams() -> None:
    """Leave the session's DB as other tests expect it: no teams."""
    from airflow.models.team import Team
    from airflow.models.team import dag_bundle_team_association_table as association
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(association.delete().where(association.c.team_name.in_(TEAMS)))
        session.query(Team).filter(Team.name.in_(TEAMS)).delete(synchronize_session=False)


def run_dag(dags: Any, dag_id: str = DAG_ID, **conf: Any) -> str:
    params = {
        "num_images": 1,
        "sync_mode": False,
        "nsfw": "skip",
        "prefix": "",
        "key_template": "{request_id}_{index}.{ext}",
        "aspect_ratio": "1:1",
    }
    dr = dags.get_dag(dag_id).test(run_conf={**params, **conf} if dag_id == DAG_ID else conf)
    assert dr.state == "success", [(ti.task_id, ti.state) for ti in dr.get_task_instances()]
    return dr.run_id


@pytest.fixture(scope="module")
def gallery_env(airflow_db, dags, moto_server, tmp_path_factory) -> Any:
    """Two runs of ``flux_test_to_s3`` in moto S3, and an api-server (simple auth, 3 users) serving them."""

    started = time.monotonic()
    home = Path(os.environ["AIRFLOW_HOME"])
    work = tmp_path_factory.mktemp("gallery")
    passwords_file = work / "passwords.json"
    passwords_file.write_text(json.dumps(PASSWORDS))
    bucket = f"gallery-{uuid.uuid4().hex[:10]}"
    s3 = moto_s3_client(moto_server)
    s3.create_bucket(Bucket=bucket)
    aws_conn = moto_aws_conn(moto_server)
    with FluxEmulator(queue_seconds=0.1, run_seconds=0.1, url_mode="fal") as emu, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(aws_conn))
        mp.setenv(
            "AIRFLOW_CONN_FLUX_DEFAULT", json.dumps({"conn_type": "flux", "host": emu.base_url, "password": TOKEN})
        )
        _create_teams()
        store_connection("aws_default", aws_conn)
        log = work / "api-server.log"
        # Started first: it boots while the runs below are made.
        proc, port = start_api_server(work, simple_auth_env(passwords_file))
        env = GalleryEnv(api=f"http://127.0.0.1:{port}", home=home, bucket=bucket, s3=s3)
        try:
            emu.add_scenario(Scenario(nsfw=[False, False, True, False]), match="gallery foxes")
            emu.add_scenario(Scenario(nsfw=[False, True]), match="gallery owls")
            # Four images, one flagged NSFW and kept (shown blurred, with a badge).
            env.runs["foxes"] = run_dag(dags, prompt="gallery foxes", num_images=4, bucket=bucket, nsfw="keep")
            # Two images, one flagged NSFW and skipped (listed, not stored).
            env.runs["owls"] = run_dag(dags, prompt="gallery owls", num_images=2, bucket=bucket, nsfw="skip")
            # Two 16:9 images: their frames must follow the image, not a square.
            env.runs["wide"] = run_dag(
                dags, prompt="gallery wide cranes", num_images=2, bucket=bucket, aspect_ratio="16:9"
            )
            # An edit of a 3:2 image in S3: the image page shows its input.
            s3.put_object(Bucket=bucket, Key=EDIT_INPUT, Body=png(768, 512, "#d2452d"), ContentType="image/png")
            env.runs["edit"] = run_dag(dags, EDIT_DAG_ID, bucket=bucket, key=EDIT_INPUT)
            env.timings.append(f"runs made {time.monotonic() - started:.1f}s")
            _assign_bundle_to_team("red")
            proc, env.api = healthy_api_server(work, simple_auth_env(passwords_file), proc, env.api)
            env.timings.append(f"api-server up {time.monotonic() - started:.1f}s")
            env.tokens = api_tokens(env.api, PASSWORDS)
            yield env
        except BaseException:
            print(f"\n----- api-server log -----\n{log.read_text(errors='replace')[-6000:]}")
            raise
        finally:
            stop(proc)
            _remove_teams()
            delete_connection("aws_default")
            print(f"\ngallery env: {', '.join(env.timings)}; total {time.monotonic() - started:.1f}s")


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the browser tests save what each page looked like: ``FLUX_SCREENSHOTS_DIR`` (``make test``
    sets it and prints it), else a temporary folder."""
    folder = os.environ.get("FLUX_SCREENSHOTS_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """Debian's chromium; installed here when missing and we may (root, apt-get), as CI does."""
    binary = find_chromium()
    if binary is None and os.geteuid() == 0 and Path("/usr/bin/apt-get").exists():
        print("chromium not found: installing it with apt-get (as .ci/run does)")
        subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
            shell=True,
            check=False,
            timeout=900,
        )
        binary = find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs it with apt-get install -y chromium)")
        pytest.skip("headless browser check skipped: chromium not found and not installable here (apt-get, as root)")
    return binary
