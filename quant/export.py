"""Export a calq checkpoint to formats other runtimes load: compressed-tensors (vLLM, transformers), AutoAWQ GEMM
(transformers, AutoAWQ, vLLM) and GGUF (llama.cpp).

Every export starts from the hash-checked calq checkpoint (quant.load), is written to a temporary directory renamed
into place at the end (an interrupted export leaves nothing that looks complete), ends with a manifest of hashes,
and carries the fitted temperature and the run's gate verdict for that variant (config.json `calq`, GGUF `calq.*`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file, save_model
from torch import Tensor, nn

import kernels
from quant.cache import CalqError, atomic_path
from quant.checkpoint import WEIGHTS, CheckpointInfo, checkpoint_info, load, write_manifest
from quant.gate import GateReport
from quant.quantize import QuantLinear, dequantize_codes
from quant.schema import StrictModel

log = logging.getLogger(__name__)

Format = Literal["compressed-tensors", "awq", "gguf"]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ GEMM packing: nibble i of an int32 word holds output column 8 * word + AWQ_ORDER[i]."""


class ExportConfig(StrictModel):
    format: Format
    variant: str | None = None
    """Which quantized variant of a run directory (not needed for a model directory or a one-variant run)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Float dtype of scales and of the layers kept in full precision (runtimes' kernels want 16-bit)."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: Format
    weight_bytes: int
    """Bytes of the weight files (safetensors or GGUF) as written."""


@dataclass(frozen=True)
class _Source:
    model: nn.Module
    tokenizer: object
    directory: Path
    info: CheckpointInfo
    calq: dict
    """What travels with the export: scheme, temperature, gate verdict."""

    @property
    def quantized(self) -> dict[str, QuantLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuantLinear)}


def _model_dir(path: Path, variant: str | None) -> Path:
    if (path / WEIGHTS).is_file():
        return path
    variants = sorted(p.name for p in (path / "models").glob("*") if (p / WEIGHTS).is_file())
    if variant is None and len(variants) == 1:
        variant = variants[0]
    if variant not in variants:
        raise CalqError(f"{path}: choose the variant to export with --variant (one of {variants}); "
                        "or pass a model directory run_dir/models/<variant>")
    return path / "models" / variant


def _gate_verdict(directory: Path) -> dict | None:
    gate = directory.parent.parent / "gate.json"
    if directory.parent.name != "models" or not gate.is_file():
        return None
    name = directory.name  # a re-calibrated variant is gated as name+T
    results = [r for r in GateReport.load(gate).results if r.variant == name or r.variant.startswith(f"{name}+")]
    return {"passed": all(r.passed for r in results), "results": [r.line() for r in results]} if results else None


def _source(path: Path, variant: str | None) -> _Source:
    directory = _model_dir(Path(path).expanduser(), variant)
    model, tokenizer = load(directory, device="cpu")
    info = checkpoint_info(directory)
    calq = {"variant": info.spec.name, "spec": info.spec.model_dump(mode="json"), "temperature": info.temperature,
            "gate": _gate_verdict(directory)}
    return _Source(model, tokenizer, directory, info, calq)


def _fp_state(src: _Source, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor outside the quantized linears (tied copies once), in `dtype`."""
    skip = tuple(f"{n}." for n in src.quantized)
    state = {k: v for k, v in src.model.state_dict().items() if not k.startswith(skip)}
    if getattr(src.model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}


def _group_size(src: _Source, fmt: str) -> int | None:
    """Formats with whole groups only: the group size must divide every quantized layer's input size."""
    group = src.info.spec.weights.group_size
    ragged = [n for n, m in src.quantized.items() if group and m.in_features % group]
    if ragged:
        raise CalqError(f"{fmt} needs group_size {group} to divide every input size, but {ragged[0]} has "
                        f"{src.quantized[ragged[0]].in_features} inputs (ragged last group); quantize with a "
                        "group_size that divides it (e.g. 32 or 64)")
    return group


# ----------------------------------------------------------------------------------------------------------------
# compressed-tensors
# ----------------------------------------------------------------------------------------------------------------

def _ct_scheme(src: _Source):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    spec = src.info.spec
    if spec.weights.bits == 4:
        group = _group_size(src, "compressed-tensors")
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=spec.weights.symmetric,
                                   strategy="group" if group else "channel", group_size=group)
    else:
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    acts = None
    if spec.activations is not None:
        dynamic = spec.activations.mode == "dynamic"
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=dynamic,
                                strategy="token" if dynamic else "tensor")
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def _export_compressed_tensors(src: _Source, dtype: torch.dtype, out: Path) -> None:
    """Our codes and scales, handed to compressed-tensors: W4A16 as pack-quantized, W8A8/W8A16 as int-quantized."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    scheme = _ct_scheme(src)
    model = copy.deepcopy(src.model)
    quantized = src.quantized
    for name, q in quantized.items():
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        # Scales rounded to the export dtype first, so compressed-tensors' re-quantization recovers our exact codes.
        scales = q.scales.to(dtype).float()
        if q.scheme.bits == 4:
            codes = kernels.unpack_int4(q.qweight, q.in_features).float()
            linear.weight.data = dequantize_codes(codes, scales, q.zeros.float(), q.scheme.group_size)
        else:
            linear.weight.data = q.qweight.float() * scales[:, None]
        if q.bias is not None:
            linear.bias.data = q.bias.float()
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, linear)
    kept = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=kept,
                                quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    for name, q in quantized.items():
        target = model.get_submodule(name)
        target.weight_scale.data.copy_(q.scales.to(dtype).reshape(target.weight_scale.shape))
        if q.scheme.bits == 4 and not q.scheme.symmetric:
            target.weight_zero_point.data.copy_((q.zeros.to(torch.int16) - 8).to(torch.int8))  # ct codes are signed
        if q.act_mode == "static":
            target.input_scale.data.copy_(q.act_scale.reshape(target.input_scale.shape))
    fmt = "pack-quantized" if src.info.spec.weights.bits == 4 else "int-quantized"
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.to(dtype)
    model.config.dtype = dtype
    save_model(model, str(out / WEIGHTS), metadata={"format": "pt"})
    model.config.calq = src.calq
    model.config.save_pretrained(out)
    compressor.update_config(str(out))


# ----------------------------------------------------------------------------------------------------------------
# AutoAWQ GEMM
# ----------------------------------------------------------------------------------------------------------------

def pack_awq(codes: Tensor) -> Tensor:
    """(rows, cols) codes in 0..15 -> int32 (rows, cols / 8) in AutoAWQ's GEMM order."""
    rows, cols = codes.shape
    words = codes.to(torch.int64).view(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    packed = (words << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _export_awq(src: _Source, dtype: torch.dtype, out: Path) -> None:
    """qweight (K, N/8), qzeros (K/g, N/8) int32 and scales (K/g, N) per layer: what AutoAWQ's WQLinear_GEMM loads."""
    w = src.info.spec.weights
    group = _group_size(src, "awq")
    if w.bits != 4 or group is None:
        raise CalqError(f"AWQ's GEMM format is group-wise int4; {src.info.spec.name!r} is W{w.bits} with one scale "
                        "per output channel: use --format compressed-tensors or gguf")
    state = _fp_state(src, dtype)
    for name, q in src.quantized.items():
        if q.out_features % 8:
            raise CalqError(f"awq packs 8 output columns per int32, but {name} has {q.out_features} outputs; "
                            "use --format compressed-tensors or gguf")
        codes = kernels.unpack_int4(q.qweight, q.in_features)
        state[f"{name}.qweight"] = pack_awq(codes.t().contiguous())
        state[f"{name}.qzeros"] = pack_awq(q.zeros.t().contiguous())
        state[f"{name}.scales"] = q.scales.t().to(dtype).contiguous()
        if q.bias is not None:
            state[f"{name}.bias"] = q.bias.to(dtype).contiguous()
    save_file(state, out / WEIGHTS, metadata={"format": "pt"})
    config = copy.deepcopy(src.model.config)
    config.dtype = dtype
    config.calq = src.calq
    config.quantization_config = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group, "zero_point": True,
        "modules_to_not_convert": sorted(n for n, m in src.model.named_modules()
                                         if isinstance(m, nn.Linear) and n not in src.quantized) or None}
    config.save_pretrained(out)


# ----------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp)
# ----------------------------------------------------------------------------------------------------------------

def _permute_rope(w: Tensor | np.ndarray, heads: int) -> Tensor | np.ndarray:
    """Hugging Face's rotary layout -> llama.cpp's (interleaved pairs), as llama.cpp's converter does for q and k:
    a permutation of rows (output features)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_BLOCK = 32
"""llama.cpp's Q8_0, Q4_0 and Q4_1 blocks: 32 weights along the input with one float16 scale (Q4_1: and a min)."""


def _gguf_blocks(name: str, q: QuantLinear) -> tuple[np.ndarray, object]:
    """Our codes and scales written straight into llama.cpp blocks, row by row: W8 as Q8_0, symmetric W4 as Q4_0,
    asymmetric W4 as Q4_1 (scale d, min -zero * scale). Exact up to the blocks' float16 scales, for any group size
    that is a whole number of blocks; re-quantizing our dequantized weights instead rounds a second time (g64 into
    32-wide Q4_1 blocks changed SmolLM2's top-1 token at 30% of positions)."""
    import gguf

    n, k = q.out_features, q.in_features
    group = q.scheme.group_size or k
    if k % GGUF_BLOCK or group % GGUF_BLOCK:
        raise CalqError(f"{name} has {k} inputs in groups of {group}; llama.cpp stores whole blocks of {GGUF_BLOCK}: "
                        f"quantize with a group_size that is a multiple of {GGUF_BLOCK}, or use --format "
                        "compressed-tensors")
    blocks = k // GGUF_BLOCK

    def per_block(t: Tensor) -> np.ndarray:  # (n, groups) -> float16 bytes (n, blocks, 2)
        t = t.float().reshape(n, -1).repeat_interleave(group // GGUF_BLOCK, 1)[:, :blocks]
        return t.half().numpy().view(np.uint8).reshape(n, blocks, 2)

    if q.scheme.bits == 8:
        codes = q.qweight.numpy().view(np.uint8).reshape(n, blocks, GGUF_BLOCK)
        parts, qtype = [per_block(q.scales), codes], gguf.GGMLQuantizationType.Q8_0
    else:  # a block's byte j holds weight j (low nibble) and weight j + 16 (high nibble)
        codes = kernels.unpack_int4(q.qweight, k).numpy().reshape(n, blocks, 2, GGUF_BLOCK // 2)
        nibbles = codes[..., 0, :] | (codes[..., 1, :] << 4)
        if q.scheme.symmetric:  # our symmetric zero point is 8, Q4_0's too
            parts, qtype = [per_block(q.scales), nibbles], gguf.GGMLQuantizationType.Q4_0
        else:
            parts, qtype = ([per_block(q.scales), per_block(-q.zeros.float() * q.scales.float()), nibbles],
                            gguf.GGMLQuantizationType.Q4_1)
    return np.concatenate(parts, axis=-1).reshape(n, -1), qtype


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name (tokenizer.ggml.pre, see its llama-vocab.cpp) for the tokenizer's pre-tokenizer: it picks
    the regex llama.cpp splits text with before BPE, so a wrong name tokenizes prompts differently."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"] or {"type": "none"}
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    shape = [step["type"] for step in steps]
    if shape == ["ByteLevel"] and steps[0]["use_regex"]:
        return "gpt-2"
    if shape == ["Digits", "ByteLevel"] and steps[0]["individual_digits"] and steps[1]["use_regex"]:
        return "smollm"
    if (shape == ["Split", "ByteLevel"] and steps[0]["pattern"].get("Regex") == LLAMA3_SPLIT
            and not steps[1]["use_regex"]):
        return "llama-bpe"
    raise CalqError(f"GGUF export knows no llama.cpp pre-tokenizer for this tokenizer's {' + '.join(shape)}; "
                    "export to compressed-tensors instead, or convert with llama.cpp's convert_hf_to_gguf.py")


def _gguf_vocab(writer, tokenizer, directory: Path) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    special = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    added = set(tokenizer.get_added_vocab().values())
    tokens, types = [], []
    for i in range(len(tokenizer)):
        tokens.append(tokenizer.convert_ids_to_tokens(i))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    if len(vocab) != len(tokens):
        raise CalqError(f"tokenizer ids are not contiguous ({len(vocab)} tokens, {len(tokens)} ids); "
                        "GGUF needs one token per id")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def _export_gguf(src: _Source, dtype: torch.dtype, out: Path) -> None:
    """A llama-architecture GGUF: quantized layers as our own codes in llama.cpp blocks (see _gguf_blocks); norms
    F32, other full-precision tensors in `dtype`."""
    import gguf

    cfg = src.model.config
    if cfg.model_type != "llama":
        raise CalqError(f"GGUF export writes the llama architecture; this model is {cfg.model_type!r}: "
                        "use --format compressed-tensors")
    bits, sym = src.info.spec.weights.bits, src.info.spec.weights.symmetric
    float_type = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
                  torch.bfloat16: gguf.GGMLQuantizationType.BF16}[dtype]
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(out / "model.gguf", "llama")
    writer.add_name(src.info.spec.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if bits == 8 else
                         gguf.LlamaFileType.MOSTLY_Q4_0 if sym else gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_string("calq.spec", json.dumps(src.calq["spec"]))
    if src.calq["temperature"] is not None:
        writer.add_float32("calq.temperature", src.calq["temperature"])
    if src.calq["gate"] is not None:
        writer.add_string("calq.gate", json.dumps(src.calq["gate"]))
    _gguf_vocab(writer, src.tokenizer, src.directory)

    quantized = src.quantized
    tensors: dict[str, Tensor | QuantLinear] = {f"{n}.weight": q for n, q in quantized.items()}
    tensors.update({f"{n}.bias": q.bias.float() for n, q in quantized.items() if q.bias is not None})
    tensors.update(_fp_state(src, torch.float32))
    for hf_name, w in tensors.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CalqError(f"GGUF export has no llama.cpp name for tensor {hf_name}; use --format compressed-tensors")
        if isinstance(w, QuantLinear):
            data, raw_dtype = _gguf_blocks(hf_name.rpartition(".")[0], w)
        elif w.ndim == 1 or float_type == gguf.GGMLQuantizationType.F32:
            data, raw_dtype = w.float().numpy(), None
        else:
            data, raw_dtype = gguf.quants.quantize(w.float().numpy(), float_type), float_type
        if hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            data = _permute_rope(data, heads if "q_proj" in hf_name else kv_heads)  # rows, so packed blocks too
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


WRITERS = {"compressed-tensors": _export_compressed_tensors, "awq": _export_awq, "gguf": _export_gguf}


def export(source: str | Path, config: ExportConfig, out: str | Path) -> ExportResult:
    """Write the checkpoint at `source` (a run or model directory) to `out` in `config.format`, atomically."""
    src = _source(Path(source), config.variant)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        WRITERS[config.format](src, getattr(torch, config.dtype), tmp)
        if config.format != "gguf":
            src.tokenizer.save_pretrained(tmp)
        write_manifest(tmp, config.format, calq=src.calq)
    weights = [p for p in out.iterdir() if p.suffix in (".safetensors", ".gguf")]
    result = ExportResult(out, config.format, sum(p.stat().st_size for p in weights))
    log.info("exported %s as %s to %s (%.1f MB)", src.info.spec.name, config.format, out, result.weight_bytes / 2**20)
    return result
