"""A real ComfyUI server (``main.py --cpu``) on 127.0.0.1 for HTTP and browser tests, and tiny JSON helpers."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from comfy_host import COMFYUI_ROOT, PACK_LINK_NAME, REPO_ROOT

STARTUP_SECONDS = 120
#: another front end for the browser tests: a folder holding its index.html (a comfyui-frontend-package wheel's
#: ``comfyui_frontend_package/static``), passed to ComfyUI as ``--front-end-root``; unset: the ComfyUI's own
FRONTEND_ROOT = os.environ.get("LORWEB_FRONTEND_ROOT") or None


def frontend_arguments() -> list[str]:
    if FRONTEND_ROOT is None:
        return []
    root = Path(FRONTEND_ROOT).resolve()
    if not (root / "index.html").is_file():
        raise RuntimeError(f"LORWEB_FRONTEND_ROOT={FRONTEND_ROOT} holds no index.html (use the wheel's static folder)")
    return ["--front-end-root", str(root)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post_json(url: str, body) -> tuple[int, dict | None]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, _json_or_none(response.read())
    except urllib.error.HTTPError as error:
        return error.code, _json_or_none(error.read())


def _json_or_none(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        return None


def make_base(base: Path, extra_packs: dict[str, Path] | None = None) -> Path:
    """A --base-directory with the pack (and any extra packs) linked into custom_nodes/, as users install it."""
    packs = {PACK_LINK_NAME: REPO_ROOT, **(extra_packs or {})}
    for name, target in packs.items():
        link = base / "custom_nodes" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
    for folder in ("models/lorweb", "models/loras", "input", "output", "temp", "user"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    return base


@contextlib.contextmanager
def running_server(base: Path) -> Iterator[str]:
    """Start ComfyUI on a free loopback port with ``base`` as its base directory; yields its URL."""
    port = free_port()
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--base-directory",
                str(base),
                "--disable-auto-launch",
                *frontend_arguments(),
            ],
            cwd=COMFYUI_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_up(url, process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_until_up(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            get_json(url + "/system_stats")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ComfyUI did not start:\n" + log_path.read_text()[-5000:]) from None
            time.sleep(0.5)
