"""Runs the host tests inside ComfyUI's own Python when this pytest is not that Python (see conftest)."""

import os
import subprocess

from comfy_host import COMFYUI_PYTHON, HOST_DIR, HOST_SUMMARY, REPO_ROOT


def test_host_suite_in_comfyui_python(request):
    command = [COMFYUI_PYTHON, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(HOST_DIR)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=os.environ.copy(), capture_output=True, text=True)
    lines = result.stdout.splitlines()
    # shown at the end of this session by conftest.pytest_terminal_summary
    header = f"host tests in {COMFYUI_PYTHON} (COMFYUI_ROOT={os.environ['COMFYUI_ROOT']}):"
    notable = [line for line in lines if line.startswith(("SKIPPED", "FAILED", "ERROR", "front end in the browser"))]
    request.config.stash[HOST_SUMMARY] = [header, *notable, *lines[-1:]]
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
