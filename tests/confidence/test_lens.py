import copy

import numpy as np
import pytest
import torch

from quant.checks.evaluation import EvalConfig, TextEvalConfig, eval_windows, evaluate
from quant.confidence.lens import layer_calibration, lens_positions, markdown
from quant.methods import QuantSpec, WeightScheme, quantize_variant
from quant.models import fold_scales

TEXT = TextEvalConfig(windows=2, seq_len=64)


def test_last_layer_is_the_models_own_prediction(tiny_model, tokenizer, tmp_path):
    w4 = quantize_variant(tiny_model, QuantSpec(name="w4", weights=WeightScheme(num_bits=4, group_size=32, symmetric=False))).model
    models = {"fp": tiny_model, "w4": w4}
    windows = eval_windows(tokenizer, TEXT)
    lens = layer_calibration(models, windows, n_bins=10)
    evals = evaluate(models, tokenizer, EvalConfig(text=TEXT, mmlu=None, ece_bins=10), reference="fp")
    n_layers = tiny_model.config.num_hidden_layers
    assert lens.tokens == 2 * 63
    for name in models:
        rows = lens.layers[name]
        assert [r["layer"] for r in rows] == list(range(n_layers + 1))  # embeddings + every decoder layer
        own = evals[name].text
        assert rows[-1]["accuracy"] == own["accuracy"]  # same argmax on every token
        assert rows[-1]["mean_confidence"] == pytest.approx(own["mean_confidence"], abs=1e-6)
        assert rows[-1]["ece"] == pytest.approx(own["ece"], abs=1e-6)
        for r in rows:
            assert 0 <= r["ece"] <= r["mce"] <= 1 and 0 <= r["accuracy"] <= 1 and 0 < r["mean_confidence"] <= 1
    lens.plot(tmp_path / "layerwise.png", "tiny")
    assert (tmp_path / "layerwise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown(lens.table())
    assert table.count("\n") == 1 + n_layers + 1 and "fp: acc / conf / ECE / MCE" in table


@pytest.mark.parametrize("positions", [None, 9])
def test_middle_layer_reads_out_through_the_models_own_norm(tiny_model, tokenizer, positions):
    """Layer 1 of the lens equals the output of the same model cut after its first layer, at every position or at
    9 evenly spaced ones of each window (read with the whole window as context). The final norm's weight is
    randomized so Gemma's (1 + w) scaling differs from plain w."""
    torch.manual_seed(1)
    tiny_model.model.norm.weight.normal_()
    cut = copy.deepcopy(tiny_model)
    cut.model.layers = cut.model.layers[:1]
    cut.config.num_hidden_layers = 1
    windows = eval_windows(tokenizer, TEXT)
    lens = layer_calibration({"m": tiny_model}, windows, positions=positions)
    rows = lens.layers["m"]
    row = rows[1]
    pos = lens_positions(63, positions)
    assert len(pos) == (positions or 63) and pos[0] == 0 and pos[-1] == 62 and lens.tokens == 2 * len(pos)
    with torch.inference_mode():
        probs = [cut(input_ids=w[None, :-1]).logits[0, pos].softmax(-1) for w in windows]
    conf = torch.cat([p.max(-1).values for p in probs]).double().numpy()
    correct = torch.cat([p.argmax(-1) == w[1:][pos] for p, w in zip(probs, windows)]).numpy()
    assert row["accuracy"] == correct.mean()
    assert row["mean_confidence"] == pytest.approx(conf.mean(), abs=1e-6)
    assert not np.isclose(row["mean_confidence"], rows[2]["mean_confidence"])  # a different readout per layer
    greedy = windows[0][:1][None]  # text the model predicts exactly: its last layer is right at every position
    with torch.inference_mode():
        for _ in range(63):
            greedy = torch.cat([greedy, tiny_model(input_ids=greedy).logits[:, -1:].argmax(-1)], 1)
    assert layer_calibration({"m": tiny_model}, [greedy[0]], positions=positions).layers["m"][-1]["accuracy"] == 1.0


@pytest.mark.parametrize("model_type, after", [("cohere", {"logit_scale": 0.01}), ("granite", {"logits_scaling": 100.0}),
                                               ("gemma2", {"final_logit_softcapping": 0.05})])
def test_the_lens_applies_the_scaling_after_the_head(model_type, after, tokenizer):
    """The last layer's confidence is the model's own, under Cohere's logit_scale, Granite's logits_scaling and
    Gemma 2's soft-cap. The head's logits are made large (final norm x 100) and each scaling shrinks them, so a lens
    that ignored it would read a very different confidence."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                               pad_token_id=0, **after)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    norm = model.model.norm
    fold_scales(norm, [], torch.full((norm.weight.numel(),), 0.01, device="cpu"))
    windows = eval_windows(tokenizer, TEXT)
    rows = layer_calibration({"m": model}, windows).layers["m"]
    with torch.inference_mode():
        conf = torch.cat([model(input_ids=w[None, :-1]).logits[0].softmax(-1).max(-1).values for w in windows])
    assert rows[-1]["mean_confidence"] == pytest.approx(float(conf.double().mean()), abs=1e-6)
    with torch.inference_mode():
        raw = torch.cat([model.get_output_embeddings()(model.model(w[None, :-1]).last_hidden_state)[0].softmax(-1)
                         .max(-1).values for w in windows])
    assert float(raw.double().mean()) - rows[-1]["mean_confidence"] > 0.3  # the scaling matters here
