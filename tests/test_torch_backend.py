"""The PyTorch adapter: wrapped forward, merge/unmerge, extract, strength, training, compile,
and peer checks against PEFT and a hand merge of ``Adapter.delta_weight`` on tiny models."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import TOLERANCE, assert_close, required_backends

if "torch" in required_backends():
    import torch  # a run that asked for torch fails here instead of skipping
else:
    torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from portable_lora import examples  # noqa: E402
from portable_lora import torch as plt  # noqa: E402
from portable_lora.adapter import Adapter, LoraModule  # noqa: E402
from portable_lora.errors import LoraError  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RNG = np.random.default_rng(7)


def npy(t):
    return t.detach().to(torch.float64).cpu().numpy()


# -- tiny models ---------------------------------------------------------------------------------

def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(config).to(dtype).eval()


LLAMA_SHAPES = examples.llama_module_shapes(layers=2, hidden=64, intermediate=128, kv_hidden=32)
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))


def tiny_gpt2(dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32,
                        attn_implementation="eager")
    return GPT2LMHeadModel(config).to(dtype).eval()


GPT2_NAMES = [f"transformer.h.{i}.{p}" for i in range(2)
              for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def gpt2_shapes(model):
    # Conv1D weights are (in, out); adapters are canonical (out, in)
    return {n: tuple(model.get_submodule(n).weight.shape)[::-1] for n in GPT2_NAMES}


class ConvNet(nn.Module):
    def __init__(self, **geometry):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, **geometry)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class EmbedNet(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(20, 12, padding_idx=padding_idx)
        self.head = nn.Linear(12, 5)

    def forward(self, ids):
        return self.head(self.embed(ids))


class Mixed(nn.Module):
    """One of each supported layer."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 12, padding_idx=0)
        self.proj = nn.Linear(12, 10)
        self.gpt = Conv1D(12, 10)   # nf=out 12, nx=in 10
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, ids, image):
        h = self.gpt(self.proj(self.embed(ids)))
        return h, self.conv(image)


MIXED_SHAPES = {"embed": (20, 12), "proj": (10, 12), "gpt": (12, 10), "conv": (4, 3, 3, 3)}
MIXED_KINDS = {"embed": "embedding", "proj": "linear", "gpt": "linear", "conv": "conv"}
MIXED_INPUTS = (torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0)),
                torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)))


def mixed_adapter(dora=False, dtype=np.float32, seed=0):
    adapter = Adapter()
    for name, shape in MIXED_SHAPES.items():
        kind = MIXED_KINDS[name]
        one = examples.random_adapter({name: shape}, rank=3, alpha=6.0, kind=kind, seed=seed,
                                      dtype=dtype, dora=dora and kind != "embedding")
        adapter[name] = one[name]
    return adapter


def run_mixed(model):
    ids, image = MIXED_INPUTS
    dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        return model(ids, image.to(dtype))


# -- the shim ---------------------------------------------------------------------------------------

def test_shim_reexports_the_verbs():
    from portable_lora.backends import torch as backend

    for verb in ("apply", "merge", "unmerge", "remove", "extract", "set_strength"):
        assert getattr(plt, verb) is getattr(backend, verb)


def test_module_docstring_example_runs():
    import doctest

    from portable_lora.backends import torch as backend

    result = doctest.testmod(backend)
    assert result.attempted > 0 and result.failed == 0


def test_shim_without_torch_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import portable_lora.torch\n"
            "except ImportError as e:\n    print(e, '|', type(e.__cause__).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "portable_lora.torch needs PyTorch: pip install 'portable-lora[torch]'" in out.stdout
    assert "| ModuleNotFoundError" in out.stdout


# -- forward vs a hand merge of Adapter.delta_weight ------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_llama_logits_match_hand_merge(dtype):
    base = tiny_llama(DTYPES[dtype])
    adapter = examples.random_adapter(LLAMA_SHAPES, rank=4, alpha=8.0, seed=1)
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for name in adapter:
            w = by_hand.get_submodule(name).weight
            w.copy_((w.double() + torch.from_numpy(adapter.delta_weight(name, np.float64))).to(w.dtype))
        expected = by_hand(IDS).logits
        actual = plt.apply(base, adapter)(IDS).logits
    assert actual.dtype == DTYPES[dtype]
    assert_close(npy(actual), npy(expected), dtype, what="llama logits")
    # and the LoRA term is not negligible, so the comparison proves something
    with torch.no_grad():
        plt.set_strength(base, 0.0)
        plain = base(IDS).logits
    assert np.abs(npy(plain) - npy(expected)).max() > 50 * TOLERANCE[dtype] * np.abs(npy(expected)).max()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gpt2_conv1d_logits_match_hand_merge(dtype):
    base = tiny_gpt2(DTYPES[dtype])
    adapter = examples.random_adapter(gpt2_shapes(base), rank=4, alpha=8.0, seed=2)
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        for name in adapter:
            w = by_hand.get_submodule(name).weight  # (in, out): ΔW goes in transposed
            w.copy_((w.double() + torch.from_numpy(adapter.delta_weight(name, np.float64)).T).to(w.dtype))
        expected = by_hand(IDS).logits
        actual = plt.apply(base, adapter)(IDS).logits
    assert isinstance(base.get_submodule(GPT2_NAMES[0]), plt.LoraConv1D)
    assert_close(npy(actual), npy(expected), dtype, what="gpt2 logits")


# -- peers: PEFT ------------------------------------------------------------------------------------

def peft_adapter(peft_model, names, *, rank, alpha, rule, kind="linear", dora=False):
    """PEFT's own factors (and magnitudes) copied into an Adapter, names without the prefix."""
    root = peft_model.base_model.model
    adapter = Adapter()
    for name in names:
        layer = root.get_submodule(name)
        if kind == "embedding":
            A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        else:
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        magnitude = None
        if dora:
            magnitude = plt.to_numpy(layer.lora_magnitude_vector["default"].weight).reshape(-1)
        adapter[name] = LoraModule(plt.to_numpy(A), plt.to_numpy(B), alpha=alpha, rule=rule,
                                   kind=kind, magnitude=magnitude)
    return adapter


def make_peft(model, names, *, rank, alpha, rslora=False, dora=False, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(names), use_rslora=rslora,
                        use_dora=dora, init_lora_weights=False, lora_dropout=0.0, **extra)
    peft_model = get_peft_model(model, config)
    if dora:  # PEFT starts m at ‖W + ΔW‖ (DoRA = LoRA then): move it so DoRA is really tested
        with torch.no_grad():
            for layer in peft_model.modules():
                if hasattr(layer, "lora_magnitude_vector") and "default" in layer.lora_magnitude_vector:
                    m = layer.lora_magnitude_vector["default"].weight
                    m.mul_(1 + 0.2 * torch.randn(m.shape))
    return peft_model.eval()


def check_against_peft(base, names, inputs, forward, *, rank=4, alpha=8, rslora=False, dora=False,
                       kind="linear", **extra):
    ours = copy.deepcopy(base)
    merged_ours = copy.deepcopy(base)
    peft_model = make_peft(base, names, rank=rank, alpha=alpha, rslora=rslora, dora=dora, **extra)
    rule = "alpha/sqrt(rank)" if rslora else "alpha/rank"
    adapter = peft_adapter(peft_model, names, rank=rank, alpha=alpha, rule=rule, kind=kind, dora=dora)
    with torch.no_grad():
        expected = forward(peft_model, inputs)
        actual = forward(plt.apply(ours, adapter), inputs)
    assert_close(npy(actual), npy(expected), "float32", what="forward vs PEFT")
    # merged weights: PEFT's merge_and_unload against ours, layer by layer
    plt.merge(merged_ours, adapter)
    peft_merged = peft_model.merge_and_unload()
    for name in names:
        assert_close(npy(merged_ours.get_submodule(name).weight), npy(peft_merged.get_submodule(name).weight),
                     "float32", what=f"merged {name}")
    return adapter


def llama_forward(model, ids):
    return model(ids).logits


@pytest.mark.peer
@pytest.mark.parametrize("rslora,dora", [(False, False), (True, False), (False, True)],
                         ids=["lora", "rslora", "dora"])
def test_peft_llama_linear(rslora, dora):
    names = [n for n in LLAMA_SHAPES if ".0." in n or "q_proj" in n]
    check_against_peft(tiny_llama(), names, IDS, llama_forward, rank=4, alpha=12, rslora=rslora,
                       dora=dora)


@pytest.mark.peer
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_gpt2_conv1d(dora):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice
        check_against_peft(tiny_gpt2(), GPT2_NAMES, IDS, llama_forward, dora=dora, fan_in_fan_out=True)


@pytest.mark.peer
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_conv2d(dora):
    torch.manual_seed(1)
    image = torch.randn(2, 3, 9, 9)
    check_against_peft(ConvNet(stride=2, padding=1), ["conv1", "conv2"], image, lambda m, x: m(x),
                       rank=3, alpha=6, dora=dora, kind="conv")


@pytest.mark.peer
def test_peft_embedding_forward_merge_and_gradients():
    torch.manual_seed(2)
    base = EmbedNet(padding_idx=0)
    ids = torch.tensor([[0, 3, 5, 0], [7, 19, 0, 2]])
    adapter = check_against_peft(base, ["embed"], ids, lambda m, x: m(x), rank=3, alpha=6,
                                 kind="embedding")
    # gradients of A and B match PEFT's, padding column of A included (no gradient there)
    peft_model = make_peft(copy.deepcopy(base), ["embed"], rank=3, alpha=6).train()
    with torch.no_grad():  # same factors in both
        layer = peft_model.base_model.model.embed
        layer.lora_embedding_A["default"].copy_(torch.from_numpy(adapter["embed"].A))
        layer.lora_embedding_B["default"].copy_(torch.from_numpy(adapter["embed"].B))
    ours = plt.apply(copy.deepcopy(base), adapter).train()
    peft_model(ids).square().sum().backward()
    ours(ids).square().sum().backward()
    grad_a = ours.embed.lora_A.grad
    assert_close(npy(grad_a), npy(layer.lora_embedding_A["default"].grad), "float32", what="grad A")
    assert_close(npy(ours.embed.lora_B.grad), npy(layer.lora_embedding_B["default"].grad), "float32",
                 what="grad B")
    assert torch.all(grad_a[:, 0] == 0) and torch.any(grad_a[:, 3] != 0)


# -- merge, unmerge, remove, extract, strength ------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_matches_unmerged_forward_and_unmerge_restores(dtype, dora):
    base = Mixed().to(DTYPES[dtype])
    adapter = mixed_adapter(dora=dora)
    originals = {n: p.detach().clone() for n, p in base.state_dict().items()}
    unmerged = run_mixed(plt.apply(copy.deepcopy(base), adapter))
    plt.merge(base, adapter)
    merged = run_mixed(base)
    for got, want in zip(merged, unmerged):
        assert_close(npy(got), npy(want), dtype, what="merged vs unmerged forward")
    for name in MIXED_SHAPES:  # the merge really changed every weight
        assert not torch.equal(base.get_submodule(name).weight, originals[f"{name}.weight"])
    plt.unmerge(base, adapter)
    for name, value in base.state_dict().items():
        assert_close(npy(value), npy(originals[name]), dtype, what=f"unmerged {name}")
    assert not any(hasattr(m, "_portable_lora_merges") for m in base.modules())


def test_merge_twice_unmerges_in_reverse_order():
    base = Mixed()
    originals = {n: p.detach().clone() for n, p in base.state_dict().items()}
    first, second = mixed_adapter(dora=True, seed=1), mixed_adapter(dora=True, seed=2)
    plt.merge(base, first, strength=0.5)
    plt.merge(base, second)
    plt.unmerge(base, second)
    plt.unmerge(base, first)
    for name, value in base.state_dict().items():
        assert_close(npy(value), npy(originals[name]), "float32", what=name)


@pytest.mark.parametrize("geometry", [dict(stride=2, padding=2, dilation=2),
                                      dict(padding=1, padding_mode="reflect"),
                                      dict(padding="same", dilation=2)],
                         ids=["strided-dilated", "reflect", "same"])
def test_conv_lora_uses_the_base_geometry(geometry):
    base = ConvNet(**geometry)
    adapter = examples.random_adapter({"conv2": (6, 8, 3, 3)}, rank=3, kind="conv", seed=4)
    image = torch.randn(2, 3, 11, 11, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = plt.apply(copy.deepcopy(base), adapter)(image)
        merged = plt.merge(base, adapter)(image)
    assert_close(npy(unmerged), npy(merged), "float32", what="conv unmerged vs merged")


def test_scaled_embedding_scales_the_lora_term_like_the_merged_table():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    torch.manual_seed(0)
    base = nn.Sequential(Gemma3TextScaledWordEmbedding(20, 12, padding_idx=0, embed_scale=12 ** 0.5))
    adapter = examples.random_adapter({"0": (20, 12)}, rank=3, kind="embedding", seed=5)
    ids = MIXED_INPUTS[0]
    with torch.no_grad():
        unmerged = plt.apply(copy.deepcopy(base), adapter)(ids)
        merged = plt.merge(base, adapter)(ids)
    assert_close(npy(unmerged), npy(merged), "float32", what="scaled embedding")


def test_float_embed_scale_of_bart_scales_the_lora_term():
    """BART (and M2M100, BioGPT, Blenderbot) keep ``embed_scale`` as a Python float, not a
    tensor: the applied forward works and equals the merged one (the encoder's table is tied to
    the decoder's and the head's, hence allow_shared; the encoder sees the same table)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, scale_embedding=True, max_position_embeddings=32)
    base = BartForConditionalGeneration(config).eval()
    name = "model.encoder.embed_tokens"
    assert isinstance(base.get_submodule(name).embed_scale, float)  # the case under test
    adapter = examples.random_adapter({name: (64, 32)}, rank=4, alpha=8.0, kind="embedding", seed=1)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base.model.encoder(input_ids=ids).last_hidden_state
        applied = plt.apply(copy.deepcopy(base), adapter).model.encoder(input_ids=ids).last_hidden_state
        merged = plt.merge(copy.deepcopy(base), adapter, allow_shared=True).model.encoder(input_ids=ids)
    assert_close(npy(applied), npy(merged.last_hidden_state), "float32", what="applied vs merged encoder")
    assert np.abs(npy(applied) - npy(plain)).max() > 1e-2  # the LoRA term is there


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_factors_cast_after_apply_are_followed(dora):
    """The usual "train the adapter in float32" step on a bfloat16 model: factors applied in
    bfloat16, then upcast in place (``p.data = p.data.float()``). Forward follows the factors'
    dtype as it is now, giving what apply(dtype=torch.float32) with those factors gives, on
    every layer kind; cast back down, what bfloat16 factors give."""
    model = plt.apply(Mixed().to(torch.bfloat16), mixed_adapter(dora=dora))
    for cast, factor_dtype in ((torch.Tensor.float, torch.float32), (torch.Tensor.bfloat16, None)):
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = cast(parameter.data)
        reference = plt.apply(Mixed().to(torch.bfloat16), plt.extract(model), dtype=factor_dtype)
        for got, want in zip(run_mixed(model), run_mixed(reference)):
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, want)


def test_remove_restores_the_original_layers():
    base = Mixed()
    base.proj.bias.requires_grad_(False)  # a flag apply() did not set stays as it was
    layers = {n: base.get_submodule(n) for n in MIXED_SHAPES}
    before = run_mixed(base)
    state = {n: p.clone() for n, p in base.state_dict().items()}
    plt.apply(base, mixed_adapter())
    assert all(isinstance(base.get_submodule(n), plt.LoraLayer) for n in MIXED_SHAPES)
    assert plt.remove(base) is base
    assert all(base.get_submodule(n) is layers[n] for n in MIXED_SHAPES)
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(base.state_dict()[n], state[n]) for n in state)
    assert {n for n, p in base.named_parameters() if not p.requires_grad} == {"proj.bias"}
    for got, want in zip(run_mixed(base), before):
        assert torch.equal(got, want)


@pytest.mark.parametrize("np_dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_extract_round_trips_the_adapter(np_dtype):
    torch_dtype = torch.bfloat16 if np_dtype == ml_dtypes.bfloat16 else torch.float32
    adapter = mixed_adapter(dora=True, dtype=np_dtype)
    adapter["proj"] = LoraModule(adapter["proj"].A, adapter["proj"].B, alpha=3.5, rule="raw",
                                 magnitude=adapter["proj"].magnitude)
    model = plt.apply(Mixed().to(torch_dtype), adapter)
    back = plt.extract(model)
    assert list(back) == list(adapter)
    for name, want in adapter.items():
        got = back[name]
        assert (got.alpha, got.rule, got.kind, got.is_dora) == (want.alpha, want.rule, want.kind, want.is_dora)
        assert got.A.dtype == want.A.dtype
        assert np.array_equal(got.A.view(np.uint8), want.A.view(np.uint8))
        assert np.array_equal(got.B.view(np.uint8), want.B.view(np.uint8))
        if want.is_dora:
            assert np.array_equal(got.magnitude.view(np.uint8), want.magnitude.view(np.uint8))


@pytest.mark.parametrize("name", list(MIXED_SHAPES))
def test_strength_zero_is_the_base_and_two_doubles_the_term(name):
    # one adapted layer at a time: the rest of Mixed is affine, so the term passes through linearly
    base = Mixed()
    plain = run_mixed(base)
    adapter = mixed_adapter()
    model = plt.apply(copy.deepcopy(base), Adapter({name: adapter[name]}), strength=1.0)
    one = run_mixed(model)
    plt.set_strength(model, 0.0)
    for got, want in zip(run_mixed(model), plain):
        assert torch.equal(got, want)
    plt.set_strength(model, 2.0)
    for got, single, ref in zip(run_mixed(model), one, plain):
        assert_close(npy(got - ref), 2 * npy(single - ref), "float32", what="strength 2")
    assert "strength=2" in repr(model.get_submodule(name))


def test_strength_at_apply_time_equals_set_strength():
    base = Mixed()
    a = run_mixed(plt.apply(copy.deepcopy(base), mixed_adapter(dora=True), strength=0.5))
    model = plt.apply(copy.deepcopy(base), mixed_adapter(dora=True))
    b = run_mixed(plt.set_strength(model, 0.5))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# -- training -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_step_changes_only_the_factors(dora):
    model = plt.apply(tiny_llama().train(), examples.random_adapter(LLAMA_SHAPES, rank=4, dora=dora))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    suffixes = ("lora_A", "lora_B") + (("lora_magnitude",) if dora else ())
    assert trainable == {f"{m}.{s}" for m in LLAMA_SHAPES for s in suffixes}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name
    # what was trained comes back out
    trained = plt.extract(model)
    name = "model.layers.1.mlp.down_proj"
    assert np.array_equal(trained[name].B, plt.to_numpy(model.get_submodule(name).lora_B))


# -- torch.compile ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_compile_fullgraph_has_no_graph_break(dora):
    import torch._dynamo

    torch._dynamo.reset()
    model = plt.apply(Mixed(), mixed_adapter(dora=dora))
    eager = run_mixed(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dynamo warnings either (e.g. lru_cache tracing)
        explanation = torch._dynamo.explain(model)(*MIXED_INPUTS)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph raises on a break
    with torch.no_grad():
        for got, want in zip(compiled(*MIXED_INPUTS), eager):
            assert_close(npy(got), npy(want), "float32", what="compiled")
        plt.set_strength(model, 0.0)  # a new strength reaches the compiled model
        for got, want in zip(compiled(*MIXED_INPUTS), run_mixed(plt.remove(copy.deepcopy(model)))):
            if not dora:
                assert torch.equal(got, want)


def test_compiled_op_is_defined_only_where_triton_may_run():
    """``import portable_lora.torch`` defines ``torch.ops.portable_lora.linear_lora`` (the
    fused forward as one op in compiled graphs) where triton is installed, and not with
    ``PORTABLE_LORA_TRITON=0``: then compiled graphs hold plain ATen ops only."""
    import importlib.util

    code = ("import torch, portable_lora.torch; from portable_lora.core import _triton_linear as t; "
            "print(t._OP is not None, hasattr(torch.ops.portable_lora, 'linear_lora'))")
    root = str(Path(__file__).resolve().parent.parent)
    for value, want in (("0", "False False"), ("1", "True True" if importlib.util.find_spec("triton") else "False False")):
        env = dict(os.environ, PORTABLE_LORA_TRITON=value,
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split()[-2:] == want.split(), (value, proc.stdout)


def test_compile_fullgraph_trains_a_llama():
    import torch._dynamo

    torch._dynamo.reset()
    model = plt.apply(tiny_llama().train(), examples.random_adapter(LLAMA_SHAPES, rank=4, dora=True),
                      dtype=torch.float32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(IDS, labels=IDS).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.lora_A.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- dtype and device -----------------------------------------------------------------------------------

def test_factors_follow_the_base_dtype_unless_overridden():
    adapter = mixed_adapter(dora=True)
    model = plt.apply(Mixed().to(torch.bfloat16), adapter)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    reference = run_mixed(plt.apply(Mixed(), adapter))
    wide = plt.apply(Mixed().to(torch.bfloat16), adapter, dtype=torch.float32)
    assert {p.dtype for n, p in wide.named_parameters() if "lora_" in n} == {torch.float32}
    for got, want in zip(run_mixed(wide), reference):
        assert got.dtype == torch.bfloat16
        assert_close(npy(got), npy(want), "bfloat16", what="float32 factors on a bfloat16 base")


def test_factors_are_created_on_the_base_device():
    with torch.device("meta"):
        model = Mixed()
    plt.apply(model, mixed_adapter(dora=True))
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_and_merge():
    adapter = mixed_adapter(dora=True)
    cpu = run_mixed(plt.apply(Mixed(), adapter))
    model = plt.apply(Mixed().cuda(), adapter)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    with torch.no_grad():
        out = model(*(t.cuda() for t in MIXED_INPUTS))
    for got, want in zip(out, cpu):
        assert_close(npy(got), npy(want), "float32", what="cuda")
    merged = plt.merge(Mixed().cuda(), adapter)
    with torch.no_grad():
        for got, want in zip(merged(*(t.cuda() for t in MIXED_INPUTS)), cpu):
            assert_close(npy(got), npy(want), "float32", what="cuda merged")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bulk_upload_merge_of_mixed_factor_dtypes_and_unmerge():
    """The factors of every layer go up in one pinned copy, sliced per factor (odd sizes,
    bf16 and float32 and DoRA magnitudes side by side): the merge equals the CPU one and
    unmerge restores the weights to within one rounding."""
    shapes = {"a": (37, 29), "b": (64, 64), "c": (5, 300)}
    model = nn.ModuleDict({n: nn.Linear(i, o, bias=False) for n, (o, i) in shapes.items()}).to(torch.bfloat16)
    modules = {}
    for i, (n, shape) in enumerate(shapes.items()):
        dtype = (ml_dtypes.bfloat16, np.float32, ml_dtypes.bfloat16)[i]
        modules[n] = examples.random_adapter({n: shape}, rank=3 + i, dtype=dtype, seed=i, dora=i == 2)[n]
    adapter = Adapter(modules)
    cpu = copy.deepcopy(model)
    gpu = copy.deepcopy(model).cuda()
    plt.merge(cpu, adapter)
    plt.merge(gpu, adapter)
    for n in shapes:
        assert_close(npy(gpu[n].weight.float()), npy(cpu[n].weight.float()), "bfloat16", what=n)
    plt.unmerge(gpu, adapter)
    for n in shapes:
        assert_close(npy(gpu[n].weight.float()), npy(model[n].weight.float()), "bfloat16", what=f"{n} unmerged")


def test_a_layer_under_two_names_is_one_module_and_merges_only_when_allowed():
    """One Linear reachable as `a` and as `b`. An adapter naming both is refused by every verb,
    as by the NumPy and JAX backends (one module per layer; merging both, then unmerging, was
    refused halfway before), and nothing changes. Naming `a` alone, merge is refused (it would
    change `b`, which apply() leaves alone) unless allow_shared=True; merges through `a` and
    `b` then come back in the reverse order, each with its own scale, restoring the weight."""
    shared = nn.Linear(12, 10, bias=False)
    model = nn.Module()
    model.a = shared
    model.b = shared
    original = shared.weight.detach().clone()
    first = examples.random_adapter({"a": (10, 12)}, rank=2, alpha=2.0, seed=1)["a"]
    second = examples.random_adapter({"b": (10, 12)}, rank=4, alpha=32.0, seed=2)["b"]
    both = Adapter({"a": first, "b": second})
    for verb in (plt.apply, plt.merge, lambda m, a: plt.merge(m, a, allow_shared=True), plt.unmerge):
        with pytest.raises(LoraError, match="modules 'a' and 'b' both map to one Linear") as info:
            verb(model, both)
        assert info.value.key == "b"
        assert model.a is shared and model.b is shared and torch.equal(shared.weight, original)
    with pytest.raises(LoraError, match=r"module 'a' holds its weight together with 'b' \(tied or shared "
                                        r"weights\).*allow_shared=True"):
        plt.merge(model, Adapter({"a": first}))
    assert torch.equal(shared.weight, original) and not hasattr(shared, "_portable_lora_merges")
    plt.merge(model, Adapter({"a": first}), allow_shared=True)
    plt.merge(model, Adapter({"b": second}), allow_shared=True)
    expected = original.double().numpy() + first.delta_weight(np.float64) + second.delta_weight(np.float64)
    assert_close(npy(shared.weight), expected, "float32", what="both merged")
    with pytest.raises(LoraError, match="merged last into 'a' is not this adapter's"):
        plt.unmerge(model, Adapter({"a": first}))
    plt.unmerge(model, Adapter({"b": second}))  # b's own scale (8), not a's (1)
    assert_close(npy(shared.weight), original.double().numpy() + first.delta_weight(np.float64), "float32",
                 what="b unmerged")
    plt.unmerge(model, Adapter({"a": first}))
    assert_close(npy(shared.weight), original.numpy(), "float32", what="both unmerged")
    with pytest.raises(LoraError, match="'a' has no merged LoRA to unmerge"):
        plt.unmerge(model, Adapter({"a": first}))


def test_a_block_registered_twice_merges_as_apply_changes_it():
    """A block run twice (`0` and `1` of a Sequential): apply() on `0.q` replaces the block's
    own `q`, so `1.q` gets the LoRA as well; merge changes both too, so it is not refused, and
    the merged forward equals the applied one."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            return torch.tanh(self.q(x))

    torch.manual_seed(0)
    block = Block()
    base = nn.Sequential(block, block)
    adapter = examples.random_adapter({"0.q": (8, 8)}, rank=2, alpha=4.0, seed=3)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        applied = plt.apply(copy.deepcopy(base), adapter)
        assert isinstance(applied[1].q, plt.LoraLinear)
        merged = plt.merge(copy.deepcopy(base), adapter)
        assert_close(npy(merged(x)), npy(applied(x)), "float32", what="merged vs applied")


def tiny_tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         tie_word_embeddings=True, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_tied_head_merge_is_refused_unless_allowed_and_unmerges_per_weight():
    """tie_word_embeddings: an lm_head LoRA would be merged into the table the input embedding
    reads too, while apply() changes only the head: refused, naming both modules, the model
    unchanged. With allow_shared=True both ends see W + ΔW (the weight stays tied); merges
    through either end come back in the reverse order of merging into the weight; the two ends
    in one adapter are refused even then (one weight cannot take two ΔW)."""
    base = tiny_tied_llama()
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    head = examples.random_adapter({"lm_head": (128, 64)}, rank=4, alpha=8.0, seed=1)
    with pytest.raises(LoraError, match=r"module 'lm_head' holds its weight together with 'model.embed_tokens'"
                                        r".*allow_shared=True") as info:
        plt.merge(base, head)
    assert info.value.key == "lm_head"
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    assert not any(hasattr(m, "_portable_lora_merges") for m in base.modules())

    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        w = by_hand.lm_head.weight
        w.copy_((w.double() + torch.from_numpy(head.delta_weight("lm_head", np.float64))).float())
        expected = by_hand(IDS).logits
        plt.merge(base, head, allow_shared=True)
        assert base.lm_head.weight is base.model.embed_tokens.weight
        assert_close(npy(base(IDS).logits), npy(expected), "float32", what="tied merge, both ends")

    e = examples.random_adapter({"model.embed_tokens": (128, 64)}, rank=3, kind="embedding", seed=2)
    plt.merge(base, e, allow_shared=True)
    merged_twice = base.lm_head.weight.detach().clone()
    with pytest.raises(LoraError, match="'lm_head' shares its weight with 'model.embed_tokens', which had a "
                                        "LoRA merged into it after this one"):
        plt.unmerge(base, head)
    assert torch.equal(base.lm_head.weight, merged_twice)
    both = Adapter({"model.embed_tokens": e["model.embed_tokens"], "lm_head": head["lm_head"]})
    for verb in (lambda m, a: plt.merge(m, a, allow_shared=True), plt.unmerge):
        with pytest.raises(LoraError, match="modules 'model.embed_tokens' and 'lm_head' both map to one weight"):
            verb(base, both)
        assert torch.equal(base.lm_head.weight, merged_twice)
    plt.unmerge(base, e)
    plt.unmerge(base, head)
    # back to within the rounding of the merged table (ΔW outweighs this small-init W)
    bound = 4 * np.finfo(np.float32).eps * np.abs(npy(merged_twice)).max()
    for k, v in base.state_dict().items():
        assert np.abs(npy(v) - npy(state[k])).max() <= (bound if k.endswith("embed_tokens.weight") or
                                                        k == "lm_head.weight" else 0), k


@pytest.mark.parametrize("dora", [False, True])
def test_stacked_adapters_come_back_in_reverse_order_only(dora):
    """merge(A), merge(B), unmerge(A) is refused (naming the module, W untouched) even when
    A and B have the same rank and kind, where the scale of B's record would otherwise be
    used with A's factors; B then A restores W. As the MLX backend does."""
    shapes = {"proj": (10, 12)}
    first = examples.random_adapter(shapes, rank=2, alpha=4.0, seed=1, dora=dora)
    second = examples.random_adapter(shapes, rank=2, alpha=16.0, seed=2, dora=dora)
    model = nn.Module()
    model.proj = nn.Linear(12, 10, bias=False)
    original = model.proj.weight.detach().clone()
    plt.merge(model, first)
    plt.merge(model, second)
    before = model.proj.weight.detach().clone()
    with pytest.raises(LoraError, match="merged last into 'proj' is not this adapter's; unmerge adapters in "
                                        "the reverse order"):
        plt.unmerge(model, first)
    assert torch.equal(model.proj.weight, before)
    plt.unmerge(model, second)
    plt.unmerge(model, first)
    assert_close(npy(model.proj.weight), original.numpy(), "float32", what="in reverse order")
    # an adapter loaded again (other objects, same numbers) still unmerges its own merge
    plt.merge(model, first)
    plt.unmerge(model, Adapter({"proj": first["proj"].copy()}))
    assert_close(npy(model.proj.weight), original.numpy(), "float32", what="reloaded adapter")


def test_upload_chunk_packs_every_factor_at_its_aligned_offset():
    """The packing half of the CUDA upload, on any machine: same-shaped plain linear layers'
    factors go in stacked (their A's back to back, then their B's: one view each, member i
    the i-th layer's), every other layer's one by one (odd sizes, bf16/float32/float64, a
    DoRA magnitude, a conv's 4-D factors, an empty factor, a stack key seen once), every
    block at a 256-aligned offset; the views read back exactly the packed arrays."""
    from portable_lora.backends import torch as backend

    rng = np.random.default_rng(0)

    def arr(shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)

    bf16 = ml_dtypes.bfloat16
    layers = [  # (name, stack key, arrays)
        ("q0", "q", [arr((3, 7), bf16), arr((5, 3), bf16)]),
        ("odd", None, [arr((3, 7), bf16), arr((5, 3), bf16), arr(5)]),  # DoRA
        ("q1", "q", [arr((3, 7), bf16), arr((5, 3), bf16)]),
        ("conv", None, [arr((2, 3, 3, 1), np.float64), arr((4, 2, 1, 1), np.float64)]),
        ("v0", "v", [arr((4, 33)), arr((40, 4))]),
        ("q2", "q", [arr((3, 7), bf16), arr((5, 3), bf16)]),
        ("v1", "v", [arr((4, 33)), arr((40, 4))]),
        ("empty", None, [np.zeros((0, 4), np.float32), np.zeros((6, 0), np.float32)]),
        ("alone", "k", [arr((16, 300), bf16), arr((2, 16), bf16)]),
    ]
    chunk = backend._Chunk(torch.device("cpu"))
    for name, key, arrays in layers:
        chunk.add(name, key, arrays)
    chunk.layout()
    assert chunk.nbytes % 256 == 0
    assert [names for names, _, _ in chunk.stacks] == [["q0", "q1", "q2"], ["v0", "v1"]]
    assert [name for name, _ in chunk.singles] == ["odd", "conv", "empty", "alone"]
    chunk.staging = np.full(chunk.nbytes, 0xAB, np.uint8)
    chunk.pack()
    singles, stacks = backend._chunk_views(chunk, torch.from_numpy(chunk.staging))
    given = {name: arrays for name, _, arrays in layers}
    for names, A, B in stacks:
        assert A.data_ptr() % 256 == B.data_ptr() % 256 == chunk.staging.ctypes.data % 256
        for i, name in enumerate(names):
            np.testing.assert_array_equal(npy(A[i]), given[name][0].astype(np.float32), err_msg=name)
            np.testing.assert_array_equal(npy(B[i]), given[name][1].astype(np.float32), err_msg=name)
    for name, factors in singles:
        expected = given[name] + [None] * (3 - len(given[name]))
        for got, want in zip(factors, expected):
            if want is None:
                assert got is None
                continue
            assert want.size == 0 or (got.data_ptr() - chunk.staging.ctypes.data) % 256 == 0
            assert tuple(got.shape) == want.shape
            np.testing.assert_array_equal(npy(got.float()), want.astype(np.float32), err_msg=name)


def test_stack_key_groups_only_plain_linear_layers_of_one_shape():
    from portable_lora.backends import torch as backend

    adapter = examples.random_adapter({"a": (10, 12), "b": (10, 12), "c": (10, 14)}, rank=2)
    dora = examples.random_adapter({"a": (10, 12)}, rank=2, dora=True)["a"]
    lin = {n: nn.Linear(12 if n != "c" else 14, 10, bias=False) for n in "abc"}

    def key(n, module):
        return backend._stack_key(lin[n], module, [module.A, module.B])

    assert key("a", adapter["a"]) == key("b", adapter["b"]) is not None
    assert key("c", adapter["c"]) != key("a", adapter["a"])
    assert key("a", dora) is None
    conv = examples.random_adapter({"k": (8, 3, 3, 3)}, rank=2, kind="conv")["k"]
    assert backend._stack_key(nn.Conv2d(3, 8, 3, bias=False), conv, [conv.A, conv.B]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_chunked_upload_pipeline_with_a_cpu_layer_between(monkeypatch):
    """Factors go up chunk by chunk on a side stream while earlier chunks merge: with chunks of
    a few layers, same-shaped layers stacked (one launch each group), packing threads, a CPU
    layer in the middle (its factors converted on their
    own), a conv and an embedding, a first merge in inference mode and a second on top, every
    weight equals the CPU merge, and after unmerging both, the CPU unmerge to within the
    rounding of the merged weights (bfloat16 W + ΔW, with ΔW larger than W here: that
    rounding, not the pipeline, bounds how close either comes back to W)."""
    from portable_lora.backends import torch as backend

    monkeypatch.setattr(backend, "_FIRST_CHUNK_BYTES", 1024)
    monkeypatch.setattr(backend, "_CHUNK_BYTES", 6000)
    torch.manual_seed(0)
    names = [f"l{i}" for i in range(12)]
    # three shapes, four layers each: the first adapter's factors go up stacked per shape
    model = nn.ModuleDict({n: nn.Linear(48 + i % 3, 40 + 2 * (i % 3), bias=False) for i, n in enumerate(names)})
    model = model.to(torch.bfloat16)
    shapes = {n: tuple(model[n].weight.shape) for n in names}
    first = examples.random_adapter(shapes, rank=4, dtype=ml_dtypes.bfloat16, seed=1)
    second = examples.random_adapter(shapes, rank=8, dtype=np.float32, seed=2, dora=True)
    # a conv (4-D factors) and an embedding table between the linears, in the first adapter
    model["l7"] = nn.Conv2d(3, 8, 3, bias=False).to(torch.bfloat16)
    model["l8"] = nn.Embedding(30, 16).to(torch.bfloat16)
    del second["l7"], second["l8"]
    first["l7"] = examples.random_adapter({"l7": (8, 3, 3, 3)}, rank=4, kind="conv", seed=3)["l7"]
    first["l8"] = examples.random_adapter({"l8": (30, 16)}, rank=4, kind="embedding", seed=4)["l8"]
    cpu = copy.deepcopy(model)
    gpu = copy.deepcopy(model).cuda()
    gpu["l5"] = gpu["l5"].cpu()  # one layer stays on the CPU
    plt.merge(cpu, first)
    with torch.inference_mode():  # pinned buffers made in inference mode, packed on other threads
        plt.merge(gpu, first)
    plt.merge(cpu, second)
    plt.merge(gpu, second)
    merged = {n: npy(cpu[n].weight.float()) for n in names}
    for n in names:
        assert_close(npy(gpu[n].weight.float().cpu()), merged[n], "bfloat16", what=n)
    for m in (gpu, cpu):
        plt.unmerge(m, second)
        plt.unmerge(m, first)
    for n in names:
        got, want = npy(gpu[n].weight.float().cpu()), npy(cpu[n].weight.float())
        # a few bfloat16 ulps of the largest merged value (the two paths may round an element
        # of W + ΔW apart by one, and DoRA's unmerge scales that)
        assert np.max(np.abs(got - want)) <= 3e-2 * np.max(np.abs(merged[n])), f"{n} unmerged"


# -- bad input ---------------------------------------------------------------------------------------------

def test_unmatched_modules_are_all_listed():
    adapter = mixed_adapter()
    adapter["base_model.model.proj"] = adapter["proj"].copy()
    adapter["nowhere"] = adapter["proj"].copy()
    model = Mixed()
    with pytest.raises(LoraError, match=r"2 adapter module\(s\) match no layer.*'base_model.model.proj', "
                                        r"'nowhere'") as info:
        plt.apply(model, adapter)
    assert info.value.key == "base_model.model.proj"
    assert not any(isinstance(m, plt.LoraLayer) for m in model.modules())  # nothing half-applied


def test_shape_mismatch_names_module_and_shapes():
    adapter = examples.random_adapter({"proj": (10, 11)}, rank=2)
    with pytest.raises(LoraError, match=r"'proj'.*Linear weight is \[10, 12\].*A \[2, 11\].*ΔW \[10, 11\]"):
        plt.apply(Mixed(), adapter)
    square_but_transposed = examples.random_adapter({"gpt": (10, 12)}, rank=2)
    with pytest.raises(LoraError, match=r"'gpt'.*Conv1D weight is \[12, 10\]"):
        plt.merge(Mixed(), square_but_transposed)


def test_applying_twice_is_an_error():
    model = plt.apply(Mixed(), mixed_adapter())
    with pytest.raises(LoraError, match="'embed' already has a LoRA applied; call remove"):
        plt.apply(model, mixed_adapter())
    with pytest.raises(LoraError, match="already has a LoRA applied"):
        plt.merge(model, mixed_adapter())


@pytest.mark.parametrize("name,kind,shape,expected", [
    ("proj", "embedding", (12, 10), "'embedding' LoRA but the layer is a Linear"),
    ("conv", "linear", (4, 3), "'linear' LoRA but the layer is a Conv2d"),
    ("embed", "linear", (12, 20), "'linear' LoRA but the layer is a Embedding"),
])
def test_kind_must_fit_the_layer(name, kind, shape, expected):
    adapter = examples.random_adapter({name: shape}, rank=2, kind=kind)
    with pytest.raises(LoraError, match=expected):
        plt.apply(Mixed(), adapter)


def test_unsupported_layers_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(LoraError, match="'1' is a LayerNorm; LoRA applies to nn.Linear"):
        plt.apply(model, examples.random_adapter({"1": (4, 4)}, rank=2))
    grouped = examples.random_adapter({"2": (4, 2, 3, 3)}, rank=2, kind="conv")
    with pytest.raises(LoraError, match="grouped convolutions"):
        plt.apply(model, grouped)


def test_verbs_on_a_model_without_lora_are_errors():
    model = Mixed()
    for verb in (plt.extract, plt.remove, lambda m: plt.set_strength(m, 1.0)):
        with pytest.raises(LoraError, match="no LoRA layers"):
            verb(model)
    with pytest.raises(LoraError, match="'embed' has no merged LoRA to unmerge"):
        plt.unmerge(model, mixed_adapter())
    plt.merge(model, mixed_adapter(dora=True))
    with pytest.raises(LoraError, match="last merge was a rank 3 DoRA"):
        plt.unmerge(model, mixed_adapter())


@pytest.mark.parametrize("bad", [float("nan"), "1", True, None])
def test_bad_strength(bad):
    with pytest.raises(LoraError, match="strength must be a finite real number"):
        plt.apply(Mixed(), mixed_adapter(), strength=bad)


def test_bad_arguments():
    with pytest.raises(LoraError, match="needs a torch.nn.Module"):
        plt.apply(object(), mixed_adapter())
    with pytest.raises(LoraError, match="needs a portable_lora.Adapter"):
        plt.apply(Mixed(), {"proj": None})
    with pytest.raises(LoraError, match="dtype must be a floating torch.dtype"):
        plt.apply(Mixed(), mixed_adapter(), dtype=torch.int8)
