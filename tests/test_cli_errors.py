"""Errors of the command line and the operations under it: exit codes, what a message names,
and checks that come before the expensive work (the docs/CLI review's findings)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_cli import adapter_and_base

import portable_lora as pl
from portable_lora import core, ops
from portable_lora.cli import main
from portable_lora.io.safetensors_io import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
Q = "model.layers.0.self_attn.q_proj"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("portable-lora: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0][len("portable-lora: error: "):]


@pytest.fixture
def files(tmp_path):
    """A portable adapter, a base for it, and a tuned checkpoint (the adapter merged in)."""
    made = adapter_and_base(tmp_path)
    tuned = dict(made["weights"])
    for name, m in made["obj"].items():
        tuned[f"{name}.weight"] = (tuned[f"{name}.weight"] + m.delta_weight(np.float32)).astype(np.float32)
    write_safetensors(tmp_path / "tuned.safetensors", tuned)
    return {**made, "tuned": tmp_path / "tuned.safetensors"}


def with_nan(a: pl.Adapter, name: str = Q) -> pl.Adapter:
    bad = a.copy()
    bad[name].A[0, 0] = np.nan
    return bad


def no_svd(monkeypatch) -> None:
    """Make every SVD of the operations fail loudly: a check must come before it."""
    def boom(*args, **kwargs):
        raise AssertionError("the SVD ran before the output was checked")

    monkeypatch.setattr(core, "low_rank", boom)
    monkeypatch.setattr(core, "resize_rank", boom)


# -- 1. NaN/Inf before an SVD ------------------------------------------------------------------

def test_resize_of_a_nan_factor_is_bad_input_naming_the_tensor(capsys, files):
    pl.save(with_nan(files["obj"]), files["dir"] / "nan.safetensors")
    out = files["dir"] / "r.safetensors"
    code, _, err = run(capsys, "resize", files["dir"] / "nan.safetensors", out, "--rank", "1")
    assert code == 2 and not out.exists()
    line = one_line_error(err)
    assert line.startswith(f"{files['dir'] / 'nan.safetensors'} [{Q}.lora_A]: ")
    assert "non-finite" in line and "NaN or infinite" in line


def test_core_svd_functions_refuse_non_finite_input():
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((4, 6)), rng.standard_normal((5, 4))
    B[1, 1] = np.inf
    with pytest.raises(pl.LoraError, match="non-finite") as caught:
        core.resize_rank(A, B, 2, name="m")
    assert caught.value.key == "m.lora_B"
    delta = rng.standard_normal((5, 6))
    delta[0, 0] = np.nan
    with pytest.raises(pl.LoraError, match="non-finite") as caught:
        core.low_rank(delta, 2, name="m.weight")
    assert caught.value.key == "m.weight"


def test_extract_of_a_nan_weight_names_the_checkpoint_and_tensor(capsys, files):
    tuned = dict(files["weights"])
    tuned[f"{Q}.weight"] = tuned[f"{Q}.weight"].copy()
    tuned[f"{Q}.weight"][0, 0] = np.nan
    write_safetensors(files["dir"] / "nan_tuned.safetensors", tuned)
    code, _, err = run(capsys, "extract", files["base"], files["dir"] / "nan_tuned.safetensors",
                       files["dir"] / "x.safetensors", "--rank", "2")
    assert code == 2
    line = one_line_error(err)
    assert line.startswith(f"{files['dir'] / 'nan_tuned.safetensors'} [{Q}.weight]: ") and "non-finite" in line


# -- 2. the output is checked before the SVD; the docs' extract example runs --------------------

def test_docs_extract_example_runs(files, monkeypatch):
    text = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    line = re.search(r"^ops\.extract\(.*\)$", text, re.M).group(0)
    monkeypatch.chdir(files["dir"])  # holds base.safetensors and tuned.safetensors
    report = eval(line, {"ops": ops})
    assert report.format == "peft" and len(pl.load(report.out)) == len(files["obj"])


@pytest.mark.parametrize("case", ["peft-file-name", "save-option", "exists", "file-format-dir"])
def test_extract_and_resize_check_the_output_before_the_svd(monkeypatch, files, case):
    d = files["dir"]
    (d / "taken.safetensors").write_bytes(b"x")
    (d / "adir").mkdir()
    out, kw = {"peft-file-name": (d / "o.safetensors", {"to": "peft"}),
               "save-option": (d / "o.safetensors", {"to": "portable", "save_options": {"bogus": 1}}),
               "exists": (d / "taken.safetensors", {"to": "portable"}),
               "file-format-dir": (d / "adir", {"to": "portable", "force": True})}[case]
    no_svd(monkeypatch)
    with pytest.raises(pl.LoraError) as caught:
        ops.extract(files["base"], files["tuned"], out, rank=2, **kw)
    assert caught.value.file == str(out)
    with pytest.raises(pl.LoraError) as caught:
        ops.resize(files["adapter"], out, rank=1, **kw)
    assert caught.value.file == str(out)


def test_resize_checks_the_default_format_before_the_svd(monkeypatch, files):
    pl.save(files["obj"], files["dir"] / "peft", format="peft")
    no_svd(monkeypatch)
    with pytest.raises(pl.LoraError, match="is a directory"):
        ops.resize(files["dir"] / "peft", files["dir"] / "small.safetensors", rank=1)  # to: the source's, peft


# -- 3. --debug keeps the exit codes ----------------------------------------------------------

def test_debug_prints_the_traceback_and_keeps_the_exit_code(capsys, monkeypatch, files):
    for argv in (["--debug", "inspect", files["dir"] / "nope"], ["inspect", files["dir"] / "nope", "--debug"]):
        code, _, err = run(capsys, *argv)
        assert code == 2
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("portable-lora: error: ")
        assert "no such file" in err

    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(ops, "inspect", boom)
    code, _, err = run(capsys, "--debug", "inspect", files["adapter"])
    assert code == 3 and "Traceback" in err and "internal error: RuntimeError: bug" in err


# -- 4. demo --out into an existing directory ---------------------------------------------------

def test_demo_refuses_an_occupied_target_before_writing(capsys, tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "adapter-peft").write_text("precious")
    code, stdout, err = run(capsys, "demo", "--out", out, "--backends", "numpy")
    assert code == 2 and stdout == ""
    line = one_line_error(err)
    assert line.startswith(f"{out / 'adapter-peft'}: exists and is not a directory") and "demo" in line
    assert "cannot express" not in line
    assert sorted(p.name for p in out.iterdir()) == ["adapter-peft"]  # nothing written
    assert (out / "adapter-peft").read_text() == "precious"


def test_demo_reuses_its_directory_and_leaves_other_files(capsys, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for _ in range(2):  # the second run replaces the first one's outputs
        code, j = run(capsys, "demo", "--out", out, "--backends", "numpy", "--json")[:2]
        assert code == 0 and json.loads(j)["ok"]
    assert (out / "notes.txt").read_text() == "mine"


# -- 5. verify: NaN and tolerances -------------------------------------------------------------

def test_verify_reports_non_finite_honestly(capsys, files):
    pl.save(with_nan(files["obj"]), files["dir"] / "nan.safetensors")
    nan = files["dir"] / "nan.safetensors"
    code, out, _ = run(capsys, "verify", nan, nan)
    assert code == 1
    row = next(line for line in out.splitlines() if Q in line)
    assert "not finite" in row and "nan" in row.split()[-2]  # rel err
    code, out, _ = run(capsys, "verify", files["adapter"], nan, "--json")
    j = json.loads(out)
    assert code == 1 and not j["ok"] and j["max_relative_error"] is None
    (bad,) = j["differing"]
    assert bad["module"] == Q and bad["status"].startswith("not finite") and bad["relative_error"] is None


@pytest.mark.parametrize("option,value", [("--rtol", "-1"), ("--rtol", "nan"), ("--atol", "-1e-3"),
                                          ("--atol", "nan"), ("--rtol", "inf")])
def test_verify_rejects_bad_tolerances(capsys, files, option, value):
    code, out, err = run(capsys, "verify", files["adapter"], files["adapter"], f"{option}={value}")
    assert code == 2 and out == ""
    assert one_line_error(err).startswith(f"{option}: ")
    with pytest.raises(pl.LoraError) as caught:
        ops.verify(files["adapter"], files["adapter"], **{option[2:]: float(value)})
    assert caught.value.key == option[2:]


# -- 6. extract says why nothing came out --------------------------------------------------------

def test_extract_gives_the_real_cause_of_nothing_to_extract(capsys, files):
    d = files["dir"]
    code, _, err = run(capsys, "extract", files["base"], files["tuned"], d / "x.safetensors", "--rank", "2",
                       "--modules", "nomatch")
    line = one_line_error(err)
    assert code == 2 and line.startswith("--modules: ") and "'nomatch' matches none" in line
    code, _, err = run(capsys, "extract", files["adapter"], files["tuned"], d / "x.safetensors", "--rank", "2")
    line = one_line_error(err)
    assert code == 2 and "no tensor name is in both checkpoints" in line and "differs" not in line
    code, _, err = run(capsys, "extract", files["base"], files["base"], d / "x.safetensors", "--rank", "2")
    assert code == 2 and "no 2-D or 4-D weight differs" in one_line_error(err)
    assert not (d / "x.safetensors").exists()


# -- 7. errors name the file or the command-line option ---------------------------------------

def test_errors_name_the_file_or_the_option(capsys, files):
    d = files["dir"]
    code, _, err = run(capsys, "convert", files["adapter"], d / "o", "--to", "portable", "--strip-prefix", "foo.")
    assert code == 2 and one_line_error(err).startswith(f"{files['adapter']} [")
    code, _, err = run(capsys, "merge", files["base"], files["adapter"], d / "m.safetensors", "--strength", "nan")
    assert code == 2 and one_line_error(err).startswith("--strength: ")
    code, _, err = run(capsys, "check", files["adapter"], "--dtypes", "float7")
    assert code == 2 and one_line_error(err).startswith("--dtypes: ")
    kohya = d / "te.safetensors"
    assert run(capsys, "convert", files["adapter"], kohya, "--to", "kohya", "--add-prefix", "text_encoder.")[0] == 0
    code, _, err = run(capsys, "inspect", kohya, "--load-option", "naming=sd9")
    assert code == 2 and one_line_error(err).startswith(f"{kohya} [naming]: ")
    code, _, err = run(capsys, "inspect", files["adapter"], "--load-option", "convention=raw")
    assert code == 2 and "--convention" in one_line_error(err)  # was an internal error (TypeError)


# -- 8. unknown options list the valid ones ----------------------------------------------------

def test_unknown_options_list_the_valid_ones(capsys, files):
    d = files["dir"]
    code, _, err = run(capsys, "convert", files["adapter"], d / "p", "--to", "peft", "--save-option", "bogus=1")
    line = one_line_error(err)
    assert code == 2 and "['bogus']" in line and "fan_in_fan_out" in line and "task_type" in line
    assert not (d / "p").exists()
    pl.save(files["obj"], d / "peft", format="peft")
    code, _, err = run(capsys, "inspect", d / "peft", "--load-option", "bogus=1")
    line = one_line_error(err)
    assert code == 2 and "['bogus']" in line and "extra_tensors" in line


# -- 9. merge never writes over (or around) what it reads -------------------------------------------

def test_merge_refuses_to_overwrite_the_adapter_even_with_force(capsys, files):
    before = files["adapter"].read_bytes()
    code, _, err = run(capsys, "merge", files["base"], files["adapter"], files["adapter"], "--force")
    assert code == 2 and "adapter being read" in one_line_error(err)
    assert files["adapter"].read_bytes() == before


def test_merge_refuses_an_output_directory_holding_its_inputs(capsys, files):
    d = files["dir"]
    sub = d / "work"
    sub.mkdir()
    pl.save(files["obj"], sub / "a.safetensors")
    code, _, err = run(capsys, "merge", files["base"], sub / "a.safetensors", sub, "--force")
    assert code == 2 and "adapter being read" in one_line_error(err)
    assert (sub / "a.safetensors").is_file()


def test_the_python_merge_protects_its_inputs_too(files):
    """ops.merge, not only the command line, refuses an output that would replace an input."""
    sub = files["dir"] / "work"
    sub.mkdir()
    pl.save(files["obj"], sub / "a.safetensors")
    for out, adapter in ((files["adapter"], files["adapter"]), (sub, sub / "a.safetensors"),
                         (files["dir"], files["adapter"])):
        with pytest.raises(pl.LoraError, match="being read"):
            ops.merge(files["base"], adapter, out, force=True)
    assert (sub / "a.safetensors").is_file() and files["adapter"].is_file() and files["base"].is_file()


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_a_pickle_named_output_is_refused_before_the_svd(monkeypatch, files, suffix):
    no_svd(monkeypatch)
    with pytest.raises(pl.LoraError, match="name it .safetensors"):
        ops.extract(files["base"], files["tuned"], files["dir"] / f"x{suffix}", rank=2)
    with pytest.raises(pl.LoraError, match="name it .safetensors"):
        ops.resize(files["adapter"], files["dir"] / f"r{suffix}", rank=2)
    assert not list(files["dir"].glob(f"*{suffix}"))


def test_check_refuses_a_nan_adapter_and_the_report_keeps_nan(capsys, files):
    pl.save(with_nan(files["obj"]), files["dir"] / "nan.safetensors")
    code, _, err = run(capsys, "check", files["dir"] / "nan.safetensors")
    assert code == 2 and f"{Q}.lora_A" in one_line_error(err)
    from portable_lora.testing import EquivalenceRow, _worse
    assert np.isnan(_worse(0.5, float("nan"))) and np.isnan(_worse(float("nan"), 0.5))
    assert not EquivalenceRow("numpy", "float32", float("nan"), 0.0, 1e-5, Q).ok
