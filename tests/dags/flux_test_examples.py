"""Example DAGs users copy (``dags/``), loaded into the test DAG folder so airflow's ``dag.test()`` runs them
in-process (it serializes what this folder's DagBag holds). Each keeps its own dag_id."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_EXAMPLES = Path(__file__).resolve().parents[2] / "dags"

for _name in ("flux2_product_shots",):
    _spec = importlib.util.spec_from_file_location(f"flux_example_{_name}", _EXAMPLES / f"{_name}.py")
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    globals().update({k: v for k, v in vars(_module).items() if not k.startswith("_") and k.islower()})
