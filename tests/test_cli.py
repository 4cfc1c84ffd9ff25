"""The portable-lora command line: exit codes, --json fields, one-line errors, a subprocess run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_ops import base_weights, small_adapter, write_sharded

import portable_lora as pl
from portable_lora import ops
from portable_lora.cli import main
from portable_lora.io.safetensors_io import read_safetensors, write_safetensors

REPO = Path(__file__).resolve().parents[1]


def adapter_and_base(tmp_path) -> dict:
    """A portable adapter and a matching single-file base, in ``tmp_path``."""
    a = small_adapter()
    pl.save(a, tmp_path / "a.safetensors")
    w = base_weights(a)
    write_safetensors(tmp_path / "base.safetensors", w)
    return {"dir": tmp_path, "adapter": tmp_path / "a.safetensors", "base": tmp_path / "base.safetensors",
            "obj": a, "weights": w}


@pytest.fixture
def files(tmp_path):
    """:func:`adapter_and_base` and a sharded copy of the base."""
    made = adapter_and_base(tmp_path)
    write_sharded(tmp_path / "sharded", made["weights"])
    return {**made, "sharded": tmp_path / "sharded"}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> tuple[int, dict]:
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out)


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("portable-lora: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, err)


# -- usage -----------------------------------------------------------------------------------------

def test_version_help_and_usage_errors(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"portable-lora {pl.__version__}"
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "inspect" in out and "merge" in out and "Exit codes" in out
    for sub in ("inspect", "convert", "merge", "extract", "resize", "verify", "check", "demo"):
        code, out, _ = run(capsys, sub, "--help")
        assert code == 0 and f"portable-lora {sub}" in out
    assert run(capsys)[0] == 2  # no subcommand
    code, _, err = run(capsys, "convert", "a", "b", "--to", "nope")
    assert code == 2 and "invalid choice" in err
    code, _, err = run(capsys, "resize", "a", "b", "--rank", "0")
    assert code == 2 and "positive integer" in err


def test_missing_file_is_a_one_line_error(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", tmp_path / "nope")
    assert code == 2 and out == ""
    assert_one_line_error(err, str(tmp_path / "nope"), "no such file")


def test_debug_shows_the_traceback(capsys, tmp_path):
    for argv in (["inspect", str(tmp_path / "nope"), "--debug"], ["--debug", "inspect", str(tmp_path / "nope")]):
        assert main(argv) == 2  # the documented code: --debug changes what is printed, not the exit
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("portable-lora: error: ")


def test_internal_errors_exit_3(capsys, monkeypatch, files):
    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(ops, "inspect", boom)
    code, _, err = run(capsys, "inspect", files["adapter"])
    assert code == 3
    assert_one_line_error(err, "internal error: RuntimeError: bug", "--debug")


# -- inspect ---------------------------------------------------------------------------------------

def test_inspect_text_and_json(capsys, files):
    code, out, err = run(capsys, "inspect", files["adapter"])
    assert code == 0 and err == ""
    assert "format:      portable" in out and "14 (" in out and "alpha/rank" in out
    code, j = run_json(capsys, "inspect", files["adapter"], "--base", files["sharded"])
    assert code == 0
    for key in ("path", "format", "detected_because", "modules", "parameters", "base_model", "ranks", "dtypes",
                "kinds", "dora_modules", "convention", "convention_reason", "groups", "provenance", "warnings",
                "base"):
        assert key in j, key
    assert j["format"] == "portable" and j["modules"] == 14 and j["ranks"] == [2, 3, 4]
    b = j["base"]
    assert set(b) == {"path", "thresholds", "file_rules", "rules", "modules", "unmatched"}
    assert b["thresholds"] == {"weak": ops.WEAK, "strong": ops.STRONG} and b["unmatched"] == []
    assert set(b["rules"]) == set(pl.RULES)
    for m in b["modules"]:
        adapter_module = files["obj"][m["module"]]
        W = files["weights"][m["weight"]].astype(np.float64)
        expected = np.linalg.norm(adapter_module.delta_weight(np.float64)) / np.linalg.norm(W)
        assert m["ratio"] == pytest.approx(expected, rel=1e-5)
        assert m["ratios"]["raw"] / m["ratios"]["alpha/rank"] == pytest.approx(adapter_module.rank)


def test_inspect_rank32_alpha1_reads_32x_stronger_raw(capsys, tmp_path):
    rng = np.random.default_rng(3)
    A = (rng.standard_normal((32, 64)) / 8).astype(np.float32)
    B = (rng.standard_normal((64, 32)) * 0.01).astype(np.float32)
    pl.save(pl.Adapter({"q": pl.LoraModule(A, B, alpha=1.0)}), tmp_path / "a.safetensors")
    write_safetensors(tmp_path / "w.safetensors", {"q.weight": (rng.standard_normal((64, 64)) / 8).astype(np.float32)})
    code, j = run_json(capsys, "inspect", tmp_path / "a.safetensors", "--base", tmp_path / "w.safetensors")
    rules = j["base"]["rules"]
    assert code == 0
    assert rules["raw"]["median"] / rules["alpha/rank"]["median"] == pytest.approx(32, rel=1e-12)
    code, out, _ = run(capsys, "inspect", tmp_path / "a.safetensors", "--base", tmp_path / "w.safetensors", "-v")
    assert "* alpha/rank" in out and "per module:" in out


# -- convert ---------------------------------------------------------------------------------------

def test_convert_refuses_overwrite_then_forces(capsys, files):
    dst = files["dir"] / "copy.safetensors"
    code, j = run_json(capsys, "convert", files["adapter"], dst, "--to", "portable", "--verify")
    assert code == 0 and j["ok"] and j["verified"]["ok"]
    for key in ("src", "dst", "from_format", "to_format", "detected_because", "modules", "bytes", "convention",
                "warnings", "verified"):
        assert key in j, key
    assert j["bytes"] == dst.stat().st_size and j["modules"] == 14
    before = dst.read_bytes()
    code, out, err = run(capsys, "convert", files["adapter"], dst, "--to", "portable")
    assert code == 2 and out == ""
    assert_one_line_error(err, str(dst), "already exists", "--force")
    assert dst.read_bytes() == before
    code, _, _ = run(capsys, "convert", files["adapter"], dst, "--to", "portable", "--force")
    assert code == 0


def test_convert_with_prefixes(capsys, files):
    """An LLM adapter becomes a kohya text-encoder adapter and an mlx-vlm adapter by renaming."""
    kohya = files["dir"] / "te.safetensors"
    code, j = run_json(capsys, "convert", files["adapter"], kohya, "--to", "kohya", "--add-prefix", "text_encoder.",
                       "--verify")
    assert code == 0 and j["verified"]["ok"]
    back = pl.load(kohya, modules=["text_encoder." + n for n in files["obj"]])
    assert sorted(back) == sorted("text_encoder." + n for n in files["obj"])
    vlm = files["dir"] / "vlm"
    code, _, _ = run(capsys, "convert", files["adapter"], vlm, "--to", "mlx-vlm", "--add-prefix", "language_model.")
    assert code == 0
    again = files["dir"] / "again.safetensors"
    code, _, _ = run(capsys, "convert", vlm, again, "--to", "portable", "--strip-prefix", "language_model.")
    assert code == 0
    for name, m in files["obj"].items():
        np.testing.assert_allclose(pl.load(again).delta_weight(name), m.delta_weight(), rtol=1e-6, atol=1e-7)  # mlx-vlm: one scale, folded
    code, out, err = run(capsys, "convert", files["adapter"], files["dir"] / "x", "--to", "peft", "--strip-prefix", "nope.")
    assert code == 2
    assert_one_line_error(err, "does not start with the prefix 'nope.'")
    assert not (files["dir"] / "x").exists()


def test_convert_option_errors_are_exit_2(capsys, files):
    code, _, err = run(capsys, "convert", files["adapter"], files["dir"] / "o.safetensors", "--to", "portable",
                       "--save-option", "bogus=1")
    assert code == 2
    assert_one_line_error(err, "unknown options", "bogus")
    code, _, err = run(capsys, "convert", files["adapter"], files["dir"] / "o.safetensors", "--to", "portable",
                       "--save-option", "novalue")
    assert code == 2 and "KEY=VALUE" in err


def test_convert_verify_catches_a_broken_writer(capsys, monkeypatch, files):
    from portable_lora.formats import portable

    real = portable.save

    def doubling(adapter, path, **options):  # a writer that loses the scale: ΔW doubles
        bad = adapter.copy()
        for m in bad.values():
            m.B = m.B * 2
        real(bad, path, **options)

    monkeypatch.setattr(portable, "save", doubling)
    code, out, _ = run(capsys, "convert", files["adapter"], files["dir"] / "bad.safetensors", "--to", "portable",
                       "--verify")
    assert code == 1 and "14 modules DIFFER" in out


def test_demo_reports_a_failing_format_and_exits_1(capsys, monkeypatch, tmp_path):
    from portable_lora.formats import portable

    def broken(adapter, path, **options):
        raise RuntimeError("writer bug")

    monkeypatch.setattr(portable, "save", broken)
    code, j = run_json(capsys, "demo", "--out", tmp_path / "d", "--backends", "numpy")
    rows = {c["format"]: c for c in j["conversions"]}
    assert code == 1 and not j["ok"]
    assert rows["portable"]["status"] == "FAILED" and "RuntimeError: writer bug" in rows["portable"]["note"]
    assert rows["peft"]["status"] == "verified"  # the others still ran


# -- merge -----------------------------------------------------------------------------------------

def test_merge_sharded_json_and_no_progress_without_tty(capsys, files):
    out = files["dir"] / "merged"
    code, out_text, err = run(capsys, "merge", files["sharded"], files["adapter"], out, "--strength", "0.5", "--json")
    assert code == 0 and err == ""  # stderr is not a terminal: no progress bar
    j = json.loads(out_text)
    for key in ("ok", "base", "adapter", "out", "strength", "unmerge", "dtype", "merged_modules", "modules",
                "tensors", "bytes", "shards", "sharded", "copied_files", "warnings"):
        assert key in j, key
    assert j["merged_modules"] == 14 and j["sharded"] and len(j["shards"]) == 3 and j["strength"] == 0.5
    assert j["copied_files"] == ["config.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == j["bytes"]
    assert sorted(p.name for p in out.iterdir()) == sorted(j["shards"] + ["config.json", "model.safetensors.index.json"])


def test_merge_errors_exit_2_and_write_nothing(capsys, files):
    a = files["obj"].copy()
    a["model.layers.9.self_attn.q_proj"] = a["model.layers.0.self_attn.q_proj"].copy()
    pl.save(a, files["dir"] / "extra.safetensors")
    out = files["dir"] / "never"
    code, _, err = run(capsys, "merge", files["sharded"], files["dir"] / "extra.safetensors", out)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "extra.safetensors", "model.layers.9.self_attn.q_proj", "match no tensor")
    b = files["obj"].copy()
    b["model.layers.0.mlp.up_proj"].A[0, 0] = np.inf
    pl.save(b, files["dir"] / "inf.safetensors")
    code, _, err = run(capsys, "merge", files["base"], files["dir"] / "inf.safetensors", out)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "inf.safetensors", "[model.layers.0.mlp.up_proj.lora_A]", "NaN or infinite",
                          "--allow-nonfinite")
    code, _, _ = run(capsys, "merge", files["base"], files["dir"] / "inf.safetensors", out, "--allow-nonfinite")
    assert code == 0 and out.exists()


def test_merge_dtype_and_unmerge_round_trip(capsys, files):
    d = files["dir"]
    assert run(capsys, "merge", files["base"], files["adapter"], d / "m.safetensors")[0] == 0
    assert run(capsys, "merge", d / "m.safetensors", files["adapter"], d / "u.safetensors", "--unmerge")[0] == 0
    back, _ = read_safetensors(d / "u.safetensors")
    for name, w in files["weights"].items():
        np.testing.assert_allclose(back[name], w, atol=1e-6 * np.abs(w).max())
    assert run(capsys, "merge", files["base"], files["adapter"], d / "h.safetensors", "--dtype", "float16")[0] == 0
    half, _ = read_safetensors(d / "h.safetensors")
    assert {t.dtype for t in half.values()} == {np.dtype(np.float16)}


# -- extract, resize, verify -----------------------------------------------------------------------

def test_extract_resize_verify(capsys, files):
    d = files["dir"]
    assert run(capsys, "merge", files["base"], files["adapter"], d / "tuned.safetensors")[0] == 0
    code, j = run_json(capsys, "extract", files["base"], d / "tuned.safetensors", d / "x.safetensors", "--rank", "4")
    assert code == 0 and j["extracted"] == 14 and j["max_relative_error"] < 1e-4
    assert j["skipped_by_reason"] == {"unchanged": 1, "1-D (norm, bias or other)": 2}
    code, j = run_json(capsys, "verify", files["adapter"], d / "x.safetensors", "--rtol", "1e-4")
    assert code == 0 and j["ok"] and j["matching"] == 14 and j["differing"] == []
    for key in ("ok", "a", "b", "format_a", "format_b", "modules", "matching", "max_relative_error", "tolerance",
                "differing", "rows", "warnings"):
        assert key in j, key
    code, j = run_json(capsys, "resize", files["adapter"], d / "r.safetensors", "--rank", "2")
    assert code == 0 and j["format"] == "portable" and j["resized"] + j["kept"] == 14
    assert {r["status"] for r in j["modules"]} == {"resized", "kept"}
    # a lower rank changes ΔW: verify says so, exit 1, with a table of what differs
    code, out, err = run(capsys, "verify", files["adapter"], d / "r.safetensors")
    assert code == 1 and "modules differ" in out and "differs" in out and err == ""
    code, j = run_json(capsys, "verify", files["adapter"], d / "r.safetensors")
    assert code == 1 and not j["ok"] and len(j["differing"]) == j["modules"] - j["matching"] > 0


# -- check and demo --------------------------------------------------------------------------------

def test_check_json(capsys, files):
    code, j = run_json(capsys, "check", "--backends", "numpy,array_api_strict", "--dtypes", "float32")
    assert code == 0 and j["ok"] and j["adapter"] == "built-in example"
    assert {(r["backend"], r["dtype"]) for r in j["rows"]} == {("numpy", "float32"), ("array_api_strict", "float32")}
    code, out, _ = run(capsys, "check", files["adapter"], "--backends", "numpy", "--base", files["base"])
    assert code == 0 and "all backends agree" in out
    code, _, err = run(capsys, "check", "--dtypes", "float7")
    assert code == 2 and "unknown dtypes" in err
    code, _, err = run(capsys, "check", "--dtypes", "")
    assert code == 2 and "no dtypes" in err


def test_demo_json(capsys, tmp_path):
    code, j = run_json(capsys, "demo", "--out", tmp_path / "d", "--backends", "numpy")
    assert code == 0 and j["ok"]
    assert {c["format"] for c in j["conversions"]} == set(pl.FORMATS)
    assert all(set(c) == {"format", "file", "bytes", "status", "max_relative_error", "note"} for c in j["conversions"])
    assert (tmp_path / "d" / "base" / "model.safetensors.index.json").exists()


# -- as a program ----------------------------------------------------------------------------------

def _subprocess(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "portable_lora", *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_python_dash_m_runs_the_cli(files):
    ok = _subprocess("inspect", str(files["adapter"]), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["modules"] == 14
    bad = _subprocess("merge", str(files["base"]), str(files["adapter"]), str(files["adapter"]))
    assert bad.returncode == 2 and bad.stdout == ""
    assert_one_line_error(bad.stderr, "already exists")


def test_cli_import_loads_no_framework():
    code = ("import sys, portable_lora.cli, portable_lora.ops\n"
            "print(sorted(m for m in ('torch', 'jax', 'mlx', 'tensorflow', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("where", ["before", "after", "absent"])
def test_durable_flag_fsyncs_what_is_written(capsys, monkeypatch, files, where):
    from portable_lora.io import atomic

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    monkeypatch.delenv(atomic.DURABLE_ENV, raising=False)
    flag = {"before": ["--durable", "merge"], "after": ["merge", "--durable"], "absent": ["merge"]}[where]
    code, _, _ = run(capsys, *flag, files["base"], files["adapter"], str(files["dir"] / "m.safetensors"),
                     "--threads", "2")
    assert code == 0 and (files["dir"] / "m.safetensors").exists()
    assert (len(synced) >= 2) == (where != "absent")  # the file and its directory
    assert not atomic.is_durable()  # the setting ends with the command
