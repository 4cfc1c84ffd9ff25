"""The math core: every LoRA formula, written once against the Python array API standard."""

from .capabilities import (CAPABILITIES, add_matmul, add_matmul_, add_matmul_many_, add_matmul_stacked_,
                           fused_available, linear_lora, stop_gradient)
from .lora import (KINDS, accumulation_dtype, add_lora_output, delta_weight, dora_factor,
                   dora_forward, dora_weight_norm, embedding_lora_output, linear_forward,
                   lora_output, merge_into, merge_into_many, merge_into_stacked, unmerge_from)
from .lowrank import LowRank, low_rank, pad_rank, resize_rank
from .namespace import array_namespace, namespace_family
from .scale import (ALPHA_OVER_RANK, ALPHA_OVER_SQRT_RANK, RAW, RULES, alpha_for_scale, check_strength,
                    check_alpha, check_rank, check_rule, effective_scale)

__all__ = [
    "CAPABILITIES", "add_matmul", "add_matmul_", "add_matmul_many_", "add_matmul_stacked_", "fused_available", "linear_lora", "stop_gradient",
    "KINDS", "accumulation_dtype", "add_lora_output", "delta_weight", "dora_factor", "dora_forward",
    "dora_weight_norm", "embedding_lora_output", "linear_forward", "lora_output", "merge_into",
    "merge_into_many", "merge_into_stacked", "unmerge_from", "LowRank", "low_rank", "pad_rank", "resize_rank", "array_namespace",
    "namespace_family", "ALPHA_OVER_RANK", "ALPHA_OVER_SQRT_RANK", "RAW", "RULES",
    "alpha_for_scale", "check_alpha", "check_rank", "check_rule", "check_strength", "effective_scale",
]
