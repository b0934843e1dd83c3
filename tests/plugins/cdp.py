"""A tiny Chrome DevTools Protocol client: headless Chromium driven over its websocket (aiohttp).

Just what the gallery test needs: set a cookie, open a page, wait for it, run JavaScript,
read the bytes the browser received for a request, take a screenshot. Chromium runs in its
own process group with a throw-away profile, and listens on 127.0.0.1 only. Every wait is
for a state (an event, a response); its timeout is a bound for a loaded machine, not a pause.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from pathlib import Path

#: Debian ships ``chromium``; other names cover a developer's machine.
BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in BINARIES:
        if path := shutil.which(name):
            return path
    return None


class CDPError(RuntimeError):
    pass


@dataclass
class Response:
    """A response the page received (``Network.responseReceived``)."""

    request_id: str
    url: str
    status: int
    mime_type: str
    finished: bool = False
    failed: str | None = None


@dataclass
class Page:
    """One browser tab: commands, events, and what it loaded."""

    ws: aiohttp.ClientWebSocketResponse
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    responses: dict[str, Response] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    reader: asyncio.Task | None = None

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = msg.json()
            if "id" in data:
                future = self.pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method", ""), data.get("params", {})
            self.events.setdefault(method, []).append(params)
            if method == "Network.responseReceived":
                r = params["response"]
                self.responses[params["requestId"]] = Response(
                    params["requestId"], r["url"], r["status"], r.get("mimeType", "")
                )
            elif method == "Network.loadingFinished" and params["requestId"] in self.responses:
                self.responses[params["requestId"]].finished = True
            elif method == "Network.loadingFailed" and params["requestId"] in self.responses:
                self.responses[params["requestId"]].failed = params.get("errorText", "failed")
            elif method == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))

    async def send(self, method: str, timeout: float = 90, **params: Any) -> dict[str, Any]:
        cid = next(self.ids)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending[cid] = future
        await self.ws.send_json({"id": cid, "method": method, "params": params})
        data = await asyncio.wait_for(future, timeout)
        if "error" in data:
            raise CDPError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def navigate(self, url: str, timeout: float = 90) -> int:
        """Open ``url`` and wait for its load event; return the document's HTTP status."""
        self.events.pop("Page.loadEventFired", None)
        self.responses.clear()
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"navigate {url}: {result['errorText']}")
        deadline = time.monotonic() + timeout
        while not self.events.get("Page.loadEventFired"):
            if time.monotonic() > deadline:
                raise CDPError(f"{url} did not load within {timeout}s")
            await asyncio.sleep(0.05)
        document = [r for r in self.responses.values() if r.url == url]
        return document[0].status if document else 0

    async def evaluate(self, expression: str, timeout: float = 90) -> Any:
        """Run JavaScript in the page (promises awaited) and return its value as JSON."""
        result = await self.send(
            "Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise CDPError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def body(self, request_id: str) -> bytes:
        """The bytes the browser received for a request (as it used them, e.g. to draw an image)."""
        result = await self.send("Network.getResponseBody", requestId=request_id)
        return base64.b64decode(result["body"]) if result.get("base64Encoded") else result["body"].encode()

    async def screenshot(self, path: Path) -> Path:
        """Save what the page shows (the viewport) as a PNG."""
        result = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(result["data"]))
        return path


class Chromium:
    """Headless Chromium with DevTools on a free loopback port, and a profile under ``workdir``.

    :param binary: the chromium executable.
    :param workdir: a temporary folder (profile, output).
    :param window: window size, ``(width, height)``: a laptop screen.
    """

    def __init__(self, binary: str, workdir: Path, window: tuple[int, int] = (1280, 900)) -> None:
        self.binary, self.workdir, self.window = binary, workdir, window
        self.profile = workdir / "chromium-profile"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = workdir / "chromium.log"

    def start(self, timeout: float = 60) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)
        port_file = self.profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a reused profile's is stale
        argv = [
            self.binary,
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--mute-audio",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",  # Chromium picks a port and writes it to DevToolsActivePort
            f"--user-data-dir={self.profile}",
            f"--window-size={self.window[0]},{self.window[1]}",
            "about:blank",
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            if port_file.exists() and (lines := port_file.read_text().splitlines()):
                self.port = int(lines[0])
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise CDPError(f"Chromium did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    @contextlib.asynccontextmanager
    async def page(self):
        """A new tab with Page, Network and Runtime events on."""
        async with aiohttp.ClientSession() as http:
            async with http.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as resp:
                target = await resp.json()
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws=ws)
                page.reader = asyncio.create_task(page._read())
                try:
                    for domain in ("Page", "Network", "Runtime"):
                        await page.send(f"{domain}.enable")
                    yield page
                finally:
                    page.reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await page.reader
