"""Part 1 of issue #6: API calls and detection delay per generation.

For each generation time (default 5 s, 30 s, 120 s) and each contender, a fresh emulator
request is submitted and waited for in its own asyncio task; all cases run concurrently in
one event loop against one emulator process, so the whole run takes about as long as the
longest generation. Contenders:

* ``flux_sse``: ``FluxStatusTrigger`` (default ``use_stream=True``) - follows the SSE stream.
* ``flux_poll``: the same trigger on requests whose stream is refused (scenario
  ``stream: "refuse"``), so it falls back to its growing polling interval.
* ``http_sensor_60s`` / ``http_sensor_5s``: ``HttpSensorTrigger`` of the http provider on the
  request's ``status_url``, with ``HttpSensor``'s default ``poke_interval`` (60 s) and with
  the trigger's own default (5 s). It has no ``response_check``: any non-error answer fires it.
* ``poller_0.1s``: a plain aiohttp loop that polls the status every 0.1 s until 200
  ``COMPLETED`` and then fetches the result, like fal's Python client.

Measured per request: calls by kind from the emulator's request log; detection delay =
time the event reached the caller - time the emulator marked the job COMPLETED (both
``time.time()`` on this machine); whether the event was false (fired before COMPLETED);
whether the result was fetched. A last, separate phase shows ``HttpSensorTrigger`` pointed
at the ``response_url`` instead (400 while running) for the shortest generation only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# Trigger logs are not what is measured here (the scale benchmark keeps them at INFO); at
# INFO they would bury the table, and the hot-looping case logs thousands of warnings.
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")
common.airflow_env()

# Imported before any clock starts: importing Airflow inside the event loop would stall every case.
import aiohttp  # noqa: E402
from airflow.providers.http.triggers.http import HttpSensorTrigger  # noqa: E402

from airflow_flux.triggers.flux import FluxStatusTrigger  # noqa: E402

CONTENDERS = ("flux_sse", "flux_poll", "http_sensor_60s", "http_sensor_5s", "poller_0.1s")
LABELS = {
    "flux_sse": "FluxStatusTrigger, SSE",
    "flux_poll": "FluxStatusTrigger, polling fallback",
    "http_sensor_60s": "HttpSensorTrigger, poke 60 s (HttpSensor default)",
    "http_sensor_5s": "HttpSensorTrigger, poke 5 s",
    "poller_0.1s": "0.1 s poller (fal client style)",
    "http_sensor_result": "HttpSensorTrigger on response_url (400 until done)",
}
FLUX_CONN = "flux_bench"
HTTP_CONN = "http_bench"


def tag(gen: float, rep: int, refuse: bool) -> str:
    return f"#g{gen:g}#r{rep}#{'refuse' if refuse else 'ok'}#"


async def wait_flux(handle: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    trigger = FluxStatusTrigger(flux_conn_id=FLUX_CONN, handle=handle)
    payload: dict[str, Any] = {}
    t_event = float("nan")
    async for event in trigger.run():
        t_event, payload = time.time(), event.payload
    return t_event, {"status": payload.get("status"), "result": "result" in payload}


async def wait_http_sensor(url: str, poke_interval: float, cap: float | None = None) -> tuple[float, dict[str, Any]]:
    trigger = HttpSensorTrigger(endpoint=urlsplit(url).path, http_conn_id=HTTP_CONN, poke_interval=poke_interval)

    async def consume() -> tuple[float, Any]:
        async for event in trigger.run():
            return time.time(), event.payload
        return float("nan"), None

    if cap is None:
        t_event, payload = await consume()
    else:
        try:
            t_event, payload = await asyncio.wait_for(consume(), cap)
        except asyncio.TimeoutError:
            return float("nan"), {"status": "no event (capped)", "result": False}
    return t_event, {"status": f"event payload {payload!r}", "result": False}


async def wait_poller(handle: dict[str, Any], interval: float = 0.1) -> tuple[float, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {common.TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        while True:
            async with session.get(handle["status_url"]) as resp:
                body = await resp.json()
            if resp.status == 200 and body.get("status") == "COMPLETED":
                break
            await asyncio.sleep(interval)
        async with session.get(handle["response_url"]) as resp:
            ok = resp.status == 200
            await resp.read()
    return time.time(), {"status": "success" if ok else f"HTTP {resp.status}", "result": ok}


async def run_case(emu: common.Emulator, contender: str, gen: float, rep: int, delay: float) -> dict[str, Any]:
    await asyncio.sleep(delay)
    refuse = contender == "flux_poll"
    (handle,) = await common.submit_many(emu.base_url, [f"bench {tag(gen, rep, refuse)} {contender}"])
    t_submit = time.time()
    if contender in ("flux_sse", "flux_poll"):
        t_event, info = await wait_flux(handle)
    elif contender == "http_sensor_60s":
        t_event, info = await wait_http_sensor(handle["status_url"], 60.0)
    elif contender == "http_sensor_5s":
        t_event, info = await wait_http_sensor(handle["status_url"], 5.0)
    elif contender == "http_sensor_result":
        t_event, info = await wait_http_sensor(handle["response_url"], 5.0, cap=gen + 10)
    else:
        t_event, info = await wait_poller(handle)
    return {
        "contender": contender,
        "gen": gen,
        "rep": rep,
        "request_id": handle["request_id"],
        "t_submit": t_submit,
        "t_event": t_event,
        **info,
    }


def summarize(cases: list[dict[str, Any]], emu: common.Emulator) -> None:
    jobs = emu.jobs()
    calls = common.calls_by_request(emu.requests())
    for case in cases:
        job = jobs[case["request_id"]]
        case["completed_at"] = job["completed_at"]
        case["calls"] = calls.get(case["request_id"], {})
        if case["t_event"] != case["t_event"]:  # NaN: no event
            case["delay"] = None
            case["false"] = False
        else:
            done = job["completed_at"]
            case["delay"] = None if done is None else case["t_event"] - done
            case["false"] = done is None or case["t_event"] < done


def table(cases: list[dict[str, Any]], gens: list[float], contenders: list[str]) -> str:
    rows = []
    for gen in gens:
        ref = [c for c in cases if c["gen"] == gen and c["contender"] == "flux_sse"]
        ref_calls = common.median([sum(c["calls"].values()) for c in ref])
        ref_delay = common.median([c["delay"] for c in ref if c["delay"] is not None and not c["false"]])
        for contender in contenders:
            group = [c for c in cases if c["gen"] == gen and c["contender"] == contender]
            if not group:
                continue

            def med(kind: str, group: list[dict[str, Any]] = group) -> float | None:
                return common.median([c["calls"].get(kind, 0) for c in group])

            total = common.median([sum(c["calls"].values()) for c in group])
            true_delays = [c["delay"] for c in group if c["delay"] is not None and not c["false"]]
            false_n = sum(c["false"] for c in group)
            lost_n = sum(c["delay"] is None for c in group)
            if true_delays:
                delay = f"{common.median(true_delays):.2f} ({min(true_delays):.2f}-{max(true_delays):.2f})"
            else:
                fired = [c["delay"] for c in group if c["delay"] is not None]
                delay = f"fired {common.median(fired):+.1f} s" if fired else "no event"
            rows.append(
                [
                    f"{gen:g} s",
                    LABELS[contender],
                    med("submit"),
                    med("status"),
                    med("stream"),
                    med("result"),
                    total,
                    common.ratio(total, ref_calls),
                    delay,
                    common.ratio(common.median(true_delays), ref_delay, 0) if true_delays else "-",
                    f"{false_n}/{len(group)}" + (f" ({lost_n} no event)" if lost_n else ""),
                    "yes" if all(c["result"] for c in group) else "no",
                ]
            )
    headers = [
        "generation",
        "contender",
        "submit",
        "status",
        "stream",
        "result",
        "calls",
        "calls vs SSE",
        "delay s, median (min-max)",
        "delay vs SSE",
        "false events",
        "result fetched",
    ]
    return common.md_table(headers, rows)


async def warm_up(emu: common.Emulator) -> None:
    """One untimed wait per kind of client, so lazy imports and connection lookups are done."""
    emu.scenario("#warmup#", queue_seconds=0.1, run_seconds=0.2)
    handles = await common.submit_many(emu.base_url, ["#warmup# 1", "#warmup# 2", "#warmup# 3"])
    await asyncio.sleep(0.5)
    await asyncio.gather(
        wait_flux(handles[0]), wait_http_sensor(handles[1]["status_url"], 0.1), wait_poller(handles[2])
    )


async def main_async(args: argparse.Namespace, emu: common.Emulator) -> list[dict[str, Any]]:
    await warm_up(emu)
    for gen in args.gen_seconds:
        for rep in range(args.reps):
            # Repetitions run a little longer each (+ rep x jitter), so that the polling
            # schedules, which start at submit, meet the completion at different phases.
            run = max(0.0, gen - args.queue_seconds) + rep * args.jitter
            emu.scenario(tag(gen, rep, False), queue_seconds=args.queue_seconds, run_seconds=run)
            emu.scenario(tag(gen, rep, True), queue_seconds=args.queue_seconds, run_seconds=run, stream="refuse")
    jobs = []
    for gen in args.gen_seconds:
        for rep in range(args.reps):
            for i, contender in enumerate(args.contenders):
                jobs.append(run_case(emu, contender, gen, rep, i * 0.05))
    cases = list(await asyncio.gather(*jobs))
    if args.hot_loop:
        gen = min(args.gen_seconds)
        cases += await asyncio.gather(run_case(emu, "http_sensor_result", gen, 0, 0.0))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gen-seconds", type=float, nargs="+", default=[5.0, 30.0, 120.0])
    parser.add_argument("--queue-seconds", type=float, default=1.0, help="part of each generation spent IN_QUEUE")
    parser.add_argument("--reps", type=int, default=3, help="requests per contender and generation time")
    parser.add_argument(
        "--jitter", type=float, default=0.37, help="repetition r's generation is r x JITTER seconds longer"
    )
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument(
        "--no-hot-loop",
        dest="hot_loop",
        action="store_false",
        help="skip HttpSensorTrigger on response_url (shortest generation only)",
    )
    parser.add_argument("--quick", action="store_true", help="5 s generations, one request per contender")
    parser.add_argument("--json", help="also write the raw cases to this file")
    args = parser.parse_args()
    if args.quick:
        args.gen_seconds, args.reps = [5.0], 1

    common.print_header("Detection delay and API calls per generation (issue #6, part 1)")
    started = time.monotonic()
    with common.Emulator(queue_seconds=1.0, run_seconds=4.0) as emu:
        common.flux_conn(FLUX_CONN, emu.base_url)
        common.http_conn(HTTP_CONN, emu.base_url)
        cases = asyncio.run(main_async(args, emu))
        summarize(cases, emu)
    wall = time.monotonic() - started

    contenders = [*args.contenders, *(["http_sensor_result"] if args.hot_loop else [])]
    print(table(cases, args.gen_seconds, contenders))
    print(
        f"\n{args.reps} request(s) per row (calls: median); generation = {args.queue_seconds:g} s queued + the rest "
        f"running, repetition r lasting r x {args.jitter:g} s longer. Delay = event received - emulator COMPLETED, for events that were not false. "
        "'fired -x s' = the event came x s before the request completed (a false completion)."
    )
    sse = [c for c in cases if c["contender"] == "flux_sse"]
    ok_calls = all(sum(c["calls"].values()) <= 3 for c in sse)
    sse_delays = [c["delay"] for c in sse if c["delay"] is not None]
    ok_delay = bool(sse_delays) and max(sse_delays) <= 0.5 and not any(c["false"] for c in sse)
    max_calls = max((sum(c["calls"].values()) for c in sse), default=0)
    max_delay = max(sse_delays, default=float("nan"))
    calls_verdict = common.goal("SSE wait: <= 3 API calls per generation", f"{max_calls} at most", ok_calls)
    delay_verdict = common.goal(
        "SSE wait: <= 0.5 s from COMPLETED to the event, no false event", f"{max_delay:.3f} s at most", ok_delay
    )
    print(
        f"\nGoal (SSE: <= 3 calls and <= 0.5 s delay): calls {calls_verdict}, "
        f"delay {delay_verdict} (max {max_delay:.3f} s)."
    )
    print(f"Load average at the end: {common.load_average()}; wall time {wall:.0f} s.")
    print(f"\nCommand: `{common.command_line()}`")
    common.dump_json(args.json, {"facts": common.machine_facts(), "args": vars(args), "cases": cases})


if __name__ == "__main__":
    main()
