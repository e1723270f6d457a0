"""Headless Debian Chromium driven over the DevTools protocol (aiohttp, already in ComfyUI): just enough for tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

# Flags from the machine notes: no sandbox as root, and no background traffic to hosts we cannot reach.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1400,1000",
]


#: every front-end version a test saw served (``window.__COMFYUI_FRONTEND_VERSION__``), for the session summary
FRONTEND_VERSIONS: set[str] = set()


def find_chromium() -> str | None:
    return next(
        (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
    )


class Page:
    """One browser tab: send CDP commands, evaluate JavaScript, collect console errors."""

    def __init__(self, socket):  # an aiohttp ClientWebSocketResponse
        self.socket = socket
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.errors: list[str] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.socket:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self._note_event(data)

    def _note_event(self, data: dict) -> None:
        method, params = data.get("method"), data.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(
                "console.error: "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            )
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")

    async def send(self, method: str, params: dict | None = None) -> dict:
        message_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[message_id] = future
        await self.socket.send_json({"id": message_id, "method": method, "params": params or {}})
        reply = await asyncio.wait_for(future, 60)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await self.evaluate(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for: {expression}")
            await asyncio.sleep(0.25)

    async def open_comfyui(self, url: str, node_type: str, timeout: float = 90) -> tuple[int, ...]:
        """Open ComfyUI's editor at ``url`` and wait until ``node_type`` is registered; the front end's version."""
        await self.send("Page.navigate", {"url": url})
        await self.wait_for(
            "window.app && window.app.graph && window.LiteGraph"
            f" && window.LiteGraph.registered_node_types[{json.dumps(node_type)}]",
            timeout=timeout,
        )
        version = await self.evaluate("window.__COMFYUI_FRONTEND_VERSION__ || ''")
        FRONTEND_VERSIONS.add(version or "unknown")
        return version_tuple(version)

    async def open_template(self, pack: str, name: str, as_template_browser: bool = False) -> None:
        """Fetch a pack's template from ComfyUI's template route and load it into the editor under its name.
        ``as_template_browser``: with ``openSource: 'template'``, as the template browser of front ends 1.48 and
        newer opens one (fitted to its nodes; older front ends ignore the option)."""
        route = f"/api/workflow_templates/{pack}/{name}.json"
        options = ", {openSource: 'template'}" if as_template_browser else ""
        await self.evaluate(
            f"fetch({json.dumps(route)}).then(r => r.json())"
            f".then(w => window.app.loadGraphData(w, true, true, {json.dumps(name)}{options}))"
        )

    async def screenshot(self, path: Path) -> None:
        import base64

        data = await self.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(data["data"]))


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.58.1"`` -> (1, 58, 1); () when the front end did not say."""
    parts = []
    for part in (version or "").split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@contextlib.asynccontextmanager
async def open_page(chromium: str, profile: Path) -> AsyncIterator[Page]:
    """Start Chromium with a fresh profile and yield its first tab, with console/exception capture on."""
    import aiohttp  # ComfyUI's dependency: imported here so the module loads under plain pytest too

    process = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = await _devtools_port(profile, process)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(page_url, max_msg_size=0) as socket:
                page = Page(socket)
                for domain in ("Runtime", "Log", "Page"):
                    await page.send(f"{domain}.enable")
                try:
                    yield page
                finally:
                    page.reader.cancel()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


async def _devtools_port(profile: Path, process: subprocess.Popen) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("Chromium did not start")
        await asyncio.sleep(0.1)
    return int(marker.read_text().splitlines()[0])
