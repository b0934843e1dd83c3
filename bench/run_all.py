"""Run the benchmarks (issue #6's four parts and #14's batch part) and rewrite bench/RESULTS.md from what they measured.

Each part runs as its own process (``bench/<part>.py --json ...``), one after another so no
part loads the machine while another measures. Its printed report (tables, goal checks, the
exact command) goes into RESULTS.md as printed; the goal checks it records in its JSON make
the summary at the top. Raw figures stay in ``bench/results/`` (not committed).

    .venv/bin/python bench/run_all.py            # what `make bench` runs (about 20 minutes)
    .venv/bin/python bench/run_all.py --quick    # every part in its quick form (about 2 minutes)
    .venv/bin/python bench/run_all.py --only detection parse_cost
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

HERE = Path(__file__).resolve().parent
PARTS = (
    ("detection", "1. API calls and detection delay per generation"),
    ("trigger_scale", "2. Many waits in one triggerer loop"),
    ("transfer", "3. Copying the images to S3"),
    ("parse_cost", "4. Parse cost of the DAG files"),
    ("batch", "5. Batch generation on a real Airflow"),
)


def run_part(name: str, quick: bool, results: Path) -> dict[str, Any]:
    """Run one part, echoing its output; returns its report, figures and wall time."""
    json_path = results / f"{name}.json"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", str(json_path.relative_to(common.REPO))]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, "FLUX_BENCH_EMBEDDED": "1"}
    started = time.monotonic()
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
    wall = time.monotonic() - started
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    return {
        "name": name,
        "returncode": proc.returncode,
        "wall_s": wall,
        "report": "".join(lines),
        "goals": data.get("goals", []),
    }


def _report_body(report: str) -> str:
    """The part's printed report without its own '## title' line (RESULTS.md gives its own)."""
    lines = report.strip().splitlines()
    if lines and lines[0].startswith("## "):
        lines = lines[1:]
    # Headings inside a part go one level down under the part's heading.
    return "\n".join("#" + line if line.startswith("### ") else line for line in lines).strip()


def render(parts: list[dict[str, Any]], facts: dict[str, str], started: str, total_s: float, quick: bool) -> str:
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "airflow_flux", "bench", "dags", ":!bench/RESULTS.md"],
        cwd=common.REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    titles = dict(PARTS)
    out = [
        "# Benchmarks (issue #6): the provider against the obvious alternatives",
        "",
        f"Written by `{common.command_line()}` (what `make bench` runs). Every figure below is from that one",
        "run; do not edit by hand, run it again. Investigations that go beyond one run (what-if variants,",
        "tracemalloc and cProfile breakdowns, before/after comparisons) are in [ANALYSIS.md](ANALYSIS.md),",
        "each with its own command.",
        "",
        "| | |",
        "|---|---|",
        f"| Date | {started} |",
        f"| Machine | {facts['cpu']}, {facts['memory']} RAM, {facts['os']} |",
        f"| Software | Python {facts['python']}, apache-airflow {facts['airflow']}, http provider "
        f"{facts['http provider']}, amazon provider {common._version('apache-airflow-providers-amazon')}, "
        f"aiohttp {facts['aiohttp']}, boto3 {common._version('boto3')}, moto {common._version('moto')} |",
        f"| Code | commit `{sha}`{' with uncommitted changes' if dirty else ''} |",
        f"| Load average (1/5/15 min) | {facts['load average (1/5/15 min)']} at the start, "
        f"{common.load_average()} at the end |",
        f"| Wall time | {total_s / 60:.1f} min"
        + ("" if not parts else ": " + ", ".join(f"{p['name']} {p['wall_s']:.0f} s" for p in parts))
        + (" (`--quick`: reduced sizes, not the issue's figures)" if quick else "")
        + " |",
        "",
        "Set-up common to every part: the fal-queue emulator (`python -m airflow_flux.emulator`) and the moto S3",
        "server run in their own processes; every contender of a comparison runs in the same run against the",
        "same servers; ratios are against the provider's figure unless a row says otherwise.",
        "",
        "## Goals at a glance",
        "",
        common.md_table(
            ["part", "goal", "measured", "verdict"],
            [
                [titles[p["name"]].split(" ", 1)[0].rstrip("."), g["goal"], g["measured"], _verdict(g)]
                for p in parts
                for g in p["goals"]
            ],
        ),
        "",
    ]
    failed = [p["name"] for p in parts if p["returncode"] != 0]
    if failed:
        out += [f"**Failed parts: {', '.join(failed)}** (exit code non-zero; their output is below).", ""]
    for p in parts:
        out += [f"## {titles[p['name']]}", "", _report_body(p["report"]), ""]
    return "\n".join(out).rstrip() + "\n"


def _verdict(g: dict[str, Any]) -> str:
    verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "**missed**")
    return f"{verdict}: {g['note']}" if g.get("note") else verdict


#: What follows this line in RESULTS.md is not this script's (see main).
KEPT_MARKER = "<!-- kept by run_all.py: runs of their own below -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every part's --quick form (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in PARTS], help="run only these parts")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="the report to (re)write")
    parser.add_argument("--results", default=str(HERE / "results"), help="where the raw JSON goes")
    args = parser.parse_args()
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    facts = common.machine_facts()
    started_at = facts["date"]
    t0 = time.monotonic()
    parts = [run_part(name, args.quick, results) for name, _ in PARTS if not args.only or name in args.only]
    total = time.monotonic() - t0
    report = render(parts, facts, started_at, total, args.quick)
    # Figures too long for one run (batch_scale.py's hours) follow the marker, each with its
    # own command and date; a rerun keeps them.
    previous = Path(args.output).read_text() if Path(args.output).exists() else ""
    if KEPT_MARKER in previous:
        report += "\n" + previous[previous.index(KEPT_MARKER) :]
    Path(args.output).write_text(report)
    print(f"\nWrote {args.output} ({total / 60:.1f} min).")
    sys.exit(1 if any(p["returncode"] for p in parts) else 0)


if __name__ == "__main__":
    main()
