"""Bad inputs fail loudly, naming the file and the key or field, and write nothing.

Every bad file is built from a valid portable-format file (``examples.random_adapter`` +
``portable_lora.save``) by one targeted change. Each case is checked three ways: ``load``
raises :class:`LoraError` naming the file and the key or field; the load-then-save (convert)
path leaves no output and no temporary; and the CLI's ``convert`` exits with 2.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import pytest

import portable_lora as pl
from portable_lora import LoraError
from portable_lora.formats import _common
from portable_lora.formats import portable as portable_format
from portable_lora.io.safetensors_io import SafetensorsFile, write_safetensors
from portable_lora.validation import NonFiniteWarning, check_finite, nonfinite_counts

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.0.mlp.down_proj"
SHAPES = {Q: (8, 6), DOWN: (6, 10)}


# -- building bad files ----------------------------------------------------------------------
def valid_adapter(**kwargs) -> pl.Adapter:
    return pl.examples.random_adapter(SHAPES, rank=2, alpha=4.0, **kwargs)


def valid_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.safetensors"
    pl.save(valid_adapter(), path)
    return path.read_bytes()


def split(raw: bytes) -> tuple[str, bytes]:
    """(header text, data section) of safetensors bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n].decode("utf-8"), raw[8 + n:]


def join(header: str | bytes | dict, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header)).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def edit_header(raw: bytes, change: Callable[[dict], None]) -> bytes:
    text, data = split(raw)
    header = json.loads(text)
    change(header)
    return join(header, data)


def tensors_and_config(raw: bytes, tmp_path: Path) -> tuple[dict[str, np.ndarray], dict]:
    path = tmp_path / "parts.safetensors"
    path.write_bytes(raw)
    with SafetensorsFile(path) as f:
        tensors = {k: f.get(k) for k in f.keys()}
        config = json.loads(f.metadata["portable_lora"])
    path.unlink()
    return tensors, config


def rebuild(tmp_path: Path, raw: bytes, change: Callable[[dict, dict], object]) -> bytes:
    """A structurally valid safetensors file whose tensors or config were changed.

    ``change(tensors, config)`` edits in place, or returns the config text to store verbatim.
    """
    tensors, config = tensors_and_config(raw, tmp_path)
    text = change(tensors, config)
    path = tmp_path / "rebuilt.safetensors"
    write_safetensors(path, tensors, {"portable_lora": text if isinstance(text, str) else json.dumps(config)})
    out = path.read_bytes()
    path.unlink()
    return out


def config_text(raw: bytes, tmp_path: Path, edit: Callable[[str], str]) -> bytes:
    """Rebuild with the config's JSON text edited as a string (duplicate keys, huge numbers)."""
    return rebuild(tmp_path, raw, lambda t, c: edit(json.dumps(c)))


def spec(config: dict, module: str = Q) -> dict:
    return config["modules"][module]


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[bytes, Path], bytes]
    names: str  # a key or field the error must name (in ``key`` or the message)
    bug: str | None = None  # a known bug outside the files this suite owns: xfail(strict)


def _header_entry(raw: bytes, name: str, field: str, value) -> bytes:
    return edit_header(raw, lambda h: h[name].__setitem__(field, value))


def _shift_offsets(raw: bytes, name: str, delta: int, extra: bytes = b"") -> bytes:
    text, data = split(raw)
    header = json.loads(text)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + delta, end + delta]
    return join(header, data + extra)


def _last_tensor(raw: bytes) -> str:
    header = json.loads(split(raw)[0])
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def _duplicate_tensor_name(raw: bytes) -> bytes:
    # the same entry twice: the reference safetensors package accepts this (last one wins)
    text, data = split(raw)
    header = json.loads(text)
    name = f"{Q}.lora_A"
    entry = json.dumps(header[name])
    return join(text.rstrip()[:-1] + f", {json.dumps(name)}: {entry}}}", data)


def _metadata_tensor(raw: bytes) -> bytes:
    text, data = split(raw)
    header = json.loads(text)
    header["__metadata__"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
    return join(header, data + b"\0" * 4)


def _non_utf8(raw: bytes) -> bytes:
    text, data = split(raw)
    encoded = text.encode("utf-8")
    at = encoded.index(b"q_proj")  # inside a tensor name
    return join(encoded[:at] + b"\xff" + encoded[at + 1:], data)


def _drop_tensor(suffix: str, module: str = Q):
    def change(tensors, config):
        del tensors[f"{module}.{suffix}"]
    return change


def _set_spec(field: str, value, module: str = Q):
    def change(tensors, config):
        spec(config, module)[field] = value
    return change


def _del_spec(field: str):
    def change(tensors, config):
        del spec(config)[field]
    return change


def _rank_zero(tensors, config):
    tensors[f"{Q}.lora_A"] = tensors[f"{Q}.lora_A"][:0]
    tensors[f"{Q}.lora_B"] = tensors[f"{Q}.lora_B"][:, :0]
    spec(config).update(rank=0, scale=None)


def _b_rank_three(tensors, config):
    b = tensors[f"{Q}.lora_B"]
    tensors[f"{Q}.lora_B"] = np.concatenate([b, b[:, :1]], axis=1)


def _deep(tensors, config):
    return "[" * 100_000 + "]" * 100_000


CASES = [
    # file structure
    Case("truncated-in-length-prefix", lambda raw, tmp: raw[:5], "header length prefix"),
    Case("truncated-in-header", lambda raw, tmp: raw[:8 + len(split(raw)[0]) // 2], "header length prefix"),
    Case("truncated-in-data", lambda raw, tmp: raw[:-3], "truncated"),
    Case("header-length-past-end", lambda raw, tmp: struct.pack("<Q", len(raw)) + raw[8:], "header length prefix"),
    Case("header-over-100MB-cap", lambda raw, tmp: struct.pack("<Q", 100_000_001) + raw[8:], "cap"),
    Case("overlapping-offsets", lambda raw, tmp: _shift_offsets(raw, _last_tensor(raw), -4), "overlap"),
    Case("gapped-offsets", lambda raw, tmp: _shift_offsets(raw, _last_tensor(raw), 8, b"\0" * 8), "gap"),
    Case("tensor-name-repeated", lambda raw, tmp: _duplicate_tensor_name(raw), f"{Q}.lora_A"),
    Case("tensor-named-__metadata__", lambda raw, tmp: _metadata_tensor(raw), "__metadata__"),
    Case("trailing-garbage", lambda raw, tmp: raw + b"garbage!", "after the last tensor"),
    Case("header-not-utf8", lambda raw, tmp: _non_utf8(raw), "UTF-8"),
    Case("header-is-a-json-list", lambda raw, tmp: join("[]", split(raw)[1]), "JSON object"),
    Case("header-not-json", lambda raw, tmp: join(split(raw)[0].replace(":", "=", 1), split(raw)[1]), "JSON"),
    Case("unknown-dtype", lambda raw, tmp: _header_entry(raw, f"{Q}.lora_A", "dtype", "F33"), f"{Q}.lora_A"),
    Case("negative-shape", lambda raw, tmp: _header_entry(raw, f"{Q}.lora_A", "shape", [-2, 6]), f"{Q}.lora_A"),
    Case("bool-in-shape", lambda raw, tmp: _header_entry(raw, f"{Q}.lora_A", "shape", [True, 6]), f"{Q}.lora_A"),
    Case("offsets-disagree-with-shape", lambda raw, tmp: _header_entry(raw, f"{Q}.lora_A", "shape", [2, 5]), f"{Q}.lora_A"),
    Case("offsets-reversed", lambda raw, tmp: _header_entry(raw, f"{Q}.lora_A", "data_offsets", [48, 0]), f"{Q}.lora_A"),
    Case("metadata-not-strings", lambda raw, tmp: edit_header(raw, lambda h: h["__metadata__"].__setitem__("x", 1)), "__metadata__"),
    # adapter consistency
    Case("A-without-B", lambda raw, tmp: rebuild(tmp, raw, _drop_tensor("lora_B")), Q),
    Case("B-without-A", lambda raw, tmp: rebuild(tmp, raw, _drop_tensor("lora_A")), Q),
    Case("factor-ranks-disagree", lambda raw, tmp: rebuild(tmp, raw, _b_rank_three), Q),
    Case("config-rank-disagrees", lambda raw, tmp: rebuild(tmp, raw, _set_spec("rank", 3)), f"{Q}.lora_A"),
    Case("rank-zero", lambda raw, tmp: rebuild(tmp, raw, _rank_zero), Q),
    Case("rank-negative", lambda raw, tmp: rebuild(tmp, raw, _set_spec("rank", -2)), f"{Q}.lora_A"),
    Case("rank-float", lambda raw, tmp: rebuild(tmp, raw, _set_spec("rank", 2.0)), "rank"),
    Case("rank-bool", lambda raw, tmp: rebuild(tmp, raw, _set_spec("rank", True)), "rank"),
    Case("rank-string", lambda raw, tmp: rebuild(tmp, raw, _set_spec("rank", "8")), "rank"),
    Case("alpha-missing", lambda raw, tmp: rebuild(tmp, raw, _del_spec("alpha")), "alpha"),
    Case("alpha-nan", lambda raw, tmp: rebuild(tmp, raw, _set_spec("alpha", float("nan"))), Q),
    Case("alpha-infinite", lambda raw, tmp: config_text(raw, tmp, lambda t: t.replace('"alpha": 4.0', '"alpha": 1e999', 1)), Q),
    Case("alpha-string", lambda raw, tmp: rebuild(tmp, raw, _set_spec("alpha", "16")), "alpha"),
    Case("alpha-bool", lambda raw, tmp: rebuild(tmp, raw, _set_spec("alpha", True)), "alpha"),
    Case("scale-disagrees", lambda raw, tmp: rebuild(tmp, raw, _set_spec("scale", 3.0)), Q),
    Case("unknown-rule", lambda raw, tmp: rebuild(tmp, raw, _set_spec("rule", "alpha*rank")), Q),
    Case("unknown-kind", lambda raw, tmp: rebuild(tmp, raw, _set_spec("kind", "attention")), Q),
    Case("dora-flag-without-magnitude", lambda raw, tmp: rebuild(tmp, raw, _set_spec("dora", True)), Q),
    Case("integer-factor", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: t.__setitem__(
        f"{Q}.lora_A", t[f"{Q}.lora_A"].astype(np.int32))), Q),
    Case("float8-factor", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: t.__setitem__(
        f"{Q}.lora_A", t[f"{Q}.lora_A"].astype(ml_dtypes.float8_e4m3fn))), "bfloat16, float32 or float64"),
    Case("magnitude-wrong-shape", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: (
        t.__setitem__(f"{Q}.magnitude", np.ones(3, np.float32)), spec(c).__setitem__("dora", True))), Q),
    # config and names
    Case("config-not-json", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: "{modules: }"), "portable_lora"),
    Case("config-is-a-list", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: "[]"), "portable_lora"),
    Case("format-version-2", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: c.__setitem__("format_version", 2)), "format_version"),
    Case("format-marker-other", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: c.__setitem__("format", "other")), "format"),
    Case("format-marker-missing", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: c.__delitem__("format")), "format"),
    Case("modules-missing", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: c.pop("modules")), "modules"),
    Case("modules-a-list", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: c.__setitem__("modules", [])), "modules"),
    Case("provenance-a-string", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: c.__setitem__("provenance", "x")), "provenance"),
    Case("non-adapter-tensor", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: t.__setitem__(
        "model.embed_tokens.weight", np.ones((4, 2), np.float32))), "model.embed_tokens.weight"),
    Case("tensor-of-unlisted-module", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: c["modules"].pop(DOWN)),
         f"{DOWN}.lora_A"),
    Case("module-spec-not-an-object", lambda raw, tmp: rebuild(tmp, raw, lambda t, c: c["modules"].__setitem__(Q, 2)), Q),
    # JSON hazards: repeated keys, numbers too large for a float, nesting too deep
    Case("config-key-repeated", lambda raw, tmp: config_text(raw, tmp, lambda t: t.replace(
        '"alpha": 4.0', '"alpha": 4.0, "alpha": 400.0', 1).replace('"scale": 2.0, ', '', 1)), "alpha"),
    Case("alpha-huge-integer", lambda raw, tmp: config_text(raw, tmp, lambda t: t.replace(
        '"alpha": 4.0', '"alpha": 1' + "0" * 400, 1)), Q),
    Case("scale-huge-integer", lambda raw, tmp: config_text(raw, tmp, lambda t: t.replace(
        '"scale": 2.0', '"scale": 1' + "0" * 400, 1)), Q),
    Case("config-nested-too-deep", lambda raw, tmp: rebuild(tmp, raw, _deep), "portable_lora"),
]


def _params(cases=CASES):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else [])
            for c in cases]


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


@pytest.fixture
def valid(tmp_path) -> bytes:
    return valid_bytes(tmp_path)


def _bad_file(case: Case, valid: bytes, tmp_path: Path) -> Path:
    src = tmp_path / "bad.safetensors"
    src.write_bytes(case.build(valid, tmp_path))
    return src


def _assert_names(exc: LoraError, src: Path, names: str) -> None:
    assert exc.file == str(src), f"the error does not name the file: {exc}"
    assert names in (exc.key or "") or names in str(exc), f"the error does not name {names!r}: {exc}"


def test_there_are_enough_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", _params())
def test_load_refuses_naming_file_and_key(case, valid, tmp_path):
    src = _bad_file(case, valid, tmp_path)
    with pytest.raises(LoraError) as info:
        pl.load(src, format="portable")
    _assert_names(info.value, src, case.names)


@pytest.mark.parametrize("case", _params())
def test_convert_writes_nothing(case, valid, tmp_path):
    src = _bad_file(case, valid, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "converted.safetensors"
    with pytest.raises(LoraError) as info:
        pl.save(pl.load(src), dst)  # detection, then the portable loader
    assert info.value.file == str(src)
    assert not dst.exists() and list(out.iterdir()) == []
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("case", _params())
def test_cli_convert_exits_2(case, valid, tmp_path, capsys):
    cli = pytest.importorskip("portable_lora.cli")
    src = _bad_file(case, valid, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "converted.safetensors"
    assert cli.main(["convert", str(src), str(dst), "--to", "portable"]) == 2
    assert str(src) in capsys.readouterr().err
    assert list(out.iterdir()) == [] and _temporaries(tmp_path) == []


def test_every_case_really_changed_the_file(valid, tmp_path):
    # a builder that silently produced the valid file would make its case prove nothing
    for case in CASES:
        assert case.build(valid, tmp_path) != valid, case.id


# -- cases that must load ----------------------------------------------------------------------
def test_negative_alpha_loads_as_a_negated_delta(tmp_path):
    """The portable format allows α < 0: the math gives -ΔW, which is what the file says."""
    positive = valid_adapter()
    negative = pl.Adapter({n: pl.LoraModule(m.A, m.B, alpha=-m.alpha, rule=m.rule) for n, m in positive.items()})
    path = tmp_path / "neg.safetensors"
    pl.save(negative, path)
    back = pl.load(path)
    assert back[Q].alpha == -4.0 and back[Q].scale == -2.0
    np.testing.assert_array_equal(back.delta_weight(Q), -positive.delta_weight(Q))


NAMES = ["model.weight", "q.lora_A", "lora_A", "x.lora_B.lora_A", "m.alpha", "alpha", "default",
         "blocks.0.lora_A.default.weight", "a/../../b", "..", "/etc/passwd", "C:\\Windows\\x",
         "nul\x00inside", "line\nbreak", "__metadata__", "ünïcode.模块", "~/.ssh/id_rsa"]


def test_odd_module_names_round_trip_exactly_and_touch_no_path(tmp_path):
    adapter = pl.examples.random_adapter({n: (4, 3) for n in NAMES}, rank=2)
    work = tmp_path / "work"
    work.mkdir()
    path = work / "names.safetensors"
    pl.save(adapter, path)
    before = sorted(os.walk(tmp_path))
    back = pl.load(path)
    assert list(back) == NAMES
    for name in NAMES:
        np.testing.assert_array_equal(back[name].A, adapter[name].A)
        np.testing.assert_array_equal(back[name].B, adapter[name].B)
    assert sorted(os.walk(tmp_path)) == before  # no path named in the file was created


class _Audit:
    """Records file opens, imports and process launches while active (audit hooks stay forever)."""
    active = False
    events: list[tuple[str, tuple]] = []

    @classmethod
    def hook(cls, event, args):
        if cls.active and (event in ("open", "import", "exec", "compile", "os.system",
                                     "subprocess.Popen", "os.exec", "os.posix_spawn")):
            cls.events.append((event, args))


sys.addaudithook(_Audit.hook)


def test_config_fields_naming_code_or_paths_are_inert_strings(valid, tmp_path):
    hostile = {"source_path": "/etc/passwd", "__class__": "os.system", "import": "subprocess",
               "loader": {"__reduce__": ["os.system", "touch /tmp/pwned"]}}
    src = tmp_path / "hostile.safetensors"
    src.write_bytes(rebuild(tmp_path, valid, lambda t, c: c.__setitem__("provenance", hostile)))
    _Audit.events.clear()
    _Audit.active = True
    try:
        direct = portable_format.load(src)
    finally:
        _Audit.active = False
    opened = [str(args[0]) for event, args in _Audit.events if event == "open"]
    assert opened == [str(src)], f"the loader opened {opened}"
    assert [e for e, _ in _Audit.events if e not in ("open",)] == []
    assert direct.provenance["source_path"] == "/etc/passwd"  # a string, never opened
    assert direct.provenance["__class__"] == "os.system"
    assert direct.provenance["loader"] == {"__reduce__": ["os.system", "touch /tmp/pwned"]}
    # through the public load, source_path records where the file really came from
    assert pl.load(src).provenance["source_path"] == str(src)
    assert not Path("/tmp/pwned").exists()


def test_bf16_adapter_loads_exactly(tmp_path):
    adapter = valid_adapter(dtype=ml_dtypes.bfloat16)
    path = tmp_path / "bf16.safetensors"
    pl.save(adapter, path)
    back = pl.load(path)
    assert back[Q].A.dtype == ml_dtypes.bfloat16
    assert back[Q].A.tobytes() == adapter[Q].A.tobytes()
    assert back[Q].B.tobytes() == adapter[Q].B.tobytes()


# -- NaN / Inf: loading is allowed, merging refuses unless allowed ------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("where", ["lora_A", "lora_B", "magnitude"])
def test_nonfinite_loads_but_check_finite_refuses(tmp_path, dtype, where):
    adapter = valid_adapter(dtype=dtype, dora=True)
    target = {"lora_A": adapter[DOWN].A, "lora_B": adapter[DOWN].B, "magnitude": adapter[DOWN].magnitude}[where]
    target.flat[0] = np.nan
    target.flat[-1] = -np.inf
    path = tmp_path / "nan.safetensors"
    pl.save(adapter, path)
    back = pl.load(path)  # loading (and inspecting, converting) is allowed
    assert np.isnan(np.asarray(back[DOWN].A if where == "lora_A" else back[DOWN].B if where == "lora_B"
                               else back[DOWN].magnitude, np.float32).flat[0])
    with pytest.raises(LoraError) as info:
        check_finite(back, file=path)
    exc = info.value
    assert exc.file == str(path) and exc.key == f"{DOWN}.{where}"
    assert "2 of" in exc.detail and DOWN in exc.detail and "allow_nonfinite" in exc.detail
    assert nonfinite_counts(back) == {f"{DOWN}.{where}": (2, target.size)}
    with pytest.warns(NonFiniteWarning, match=f"{DOWN}.{where}"):
        assert check_finite(back, file=path, allow_nonfinite=True) == nonfinite_counts(back)


def test_check_finite_passes_a_finite_adapter_and_counts_every_bad_tensor():
    adapter = valid_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_finite(adapter) == {}
    adapter[Q].A[0, 0] = np.inf
    adapter[DOWN].B[1, 1] = np.nan
    assert set(nonfinite_counts(adapter)) == {f"{Q}.lora_A", f"{DOWN}.lora_B"}
    with pytest.raises(LoraError, match="1 more tensors"):
        check_finite(adapter)


# -- conversion hazards --------------------------------------------------------------------------
def test_fold_scale_warns_on_fp16_underflow_with_the_fraction():
    B = np.array([[1e-4, 2e-4], [0.5, 0.25]], np.float16)
    with pytest.warns(_common.UnderflowWarning) as record:
        folded = _common.fold_scale(B, 1e-4, name="m.lora_B", file="out.safetensors")
    assert folded.dtype == np.float16
    lost = int(np.count_nonzero((folded == 0) & (B != 0)))
    assert lost == 2  # 1e-8 and 2e-8 are below fp16's smallest subnormal (6e-8)
    message = str(record[0].message)
    assert "m.lora_B" in message and "out.safetensors" in message
    assert f"{lost} of 4" in message and "50.00%" in message
    # where nothing underflows there is no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _common.fold_scale(np.float16([[0.5, 0.25]]), 0.5, name="m", file=None)


def test_fold_scale_refuses_overflow_and_keeps_a_switched_off_module_silent():
    B = np.float16([[1.0, 100.0], [0.5, -200.0]])
    with pytest.raises(LoraError, match=r"overflows 2 of 4 entries") as info:
        _common.fold_scale(B, 1000.0, name="m.lora_B", file="out.safetensors")
    assert info.value.key == "m.lora_B" and info.value.file == "out.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scale 0 is no underflow: the module is off on purpose
        assert not _common.fold_scale(B, 0.0, name="m", file=None).any()


def test_fold_scale_rounds_the_exact_product_once():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        B = rng.standard_normal((64, 64)).astype(dtype)
        factor = 1 / 3
        exact = B.astype(np.float64) * factor  # exact up to float64's own rounding of a product
        assert np.array_equal(_common.fold_scale(B, factor, name="m"), exact.astype(dtype))


def test_to_uniform_picks_the_common_nonzero_scale():
    adapter = pl.examples.random_adapter({"a": (4, 4), "b": (4, 4), "c": (4, 4)}, rank=2, alpha=4.0)
    adapter["a"].alpha = adapter["b"].alpha = 0.0  # two modules switched off, one at scale 2
    factors, rank, scale = _common.to_uniform(adapter)
    assert scale == 2.0 and not factors["a"][1].any() and np.array_equal(factors["c"][1], adapter["c"].B)


def test_a_pickle_suffix_is_refused_as_an_output(tmp_path):
    with pytest.raises(LoraError, match="name it .safetensors") as info:
        pl.save(valid_adapter(), tmp_path / "out.pt")
    assert info.value.file == str(tmp_path / "out.pt") and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config, says", [('{"peft_type": "LORA", ', "cannot be read: not valid JSON"),
                                          ('{"x": 1}', "neither 'peft_type' (PEFT) nor 'lora_parameters'")])
def test_detection_says_why_an_adapter_config_matched_nothing(tmp_path, config, says):
    pl.save(valid_adapter(), tmp_path / "p", format="peft")
    (tmp_path / "p" / "adapter_config.json").write_text(config)
    with pytest.raises(LoraError, match="unknown adapter layout") as info:
        pl.load(tmp_path / "p")
    assert says in str(info.value)


def test_a_file_format_named_for_a_directory_says_so(tmp_path):
    pl.save(valid_adapter(), tmp_path / "p", format="peft")
    for fmt in ("portable", "kohya"):
        with pytest.raises(LoraError, match=f"a {fmt} adapter is one .safetensors file; this is a directory"):
            pl.load(tmp_path / "p", format=fmt)
    with pytest.raises(LoraError, match=r"no adapters.safetensors \(the mlx-lm weights\)"):
        pl.load(tmp_path / "p", format="mlx-lm")


class _CreatesMarker:
    """Unpickling this creates a file: proof the loader never unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".PT"])
def test_pickled_files_are_refused_unopened(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    src = tmp_path / f"adapter_model{suffix}"
    src.write_bytes(pickle.dumps(_CreatesMarker(marker)))
    with pytest.raises(LoraError, match="pickle") as info:
        pl.load(src)
    assert info.value.file == str(src)
    with pytest.raises(LoraError) as info:
        pl.load(src, format="portable")  # naming a format does not bypass the refusal
    assert info.value.file == str(src)
    assert not marker.exists()


def test_directory_holding_only_a_pickle_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "peft_type": "LORA"}))
    (adapter_dir / "adapter_model.bin").write_bytes(pickle.dumps(_CreatesMarker(marker)))
    with pytest.raises(LoraError, match="pickle") as info:
        pl.load(adapter_dir)
    assert info.value.file == str(adapter_dir / "adapter_model.bin")
    assert not marker.exists()


# -- writing bad adapters ----------------------------------------------------------------------
def test_unwritable_module_name_is_refused_before_writing(tmp_path):
    adapter = pl.examples.random_adapter({"bad\ud800name": (4, 3)}, rank=2)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(LoraError) as info:
        pl.save(adapter, dst)
    assert "bad\ud800name" in (info.value.key or "") and info.value.file == str(dst)
    assert list(tmp_path.iterdir()) == []


def test_nan_in_provenance_is_refused_with_lora_error(tmp_path):
    adapter = valid_adapter()
    adapter.provenance["measured"] = math.nan
    dst = tmp_path / "out.safetensors"
    with pytest.raises(LoraError):
        pl.save(adapter, dst)
    assert list(tmp_path.iterdir()) == []


def test_detection_keeps_the_tensor_name(valid, tmp_path):
    case = next(c for c in CASES if c.id == "unknown-dtype")
    src = _bad_file(case, valid, tmp_path)
    with pytest.raises(LoraError) as info:
        pl.load(src)  # no format given: detection reports why the file is not safetensors
    assert info.value.file == str(src) and "F33" in str(info.value)
    assert f"{Q}.lora_A" in str(info.value)


def test_cli_merge_refuses_nonfinite_unless_allowed(tmp_path, capsys):
    cli = pytest.importorskip("portable_lora.cli")
    adapter = valid_adapter()
    adapter[DOWN].B[0, 0] = np.nan
    src = tmp_path / "nan.safetensors"
    pl.save(adapter, src)
    base = tmp_path / "base.safetensors"
    write_safetensors(base, {f"{name}.weight": w for name, w in pl.examples.random_weights(adapter).items()})
    out = tmp_path / "merged.safetensors"
    assert cli.main(["merge", str(base), str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{DOWN}.lora_B" in err and str(src) in err
    assert not out.exists() and _temporaries(tmp_path) == []
    assert cli.main(["merge", str(base), str(src), str(out), "--allow-nonfinite"]) == 0
    with SafetensorsFile(out) as merged:
        assert np.isnan(merged.get(f"{DOWN}.weight")).any()  # what the user asked for
        assert np.isfinite(merged.get(f"{Q}.weight")).all()


def test_merge_overflow_is_refused_or_written_with_a_warning(tmp_path):
    from portable_lora import ops
    adapter = valid_adapter()
    adapter[Q].alpha = 4.0e6  # scale 2e6: ΔW far past float16's 65504
    base = tmp_path / "base.safetensors"
    write_safetensors(base, {f"{name}.weight": w for name, w in pl.examples.random_weights(adapter).items()})
    out = tmp_path / "merged.safetensors"
    with pytest.raises(LoraError, match="non-finite|overflow"):
        ops.merge(base, adapter, out, dtype="float16")
    assert not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's own cast warning stays quiet
        report = ops.merge(base, adapter, out, dtype="float16", allow_nonfinite=True)
    assert any(f"{Q}.weight" in w and "non-finite" in w for w in report.warnings), report.warnings
    assert not any(DOWN in w for w in report.warnings)


@pytest.mark.parametrize("base_dtype, dtype", [(np.float32, "float16"), (np.float64, "float32"), (np.float64, "bfloat16")])
def test_a_cast_that_overflows_is_refused_in_untouched_and_merged_tensors(tmp_path, base_dtype, dtype):
    """--dtype narrows every float tensor: one that no module patches is checked too."""
    from portable_lora import ops
    adapter = valid_adapter()
    weights = {f"{name}.weight": w.astype(base_dtype) for name, w in pl.examples.random_weights(adapter).items()}
    big = float(ml_dtypes.finfo(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)).max) * 4
    weights["other.bias"] = np.array([big, 1.0], base_dtype)  # patched by no module
    base = tmp_path / "base.safetensors"
    write_safetensors(base, weights)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(LoraError, match="turns 1 finite values to ±inf") as info:
        ops.merge(base, adapter, out, dtype=dtype)
    assert info.value.key == "other.bias" and info.value.file == str(base) and not out.exists()
    report = ops.merge(base, adapter, out, dtype=dtype, allow_nonfinite=True)
    assert any("other.bias" in w for w in report.warnings)
    weights["other.bias"] = np.array([1.0, 1.0], base_dtype)  # now only the merged tensor overflows
    weights[f"{Q}.weight"][0, 0] = big
    write_safetensors(base, weights)
    with pytest.raises(LoraError, match="non-finite") as info:
        ops.merge(base, adapter, tmp_path / "m2.safetensors", dtype=dtype)
    assert info.value.key == f"{Q}.weight"
