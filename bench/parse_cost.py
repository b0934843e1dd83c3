"""Part 4 of issue #6: what the provider adds to DAG parsing.

A "zygote" interpreter imports ``airflow.sdk`` once (the DAG processor has it already),
calls ``gc.freeze()`` and forks one child per measurement, as the DAG processor does; the child imports the target (a module, or a DAG file
executed from its path the way the DAG processor loads it) and reports the time of that
step alone (``perf_counter``). Each target gets one untimed run first (bytecode caches),
then ``--runs`` timed runs, interleaved round-robin across targets so that background load
hits every target alike; the median is reported. ``--fresh`` measures in fresh
interpreters instead of forks (slow: ``import airflow.sdk`` costs seconds each time), to
cross-check the method. ``--breakdown`` names the costliest new imports of each target
(``python -X importtime``, one fresh interpreter per target).

For each DAG file, the share of its own ``airflow_flux`` imports is measured too: the same
file with the ``airflow_flux`` modules it imports already loaded; the difference is what the
provider's modules cost that file (the rest is Airflow's own lazily imported parts, e.g.
timetables and ``@task``, plus the file's own code).

For comparison: the building blocks of the hand-built alternative (the http provider's
operator and sensor, and amazon's ``HttpToS3Operator``) and fal's own client if installed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

GOAL_MS = 50.0
DAG_FACING = ["airflow_flux.operators", "airflow_flux.sensors", "airflow_flux.transfers"]
ALTERNATIVES = [
    "airflow.providers.http.operators.http,airflow.providers.http.sensors.http",
    "airflow.providers.http.operators.http,airflow.providers.http.sensors.http,"
    "airflow.providers.amazon.aws.transfers.http_to_s3",
    "fal_client",
]
EXAMPLE_DIRS = ["dags", "tests/dags", "tests/system/dags"]

# argv[1]: JSON list of [target, [modules to load untimed first]]; argv[2]: timed runs.
ZYGOTE = r"""
import gc, importlib, importlib.util, json, os, sys, time
import airflow.sdk
gc.freeze()  # as the DAG processor does before it forks parsers (no copy-on-write storm)

def measure(target, preload):
    for name in preload:
        importlib.import_module(name)
    t = time.perf_counter()
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location("bench_dag_file", target)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_dag_file"] = mod
        spec.loader.exec_module(mod)
    else:
        for name in target.split(","):
            importlib.import_module(name)
    return time.perf_counter() - t

def forked(target, preload):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = repr(measure(target, preload))
        except BaseException as exc:
            out = "ERR " + type(exc).__name__ + ": " + str(exc)
        os.write(w, out.encode()[:4000])
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    if text.startswith("ERR"):
        raise SystemExit(f"{target}: {text}")
    return float(text)

jobs, runs = json.loads(sys.argv[1]), int(sys.argv[2])
if sys.argv[3] == "fresh":
    print(json.dumps([measure(t, p) for t, p in jobs]))
    raise SystemExit
for target, preload in jobs:
    forked(target, preload)  # untimed: writes __pycache__
results = [[] for _ in jobs]
for _ in range(runs):
    for i, (target, preload) in enumerate(jobs):
        results[i].append(forked(target, preload))
print(json.dumps(results))
"""


def example_files() -> list[Path]:
    files: list[Path] = []
    for folder in EXAMPLE_DIRS:
        path = common.REPO / folder
        if path.is_dir():
            files += sorted(p for p in path.glob("*.py") if p.name != "__init__.py")
    return files


def provider_imports(path: Path) -> list[str]:
    """The airflow_flux modules a DAG file imports (read from its source, not run)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "airflow_flux":
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "airflow_flux"]
    return sorted(set(names))


def available(target: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in target.split(","))


def run_zygote(jobs: list[tuple[str, list[str]]], runs: int, env: dict[str, str], mode: str) -> list[list[float]]:
    proc = subprocess.run(
        [sys.executable, "-c", ZYGOTE, json.dumps(jobs), str(runs), mode],
        env=env,
        capture_output=True,
        text=True,
        cwd=common.REPO,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measuring failed:\n{proc.stdout[-1000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(jobs: list[tuple[str, list[str]]], runs: int, env: dict[str, str], fresh: bool) -> list[list[float]]:
    if not fresh:
        return run_zygote(jobs, runs, env, "fork")
    run_zygote(jobs, 1, env, "fresh")  # untimed
    results: list[list[float]] = [[] for _ in jobs]
    for _ in range(runs):
        for i, job in enumerate(jobs):
            results[i] += run_zygote([job], 1, env, "fresh")
    return results


def breakdown(target: str, env: dict[str, str], top: int = 5) -> str:
    """The costliest modules newly imported by ``target`` (cumulative, top level)."""
    code = (
        "import sys, importlib, importlib.util\nimport airflow.sdk\nsys.stderr.write('@@MARK@@\\n')\n"
        f"t = {target!r}\n"
        "if t.endswith('.py'):\n"
        "    s = importlib.util.spec_from_file_location('bench_dag_file', t)\n"
        "    m = importlib.util.module_from_spec(s); sys.modules['bench_dag_file'] = m; s.loader.exec_module(m)\n"
        "else:\n"
        "    [importlib.import_module(n) for n in t.split(',')]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=common.REPO,
        check=False,
    )
    entries = []
    for line in proc.stderr.split("@@MARK@@", 1)[-1].splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:") :].split("|")
        try:
            cum_us = int(parts[1])
        except ValueError:
            continue
        name = parts[2].rstrip()
        entries.append((cum_us, (len(name) - len(name.lstrip())) // 2, name.strip()))
    if not entries:
        return "nothing new imported"
    depth = min(e[1] for e in entries)
    tops = sorted((e for e in entries if e[1] == depth and e[2] != "gc"), reverse=True)[:top]
    return ", ".join(f"{name} {cum / 1000:.0f}" for cum, _, name in tops)


def label(target: str) -> str:
    if target.endswith(".py"):
        return f"DAG file `{Path(target).relative_to(common.REPO)}`"
    return "`import " + ", ".join(target.split(",")) + "`"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per target (median reported)")
    parser.add_argument("--quick", action="store_true", help="7 runs per target")
    parser.add_argument("--fresh", action="store_true", help="fresh interpreters instead of forks (slow)")
    parser.add_argument("--breakdown", action="store_true", help="name the costliest imports of each target")
    parser.add_argument("--json", help="also write the raw timings to this file")
    args = parser.parse_args()
    if args.quick:
        args.runs = 7

    env = common.airflow_env(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO), env.get("PYTHONPATH", "")]))
    common.print_header("Parse cost over `import airflow.sdk` (issue #6, part 4)")
    started = time.monotonic()

    modules = ["airflow_flux"] + [m for m in DAG_FACING if available(m)]
    modules.append(",".join(modules[1:]))
    files = example_files()
    alternatives = [a for a in ALTERNATIVES if available(a)]
    missing = [a for a in ALTERNATIVES if a not in alternatives]

    jobs: list[tuple[str, list[str]]] = [(m, []) for m in modules]
    for f in files:
        jobs.append((str(f), []))
        jobs.append((str(f), provider_imports(f)))  # the same file, provider already loaded
    jobs += [(a, []) for a in alternatives]
    timings = measure(jobs, args.runs, env, args.fresh)
    ms = {(t, tuple(p)): [1000 * x for x in runs] for (t, p), runs in zip(jobs, timings, strict=True)}

    def med(target: str, preload: list[str] | tuple[str, ...] = ()) -> float:
        return common.median(ms[(target, tuple(preload))]) or 0.0

    reference = med(alternatives[0]) if alternatives else None
    rows = []
    for target in [*modules, *(str(f) for f in files), *alternatives]:
        runs = ms[(target, ())]
        is_alt = target in alternatives
        own = "-"
        if target.endswith(".py"):
            without = med(target, provider_imports(Path(target)))
            own = f"{med(target) - without:.1f}"
        row = [
            label(target) + (" (alternative)" if is_alt else ""),
            f"{med(target):.1f}",
            f"{min(runs):.1f}-{max(runs):.1f}",
            own,
            common.ratio(med(target), reference, 2),
            "-" if is_alt else ("met" if med(target) <= GOAL_MS else "MISSED"),
        ]
        if args.breakdown:
            row.append(breakdown(target, env))
        rows.append(row)
    headers = [
        "target",
        "median ms",
        "min-max ms",
        "of which airflow_flux imports, ms",
        "vs http operator+sensor imports",
        f"goal <= {GOAL_MS:g} ms",
    ]
    if args.breakdown:
        headers.append("costliest new imports, ms (-X importtime)")
    if not files:
        print("No DAG files found in " + ", ".join(EXAMPLE_DIRS) + ".\n")
    print(common.md_table(headers, rows))
    method = "fresh interpreters" if args.fresh else "forks of an interpreter that has imported airflow.sdk"
    print(
        f"\nMedian of {args.runs} runs per row ({method}), after one untimed run (bytecode cached); "
        "`import airflow.sdk` itself is not included."
    )
    if missing:
        print(f"Not installed, not measured: {', '.join(missing)}.")
    print(f"\nLoad average at the end: {common.load_average()}; wall time {time.monotonic() - started:.0f} s.")
    print(f"\nCommand: `{common.command_line()}`")
    common.dump_json(
        args.json,
        {
            "facts": common.machine_facts(),
            "args": vars(args),
            "timings_ms": {f"{t} | {p}": v for (t, p), v in ms.items()},
        },
    )


if __name__ == "__main__":
    main()
