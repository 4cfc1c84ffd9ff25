"""portable_lora.ops: the operations under the CLI, against NumPy references and against PEFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import portable_lora as pl
from portable_lora import LoraError, LoraModule, ops
from portable_lora.examples import llama_module_shapes, random_adapter
from portable_lora.io.safetensors_io import read_safetensors, write_safetensors

RNG = np.random.default_rng(2024)


# -- helpers (also used by test_cli.py) ---------------------------------------------------------

def small_adapter(seed: int = 0, **kw) -> pl.Adapter:
    shapes = llama_module_shapes(layers=2, hidden=16, intermediate=24)
    names = list(shapes)
    rank = {n: (2, 4, 3)[i % 3] for i, n in enumerate(names)}
    alpha = {n: (4.0, 2.0, 9.0)[i % 3] for i, n in enumerate(names)}
    return random_adapter(shapes, rank=kw.pop("rank", rank), alpha=kw.pop("alpha", alpha), seed=seed, **kw)


def base_weights(adapter: pl.Adapter, *, dtype=np.float32, extra: bool = True, seed: int = 5) -> dict[str, np.ndarray]:
    """``<module>.weight`` for every module, plus norms and an embedding table (not patched)."""
    rng = np.random.default_rng(seed)
    w = {f"{n}.weight": (rng.standard_normal(m.weight_shape) / 4).astype(dtype) for n, m in adapter.items()}
    if extra:
        w["model.embed_tokens.weight"] = rng.standard_normal((40, 16)).astype(dtype)
        w["model.norm.weight"] = np.ones(16, dtype)
        w["model.layers.0.input_layernorm.weight"] = rng.standard_normal(16).astype(dtype)
    return w


def write_sharded(directory: Path, tensors: dict[str, np.ndarray], shards: int = 3,
                  side_files: bool = True) -> Path:
    """A transformers-style sharded checkpoint: model-0000i-of-0000n.safetensors + index json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(directory / fname, {n: tensors[n] for n in group}, {"format": "pt"})
        for n in group:
            weight_map[n] = fname
            total += tensors[n].nbytes
    index = {"metadata": {"total_size": total, "note": "kept"}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if side_files:
        (directory / "config.json").write_text('{"model_type": "llama"}')
    return directory


def numpy_merge(W: np.ndarray, m: LoraModule, strength: float = 1.0) -> np.ndarray:
    """The reference merge, written out in float64 NumPy (not through the core)."""
    A, B = m.A.astype(np.float64), m.B.astype(np.float64)
    s = m.scale * strength
    if m.kind == "linear":
        delta = s * B @ A
    elif m.kind == "embedding":
        delta = s * (B @ A).T
    else:
        delta = s * (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(B.shape[0], *A.shape[1:])
    merged = W.astype(np.float64) + delta
    if m.magnitude is not None:
        norm = np.linalg.norm(merged.reshape(merged.shape[0], -1), axis=1)
        merged = merged * (m.magnitude.astype(np.float64) / norm).reshape(-1, *([1] * (merged.ndim - 1)))
    return merged


def rel(actual, expected) -> float:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


# -- checkpoints and module matching --------------------------------------------------------------

def test_checkpoint_reads_files_and_shards(tmp_path):
    a = small_adapter()
    w = base_weights(a)
    write_safetensors(tmp_path / "one.safetensors", w)
    sharded = write_sharded(tmp_path / "sharded", w)
    with ops.Checkpoint(tmp_path / "one.safetensors") as one, ops.Checkpoint(sharded) as many:
        assert not one.is_sharded and many.is_sharded and len(many.shards) == 3
        assert sorted(one.keys()) == sorted(many.keys()) == sorted(w)
        for k in w:
            np.testing.assert_array_equal(many.get(k, copy=False), w[k])
            many.release(k)  # dropping pages must leave the data readable
            np.testing.assert_array_equal(many.get(k), w[k])
        assert "model.norm" in many.module_names()


def test_checkpoint_index_errors(tmp_path):
    w = base_weights(small_adapter())
    d = write_sharded(tmp_path / "c", w)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-00009-of-00009.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoraError, match="does not exist") as info:
        ops.Checkpoint(d)
    assert "model.safetensors.index.json" in str(info.value)
    with pytest.raises(LoraError, match="no such file"):
        ops.Checkpoint(tmp_path / "missing")


def test_match_modules_prefixes_and_ambiguity():
    keys = ["model.layers.0.q.weight", "layers.1.q.weight", "x.weight", "model.x.weight"]
    matched, unmatched = ops.match_modules(["model.layers.0.q", "model.layers.1.q", "x", "y"], keys)
    assert matched == {"model.layers.0.q": "model.layers.0.q.weight",
                       "model.layers.1.q": "layers.1.q.weight",  # 'model.' stripped
                       "x": "x.weight"}  # exact wins over 'model.x.weight'
    assert list(unmatched) == ["y"] and "'y.weight'" in unmatched["y"]
    with pytest.raises(LoraError, match="both patch"):  # two modules, one tensor: never guessed
        ops.match_modules(["model.layers.0.q", "layers.0.q"], keys)


def test_match_modules_reports_ambiguity():
    matched, unmatched = ops.match_modules(["q"], ["model.q.weight", "transformer.q.weight"])
    assert not matched and "ambiguous" in unmatched["q"]


# -- merge ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_streaming_merge_of_sharded_checkpoint(tmp_path, dtype):
    a = small_adapter()
    w = base_weights(a, dtype=dtype)
    base = write_sharded(tmp_path / "base", w)
    adapter_path = tmp_path / "a.safetensors"
    pl.save(a, adapter_path)
    report = ops.merge(base, adapter_path, tmp_path / "out", strength=0.7)
    out = tmp_path / "out"
    # same sharding, same weight_map, recomputed total_size, other metadata kept, side files copied
    src_index = json.loads((base / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == src_index["weight_map"]
    assert out_index["metadata"]["note"] == "kept"
    sizes = 0
    for shard in sorted(set(src_index["weight_map"].values())):
        tensors, meta = read_safetensors(out / shard)
        assert sorted(tensors) == sorted(k for k, s in src_index["weight_map"].items() if s == shard)
        assert meta["format"] == "pt" and json.loads(meta[ops.MERGE_METADATA_KEY])["strength"] == 0.7
        for name, t in tensors.items():
            sizes += t.nbytes
            assert t.dtype == np.dtype(dtype)
            module = name[: -len(".weight")]
            if module in a:
                ref = numpy_merge(w[name], a[module], 0.7)
                # one rounding to the weight dtype
                assert rel(t, ref) <= (1e-6 if dtype == np.float32 else 8e-3), name
            else:
                assert t.tobytes() == w[name].tobytes(), name
    assert out_index["metadata"]["total_size"] == sizes == report.bytes
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'
    assert report.sharded and len(report.modules) == len(a) and report.tensors == len(w)


def test_merge_single_file_dtype_cast_and_unmerge(tmp_path):
    a = small_adapter()
    w = base_weights(a)
    write_safetensors(tmp_path / "base.safetensors", w)
    ops.merge(tmp_path / "base.safetensors", a, tmp_path / "m.safetensors", dtype="bfloat16")
    merged, _ = read_safetensors(tmp_path / "m.safetensors")
    for name, t in merged.items():
        assert t.dtype == np.dtype(ml_dtypes.bfloat16)
        module = name[: -len(".weight")]
        ref = numpy_merge(w[name], a[module]) if module in a else w[name].astype(np.float64)
        # rounded once, from the float32 accumulation, to bfloat16 (unit roundoff 2**-8)
        err = np.abs(t.astype(np.float64) - ref)
        assert np.all(err <= 2.0 ** -8 * np.abs(ref) + 1e-6 * np.max(np.abs(ref))), name
    # merge then unmerge in float32 gives the base back
    ops.merge(tmp_path / "base.safetensors", a, tmp_path / "f.safetensors")
    ops.merge(tmp_path / "f.safetensors", a, tmp_path / "back.safetensors", unmerge=True)
    back, _ = read_safetensors(tmp_path / "back.safetensors")
    for name in w:
        assert rel(back[name], w[name]) < 1e-6, name


def test_merge_embedding_conv_and_dora(tmp_path):
    emb = random_adapter({"model.embed_tokens": (30, 8)}, kind="embedding", rank=3, seed=1)
    conv = random_adapter({"unet.conv_in": (6, 4, 3, 3)}, kind="conv", rank=2, seed=2)
    dora = random_adapter({"model.layers.0.mlp.up_proj": (12, 8)}, rank=2, dora=True, seed=3)
    a = pl.Adapter({**emb.modules, **conv.modules, **dora.modules})
    w = base_weights(a, extra=False)
    write_safetensors(tmp_path / "base.safetensors", w)
    ops.merge(tmp_path / "base.safetensors", a, tmp_path / "m.safetensors")
    merged, _ = read_safetensors(tmp_path / "m.safetensors")
    for module, m in a.items():
        assert rel(merged[f"{module}.weight"], numpy_merge(w[f"{module}.weight"], m)) < 1e-6, module
    with pytest.raises(LoraError, match="DoRA") as info:
        ops.merge(tmp_path / "base.safetensors", a, tmp_path / "u.safetensors", unmerge=True)
    assert info.value.key == "model.layers.0.mlp.up_proj"
    assert not (tmp_path / "u.safetensors").exists()


@pytest.mark.parametrize("kind,shape", [("linear", (37, 11)), ("embedding", (37, 11)), ("conv", (37, 3, 2, 2))])
def test_row_blocks_give_the_whole_tensor_result(kind, shape):
    a = random_adapter({"m": shape}, kind=kind, rank=3, seed=4, dora=kind == "linear")
    W = RNG.standard_normal(shape).astype(np.float32)
    whole = ops.merge_tensor(W, a["m"], a["m"].scale)
    tiny = ops.merge_tensor(W, a["m"], a["m"].scale, block_bytes=1)  # one row per block
    assert rel(tiny, whole) < 1e-6
    assert rel(whole, numpy_merge(W, a["m"])) < 1e-6


@pytest.mark.parametrize("dora", [False, True])
def test_row_blocks_of_a_transposed_weight(dora):
    """fan_in_fan_out weights are stored (in, out): rows are A's columns; DoRA is merged whole."""
    a = random_adapter({"m": (9, 13)}, rank=3, seed=6, dora=dora)
    W = RNG.standard_normal((13, 9)).astype(np.float32)  # (in, out)
    merged = ops.merge_tensor(W, a["m"], a["m"].scale, transposed=True, block_bytes=1)
    assert merged.shape == (13, 9)
    assert rel(merged, numpy_merge(W.T, a["m"]).T) < 1e-6
    back = ops.merge_tensor(merged, a["m"], a["m"].scale, transposed=True, unmerge=True, block_bytes=1) \
        if not dora else W
    assert rel(back, W) < 1e-5


def test_merge_refuses_nonfinite_factor_and_writes_nothing(tmp_path):
    a = small_adapter()
    name = "model.layers.1.mlp.up_proj"
    a[name].B[0, 0] = np.nan
    write_safetensors(tmp_path / "base.safetensors", base_weights(a))
    with pytest.raises(LoraError, match="NaN or infinite") as info:
        ops.merge(tmp_path / "base.safetensors", a, tmp_path / "m.safetensors")
    assert info.value.key == f"{name}.lora_B" and "allow-nonfinite" in str(info.value)
    assert not (tmp_path / "m.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    report = ops.merge(tmp_path / "base.safetensors", a, tmp_path / "m.safetensors", allow_nonfinite=True)
    assert any("NaN or infinite" in w for w in report.warnings)
    merged, _ = read_safetensors(tmp_path / "m.safetensors")
    assert np.isnan(merged[f"{name}.weight"][0]).all()


def test_merge_refuses_overflow(tmp_path):
    a = random_adapter({"m": (4, 4)}, rank=2, alpha=1e8, seed=0)  # ΔW far above float16 max
    write_safetensors(tmp_path / "b.safetensors", {"m.weight": np.ones((4, 4), np.float16)})
    with pytest.raises(LoraError, match="non-finite values") as info:
        ops.merge(tmp_path / "b.safetensors", a, tmp_path / "m.safetensors")
    assert "b.safetensors" in str(info.value) and info.value.key == "m.weight"
    assert not (tmp_path / "m.safetensors").exists()


def test_merge_unmatched_modules_listed_and_nothing_written(tmp_path):
    a = small_adapter()
    w = base_weights(a)
    del w["model.layers.1.self_attn.k_proj.weight"]
    del w["model.layers.0.mlp.down_proj.weight"]
    base = write_sharded(tmp_path / "base", w)
    with pytest.raises(LoraError) as info:
        ops.merge(base, a, tmp_path / "out")
    text = str(info.value)
    assert "2 of 14 adapter modules match no tensor" in text
    assert "model.layers.1.self_attn.k_proj" in text and "model.layers.0.mlp.down_proj" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_merge_shape_mismatch_names_module_and_shapes(tmp_path):
    a = small_adapter()
    w = base_weights(a)
    w["model.layers.0.self_attn.q_proj.weight"] = w["model.layers.0.self_attn.q_proj.weight"].T.copy()[:, :15]
    write_safetensors(tmp_path / "b.safetensors", w)
    with pytest.raises(LoraError, match=r"shape \[16, 15\].*needs \[16, 16\]") as info:
        ops.merge(tmp_path / "b.safetensors", a, tmp_path / "m.safetensors")
    assert info.value.key == "model.layers.0.self_attn.q_proj"


def test_outputs_are_never_overwritten_without_force(tmp_path):
    a = small_adapter()
    write_safetensors(tmp_path / "b.safetensors", base_weights(a))
    (tmp_path / "taken").write_text("keep me")
    pl.save(a, tmp_path / "a.safetensors")
    calls = [
        lambda **f: ops.merge(tmp_path / "b.safetensors", a, tmp_path / "taken", **f),
        lambda **f: ops.convert(tmp_path / "a.safetensors", tmp_path / "taken", to="portable", **f),
        lambda **f: ops.resize(a, tmp_path / "taken", rank=2, **f),
        lambda **f: ops.extract(tmp_path / "b.safetensors", tmp_path / "b.safetensors", tmp_path / "taken",
                                rank=2, **f),
    ]
    for call in calls:
        with pytest.raises(LoraError, match="already exists"):
            call()
        assert (tmp_path / "taken").read_text() == "keep me"
    calls[1](force=True)
    assert pl.load(tmp_path / "taken").modules.keys() == a.modules.keys()


def test_progress_bar_only_when_asked(tmp_path, capsys):
    pytest.importorskip("tqdm")
    a = small_adapter()
    write_safetensors(tmp_path / "b.safetensors", base_weights(a))
    ops.merge(tmp_path / "b.safetensors", a, tmp_path / "m.safetensors", progress=True)
    assert "merging" in capsys.readouterr().err
    ops.merge(tmp_path / "b.safetensors", a, tmp_path / "n.safetensors")
    assert capsys.readouterr().err == ""


def test_merge_matches_peft_merge_and_unload(tmp_path):
    """The peer: PEFT's own merge of a DoRA adapter with rank/alpha patterns, on a sharded base."""
    pytest.importorskip("portable_lora.formats.peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    write_sharded(tmp_path / "base", base, shards=2)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
                           use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    report = ops.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert len(report.modules) == 3
    expected = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    with ops.Checkpoint(tmp_path / "merged") as out:
        assert sorted(out.keys()) == sorted(expected)
        for k, v in expected.items():
            assert rel(out.get(k), v) < 2e-6, k


@pytest.mark.parametrize("targets", [["c_attn", "c_proj"], ["attn.c_proj"]], ids=["with-c_attn", "square-only"])
@pytest.mark.parametrize("via", ["peft", "mlx-lm"])
@pytest.mark.parametrize("layout", ["hf", "mlx"])
def test_merge_fan_in_fan_out_matches_peft_gpt2(tmp_path, layout, via, targets):
    """The base's layout, not the adapter's file, decides how a GPT-2 weight is patched.

    Hugging Face's GPT-2 stores Conv1D weights (in, out); mlx-lm's GPT-2 stores the same weights
    (out, in). A PEFT GPT-2 adapter (``fan_in_fan_out=True``), or the same adapter converted to
    mlx-lm (whose files carry no such flag), must merge into either checkpoint as PEFT's own
    merge does, the square c_proj included, where a wrong orientation would fit silently.
    """
    pytest.importorskip("portable_lora.formats.peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=16, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config).eval()
    conv1d = {n + ".weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                    fan_in_fan_out=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    expected = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    if layout == "mlx":  # mlx-lm's GPT-2 checkpoint: every Conv1D weight transposed
        base = {k: (v.T.copy() if k in conv1d else v) for k, v in base.items()}
        expected = {k: (v.T if k in conv1d else v) for k, v in expected.items()}
    write_safetensors(tmp_path / "base.safetensors", base)
    adapter = tmp_path / "peft"
    if via == "mlx-lm":
        adapter = tmp_path / "mlx"
        pl.save(pl.load(tmp_path / "peft"), adapter, format="mlx-lm")
        assert "fan_in_fan_out" not in pl.load(adapter).provenance  # PEFT's flag is about its base
    report = ops.merge(tmp_path / "base.safetensors", adapter, tmp_path / "m.safetensors")
    assert "transformer.h.0.attn.c_proj" in report.modules  # square (32, 32): orientation matters
    merged, _ = read_safetensors(tmp_path / "m.safetensors")
    for k, v in expected.items():
        assert rel(merged[k], v) < 2e-6, k
    j = ops.inspect(adapter, base=tmp_path / "base.safetensors").to_json()
    assert j["base"]["unmatched"] == [] and len(j["base"]["modules"]) == len(report.modules)


def test_one_checkpoint_with_both_layouts_patches_each_square_weight_by_its_siblings(tmp_path):
    """A ViT encoder (nn.Linear, (out, in)) under a GPT-2 decoder (Conv1D, (in, out)), as in
    Hugging Face's VisionEncoderDecoder: a square weight's layout comes from beside it."""
    n = 8
    rng = np.random.default_rng(3)
    base = {"encoder.layer.0.attention.query.weight": rng.standard_normal((n, n)).astype(np.float32),
            "decoder.h.0.attn.c_attn.weight": rng.standard_normal((n, 3 * n)).astype(np.float32),
            "decoder.h.0.attn.c_proj.weight": rng.standard_normal((n, n)).astype(np.float32)}
    write_safetensors(tmp_path / "base.safetensors", base)
    adapter = random_adapter({"encoder.layer.0.attention.query": (n, n), "decoder.h.0.attn.c_proj": (n, n)},
                             rank=2, alpha=3.0)
    for modules in (["encoder.layer.0.attention.query"], list(adapter)):
        part = pl.Adapter({m: adapter[m] for m in modules})
        ops.merge(tmp_path / "base.safetensors", part, tmp_path / "m.safetensors", force=True)
        merged, _ = read_safetensors(tmp_path / "m.safetensors")
        for m in modules:
            delta = adapter[m].delta_weight(np.float64)
            transposed = m.startswith("decoder")  # c_attn beside it is stored (in, 3·in)
            want = base[f"{m}.weight"] + (delta.T if transposed else delta)
            assert rel(merged[f"{m}.weight"], want) < 1e-6, m


# -- extract and resize ---------------------------------------------------------------------------

def test_extract_then_verify_is_near_exact(tmp_path):
    a = small_adapter()
    w = base_weights(a)
    write_safetensors(tmp_path / "base.safetensors", w)
    ops.merge(tmp_path / "base.safetensors", a, tmp_path / "tuned.safetensors")
    report = ops.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                         tmp_path / "x.safetensors", rank=8)
    j = report.to_json()
    assert j["extracted"] == len(a)
    skipped = {s["key"]: s["reason"] for s in j["skipped"]}
    assert skipped["model.norm.weight"].startswith("1-D")
    assert skipped["model.layers.0.input_layernorm.weight"].startswith("1-D")
    assert skipped["model.embed_tokens.weight"] == "unchanged"
    for row in j["modules"]:
        assert row["energy_kept"] > 1 - 1e-9 and row["relative_error"] < 1e-4
        assert row["rank"] == 8
    extracted = pl.load(tmp_path / "x.safetensors")
    assert all(m.rule == "alpha/rank" and m.alpha == m.rank and m.scale == 1.0 for m in extracted.values())
    v = ops.verify(a, extracted, rtol=1e-4)  # float32 merge rounding of W + ΔW limits what survives
    assert v.ok, v.table()


def test_extract_low_rank_error_matches_numpy_svd_and_filters(tmp_path):
    base = {"l.weight": RNG.standard_normal((20, 12)).astype(np.float64),
            "c.weight": RNG.standard_normal((6, 4, 3, 3)).astype(np.float64),
            "tok_embed.weight": RNG.standard_normal((30, 8)).astype(np.float64),
            "l.bias": np.zeros(20)}
    tuned = {k: v + RNG.standard_normal(v.shape) * 0.1 for k, v in base.items()}
    write_safetensors(tmp_path / "b.safetensors", base)
    write_safetensors(tmp_path / "t.safetensors", tuned)
    report = ops.extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "x.safetensors",
                         rank=3, dtype="float64")
    rows = {r["module"]: r for r in report.rows}
    for key in ("l.weight", "c.weight", "tok_embed.weight"):
        delta = (tuned[key] - base[key])
        s = np.linalg.svd(delta.reshape(delta.shape[0], -1), compute_uv=False)
        expected = math.sqrt(np.sum(s[3:] ** 2) / np.sum(s ** 2))
        assert rows[key[:-7]]["relative_error"] == pytest.approx(expected, rel=1e-9)
        assert rows[key[:-7]]["energy_kept"] == pytest.approx(np.sum(s[:3] ** 2) / np.sum(s ** 2), rel=1e-9)
    x = pl.load(tmp_path / "x.safetensors")
    assert x["c"].kind == "conv" and x["tok_embed"].kind == "embedding" and x["l"].kind == "linear"
    assert x.delta_weight("tok_embed").shape == (30, 8)
    assert [s["key"] for s in report.skipped] == ["l.bias"]
    only = ops.extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "y.safetensors",
                       rank=2, modules=r"^c$")
    assert [r["module"] for r in only.rows] == ["c"]
    with pytest.raises(LoraError, match="nothing to extract"):
        ops.extract(tmp_path / "b.safetensors", tmp_path / "b.safetensors", tmp_path / "z.safetensors", rank=2)


def test_resize_errors_match_numpy_svd(tmp_path):
    a = small_adapter(rank={n: 6 for n in llama_module_shapes(layers=2, hidden=16, intermediate=24)}, alpha=3.0)
    a["model.layers.0.self_attn.q_proj"] = random_adapter({"q": (16, 16)}, rank=2, alpha=5.0, seed=9)["q"]
    pl.save(a, tmp_path / "a.safetensors")
    report = ops.resize(tmp_path / "a.safetensors", tmp_path / "r.safetensors", rank=3)
    assert report.format == "portable"
    resized = pl.load(tmp_path / "r.safetensors")
    for row in report.rows:
        name, m = row["module"], a[row["module"]]
        if m.rank <= 3:
            assert row["status"] == "kept" and row["relative_error"] == 0
            np.testing.assert_array_equal(resized[name].B, m.B)
            assert resized[name].alpha == m.alpha
            continue
        delta = m.scale * m.B.astype(np.float64) @ m.A.astype(np.float64)
        s = np.linalg.svd(delta, compute_uv=False)
        expected = math.sqrt(np.sum(s[3:] ** 2) / np.sum(s ** 2))
        assert row["relative_error"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert row["energy_kept"] == pytest.approx(np.sum(s[:3] ** 2) / np.sum(s ** 2), rel=1e-5)
        r = resized[name]
        assert (r.rank, r.alpha, r.rule, r.scale) == (3, 3.0, "alpha/rank", 1.0)
        # and the new ΔW is the best rank-3 approximation (Eckart–Young): the SVD truncation
        u, sv, vh = np.linalg.svd(delta)
        best = (u[:, :3] * sv[:3]) @ vh[:3]
        assert rel(r.delta_weight(np.float64), best) < 1e-5


# -- inspect --------------------------------------------------------------------------------------

def test_inspect_ratios_under_every_rule(tmp_path):
    """The issue's example: rank 32, α = 1 reads ~32× stronger under raw α than under α/r."""
    rng = np.random.default_rng(0)
    A = (rng.standard_normal((32, 64)) / 8).astype(np.float32)
    B = (rng.standard_normal((64, 32)) * 0.01).astype(np.float32)
    a = pl.Adapter({"model.layers.0.self_attn.q_proj": LoraModule(A, B, alpha=1.0)})
    W = rng.standard_normal((64, 64)).astype(np.float32) / 8
    write_safetensors(tmp_path / "base.safetensors", {"model.layers.0.self_attn.q_proj.weight": W})
    pl.save(a, tmp_path / "a.safetensors")
    report = ops.inspect(tmp_path / "a.safetensors", base=tmp_path / "base.safetensors")
    j = report.to_json()
    assert j["format"] == "portable" and j["modules"] == 1 and j["ranks"] == [32]
    row = j["base"]["modules"][0]
    expected = np.linalg.norm(B.astype(np.float64) @ A / 32) / np.linalg.norm(W.astype(np.float64))
    assert row["ratio"] == pytest.approx(expected, rel=1e-5)
    r = row["ratios"]
    assert r["raw"] / r["alpha/rank"] == pytest.approx(32, rel=1e-12)
    assert r["alpha/sqrt(rank)"] / r["alpha/rank"] == pytest.approx(math.sqrt(32), rel=1e-12)
    # as in the issue: a fraction of a percent under α/r, several percent under raw α
    assert 1e-3 < r["alpha/rank"] < 5e-3 and 0.03 < r["raw"] < 0.2
    rules = j["base"]["rules"]
    assert rules["alpha/rank"]["file_rule"] and not rules["raw"]["file_rule"]
    assert rules["alpha/rank"]["median"] == pytest.approx(r["alpha/rank"])


def test_inspect_flags_weak_and_strong(tmp_path):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((16, 16)).astype(np.float32)
    A = rng.standard_normal((4, 16)).astype(np.float32)
    B = rng.standard_normal((16, 4)).astype(np.float32)
    a = pl.Adapter({"weak": LoraModule(A, B * 1e-6, alpha=4.0), "strong": LoraModule(A, B * 10, alpha=4.0),
                    "fine": LoraModule(A, B * 0.02, alpha=4.0), "missing": LoraModule(A, B, alpha=4.0)})
    write_safetensors(tmp_path / "b.safetensors", {"weak.weight": W, "strong.weight": W, "fine.weight": W})
    report = ops.inspect(a, base=tmp_path / "b.safetensors").to_json()
    flags = {m["module"]: m["flag"] for m in report["base"]["modules"]}
    assert flags == {"weak": "weak", "strong": "strong", "fine": None}
    assert report["base"]["unmatched"][0]["module"] == "missing"
    text = ops.inspect(a, base=tmp_path / "b.safetensors").table()
    assert "outside the plausible range" in text and "not matched" in text


def test_inspect_describes_groups_and_provenance(tmp_path):
    pytest.importorskip("portable_lora.formats.peft")
    a = small_adapter()
    pl.save(a, tmp_path / "p", format="peft")
    j = ops.inspect(tmp_path / "p").to_json()
    assert j["format"] == "peft" and "adapter_config.json" in j["detected_because"]
    assert j["modules"] == 14 and j["ranks"] == [2, 3, 4] and j["kinds"] == {"linear": 14}
    assert j["convention"] == "alpha/rank" and j["convention_reason"]
    assert sum(g["count"] for g in j["groups"]) == 14 and j["base"] is None
    assert {g["scale"] for g in j["groups"]} == {2.0, 0.5, 3.0}


# -- verify, convert, check, demo -----------------------------------------------------------------

def test_verify_reports_differences_with_numbers():
    a = small_adapter()
    b = a.copy()
    name = "model.layers.0.mlp.gate_proj"
    b[name].B[1, 0] += 0.5
    del b.modules["model.layers.1.mlp.up_proj"]
    report = ops.verify(a, b)
    assert not report.ok
    rows = {r["module"]: r for r in report.rows}
    expected_err = np.max(np.abs(a.delta_weight(name, np.float64) - b.delta_weight(name, np.float64)))
    assert rows[name]["status"] == "differs"
    assert rows[name]["max_abs_error"] == pytest.approx(expected_err, rel=1e-12)
    assert rows["model.layers.1.mlp.up_proj"]["status"] == "only in A"
    assert sum(r["status"] == "match" for r in report.rows) == 12
    assert ops.verify(a, a.copy()).ok


def test_verify_tolerance_follows_dtype():
    a = small_adapter()
    b = a.copy()
    for m in b.values():  # a bf16 copy: one rounding per factor entry
        m.A = m.A.astype(ml_dtypes.bfloat16)
        m.B = m.B.astype(ml_dtypes.bfloat16)
    auto = ops.verify(a, b)
    assert auto.ok and all(r["rtol"] == ops.AUTO_RTOL["bfloat16"] for r in auto.rows)
    assert auto.max_relative_error > 1e-4
    assert not ops.verify(a, b, rtol=1e-6).ok
    assert ops.verify(a, a.copy(), rtol=0.0).ok  # identical is identical


def test_convert_every_registered_format_and_back(tmp_path):
    """peft/portable → each format that can express the adapter, read back with the same ΔW."""
    a = small_adapter()
    pl.save(a, tmp_path / "src.safetensors")
    verified = 0
    for fmt in pl.FORMATS:
        try:
            pl.formats.get_format(fmt)
        except ModuleNotFoundError:
            continue
        dst = tmp_path / (f"out-{fmt}" if fmt in ("peft", "mlx-lm", "mlx-vlm") else f"out-{fmt}.safetensors")
        try:
            report = ops.convert(tmp_path / "src.safetensors", dst, to=fmt, check=True)
        except LoraError as exc:  # names the format cannot hold (component prefixes) are refused
            assert "prefix" in str(exc) or "top-level" in str(exc), (fmt, str(exc))
            continue
        assert report.ok and report.verified.ok, (fmt, report.table())
        assert report.to_format == fmt and report.from_format == "portable" and report.modules == 14
        verified += 1
    assert verified >= 2


def test_convert_kohya_with_modules_from(tmp_path):
    pytest.importorskip("portable_lora.formats.kohya")
    a = small_adapter().rename(lambda n: "text_encoder." + n)
    pl.save(a, tmp_path / "k.safetensors", format="kohya")
    base = {f"{n}.weight": w for n, w in pl.examples.random_weights(a).items()}
    write_safetensors(tmp_path / "te.safetensors", base)
    report = ops.convert(tmp_path / "k.safetensors", tmp_path / "p.safetensors", to="portable",
                         modules_from=tmp_path / "te.safetensors", check=True)
    assert report.from_format == "kohya" and report.ok
    assert set(pl.load(tmp_path / "p.safetensors")) == set(a)


def test_check_builtin_example_on_numpy():
    report = ops.check(backends=["numpy"], dtypes=["float32"])
    j = report.to_json()
    assert report.ok and j["adapter"] == "built-in example" and j["modules"] == report.modules
    assert [(r["backend"], r["dtype"]) for r in j["rows"]] == [("numpy", "float32")]
    example = ops.example_adapter()
    kinds = {m.kind for m in example.values()}
    assert kinds == {"linear", "embedding", "conv"} and any(m.is_dora for m in example.values())
    with pytest.raises(LoraError, match="unknown dtypes"):
        ops.check(dtypes=["float8"])
    with pytest.raises(LoraError, match="unknown backends"):
        ops.check(backends=["tensorflow"])


def test_check_detects_a_disagreement(monkeypatch):
    from portable_lora import testing

    real = testing._run

    def broken(ns, dtype, m, W, x):
        merged, forward = real(ns, dtype, m, W, x)
        return merged * 1.01, forward

    monkeypatch.setattr(testing, "_run", broken)
    report = ops.check(backends=["numpy"], dtypes=["float32"])
    assert not report.ok and "DISAGREE" in report.table()


def test_demo_end_to_end(tmp_path):
    report = ops.demo(tmp_path / "demo", backends=["numpy"])
    j = report.to_json()
    assert report.ok, report.table()
    statuses = {c["format"]: c["status"] for c in j["conversions"]}
    assert set(statuses) == set(pl.FORMATS)
    assert statuses["portable"] == "verified"
    for c in j["conversions"]:
        if c["status"] == "verified":
            assert (tmp_path / "demo" / c["file"]).exists() and c["bytes"] > 0
            assert c["max_relative_error"] < 1e-5
    assert j["inspect"]["base"]["rules"]["alpha/rank"]["verdict"] == "plausible"
    assert j["check"]["ok"]


# -- the streaming merge's fast paths -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
@pytest.mark.parametrize("alpha", [16.0, 32.0, 12.0, 8.0])  # scale 1, 2 (power of two), 0.75, 0.5
def test_row_block_merge_is_the_core_merge_bit_for_bit(dtype, alpha):
    """The reused-buffer path (ΔW rows into a buffer, a power-of-two scale folded into A) gives
    core.merge_into's bits when the GEMM has the same shape (one block); smaller blocks change
    only BLAS's kernel choice: within one float32 rounding before the final one."""
    from portable_lora import core

    a = random_adapter({"m": (67, 40)}, rank=16, alpha=alpha, seed=3, dtype=dtype)
    W = RNG.standard_normal((67, 40)).astype(np.float32).astype(dtype)
    want = np.asarray(core.merge_into(W, a["m"].A, a["m"].B, a["m"].scale))
    got = ops.merge_tensor(W, a["m"], a["m"].scale)
    assert got.dtype == W.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))
    # ulps of |W| + |s|·|B|@|A|, the size of the terms summed (where they cancel, the result's
    # own ulp is smaller than the rounding error of the sum)
    delta = np.abs(a["m"].B.astype(np.float32)) @ np.abs(a["m"].A.astype(np.float32)) * abs(a["m"].scale)
    terms = (np.abs(W.astype(np.float32)) + delta).astype(W.dtype)
    ulp = np.spacing(terms).astype(np.float64)
    for block_bytes in (1, 40 * 4 * 5):
        got = ops.merge_tensor(W, a["m"], a["m"].scale, block_bytes=block_bytes)
        off = np.abs(got.astype(np.float64) - want.astype(np.float64))
        assert np.all(off <= 2 * ulp), block_bytes
        if W.dtype.itemsize == 2:  # a float32 difference rarely changes a 16-bit rounding
            assert np.count_nonzero(off) <= max(2, off.size // 100), block_bytes
    back = ops.merge_tensor(want, a["m"], a["m"].scale, unmerge=True)
    assert np.array_equal(back.view(np.uint8), np.asarray(
        core.unmerge_from(want, a["m"].A, a["m"].B, a["m"].scale)).view(np.uint8))


def test_prescaled_factor_keeps_the_bits_or_declines():
    from portable_lora.ops._merge import _prescaled

    A = RNG.standard_normal((4, 6)).astype(np.float32)
    B = RNG.standard_normal((5, 4)).astype(np.float32)
    for scale in (2.0, 0.25, -4.0, 1.0):
        A2, post = _prescaled(A, scale)
        assert post is None and np.array_equal(B @ A2, (B @ A) * np.float32(scale))
    assert _prescaled(A, 0.75)[1] == 0.75  # not a power of two: the multiply stays
    tiny = np.full((2, 2), np.finfo(np.float32).tiny * 2, np.float32)
    assert _prescaled(tiny, 0.25)[1] == 0.25  # would go subnormal
    huge = np.full((2, 2), np.finfo(np.float32).max / 2, np.float32)
    assert _prescaled(huge, 4.0)[1] == 4.0  # would overflow


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_streaming_merge_threads_and_writers_give_the_same_file(tmp_path, monkeypatch, dtype):
    """1 and 3 worker threads, background writer on and off: the same bytes (and the same as
    merge_tensor); untouched tensors are copied file to file when their dtype stays."""
    from portable_lora.io import safetensors_io

    a = small_adapter(dtype=ml_dtypes.bfloat16)
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in base_weights(a).items()}
    write_safetensors(tmp_path / "base.safetensors", weights)
    monkeypatch.setattr(ops._merge, "_BLOCK_BYTES", 64)
    outputs = []
    for threads, background_min in ((1, 1 << 40), (3, 0), (2, 0)):
        monkeypatch.setattr(safetensors_io, "_BACKGROUND_MIN_BYTES", background_min)
        out = tmp_path / f"m{threads}.safetensors"
        ops.merge(tmp_path / "base.safetensors", a, out, threads=threads, dtype=dtype)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    merged, _ = read_safetensors(tmp_path / "m1.safetensors")
    for module, m in a.items():
        key = f"{module}.weight"
        want = ops.merge_tensor(weights[key], m, m.scale, out_dtype=dtype)
        assert np.array_equal(merged[key].view(np.uint8), want.view(np.uint8)), key
    for key in set(weights) - {f"{m}.weight" for m in a}:
        expected = weights[key] if dtype is None else weights[key].astype(np.float32)
        assert np.array_equal(merged[key], expected), key


def test_merge_threads_must_be_a_positive_integer(tmp_path):
    a = small_adapter()
    write_safetensors(tmp_path / "base.safetensors", base_weights(a))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(LoraError, match="threads"):
            ops.merge(tmp_path / "base.safetensors", a, tmp_path / "m.safetensors", threads=bad)
    assert not (tmp_path / "m.safetensors").exists()


def test_overflow_in_a_worker_thread_aborts_the_write(tmp_path):
    a = small_adapter(dtype=np.float32)
    name = next(iter(a))
    a[name].B[:] = 1e4
    a[name].A[:] = 1e4
    weights = {k: v.astype(np.float16) for k, v in base_weights(a).items()}
    write_safetensors(tmp_path / "base.safetensors", weights)
    with pytest.raises(LoraError, match="non-finite") as info:
        ops.merge(tmp_path / "base.safetensors", a, tmp_path / "m.safetensors", threads=3)
    assert info.value.key == f"{name}.weight" and not (tmp_path / "m.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(16, 300), (300, 16), (3, 5), (1, 70), (70, 1), (65, 65), (0, 4)])
def test_fast_transpose_is_the_transpose(dtype, shape):
    from portable_lora.formats._common import transposed

    x = RNG.standard_normal(shape).astype(dtype)
    for view in (x, x[:, ::-1], np.asfortranarray(x)):
        got = transposed(view)
        assert got.flags.c_contiguous and got.dtype == x.dtype
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(view.T).view(np.uint8))


def test_convert_over_its_own_source_reads_mapped_views_safely(tmp_path):
    """convert maps the source instead of copying it; writing over that same file (--force)
    replaces it atomically, so the mapped tensors stay valid while they are written."""
    a = small_adapter(dtype=ml_dtypes.bfloat16)
    path = tmp_path / "a.safetensors"
    pl.save(a, path)
    ops.convert(path, path, to="portable", force=True)
    again = pl.load(path)
    assert all(np.array_equal(again[n].A, m.A) and np.array_equal(again[n].B, m.B) for n, m in a.items())
    ops.convert(path, tmp_path / "mlx", to="mlx-lm")
    first = pl.formats.load(tmp_path / "mlx")  # mixed scales folded into B: compare with this
    ops.convert(tmp_path / "mlx", tmp_path / "mlx", to="mlx-lm", force=True)
    back = pl.formats.load(tmp_path / "mlx")
    for name, m in first.items():
        assert np.array_equal(back[name].A, m.A) and np.array_equal(back[name].B, m.B)
        assert back[name].scale == m.scale


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's threads: the child uses only NumPy
def test_merge_threads_work_in_a_forked_child(tmp_path, monkeypatch):
    """The worker pool is per process: a child forked after a threaded merge starts its own
    (the parent's pool threads do not exist in the child; using them would hang)."""
    import os

    a = small_adapter(dtype=ml_dtypes.bfloat16)
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in base_weights(a).items()}
    write_safetensors(tmp_path / "base.safetensors", weights)
    monkeypatch.setattr(ops._merge, "_BLOCK_BYTES", 64)  # many blocks a tensor: the pool runs
    ops.merge(tmp_path / "base.safetensors", a, tmp_path / "parent.safetensors", threads=2)
    assert ops._merge._POOLS  # the parent's pool exists when the child is forked
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            ops.merge(tmp_path / "base.safetensors", a, tmp_path / "child.safetensors", threads=2)
            code = 0
        finally:
            os._exit(code)
    import signal
    import time

    deadline = time.monotonic() + 60
    while True:  # a hung child (the bug this guards against) fails the test instead of hanging it
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's threaded merge hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "child.safetensors").read_bytes() == (tmp_path / "parent.safetensors").read_bytes()
