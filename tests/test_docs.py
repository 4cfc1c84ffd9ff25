"""The documentation runs: README's Python quick start and the library's doctests."""

from __future__ import annotations

import doctest
import importlib
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_quick_start_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Python quick start\n\n```python\n(.*?)```", text, re.S).group(1)
    script = tmp_path / "quick_start.py"
    script.write_text(code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "adapter_mlx").is_dir()


@pytest.mark.parametrize("module", ["portable_lora.core.scale", "portable_lora.adapter", "portable_lora.validation",
                                    "portable_lora.formats._common"])
def test_doctests(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
