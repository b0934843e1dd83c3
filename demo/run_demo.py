"""``make demo``: run ``flux_content_pipeline`` on this machine and show the images it made.

    python -m demo.run_demo [--output demo-output] [--prompt TEXT ...] [--real] [--verbose]

1. starts the fal queue emulator and a moto S3 server on free 127.0.0.1 ports (child
   processes in their own sessions), and creates the bucket ``flux-demo``;
2. runs the repo's ``dags/flux_content_pipeline.py`` with ``dag.test()`` in a child
   process whose environment holds everything: a temporary ``AIRFLOW_HOME``, the
   ``flux_default`` and ``aws_default`` connections and the bucket Variable as
   environment variables (nothing is written to your own Airflow);
3. reads the run's ``manifest.json`` back from S3, checks every image (size, SHA-256,
   decodes it) and writes it to ``./demo-output/`` (emptied first: each run replaces the
   previous run's images), with ``summary.json``;
4. prints the summary (which, on the emulator, says its images are labelled placeholders
   and how to run the same DAG on the real API) and stops every process it started, also
   on Ctrl-C or SIGTERM.

Exit code 0 only if every image landed; 1 if not; 2 for a setup problem; 130 after Ctrl-C.

``FLUX_DEMO_REAL=1`` (or ``--real``) sends the prompts to the real API instead of the
emulator: ``FLUX_API_TOKEN`` (required), ``FLUX_API_BASE`` (default
``https://queue.fal.run``, fal direct with ``Key`` auth; an aggregator's URL gets
``Bearer``), ``FLUX_API_AUTH`` (``Key``/``Bearer``, to override). S3 stays local.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if __package__ in (None, ""):  # run as a script: python demo/run_demo.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.services import (
    BIN,
    DEMO_BUCKET,
    REPO,
    ApiTarget,
    DemoError,
    LocalServices,
    ProcessGroup,
    signals_raise,
    tail,
)
from demo.summary import Summary, prepare_output, summarize

if TYPE_CHECKING:
    from collections.abc import Sequence

DAG_ID = "flux_content_pipeline"
DEFAULT_OUTPUT = REPO / "demo-output"
#: Emulator timings of the demo: short, but long enough for the waits to defer.
QUEUE_SECONDS = 1.0
RUN_SECONDS = 3.0
PIPELINE_TIMEOUT = 600.0

# Lines of the pipeline's log shown as progress: (pattern on the message, shown as).
_LOG_LINE = re.compile(r"^\S+ \[(?P<level>\w+)\s*\] (?P<msg>.*?)(?:\s+\[(?P<logger>[\w.]+)\](?: .*)?)?$")
_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(?P<task>\S+) map_index=(?P<index>-?\d+)")
_PROGRESS = (
    re.compile(r"^Submitted FLUX request \S+$"),
    re.compile(r"^Reusing request .*"),
    re.compile(r"^FLUX request \S+ is \w+"),
    re.compile(r"^FLUX request \S+ completed: .*"),
    re.compile(r"^Pausing task as DEFERRED"),
    re.compile(r"^Copying \d+ image.*"),
    re.compile(r"^Copied s3://.*"),
    re.compile(r"^Wrote manifest .*"),
    re.compile(r"^FLUX API call failed.*"),
    re.compile(r"^Task failed.*|.*Marking task as (FAILED|UP_FOR_RETRY).*"),
)


class _Progress:
    """Turns the pipeline's log into a few readable lines (the whole log goes to a file)."""

    def __init__(self, out: TextIO, verbose: bool) -> None:
        self.out = out
        self.verbose = verbose
        self.started = time.monotonic()
        self.task = ""
        self.last = ""

    def feed(self, line: str) -> None:
        if self.verbose:
            self.out.write(line + "\n")
            self.out.flush()
            return
        if line.startswith("demo: "):
            self._say(line[len("demo: ") :])
            return
        match = _LOG_LINE.match(line)
        if not match:
            return
        msg, level = match["msg"], match["level"]
        if started := _TASK_START.search(msg):
            index = int(started["index"])
            self.task = started["task"] + (f"[{index}]" if index >= 0 else "")
            return
        if msg.startswith("Done. Returned value was: ["):
            if self.task == "load_prompts":
                try:
                    msg = f"{len(ast.literal_eval(msg.split(': ', 1)[1]))} prompt(s) loaded"
                except (ValueError, SyntaxError):
                    msg = "prompts loaded"
                self._say(f"{self.task:<10} {msg}")
            return
        if msg.startswith("XCom not found"):
            # Logged as errors by Airflow's client but harmless here: a lazy XCom sequence
            # probing one item past its end (the transfer reading the mapped results), and
            # an extra link looking for a result while its task defers. A missing XCom that
            # matters fails its task, and that is shown.
            return
        if level in ("error", "critical") or any(p.match(msg) for p in _PROGRESS):
            if msg.startswith("Pausing task as DEFERRED"):
                msg = "deferred: the wait continues in the triggerer"
            text = f"{self.task:<10} {msg[:160]}"
            if text != self.last:  # the sensor's first check and the trigger both say IN_PROGRESS
                self._say(text)
                self.last = text

    def _say(self, text: str) -> None:
        self.out.write(f"  {time.monotonic() - self.started:6.1f}s  {text}\n")
        self.out.flush()


def run_demo(
    output_dir: Path | str = DEFAULT_OUTPUT,
    *,
    real: bool = False,
    prompts: Sequence[str] | None = None,
    queue_seconds: float = QUEUE_SECONDS,
    run_seconds: float = RUN_SECONDS,
    keep: bool = False,
    verbose: bool = False,
    out: TextIO | None = None,
) -> Summary:
    """Run ``flux_content_pipeline`` against the emulator (or the real API) and a local S3.

    Returns the :class:`~demo.summary.Summary`; ``summary.ok`` is true only if every image
    landed in S3 and in ``output_dir``. Every process started here is stopped before this
    returns or raises (KeyboardInterrupt included).
    """
    out = out or sys.stdout
    output_dir = Path(output_dir).resolve()
    started = time.monotonic()
    api = ApiTarget.from_env() if real else None  # fails fast without a token
    prepare_output(output_dir)
    work = Path(tempfile.mkdtemp(prefix="flux-demo-"))
    procs = ProcessGroup(work)
    services = LocalServices(procs)
    discard = False  # the temporary folder goes unless something failed (or --keep)
    try:
        with signals_raise():
            try:
                summary = _run(
                    services, procs, work, api, output_dir, prompts, queue_seconds, run_seconds, verbose, out
                )
                summary.seconds = round(time.monotonic() - started, 1)
                discard = summary.ok
                return summary
            except (KeyboardInterrupt, SystemExit):
                discard = True  # stopped on purpose: nothing to investigate
                raise
            finally:
                procs.stop()
                out.write(f"Stopped {len(procs.procs)} process(es) the demo started.\n")
    finally:
        if discard and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            out.write(f"Logs and the temporary Airflow home are kept in {work}\n")


def _run(
    services: LocalServices,
    procs: ProcessGroup,
    work: Path,
    api: ApiTarget | None,
    output_dir: Path,
    prompts: Sequence[str] | None,
    queue_seconds: float,
    run_seconds: float,
    verbose: bool,
    out: TextIO,
) -> Summary:
    def say(what: str, where: str, note: str) -> None:
        out.write(f"{what:<20} {where}" + (f"  ({note})" if note else "") + "\n")

    mode = services.start(api, bucket=DEMO_BUCKET, queue_seconds=queue_seconds, run_seconds=run_seconds, say=say)

    home = work / "airflow_home"
    home.mkdir()
    from cryptography.fernet import Fernet

    env = services.airflow_env(home, DEMO_BUCKET, AIRFLOW__CORE__FERNET_KEY=Fernet.generate_key().decode())
    result_file = work / "pipeline-result.json"
    conf = {"prompts": list(prompts)} if prompts else {}
    proc = procs.start(
        "pipeline",
        [
            str(BIN / "python"),
            "-m",
            "demo.pipeline",
            "--dag-id",
            DAG_ID,
            "--conf",
            json.dumps(conf),
            "--result",
            str(result_file),
        ],
        env=env,
        cwd=REPO,
        pipe=True,
    )
    out.write(f"Airflow              {DAG_ID} with dag.test(), AIRFLOW_HOME {home}  (pid {proc.pid})\n")
    out.flush()
    progress = _Progress(out, verbose)
    log_path = procs.logs["pipeline"]
    # A watchdog: a pipeline that hangs silently is stopped (its whole process group).
    watchdog = threading.Timer(PIPELINE_TIMEOUT, _kill_group, args=(proc.pid,))
    watchdog.daemon = True
    watchdog.start()
    assert proc.stdout is not None
    try:
        with log_path.open("a", encoding="utf-8") as log:
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                log.write(line + "\n")
                progress.feed(line)
        code = proc.wait()
    finally:
        watchdog.cancel()
    if code < 0 and time.monotonic() - progress.started >= PIPELINE_TIMEOUT:
        raise DemoError(f"The pipeline did not finish within {PIPELINE_TIMEOUT:.0f}s; its log: {log_path}")
    if not result_file.exists():
        raise DemoError(f"The pipeline process exited {code} without a result; end of its log:\n{tail(log_path)}")
    outcome: dict[str, Any] = json.loads(result_file.read_text())
    if outcome.get("import_errors"):
        raise DemoError(f"The DAG files did not import: {outcome['import_errors']}")
    if outcome["state"] != "success":
        out.write(f"The run ended {outcome['state']}; end of its log:\n{tail(log_path, 30)}\n")
    summary = summarize(
        s3=services.s3_client(),
        bucket=DEMO_BUCKET,
        dag_id=DAG_ID,
        run_id=outcome.get("run_id"),
        state=outcome["state"],
        task_instances=outcome.get("task_instances", []),
        output_dir=output_dir,
        mode=mode,
        emulator=services.emulated,
    )
    summary.pids = procs.pgids
    return summary


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.run_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder for the images (emptied first)")
    parser.add_argument("--prompt", action="append", dest="prompts", help="a prompt (repeatable); default: the file")
    parser.add_argument("--real", action="store_true", default=_env_flag("FLUX_DEMO_REAL"), help="the real API")
    parser.add_argument("--queue-seconds", type=float, default=QUEUE_SECONDS, help="emulator: time in the queue")
    parser.add_argument("--run-seconds", type=float, default=RUN_SECONDS, help="emulator: time running")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary Airflow home and logs (kept on failure)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the whole Airflow log")
    args = parser.parse_args(argv)
    model = "FLUX.1 Kontext [pro]" if args.real else "the fal queue emulator (placeholder images)"
    print(f"airflow-flux demo: {DAG_ID} -> {model} -> S3", flush=True)
    try:
        summary = run_demo(
            args.output,
            real=args.real,
            prompts=args.prompts,
            queue_seconds=args.queue_seconds,
            run_seconds=args.run_seconds,
            keep=args.keep,
            verbose=args.verbose,
        )
    except (DemoError, FileExistsError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted; every process it started is stopped.", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SIGTERM / SIGHUP, turned into SystemExit by signals_raise()
        print("demo: terminated; every process it started is stopped.", file=sys.stderr)
        return int(exc.code or 1)
    print()
    print(summary.render())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
