"""DiffSynth-Studio format: round trips, the alpha conventions, and DiffSynth's own loader rule."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest

import portable_lora as pl
from portable_lora import Adapter, LoraError, LoraModule
from portable_lora.formats import diffsynth
from portable_lora.formats._common import UnderflowWarning
from portable_lora.io.safetensors_io import read_safetensors, write_safetensors

RNG = np.random.default_rng(11)


def rand(*shape, scale=0.3, dtype=np.float32):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def general_lora_loader(weights, lora_state_dict, alpha=1.0):
    """DiffSynth-Studio 1.x ``GeneralLoRALoader`` (diffsynth/lora/__init__.py), in NumPy.

    Transcribed line by line: module names are the ``lora_B`` key without ``lora_B``, the
    adapter name after it and ``.weight``, and without a leading ``diffusion_model``; the
    weight gets ``alpha · up @ down`` (1×1 conv factors squeezed), no division by rank.
    """
    names = {}
    for key in lora_state_dict:
        if ".lora_B." not in key:
            continue
        keys = key.split(".")
        if len(keys) > keys.index("lora_B") + 2:
            keys.pop(keys.index("lora_B") + 1)
        keys.pop(keys.index("lora_B"))
        if keys[0] == "diffusion_model":
            keys.pop(0)
        keys.pop(-1)
        names[".".join(keys)] = (key, key.replace(".lora_B.", ".lora_A."))
    out = dict(weights)
    for name, (up_key, down_key) in names.items():
        up = lora_state_dict[up_key].astype(np.float32)
        down = lora_state_dict[down_key].astype(np.float32)
        if up.ndim == 4:
            delta = alpha * (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
        else:
            delta = alpha * (up @ down)
        out[name] = weights[name].astype(np.float32) + delta
    return out


def adapter_and_weights(dtype=np.float32):
    adapter = Adapter(base_model="wan (tiny)", provenance={"note": "kept"})
    adapter["blocks.0.self_attn.q"] = LoraModule(rand(4, 16, dtype=dtype), rand(16, 4, dtype=dtype), alpha=8)
    adapter["blocks.0.self_attn.k"] = LoraModule(rand(2, 16, dtype=dtype), rand(16, 2, dtype=dtype), alpha=0.5,
                                                 rule="raw")
    adapter["blocks.0.ffn.0"] = LoraModule(rand(3, 16, dtype=dtype), rand(24, 3, dtype=dtype), alpha=3,
                                           rule="alpha/sqrt(rank)")
    adapter["patch.proj"] = LoraModule(rand(2, 6, 1, 1, dtype=dtype), rand(8, 2, 1, 1, dtype=dtype), alpha=4,
                                       kind="conv")
    weights = {n: rand(*m.weight_shape, scale=1.0) for n, m in adapter.items()}
    return adapter, weights


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["f32", "f16", "bf16"])
def test_diffsynth_loader_applies_our_file(tmp_path, dtype):
    adapter, weights = adapter_and_weights(dtype)
    path = tmp_path / "lora.safetensors"
    pl.save(adapter, path, format="diffsynth")
    tensors, _ = read_safetensors(path)
    merged = general_lora_loader(weights, tensors)  # DiffSynth's default alpha=1
    tol = {np.float32: 1e-6, np.float16: 2e-3, ml_dtypes.bfloat16: 1e-2}[dtype]
    for name, m in adapter.items():
        expected = weights[name] + m.delta_weight(np.float64)
        np.testing.assert_allclose(merged[name], expected, atol=tol * np.abs(expected).max())
        # the scale went into B; A is bit-exact
        assert np.array_equal(tensors[f"{name}.lora_A.default.weight"], m.A)


def test_round_trip(tmp_path):
    adapter, _ = adapter_and_weights()
    path = tmp_path / "lora.safetensors"
    pl.save(adapter, path, format="diffsynth")
    fmt, reason = pl.detect(path)
    assert fmt == "diffsynth" and "default" in reason
    back = pl.load(path)
    assert back.base_model == "wan (tiny)" and back.provenance["note"] == "kept"
    assert back.provenance["convention"] == "raw" and "scale 1" in back.provenance["convention_reason"]
    for name, m in adapter.items():
        assert back[name].scale == 1.0 and back[name].kind == m.kind
        assert np.array_equal(back[name].A, m.A)
        np.testing.assert_allclose(back.delta_weight(name), m.delta_weight(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("convention,alpha,expected", [
    (None, 0.5, lambda r: 0.5), ("raw", 2.0, lambda r: 2.0), ("alpha/rank", 8.0, lambda r: 8.0 / r),
    ("alpha/rank", None, lambda r: 1.0), ("alpha/sqrt(rank)", 4.0, lambda r: 4.0 / np.sqrt(r)),
])
def test_alpha_conventions(tmp_path, convention, alpha, expected):
    adapter, weights = adapter_and_weights()
    path = tmp_path / "lora.safetensors"
    pl.save(adapter, path, format="diffsynth")
    back = pl.load(path, convention=convention, alpha=alpha)
    for name, m in back.items():
        assert m.scale == pytest.approx(expected(m.rank), rel=1e-12)
    assert back.provenance["convention"] == (convention or "raw")
    if convention in (None, "raw") and alpha is not None:  # DiffSynth 1.x's alpha argument
        tensors, _ = read_safetensors(path)
        merged = general_lora_loader(weights, tensors, alpha=alpha)
        for name in back:
            np.testing.assert_allclose(merged[name], weights[name] + back.delta_weight(name), rtol=1e-5,
                                       atol=1e-6)


def test_accepts_plain_keys_and_diffusion_model_prefix(tmp_path):
    A, B = rand(2, 8), rand(8, 2)
    write_safetensors(tmp_path / "x.safetensors", {"diffusion_model.blocks.1.q.lora_A.weight": A,
                                                   "diffusion_model.blocks.1.q.lora_B.weight": B})
    a = pl.load(tmp_path / "x.safetensors", format="diffsynth")
    assert list(a) == ["blocks.1.q"] and np.array_equal(a["blocks.1.q"].A, A)


def test_underflow_warning_on_fold(tmp_path):
    A = np.ones((2, 4), np.float16)
    B = np.full((4, 2), 1e-4, np.float16)
    adapter = Adapter({"blocks.0.q": LoraModule(A, B, alpha=1e-4, rule="raw")})
    with pytest.warns(UnderflowWarning, match="blocks.0.q"):
        pl.save(adapter, tmp_path / "x.safetensors", format="diffsynth")


def test_no_warning_at_scale_one(tmp_path):
    adapter = Adapter({"blocks.0.q": LoraModule(rand(2, 4, dtype=np.float16), rand(4, 2, dtype=np.float16),
                                                alpha=2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pl.save(adapter, tmp_path / "x.safetensors", format="diffsynth")
    tensors, _ = read_safetensors(tmp_path / "x.safetensors")
    assert np.array_equal(tensors["blocks.0.q.lora_B.default.weight"], adapter["blocks.0.q"].B)


# -- bad input ---------------------------------------------------------------------------------------
def _file(path, extra=None, drop=None):
    t = {"blocks.0.q.lora_A.default.weight": rand(2, 8), "blocks.0.q.lora_B.default.weight": rand(8, 2)}
    t.update(extra or {})
    if drop:
        del t[drop]
    write_safetensors(path, t)
    return path


@pytest.mark.parametrize("drop", ["blocks.0.q.lora_A.default.weight", "blocks.0.q.lora_B.default.weight"])
def test_incomplete_pair(tmp_path, drop):
    p = _file(tmp_path / "x.safetensors", drop=drop)
    with pytest.raises(LoraError, match="incomplete LoRA pair") as exc:
        pl.load(p, format="diffsynth")
    assert exc.value.file == str(p)


@pytest.mark.parametrize("key,match", [("blocks.0.q.alpha", "alpha must be a single number"),
                                       ("blocks.9.q.alpha", "alpha tensor of a module with no LoRA factors"),
                                       ("blocks.0.q.lora_A.weight", "two lora_A tensors"),
                                       ("blocks.0.q.magnitude", "not a DiffSynth LoRA tensor")])
def test_bad_keys(tmp_path, key, match):
    p = _file(tmp_path / "x.safetensors", extra={key: np.ones((2, 8), np.float32)})
    with pytest.raises(LoraError, match=match) as exc:
        pl.load(p, format="diffsynth")
    assert exc.value.key == key


def test_bad_alpha_option(tmp_path):
    with pytest.raises(LoraError, match="alpha"):
        pl.load(_file(tmp_path / "x.safetensors"), format="diffsynth", alpha=float("nan"))


def test_detection_needs_no_config(tmp_path):
    assert "no alpha" in diffsynth.detect(_file(tmp_path / "x.safetensors"))
    with_alpha = _file(tmp_path / "y.safetensors", extra={"blocks.0.q.alpha": np.ones(1, np.float32)})
    assert "per-module alpha tensors" in diffsynth.detect(with_alpha)
    write_safetensors(tmp_path / "z.safetensors", {"blocks.0.q.lora_A.default.weight": rand(2, 8)},
                      {"lora_adapter_metadata": "{}"})
    assert diffsynth.detect(tmp_path / "z.safetensors") is None


def test_save_refuses_what_diffsynth_cannot_apply(tmp_path):
    conv = LoraModule(rand(2, 3, 3, 3), rand(4, 2, 1, 1), alpha=2, kind="conv")
    with pytest.raises(LoraError, match="1×1"):
        pl.save(Adapter({"patch.conv": conv}), tmp_path / "x.safetensors", format="diffsynth")
    emb = LoraModule(rand(2, 10), rand(4, 2), alpha=2, kind="embedding")
    with pytest.raises(LoraError, match="embedding"):
        pl.save(Adapter({"emb": emb}), tmp_path / "x.safetensors", format="diffsynth")
    dora = LoraModule(rand(2, 4), rand(4, 2), alpha=2, magnitude=np.ones(4, np.float32))
    with pytest.raises(LoraError, match="DoRA"):
        pl.save(Adapter({"q": dora}), tmp_path / "x.safetensors", format="diffsynth")
    assert not (tmp_path / "x.safetensors").exists()


def test_the_alpha_one_load_was_given_is_not_carried_to_the_next(tmp_path):
    first = pl.load(_file(tmp_path / "d.safetensors"), alpha=2.0)
    assert first.provenance["user_alpha"] == 2.0 and first["blocks.0.q"].scale == 2.0
    pl.save(first, tmp_path / "again.safetensors", format="diffsynth")  # 2 folded into B
    again = pl.load(tmp_path / "again.safetensors")
    assert "user_alpha" not in again.provenance and again["blocks.0.q"].scale == 1.0


@pytest.mark.parametrize("given, scale, rule", [({}, 4.0 / 2, "alpha/rank"), ({"alpha": 0.5}, 0.5 * 4.0 / 2, "alpha/rank"),
                                                ({"convention": "raw"}, 1.0, "raw"),
                                                ({"convention": "raw", "alpha": 3.0}, 3.0, "raw")])
def test_alpha_tensors_read_as_diffsynth_2_or_1(tmp_path, given, scale, rule):
    """DiffSynth 2.x's GeneralLoRALoader applies a file's alpha / rank (times its alpha argument);
    1.x ignored the tensors, which convention='raw' reproduces."""
    p = _file(tmp_path / "a.safetensors", extra={"blocks.0.q.alpha": np.asarray(4.0, np.float32)})
    adapter = pl.load(p, **given)
    m = adapter["blocks.0.q"]
    assert m.rank == 2 and m.rule == rule and m.scale == pytest.approx(scale, rel=1e-12)
    assert adapter.provenance["source_format"] == "diffsynth"
    assert ("2.x" if rule == "alpha/rank" else "1.x") in adapter.provenance["convention_reason"]
