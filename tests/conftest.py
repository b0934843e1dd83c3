"""Test setup shared by the whole suite.

Airflow reads its configuration at import time, so the environment is set here, at
module top, before anything imports airflow: a throw-away AIRFLOW_HOME (never the
user's ~/airflow), the repo's dags/ folder, no example DAGs.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="airflow-flux-tests-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
# dag.test() re-parses the DAG folder: test DAGs live at module level in tests/dags/.
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(_REPO / "tests" / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"

import pytest  # noqa: E402

from airflow_flux.emulator import FluxEmulator  # noqa: E402
from tests.helpers import TOKEN, moto_aws_conn, moto_s3_client, start_moto_server  # noqa: E402

_conn_ids = itertools.count()


@pytest.fixture
def emulator():
    """A real fal queue emulator on a free loopback port, with short queue/run times."""
    with FluxEmulator(queue_seconds=0.2, run_seconds=0.3, url_mode="fal", ping_interval=0.5) as emu:
        yield emu


@pytest.fixture
def make_flux_conn(monkeypatch):
    """Create a ``flux`` connection (as an env var) and return its id.

    Every call gets a fresh id, so no connection cache can hand a test another test's settings.
    """

    def make(base_url: str, *, token: str | None = TOKEN, conn_id: str | None = None, **extra) -> str:
        conn_id = conn_id or f"flux_test_{next(_conn_ids)}"
        conn = {"conn_type": "flux", "host": base_url, "extra": extra}
        if token is not None:
            conn["password"] = token
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
        return conn_id

    return make


@pytest.fixture
def flux_conn(emulator, make_flux_conn) -> str:
    """A connection to the emulator, aggregator style (Bearer, URLs re-based)."""
    return make_flux_conn(emulator.base_url)


@pytest.fixture(scope="session")
def airflow_db():
    """A fresh metadata DB (SQLite in the temporary AIRFLOW_HOME) for dag.test() runs."""
    from airflow.utils import db

    db.initdb()


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 protocol server (moto) in its own process, so its memory and CPU are not ours."""
    # Its request recorder (tests that check what reached S3) writes here, not into the repo.
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": os.path.join(_AIRFLOW_HOME, "moto_recording")}
    proc, url = start_moto_server(env)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A fresh bucket on the moto server, and ``aws_default`` pointing at it."""
    import uuid

    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(moto_aws_conn(moto_server)))
    client = moto_s3_client(moto_server)
    bucket = f"flux-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket  # type: ignore[attr-defined]
    return client


@pytest.fixture
def flux_default(emulator, monkeypatch) -> FluxEmulator:
    """Point ``flux_default`` (the test DAGs' connection) at this test's emulator."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_FLUX_DEFAULT", json.dumps({"conn_type": "flux", "host": emulator.base_url, "password": TOKEN})
    )
    return emulator


class FreshDags:
    """The test DAGs of tests/dags, a new DAG object for each :meth:`get_dag` call.

    A run must not see another run's conf: ``dag.test(run_conf=...)`` writes the conf into the
    ``Param`` objects of the DAG it runs (``process_params`` updates a dict that shares them),
    so a DAG object shared between tests hands one test's conf to the next as its defaults.
    """

    def get_dag(self, dag_id: str):
        from tests.helpers import dag_bag

        bag = dag_bag(str(_REPO / "tests" / "dags"))
        assert not bag.import_errors, bag.import_errors
        dag = bag.get_dag(dag_id)
        assert dag is not None, f"no DAG {dag_id!r} in tests/dags"
        return dag


@pytest.fixture(scope="session")
def dags() -> FreshDags:
    """The test DAGs of tests/dags, parsed anew for each ``get_dag`` (dag.test() re-syncs them to the DB)."""
    return FreshDags()
