"""Which merge path rounds once? The in-place fused merge (``addmm_``) and the plain path of
``core.merge_into`` against W + s·B@A computed in float64 and rounded once to W's dtype.

    python3 benchmarks/precision_check.py            # cuda if present, else cpu
Prints, per device and dtype, the share of elements each path gets wrong (not the correctly
rounded value) and its largest error in units in the last place.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from portable_lora import core  # noqa: E402


def check(device: str, dtype: torch.dtype, out_f=4096, in_f=4096, rank=16, scale=2.0) -> str:
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(out_f, in_f, generator=g) / 64).to(dtype)
    A = (torch.randn(rank, in_f, generator=g) / 64).to(dtype)
    B = (torch.randn(out_f, rank, generator=g) * 0.1).to(dtype)
    exact = (W.double() + scale * (B.double() @ A.double())).to(dtype).double()
    w, a, b = W.to(device), A.to(device), B.to(device)
    with torch.no_grad():
        plain = core.merge_into(w, a, b, scale).cpu().double()
        fused = core.merge_into(w.clone(), a, b, scale, inplace=True).cpu().double()
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    parts = []
    for name, got in (("plain", plain), ("fused", fused)):
        wrong = got != exact
        parts.append(f"{name}: {wrong.double().mean().item():.2e} wrong, max {((got - exact).abs() / ulp).max().item():.0f} ulp")
    return f"{device} {str(dtype).replace('torch.', '')}: " + "; ".join(parts)


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("torch", torch.__version__, "allow_tf32", torch.backends.cuda.matmul.allow_tf32,
          "float32_matmul_precision", torch.get_float32_matmul_precision(),
          "bf16_reduced_precision_reduction", torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
          "fp16_reduced_precision_reduction", torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            print(check(device, dtype), flush=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        print("reduced-precision reductions off:")
        for dtype in (torch.bfloat16, torch.float16):
            print(check("cuda", dtype), flush=True)


if __name__ == "__main__":
    main()
