"""Command line: ``python -m airflow_flux.emulator --port 8787``.

Serves until Ctrl-C or SIGTERM. Prints exactly one line once listening so scripts can
wait for it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_flux.emulator",
        description="Emulate fal's queue API for the FLUX.1 Kontext family on a local port.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8787, help="TCP port, 0 for any free port")
    parser.add_argument("--token", default=None, help="accept only this API token (default: any)")
    parser.add_argument("--queue-seconds", type=float, default=1.0, help="time spent IN_QUEUE")
    parser.add_argument("--run-seconds", type=float, default=3.0, help="time spent IN_PROGRESS")
    parser.add_argument(
        "--url-mode",
        default="fal",
        help="base of returned queue URLs: 'fal' (https://queue.fal.run), 'self', or a URL",
    )
    parser.add_argument("--ping-interval", type=float, default=15.0, help="SSE keep-alive seconds")
    parser.add_argument(
        "--public-url",
        default=None,
        help="URL clients use to reach this server (CDN links, url-mode self); default: bind address",
    )
    parser.add_argument(
        "--input-fetch-timeout", type=float, default=10.0, help="seconds to download one input image of an edit"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="run at most N requests of one account (Authorization header value) at once, as fal does "
        "(2 to 40 there); the rest wait IN_QUEUE, first in first out, with a falling queue_position "
        "(default: no limit)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request to stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the emulator until interrupted; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    if args.access_log:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    from airflow_flux.emulator.server import FluxEmulator

    try:
        emulator = FluxEmulator(
            queue_seconds=args.queue_seconds,
            run_seconds=args.run_seconds,
            token=args.token,
            url_mode=args.url_mode,
            ping_interval=args.ping_interval,
            host=args.host,
            port=args.port,
            public_url=args.public_url,
            access_log=args.access_log,
            input_fetch_timeout=args.input_fetch_timeout,
            concurrency=args.concurrency,
        )
        emulator.start()
    except (OSError, ValueError) as exc:
        print(f"flux emulator: cannot start: {exc}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"flux emulator listening on http://{host}:{emulator.port}", flush=True)
    try:
        # Short waits so the signal handler gets to run promptly on every platform.
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
