"""GGUF export (llama.cpp): calq's own codes and scales written into llama.cpp's blocks, the tokenizer with the
pre-tokenizer name llama.cpp splits text with."""

from __future__ import annotations

import json
from pathlib import Path

import calq_kernels as kernels
import numpy as np
import torch
from torch import Tensor

from quant.errors import CalqError
from quant.formats.source import ExportSource, Shapes
from quant.methods import QuantLinear, QuantSpec


def permute_rope(w: Tensor | np.ndarray, heads: int) -> Tensor | np.ndarray:
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
    group = q.weights.group_size or k
    blocks = k // GGUF_BLOCK

    def per_block(t: Tensor) -> np.ndarray:  # (n, groups) -> float16 bytes (n, blocks, 2)
        t = t.float().reshape(n, -1).repeat_interleave(group // GGUF_BLOCK, 1)[:, :blocks]
        return t.half().numpy().view(np.uint8).reshape(n, blocks, 2)

    if q.weights.num_bits == 8:
        codes = q.qweight.numpy().view(np.uint8).reshape(n, blocks, GGUF_BLOCK)
        parts, qtype = [per_block(q.scales), codes], gguf.GGMLQuantizationType.Q8_0
    else:  # a block's byte j holds weight j (low nibble) and weight j + 16 (high nibble)
        codes = kernels.unpack_int4(q.qweight, k).numpy().reshape(n, blocks, 2, GGUF_BLOCK // 2)
        nibbles = codes[..., 0, :] | (codes[..., 1, :] << 4)
        if q.weights.symmetric:  # our symmetric zero point is 8, Q4_0's too
            parts, qtype = [per_block(q.scales), nibbles], gguf.GGMLQuantizationType.Q4_0
        else:
            parts, qtype = ([per_block(q.scales), per_block(-q.zeros.float() * q.scales.float()), nibbles],
                            gguf.GGMLQuantizationType.Q4_1)
    return np.concatenate(parts, axis=-1).reshape(n, -1), qtype


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
"""Qwen2's pre-tokenizer regex (single digits), llama.cpp's "qwen2"."""


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
    if (shape == ["Split", "ByteLevel"] and steps[0]["pattern"].get("Regex") == QWEN2_SPLIT
            and not steps[1]["use_regex"]):
        return "qwen2"
    raise CalqError(f"GGUF export knows no llama.cpp pre-tokenizer for this tokenizer's {' + '.join(shape)}; "
                    "export to compressed-tensors instead, or convert with llama.cpp's convert_hf_to_gguf.py")


ROPE_TYPES = ("default", "linear", "yarn", "llama3")
"""RoPE variants the export writes in llama.cpp's terms; others (dynamic NTK, longrope, ...) are refused."""


def rope_parameters(config) -> dict:
    """The global attention layers' RoPE parameters (Gemma3 keeps one set per layer type)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def rope_type(config) -> str:
    return rope_parameters(config).get("rope_type", "default")


ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
"""Model type -> llama.cpp architecture, as llama.cpp's convert_hf_to_gguf.py maps them (Mistral runs as llama).
Only the llama architecture permutes q/k rows to interleaved rotary pairs; llama.cpp's qwen2/qwen3/gemma3 graphs
use the NeoX layout Hugging Face stores. Gemma3's norms are written as 1 + w (llama.cpp multiplies by w)."""


def problems(spec: QuantSpec, shapes: Shapes, config) -> list[str]:
    """What keeps this variant of this model from the format (empty: it exports): the architecture, its RoPE
    variant, and layers that are not whole llama.cpp blocks."""
    found = []
    if spec.weights.type == "float":
        found.append("llama.cpp has no FP8 weight type; export FP8 to compressed-tensors (vLLM)")
    if config.model_type not in ARCHITECTURES:
        found.append(f"GGUF export writes {', '.join(ARCHITECTURES)}; this model is {config.model_type!r}: use "
                     "--format compressed-tensors")
    elif config.model_type == "gemma3_text" and config.query_pre_attn_scalar != config.head_dim:
        found.append(f"llama.cpp's gemma3 scales attention by 1/sqrt(head_dim {config.head_dim}), this model by "
                     f"1/sqrt({config.query_pre_attn_scalar}); use --format compressed-tensors")
    if rope_type(config) not in ROPE_TYPES:
        found.append(f"GGUF export cannot write RoPE scaling {rope_type(config)!r} (writes {', '.join(ROPE_TYPES)}); "
                     "use --format compressed-tensors")
    for name, (k, _) in shapes.items():
        group = spec.weights.group_size or k
        if k % GGUF_BLOCK or group % GGUF_BLOCK:
            found.append(f"{name} has {k} inputs in groups of {group}; llama.cpp stores whole blocks of {GGUF_BLOCK}: "
                         f"quantize with a group_size that is a multiple of {GGUF_BLOCK}, or use --format "
                         "compressed-tensors")
            break
    return found


def llama3_rope_factors(config) -> Tensor:
    """llama.cpp's rope_freqs tensor for Llama-3.1/3.2 scaling: per frequency, the factor the original frequency is
    divided by, read off transformers' own llama3 RoPE initialisation."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    exponents = torch.arange(0, len(scaled) * 2, 2, device="cpu").double() / (2 * len(scaled))
    default = rope_parameters(config)["rope_theta"] ** -exponents
    return (default / scaled.double()).float()


def _write_rope(writer, config, kind: str) -> None:
    import gguf

    rope = rope_parameters(config)
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else
                                     gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                 or config.max_position_embeddings))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))


def _gguf_vocab(writer, tokenizer, directory: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's gpt2 BPE vocabulary, padded to the model's embedding rows (as llama.cpp's own
    converter pads): the unused ids get placeholder tokens."""
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
    if len(tokens) > vocab_size:
        raise CalqError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embedding rows; "
                        "they do not belong together")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def write(src: ExportSource, dtype: torch.dtype, out: Path) -> list[str]:
    """A GGUF of the model's llama.cpp architecture (ARCHITECTURES): quantized layers as our own codes in llama.cpp blocks (see _gguf_blocks); norms
    F32, other full-precision tensors in `dtype`."""
    import gguf

    cfg = src.model.config
    rope = rope_type(cfg)
    bits, sym = src.info.spec.weights.num_bits, src.info.spec.weights.symmetric
    float_type = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
                  torch.bfloat16: gguf.GGMLQuantizationType.BF16}[dtype]
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    arch = ARCHITECTURES[cfg.model_type]
    names = gguf.get_tensor_name_map({"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                                      "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma3": gguf.MODEL_ARCH.GEMMA3}[arch],
                                     cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(out / "model.gguf", arch)
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
    writer.add_rope_freq_base(float(rope_parameters(cfg)["rope_theta"]))
    _write_rope(writer, cfg, rope)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3" and getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if bits == 8 else
                         gguf.LlamaFileType.MOSTLY_Q4_0 if sym else gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_string("calq.spec", json.dumps(src.calq["spec"]))
    if src.calq["temperature"] is not None:
        writer.add_float32("calq.temperature", src.calq["temperature"])
    if src.calq["direction"] is not None:  # the step itself is blk.N.ffn_down.bias; this says what it is
        writer.add_string("calq.direction", json.dumps(src.calq["direction"]))
    if src.calq["gate"] is not None:
        writer.add_string("calq.gate", json.dumps(src.calq["gate"]))
    _gguf_vocab(writer, src.tokenizer, src.directory, cfg.vocab_size)

    quantized = src.quantized
    tensors: dict[str, Tensor | QuantLinear] = {f"{n}.weight": q for n, q in quantized.items()}
    tensors.update({f"{n}.bias": q.bias.float() for n, q in quantized.items() if q.bias is not None})
    tensors.update(src.fp_state(torch.float32))
    if rope == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(cfg).numpy())
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
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            data = permute_rope(data, heads if "q_proj" in hf_name else kv_heads)  # rows, so packed blocks too
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1  # llama.cpp's gemma3 norms multiply by the stored weight
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return []
