"""AutoAWQ GEMM export (transformers with AutoAWQ / GPTQModel, vLLM): qweight (K, N/8), qzeros (K/g, N/8) int32 and
scales (K/g, N) per layer, packed in AutoAWQ's nibble order."""

from __future__ import annotations

import copy
from pathlib import Path

import calq_kernels as kernels
import torch
from torch import Tensor

from quant.formats.source import ExportSource, Shapes, ragged_groups
from quant.methods import QuantSpec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ GEMM packing: nibble i of an int32 word holds output column 8 * word + AWQ_ORDER[i]."""


def pack_awq(codes: Tensor) -> Tensor:
    """(rows, cols) codes in 0..15 -> int32 (rows, cols / 8) in AutoAWQ's GEMM order."""
    rows, cols = codes.shape
    words = codes.to(torch.int64).view(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    packed = (words << torch.arange(0, 32, 4, device=codes.device)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def problems(spec: QuantSpec, shapes: Shapes, config) -> list[str]:
    """What keeps this variant of this model from the format (empty: it exports)."""
    w = spec.weights
    if w.num_bits != 4 or w.group_size is None or w.type != "int":
        return [f"AWQ's GEMM format is group-wise int4; {spec.name!r} is W{w.num_bits} with one scale per output "
                "channel: use --format compressed-tensors or gguf"]
    narrow = [n for n, (_, out) in shapes.items() if out % 8]
    return ragged_groups("awq", w.group_size, shapes) + [
        f"awq packs 8 output columns per int32, but {n} has {shapes[n][1]} outputs; use --format compressed-tensors "
        "or gguf" for n in narrow[:1]]


def write(src: ExportSource, dtype: torch.dtype, out: Path) -> list[str]:
    """qweight (K, N/8), qzeros (K/g, N/8) int32 and scales (K/g, N) per layer: what AutoAWQ's WQLinear_GEMM loads."""
    group = src.info.spec.weights.group_size
    state = src.fp_state(dtype)
    for name, q in src.quantized.items():
        codes = kernels.unpack_int4(q.qweight, q.in_features)
        state[f"{name}.qweight"] = pack_awq(codes.t().contiguous())
        state[f"{name}.qzeros"] = pack_awq(q.zeros.t().contiguous())
        state[f"{name}.scales"] = q.scales.t().to(dtype).contiguous()
        if q.bias is not None:
            state[f"{name}.bias"] = q.bias.to(dtype).contiguous()
    src.save(state, out)
    config = copy.deepcopy(src.model.config)
    config.dtype = dtype
    config.calq = src.calq
    config.quantization_config = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group, "zero_point": True,
        "modules_to_not_convert": [src.names.to_hub(n) for n in src.kept] or None}
    config.save_pretrained(out)
    return []
