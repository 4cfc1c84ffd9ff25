"""Shared by the Triton kernel tests: whether triton is here (and required), and a run of a
test file's ``--interpret-worker`` entry under Triton's interpreter on the CPU.

``TRITON_INTERPRET=1`` must be set before triton is imported, hence a subprocess; it prints
one ``RESULTS <json>`` line with its measurements, which the tests then judge case by case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAVE_TRITON = importlib.util.find_spec("triton") is not None
# the dev extra installs triton on Linux x86_64; a run that requires every backend must have it
TRITON_EXPECTED = (os.environ.get("PORTABLE_LORA_REQUIRE_BACKENDS", "").strip() == "all"
                   and platform.system() == "Linux" and platform.machine() == "x86_64")


def run_interpreted(test_file: str) -> dict:
    """The ``RESULTS`` of ``python test_file --interpret-worker`` under the interpreter
    (skips without triton, fails instead where triton is required)."""
    if not HAVE_TRITON:
        if TRITON_EXPECTED:
            pytest.fail("triton is not installed, and this run requires every backend "
                        "(pip install -e '.[dev]' -c constraints-dev.txt installs it)")
        pytest.skip("triton is not installed (the dev extra installs it on Linux x86_64)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("PORTABLE_LORA_TRITON", None)
    proc = subprocess.run([sys.executable, test_file, "--interpret-worker"], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


def measure_cases(measure, cases, torch) -> dict:
    """``measure(torch, case, "cpu")`` for every case, an error reported per case (not one crash)."""
    results = {}
    for case in cases:
        try:
            results[case[0]] = measure(torch, case, "cpu")
        except Exception as exc:  # noqa: BLE001
            results[case[0]] = {"error": repr(exc)}
    return results
