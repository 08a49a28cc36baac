"""compressed-tensors export (vLLM, transformers): calq's own codes and scales handed to the compressed-tensors library,
W4A16 as pack-quantized, W8A8/W8A16 as int-quantized."""

from __future__ import annotations

import copy
from pathlib import Path

import calq_kernels as kernels
import torch
from safetensors.torch import save_model
from torch import nn

from quant.formats.checkpoint import WEIGHTS
from quant.formats.source import ExportSource, Shapes, ragged_groups
from quant.methods import QuantSpec
from quant.methods.schemes import dequantize_codes


def problems(spec: QuantSpec, shapes: Shapes, config) -> list[str]:
    """What keeps this variant of this model from the format (empty: it exports)."""
    return ragged_groups("compressed-tensors", spec.weights.group_size, shapes)


def _ct_scheme(src: ExportSource):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    spec = src.info.spec
    if spec.weights.num_bits == 4:
        group = spec.weights.group_size
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=spec.weights.symmetric,
                                   strategy="group" if group else "channel", group_size=group)
    else:
        weights = QuantizationArgs(num_bits=8, type=spec.weights.type, symmetric=True, strategy="channel")
    acts = None
    if spec.input_activations is not None:
        a = spec.input_activations
        acts = QuantizationArgs(num_bits=a.num_bits, type=a.type, symmetric=a.symmetric, dynamic=a.dynamic,
                                strategy=a.strategy)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def write(src: ExportSource, dtype: torch.dtype, out: Path) -> None:
    """Our codes and scales, handed to compressed-tensors: W4A16 as pack-quantized, W8A8/W8A16 as int-quantized,
    FP8 as float-quantized (vLLM's FP8_DYNAMIC)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    scheme = _ct_scheme(src)
    model = copy.deepcopy(src.model)
    quantized = src.quantized
    for name, q in quantized.items():
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        # Scales rounded to the export dtype first, so compressed-tensors' re-quantization recovers our exact codes.
        scales = q.scales.to(dtype).float()
        if q.weights.num_bits == 4:
            codes = kernels.unpack_int4(q.qweight, q.in_features).float()
            linear.weight.data = dequantize_codes(codes, scales, q.zeros.float(), q.weights.group_size)
        else:
            linear.weight.data = q.qweight.float() * scales[:, None]
        if q.bias is not None:
            linear.bias.data = q.bias.float()
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, linear)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=src.kept,
                                quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    for name, q in quantized.items():
        target = model.get_submodule(name)
        target.weight_scale.data.copy_(q.scales.to(dtype).reshape(target.weight_scale.shape))
        if q.weights.num_bits == 4 and not q.weights.symmetric:
            target.weight_zero_point.data.copy_((q.zeros.to(torch.int16) - 8).to(torch.int8))  # ct codes are signed
        if q.act_mode == "static":
            target.input_scale.data.copy_(q.act_scale.reshape(target.input_scale.shape))
    w = src.info.spec.weights
    fmt = "pack-quantized" if w.num_bits == 4 else "float-quantized" if w.type == "float" else "int-quantized"
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.to(dtype)
    model.config.dtype = dtype
    save_model(model, str(out / WEIGHTS), metadata={"format": "pt"})
    model.config.calq = src.calq
    model.config.save_pretrained(out)
    compressor.update_config(str(out))
