"""``comfy node validate`` (comfy-cli, the Comfy Registry's own check) on this pack's pyproject.toml.

comfy-cli is large and not a test requirement, so this test runs it where it is installed: ``COMFY_CLI`` (the path
of its ``comfy`` command) or ``comfy`` on PATH. Without it the test is skipped with the reason printed, unless
``LORWEB_REQUIRE_COMFY_CLI=1`` asks for it, which turns the absence into a failure. The registry's rules themselves
are also checked without comfy-cli, in test_first_hour.py::test_pyproject_follows_the_registry_rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from lorweb_testing import ROOT

INSTALL_HINT = (
    "install it into any virtual environment (python -m venv ~/comfycli && ~/comfycli/bin/pip install comfy-cli) "
    "and set COMFY_CLI=~/comfycli/bin/comfy"
)


def comfy_command() -> str | None:
    given = os.environ.get("COMFY_CLI")
    if given:
        if not os.access(given, os.X_OK):
            pytest.fail(f"COMFY_CLI={given} is not an executable comfy command: {INSTALL_HINT}")
        return given
    found = shutil.which("comfy")
    if found is None and os.environ.get("LORWEB_REQUIRE_COMFY_CLI") == "1":
        pytest.fail(f"LORWEB_REQUIRE_COMFY_CLI=1 but comfy-cli is not installed: {INSTALL_HINT}")
    return found


def test_comfy_node_validate_passes():
    command = comfy_command()
    if command is None:
        pytest.skip(f"comfy-cli is not installed ('comfy node validate' not run): {INSTALL_HINT}")
    result = subprocess.run(
        [command, "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output and "Warning" not in output, output
