"""`import portable_lora` imports no framework (checked in a fresh interpreter)."""

import json
import subprocess
import sys

FRAMEWORKS = ("torch", "jax", "mlx", "flax", "keras", "peft", "transformers", "diffusers", "tensorflow")


def _imported_after(statement: str) -> list[str]:
    code = (f"import sys, json\n{statement}\n"
            f"print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_portable_lora_imports_no_framework():
    assert _imported_after("import portable_lora, portable_lora.core, portable_lora.formats, "
                           "portable_lora.testing, portable_lora.examples") == []


def test_loading_and_saving_imports_no_framework(tmp_path):
    path = tmp_path / "a.safetensors"
    stmt = ("import portable_lora as pl\n"
            f"a = pl.examples.random_adapter()\npl.save(a, {str(path)!r})\n"
            f"b = pl.load({str(path)!r})\nb.delta_weight(next(iter(b)))")
    assert _imported_after(stmt) == []
