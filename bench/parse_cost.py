"""Part 4 of issue #6: what the provider adds to DAG parsing.

For each target, a fresh interpreter imports ``airflow.sdk`` (the DAG processor has it
already) and then the target: a module, or a DAG file executed from its path the way the DAG
processor loads it. The figure is the time of the second step alone (``perf_counter`` around
it), median over ``--runs`` runs after one untimed run that writes the bytecode caches.
``--breakdown`` adds the modules that cost most in that step (from ``python -X importtime``).

For comparison, the same is measured for the building blocks of the hand-built alternative
(the http provider's operator and sensor, and amazon's ``HttpToS3Operator``) and for
fal's own client if it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

GOAL_MS = 50.0

PROVIDER_MODULES = [
    "airflow_flux",
    "airflow_flux.operators",
    "airflow_flux.sensors",
    "airflow_flux.operators, airflow_flux.sensors",
]
ALTERNATIVES = [
    "airflow.providers.http.operators.http, airflow.providers.http.sensors.http",
    "airflow.providers.http.operators.http, airflow.providers.http.sensors.http, "
    "airflow.providers.amazon.aws.transfers.http_to_s3",
    "fal_client",
]
EXAMPLE_DIRS = ["dags", "tests/dags", "tests/system/dags"]

CHILD = r"""
import importlib, importlib.util, json, sys, time
target = sys.argv[1]
t0 = time.perf_counter()
import airflow.sdk
t1 = time.perf_counter()
sys.stderr.write("@@MARK@@\n"); sys.stderr.flush()
if target.endswith(".py"):
    spec = importlib.util.spec_from_file_location("bench_dag_file", target)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_dag_file"] = mod
    spec.loader.exec_module(mod)
else:
    for name in target.split(","):
        importlib.import_module(name.strip())
t2 = time.perf_counter()
print(json.dumps({"sdk": t1 - t0, "delta": t2 - t1}))
"""


def example_files() -> list[Path]:
    files: list[Path] = []
    for folder in EXAMPLE_DIRS:
        path = common.REPO / folder
        if path.is_dir():
            files += sorted(p for p in path.glob("*.py") if p.name != "__init__.py")
    return files


def available(module: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m.strip()) is not None for m in module.split(","))


def run_child(target: str, env: dict[str, str], importtime: bool = False) -> tuple[dict[str, float], str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", CHILD, target]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=common.REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"importing {target} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def breakdown(stderr: str, top: int = 6) -> str:
    """The costliest modules (cumulative, top level of what the target pulled in)."""
    lines = stderr.split("@@MARK@@", 1)[-1].splitlines()
    entries = []
    for line in lines:
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:") :].split("|")
        try:
            self_us, cum_us = int(parts[0]), int(parts[1])
        except ValueError:
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        entries.append((cum_us, self_us, depth, name.strip()))
    if not entries:
        return "nothing new imported"
    min_depth = min(e[2] for e in entries)
    tops = sorted((e for e in entries if e[2] == min_depth), reverse=True)[:top]
    return ", ".join(f"{name} {cum / 1000:.0f} ms" for cum, _, _, name in tops)


def label(target: str) -> str:
    path = Path(target)
    if target.endswith(".py"):
        return f"DAG file `{path.relative_to(common.REPO)}`"
    return f"`import {target}`"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="timed runs per target (median reported)")
    parser.add_argument("--quick", action="store_true", help="5 runs per target")
    parser.add_argument("--breakdown", action="store_true", help="name the costliest imports of each target")
    parser.add_argument("--json", help="also write the raw timings to this file")
    args = parser.parse_args()
    if args.quick:
        args.runs = 5

    env = common.airflow_env(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO), env.get("PYTHONPATH", "")]))
    common.print_header("Parse cost over `import airflow.sdk` (issue #6, part 4)")
    started = time.monotonic()

    files = example_files()
    if not (common.REPO / "dags").is_dir() or not list((common.REPO / "dags").glob("*.py")):
        print("No example DAGs in `dags/` yet: the test and system DAGs stand in for them.\n")
    targets = [*PROVIDER_MODULES, *(str(f) for f in files)]
    alternatives = [a for a in ALTERNATIVES if available(a)]
    missing = [a for a in ALTERNATIVES if a not in alternatives]

    results = {}
    for target in [*targets, *alternatives]:
        run_child(target, env)  # untimed: writes __pycache__
        timings = [run_child(target, env)[0] for _ in range(args.runs)]
        deltas = [t["delta"] * 1000 for t in timings]
        results[target] = {
            "median_ms": common.median(deltas),
            "min_ms": min(deltas),
            "max_ms": max(deltas),
            "sdk_ms": common.median([t["sdk"] * 1000 for t in timings]),
            "runs": deltas,
        }
        if args.breakdown:
            results[target]["breakdown"] = breakdown(run_child(target, env, importtime=True)[1])

    http_chain = results.get(ALTERNATIVES[0], {}).get("median_ms")
    rows = []
    for target in [*targets, *alternatives]:
        r = results[target]
        is_alt = target in alternatives
        row = [
            label(target) + (" (alternative)" if is_alt else ""),
            f"{r['median_ms']:.1f}",
            f"{r['min_ms']:.1f}-{r['max_ms']:.1f}",
            common.ratio(r["median_ms"], http_chain, 2),
            "-" if is_alt else ("met" if r["median_ms"] <= GOAL_MS else "MISSED"),
        ]
        if args.breakdown:
            row.append(r["breakdown"])
        rows.append(row)
    headers = ["target", "median ms", "min-max ms", "vs http operator+sensor", f"goal <= {GOAL_MS:g} ms"]
    if args.breakdown:
        headers.append("costliest new imports (-X importtime, cumulative)")
    print(common.md_table(headers, rows))
    sdk = common.median([r["sdk_ms"] for r in results.values()])
    print(
        f"\nMedian of {args.runs} fresh interpreters per row, after one untimed run (bytecode cached); "
        f"`import airflow.sdk` itself took {sdk:.0f} ms (median) and is not included."
    )
    if missing:
        print(f"Not installed, not measured: {', '.join(missing)}.")
    print(f"\nLoad average at the end: {common.load_average()}; wall time {time.monotonic() - started:.0f} s.")
    print(f"\nCommand: `{common.command_line()}`")
    common.dump_json(args.json, {"facts": common.machine_facts(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
