"""The wheel, as a user installs it: built from the source tree, installed (not editable) into
a fresh venv with the runtime dependencies only, and the example DAGs parsed there.

A runtime import that is not a declared dependency (a test or demo package, Pillow outside
its extra) fails here. The venv gets the versions this one has (a constraints file from
``uv pip freeze``), so the test checks the wheel and its declared dependencies, not a new
resolution; ``make test-compat`` installs wheels beside other Airflow releases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import uv

from tests.helpers import REPO

PARSE = """
import json, sys
import airflow_flux
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:  # Airflow 3.1
    from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print("RESULT=" + json.dumps({
    "package": airflow_flux.__file__,
    "errors": {k: str(v)[-400:] for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dag_ids),
}))
"""


def _run(*args: object, cwd: object = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_wheel_installs_in_a_fresh_venv_and_the_example_dags_parse(tmp_path):
    uv_bin = uv.find_uv_bin()
    _run(uv_bin, "build", "-q", "--wheel", "-o", tmp_path / "dist", REPO)
    (wheel,) = (tmp_path / "dist").glob("airflow_flux-*.whl")

    freeze = _run(uv_bin, "pip", "freeze", "-p", sys.executable, "--exclude-editable")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(line for line in freeze.splitlines() if not line.startswith("airflow-flux")))
    venv = tmp_path / "venv"
    _run(uv_bin, "venv", "-q", "-p", sys.executable, venv)
    python = venv / "bin" / "python"
    _run(uv_bin, "pip", "install", "-q", "-p", python, "-c", constraints, wheel)

    # The DAGs alone, away from the source tree: only the installed package can be imported.
    dags = shutil.copytree(REPO / "dags", tmp_path / "dags")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON"))}
    env |= {"AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = _run(python, "-c", PARSE, dags, cwd=tmp_path, env=env)
    (line,) = [line for line in out.splitlines() if line.startswith("RESULT=")]
    result = json.loads(line.removeprefix("RESULT="))

    assert result["package"].startswith(str(venv)), result["package"]  # the wheel's copy, not the source
    assert result["errors"] == {}
    assert result["dags"] == [
        "flux2_product_shots",
        "flux_batch_pipeline",
        "flux_content_pipeline",
        "flux_edit_from_s3",
        "flux_generate_one_task",
        "flux_kontext_to_s3",
        "flux_review_and_publish",
    ]
    installed = _run(uv_bin, "pip", "list", "-p", python, "--format", "json")
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "pillow" not in names and "moto" not in names and "pytest" not in names  # extras stay out
