"""Checkpoints: calq's own save -> load round trip (hash-checked), and exports that other runtimes load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import quant
from quant.cache import CalqError
from quant.checkpoint import save_quantized
from quant.methods import QuantSpec
from quant.quantize import ActScheme, QuantLinear, WeightScheme, quantize

from .conftest import tiny_config

SPECS = {
    "w4-g32": QuantSpec(name="w4-g32", weights=WeightScheme(bits=4, group_size=32, symmetric=False)),
    "w8a8": QuantSpec(name="w8a8", weights=WeightScheme(bits=8, group_size=None, symmetric=True),
                      activations=ActScheme(mode="dynamic")),
}


def _tiny(family: str, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    return model.eval().requires_grad_(False)


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer(["the river market of alpha", "quantum music and film theory"], return_tensors="pt").input_ids


@pytest.mark.parametrize(("family", "variant"), [("llama", "w4-g32"), ("llama", "w8a8"), ("qwen2", "w4-g32")])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tokenizer, family, variant):
    result = quantize(_tiny(family, tokenizer), SPECS[variant])
    save_quantized(result, tokenizer, tmp_path / variant)
    model, tok = quant.load(tmp_path / variant, device="cpu")
    loaded = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert loaded == set(result.quantized) and len(loaded) == 14
    ids = _ids(tok)
    assert torch.equal(ids, _ids(tokenizer))
    torch.testing.assert_close(model(ids).logits, result.model(ids).logits, rtol=0, atol=0)


def test_load_refuses_truncated_or_tampered_files(tmp_path, tokenizer):
    save_quantized(quantize(_tiny("llama", tokenizer), SPECS["w4-g32"]), tokenizer, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CalqError, match=r"model\.safetensors: hash mismatch"):
        quant.load(tmp_path / "ckpt")
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CalqError, match=r"model\.safetensors: hash mismatch"):
        quant.load(tmp_path / "ckpt")
    weights.write_bytes(data)
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(CalqError, match=r"config\.json: hash mismatch"):
        quant.load(tmp_path / "ckpt")
    (tmp_path / "run" / "models").mkdir(parents=True)
    (tmp_path / "ckpt").rename(tmp_path / "run" / "models" / "w4")
    with pytest.raises(CalqError, match="run directory; load one of its variants"):
        quant.load(tmp_path / "run")
