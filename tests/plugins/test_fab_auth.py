"""The gallery behind the FAB auth manager, on a real api-server: per-DAG roles and forged records (#22).

Two DAGs, two users with a role each on one DAG (``carol``: ``flux_test_to_s3``, ``dave``:
``flux_test_edit_from_s3``), ``erin`` who may read ``flux_test_to_s3`` and its runs but not
its XComs, and ``admin``. The runs are real (``dag.test()`` against the emulator and a moto
S3 server); the api-server is ``airflow api-server`` with ``FabAuthManager`` on this session's
metadata DB, its roles made with FAB's own security manager. Then what an attacker can write
is written: an XCom edited through the REST API (as a user allowed to edit XComs) to name
another manifest, a manifest rewritten to list an object outside the task's prefix, and one
rewritten to name another bucket. The gallery must serve none of it, and say why.
"""

from __future__ import annotations

import hashlib
import html
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from airflow_flux.emulator import FluxEmulator
from tests.helpers import TOKEN, moto_aws_conn, moto_s3_client
from tests.plugins.conftest import (
    AIRFLOW,
    api_server_env,
    api_tokens,
    delete_connection,
    healthy_api_server,
    png,
    run_dag,
    start_api_server,
    stop,
    store_connection,
)

pytest.importorskip("airflow.providers.fab", reason="the FAB auth manager is in the test extra")

TO_S3 = "flux_test_to_s3"
EDIT = "flux_test_edit_from_s3"
FAB_AUTH = {"AIRFLOW__CORE__AUTH_MANAGER": "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"}
#: user -> the DAGs their role may read, and whether it may read their XComs.
ROLES: dict[str, tuple[list[str], bool]] = {
    "carol": ([TO_S3], True),
    "dave": ([EDIT], True),
    "erin": ([TO_S3], False),
}

# Run in a subprocess with the FAB auth manager configured: FAB's security manager makes the
# roles (a per-DAG resource "DAG:<dag_id>", and the run and XCom resources) and the users.
_SETUP = """
import json, sys
from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

spec = json.load(sys.stdin)
with get_application_builder() as appbuilder:
    sm = appbuilder.sm
    sm.sync_roles()
    for user, (dag_ids, xcoms) in spec["roles"].items():
        role = sm.find_role(f"{user}_role") or sm.add_role(f"{user}_role")
        resources = [f"DAG:{d}" for d in dag_ids] + ["DAG Runs"] + (["XComs"] if xcoms else [])
        for resource in resources:
            sm.add_permission_to_role(role, sm.create_permission("can_read", resource))
        sm.add_user(user, user, "Test", f"{user}@example.com", role, spec["passwords"][user])
    admin = sm.find_role("Admin")
    sm.add_user("admin", "admin", "Test", "admin@example.com", admin, spec["passwords"]["admin"])
"""


@dataclass
class FabEnv:
    api: str
    bucket: str
    s3: Any
    other_bucket: str = field(default_factory=lambda: f"fab-other-{uuid.uuid4().hex[:8]}")
    runs: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    #: forged run -> the SHA-256 of the object its forgery names (no task wrote it).
    secrets: dict[str, str] = field(default_factory=dict)

    def get(self, path: str, user: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        return requests.get(f"{self.api}{path}", headers=headers, timeout=30, allow_redirects=False)

    def manifest_key(self, run: str) -> str:
        return "edits/manifest.json" if run == "edit" else f"flux/{self.runs[run]}/manifest.json"

    def manifest(self, run: str) -> dict[str, Any]:
        return json.loads(self.s3.get_object(Bucket=self.bucket, Key=self.manifest_key(run))["Body"].read())

    def put_json(self, key: str, value: Any, bucket: str | None = None) -> None:
        self.s3.put_object(Bucket=bucket or self.bucket, Key=key, Body=json.dumps(value).encode())


def _fab(args: list[str], env: dict[str, str], stdin: str = "", timeout: float = 240) -> str:
    out = subprocess.run(args, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args[:3]}: {out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def fab_env(airflow_db, dags, moto_server, tmp_path_factory) -> Any:
    work = tmp_path_factory.mktemp("fab")
    passwords = {user: f"{user}-pw-{uuid.uuid4().hex[:8]}" for user in [*ROLES, "admin"]}
    bucket = f"fab-{uuid.uuid4().hex[:10]}"
    s3 = moto_s3_client(moto_server)
    s3.create_bucket(Bucket=bucket)
    aws_conn = moto_aws_conn(moto_server)
    env = api_server_env(0, FAB_AUTH)
    _fab([str(AIRFLOW), "fab-db", "migrate"], env)
    _fab([sys.executable, "-c", _SETUP], env, stdin=json.dumps({"roles": ROLES, "passwords": passwords}))
    with FluxEmulator(queue_seconds=0.1, run_seconds=0.1, url_mode="fal") as emu, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(aws_conn))
        mp.setenv(
            "AIRFLOW_CONN_FLUX_DEFAULT", json.dumps({"conn_type": "flux", "host": emu.base_url, "password": TOKEN})
        )
        store_connection("aws_default", aws_conn)
        log = work / "api-server.log"
        proc, port = start_api_server(work, FAB_AUTH)
        fab = FabEnv(api=f"http://127.0.0.1:{port}", bucket=bucket, s3=s3)
        try:
            # carol's run last: the index shows the latest runs' images.
            for run in ("forged_xcom", "forged_prefix", "forged_bucket", "carol"):
                fab.runs[run] = run_dag(dags, prompt=f"fab {run} foxes", bucket=bucket)
            s3.put_object(Bucket=bucket, Key="inputs/fab-in.png", Body=png(64, 48, "#2d45d2"), ContentType="image/png")
            fab.runs["edit"] = run_dag(dags, EDIT, bucket=bucket, key="inputs/fab-in.png")
            proc, fab.api = healthy_api_server(work, FAB_AUTH, proc, fab.api)
            fab.tokens = api_tokens(fab.api, passwords)
            _forge(fab)
            yield fab
        except BaseException:
            print(f"\n----- api-server log -----\n{log.read_text(errors='replace')[-6000:]}")
            raise
        finally:
            stop(proc)
            delete_connection("aws_default")


def _pages(fab: FabEnv, dag_id: str, run: str) -> list[str]:
    """The run's pages and the first image's full size, thumbnail (and an edit's input)."""
    run_id = fab.runs[run]
    entry = next(e for e in fab.manifest(run)["images"] if e.get("run_id") == run_id)
    base = f"/flux-gallery/dags/{dag_id}/runs/{run_id}"
    paths = [f"/flux-gallery/dags/{dag_id}", base, f"{base}/images/{entry['sha256']}"]
    paths.append(f"{base}/images/{entry['sha256']}?size=thumb")
    if entry.get("inputs"):
        paths.append(f"{base}/images/{entry['sha256']}/inputs/0")
    return paths


def test_each_user_sees_only_the_dag_their_role_names(fab_env: FabEnv) -> None:
    fab = fab_env
    carol_pages, dave_pages = _pages(fab, TO_S3, "carol"), _pages(fab, EDIT, "edit")
    assert len(dave_pages) == 5, "the edit's input is served too"
    for path in carol_pages:
        assert fab.get(path, "carol").status_code == 200, path
        assert fab.get(path, "dave").status_code == 403, path
    for path in dave_pages:
        assert fab.get(path, "dave").status_code == 200, path
        assert fab.get(path, "carol").status_code == 403, path
    for path in carol_pages + dave_pages:
        assert fab.get(path, "admin").status_code == 200, path

    # The index: nothing of the other DAG, neither its name nor its prompts nor its images.
    carol_index, dave_index = fab.get("/flux-gallery/", "carol").text, fab.get("/flux-gallery/", "dave").text
    assert TO_S3 in carol_index and "fab carol foxes" in carol_index
    assert EDIT not in carol_index
    assert EDIT in dave_index
    assert TO_S3 not in dave_index and "fab carol foxes" not in dave_index


def test_a_user_who_may_not_read_xcoms_gets_no_images_or_prompts(fab_env: FabEnv) -> None:
    fab = fab_env
    for path in _pages(fab, TO_S3, "carol"):
        assert fab.get(path, "erin").status_code == 403, path
    index = html.unescape(fab.get("/flux-gallery/", "erin").text)
    # The DAG is listed (she may read it), its images and prompts are not.
    assert TO_S3 in index
    assert "Its images and prompts need read access to its runs and XComs." in index
    assert "fab carol foxes" not in index and "/images/" not in index


def _secret(fab: FabEnv, bucket: str, key: str) -> str:
    """An object the gallery's credentials can read that no task wrote; its SHA-256."""
    body = png(32, 32, "#101010")
    fab.s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="image/png")
    return hashlib.sha256(body).hexdigest()


def _forged_entry(fab: FabEnv, run: str, key: str, sha256: str) -> dict[str, Any]:
    """An entry as the run's copy task would have written it, naming ``key``."""
    real = next(e for e in fab.manifest(run)["images"] if e.get("run_id") == fab.runs[run])
    return {**real, "key": key, "sha256": sha256, "index": 99}


def _forge(fab: FabEnv) -> None:
    """What an attacker writes, before the api-server has read anything (it caches manifests).

    * ``forged_xcom``: a manifest elsewhere in the bucket listing an object no task wrote, and
      the copy task's XCom edited through the REST API to name it;
    * ``forged_prefix``: the task's own manifest with an entry for a key outside its prefix;
    * ``forged_bucket``: the task's own manifest naming another bucket, with a key under the
      task's prefix there.
    """
    run_id = fab.runs["forged_xcom"]
    fab.secrets["forged_xcom"] = secret = _secret(fab, fab.bucket, "secret/xcom.png")
    forged = fab.manifest("forged_xcom")
    forged["images"] = [_forged_entry(fab, "forged_xcom", "secret/xcom.png", secret)]
    fab.put_json("forged/manifest.json", forged)
    # Whoever may edit XComs (admin here) points the copy task's XCom at the forged manifest.
    resp = requests.patch(
        f"{fab.api}/api/v2/dags/{TO_S3}/dagRuns/{run_id}/taskInstances/to_s3/xcomEntries/flux_manifest",
        json={"value": f"s3://{fab.bucket}/forged/manifest.json", "map_index": -1},
        headers={"Authorization": f"Bearer {fab.tokens['admin']}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text

    fab.secrets["forged_prefix"] = secret = _secret(fab, fab.bucket, "secret/prefix.png")
    manifest = fab.manifest("forged_prefix")
    manifest["images"].append(_forged_entry(fab, "forged_prefix", "secret/prefix.png", secret))
    fab.put_json(fab.manifest_key("forged_prefix"), manifest)

    fab.s3.create_bucket(Bucket=fab.other_bucket)
    key = f"flux/{fab.runs['forged_bucket']}/secret.png"
    fab.secrets["forged_bucket"] = secret = _secret(fab, fab.other_bucket, key)
    manifest = fab.manifest("forged_bucket")
    manifest["bucket"] = fab.other_bucket
    manifest["images"] = [_forged_entry(fab, "forged_bucket", key, secret)]
    fab.put_json(fab.manifest_key("forged_bucket"), manifest)


def _run_page(fab: FabEnv, run: str) -> str:
    resp = fab.get(f"/flux-gallery/dags/{TO_S3}/runs/{fab.runs[run]}", "carol")
    assert resp.status_code == 200
    return html.unescape(resp.text)


def test_an_xcom_edited_to_name_another_manifest_is_refused(fab_env: FabEnv) -> None:
    fab = fab_env
    run_id, secret = fab.runs["forged_xcom"], fab.secrets["forged_xcom"]
    page = _run_page(fab, "forged_xcom")
    expected = f"s3://{fab.bucket}/flux/{run_id}/manifest.json"
    assert f"the XCom does not name the manifest this task wrote ({expected})" in page
    assert secret not in page
    base = f"/flux-gallery/dags/{TO_S3}/runs/{run_id}/images/{secret}"
    assert fab.get(base, "carol").status_code == 404
    assert fab.get(f"{base}?size=thumb", "carol").status_code == 404


def test_a_manifest_rewritten_to_list_a_key_outside_the_prefix_does_not_serve_it(fab_env: FabEnv) -> None:
    fab = fab_env
    run_id, secret = fab.runs["forged_prefix"], fab.secrets["forged_prefix"]
    page = _run_page(fab, "forged_prefix")
    assert f"1 entry outside the task's prefix (flux/{run_id}/) not shown" in page
    base = f"/flux-gallery/dags/{TO_S3}/runs/{run_id}/images"
    assert fab.get(f"{base}/{secret}", "carol").status_code == 404
    [real] = [e for e in fab.manifest("forged_prefix")["images"] if e.get("run_id") == run_id and e["sha256"] != secret]
    assert fab.get(f"{base}/{real['sha256']}", "carol").status_code == 200, "the task's own image still is"


def test_a_manifest_rewritten_to_name_another_bucket_is_refused(fab_env: FabEnv) -> None:
    fab = fab_env
    run_id, secret = fab.runs["forged_bucket"], fab.secrets["forged_bucket"]
    page = _run_page(fab, "forged_bucket")
    assert f"it names bucket '{fab.other_bucket}', not the task's ('{fab.bucket}')" in page
    assert fab.get(f"/flux-gallery/dags/{TO_S3}/runs/{run_id}/images/{secret}", "carol").status_code == 404
