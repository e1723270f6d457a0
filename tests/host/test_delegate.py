"""Runs the host tests inside ComfyUI's own Python when this pytest is not that Python (see conftest)."""

import os
import subprocess

from comfy_host import COMFYUI_PYTHON, HOST_DIR, REPO_ROOT


def test_host_suite_in_comfyui_python(request):
    command = [COMFYUI_PYTHON, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(HOST_DIR)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=os.environ.copy(), capture_output=True, text=True)
    summary = [line for line in result.stdout.splitlines() if line.startswith(("SKIPPED", "FAILED", "ERROR", "="))]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nhost tests in {COMFYUI_PYTHON}:")
        for line in summary[-12:]:
            reporter.write_line("  " + line)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
