"""compressed-tensors export (vLLM, transformers): calq's own codes and scales handed to the compressed-tensors library,
in the format it picks for each scheme (as llm-compressor does: weight-only int as pack-quantized, W8A8 as
int-quantized, FP8 as float-quantized), under the hub's names, per-expert MoE weights as vLLM's fused-MoE loaders
and transformers' expert converters read them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import calq_kernels as kernels
import torch
from torch import nn

from quant.formats.source import ExportSource, Shapes, ragged_groups
from quant.methods import QuantSpec
from quant.methods.schemes import dequantize_codes
from quant.models import converted_kinds


def problems(spec: QuantSpec, shapes: Shapes, config) -> list[str]:
    """What keeps this variant of this model from the format (empty: it exports). MoE experts: vLLM's fused-MoE
    methods read symmetric int weights only (no zero points) and int8 activations only dynamic per token."""
    found = ragged_groups("compressed-tensors", spec.weights.group_size, shapes)
    if "experts" in converted_kinds(config):
        w, a = spec.weights, spec.input_activations
        if w.type == "int" and not w.symmetric:
            found.append(f"compressed-tensors MoE experts ({config.model_type}) need symmetric int weights: vLLM's "
                         "and transformers' MoE loaders read no zero points; quantize with weights.symmetric: true, "
                         "or export --format awq")
        if a is not None and a.type == "int" and not a.dynamic:
            found.append(f"compressed-tensors MoE experts ({config.model_type}) with int8 activations need them "
                         "dynamic per token (vLLM's int8 MoE has no static scales); quantize with "
                         "input_activations.dynamic: true")
    return found


def notes(spec: QuantSpec, config) -> list[str]:
    """What a user should know about an export that is written: where it loads and where it does not."""
    a = spec.input_activations
    if "experts" in converted_kinds(config) and a is not None and a.type == "int":
        return [f"int8 W8A8 MoE experts ({config.model_type}) are written as vLLM's int8 fused-MoE reads them; "
                "transformers 5.17 cannot load them (its MoE loader dequantizes only pack-quantized and FP8 "
                "experts): in transformers use calq's own checkpoint (quant.load)"]
    return []


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


def _ignore_by_hub_names(path: Path, src: ExportSource) -> None:
    """The ignore list compressed-tensors wrote, named as the checkpoint's tensors are (vLLM matches it against its
    own module names: Mixtral's block_sparse_moe.gate)."""
    config = json.loads(path.read_text())
    qc = config["quantization_config"]
    qc["ignore"] = [src.names.to_hub(n) for n in qc.get("ignore") or []]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write(src: ExportSource, dtype: torch.dtype, out: Path) -> list[str]:
    """Our codes and scales, handed to compressed-tensors, which packs them in the format it infers for the scheme
    (FP8: float-quantized, vLLM's FP8_DYNAMIC)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
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
    fmt = infer_module_format(nn.Linear, scheme).value
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.to(dtype)
    model.config.dtype = dtype
    src.save(model.state_dict(), out)
    model.config.calq = src.calq
    model.config.save_pretrained(out)
    compressor.update_config(str(out))
    _ignore_by_hub_names(out / "config.json", src)
    return notes(src.info.spec, model.config)
