"""Shared fixtures: a small byte-level BPE tokenizer trained on the fly and tiny random models of
several architecture families, so stage tests run in seconds without any download."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: kernel tests run interpreted on CPU

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

from calq_kernels import unpack_int4
from quant.methods import QuantLinear
from quant.methods.schemes import dequantize_codes

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus() -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "river", "market", "film", "score", "theory", "planet",
             "music", "history", "the", "of", "and", "a", "in", "is", "was", "quantum"]
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[i] for i in torch.randint(0, len(words), (40,), generator=g).tolist()) for _ in range(200)]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus() + ["A B C D A. B. C. D."], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def bos_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The test tokenizer, adding a BOS before every text as Llama-3's and Gemma's do."""
    tok = copy.deepcopy(tokenizer)
    bos = "<|im_start|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    tok.bos_token = bos
    return tok


def tiny_config(family: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=24, sliding_window=64, query_pre_attn_scalar=24)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "gemma3")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    return model.eval().requires_grad_(False)


def save_tiny_llama(directory, tokenizer) -> None:
    """A seeded tiny random Llama and its tokenizer, saved as a model directory a recipe can name."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def dequantized(q: QuantLinear) -> torch.Tensor:
    """The float weight a QuantLinear's buffers hold."""
    if q.weights.num_bits == 4:
        return dequantize_codes(unpack_int4(q.qweight, q.in_features), q.scales.float(), q.zeros.float(),
                                q.weights.group_size)
    return q.qweight.float() * q.scales[:, None]
