"""Run one DAG of ``dags/`` with ``dag.test()`` in this process and write what happened as JSON.

Started by :mod:`demo.run_demo` as ``python -m demo.pipeline`` with the whole Airflow
environment already set (a temporary ``AIRFLOW_HOME``, ``AIRFLOW__CORE__DAGS_FOLDER`` =
the repo's ``dags/``, connections as ``AIRFLOW_CONN_*``), because Airflow reads its
configuration when first imported. ``dag.test()`` runs the deferred waits' triggers in
line, in this process. Exit code 0 when the run succeeded, 1 when it failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: Tasks whose XCom the summary reads: the prompts, and the results with ``waited_seconds``.
XCOM_TASKS = ("load_prompts", "wait", "generate")


def run(dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    if not os.environ.get("AIRFLOW_HOME") or "airflow" in sys.modules:
        raise RuntimeError("demo.pipeline must start with AIRFLOW_HOME set and airflow not yet imported")
    started = time.monotonic()
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]
    from airflow.utils import db

    print("demo: creating the metadata database", flush=True)
    db.initdb()
    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        return {"state": "import_error", "import_errors": {str(k): v for k, v in bag.import_errors.items()}}
    dag = bag.get_dag(dag_id)
    if dag is None:
        return {"state": "missing", "import_errors": {}, "dags": sorted(bag.dag_ids)}
    print(f"demo: running {dag_id} with dag.test()", flush=True)
    dr = dag.test(run_conf=conf or None)  # returns the DagRun; does not raise on failure
    tis = sorted(dr.get_task_instances(), key=lambda ti: (ti.task_id, ti.map_index))
    return {
        "state": str(dr.state),
        "dag_id": dag_id,
        "run_id": dr.run_id,
        "task_instances": [_ti_info(ti) for ti in tis],
        "seconds": round(time.monotonic() - started, 1),
    }


def _ti_info(ti: Any) -> dict[str, Any]:
    """A task instance as the REST API shows it, plus the XCom the summary needs."""
    info: dict[str, Any] = {
        "task_id": ti.task_id,
        "map_index": ti.map_index,
        "state": str(ti.state),
        "start_date": ti.start_date.isoformat() if ti.start_date else None,
        "end_date": ti.end_date.isoformat() if ti.end_date else None,
    }
    if ti.state == "success" and ti.task_id in XCOM_TASKS:
        info["return_value"] = ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.pipeline", description=__doc__)
    parser.add_argument("--dag-id", default="flux_content_pipeline")
    parser.add_argument("--conf", default="{}", help="the run's conf (params), JSON")
    parser.add_argument("--result", required=True, type=Path, help="where to write the outcome (JSON)")
    args = parser.parse_args(argv)
    outcome = run(args.dag_id, json.loads(args.conf))
    args.result.write_text(json.dumps(outcome, indent=2))
    return 0 if outcome["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
