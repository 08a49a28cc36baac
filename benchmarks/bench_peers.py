"""Our methods against the peers, on the same calibration samples and the same evaluation, in one run.

Peers (each optional: skipped with a note when it does not import or fails):
    llmc-awq          llm-compressor 0.14 AWQModifier + W4A16_ASYM (group 128), its own fake quantization
    llmc-gptq         llm-compressor GPTQModifier, W4A16 asymmetric, its defaults (damping 0.01, static act order)
    llmc-sq-dynamic   llm-compressor SmoothQuantModifier(0.8) + W8A8 (per-channel int8 weights, per-token int8 acts)
    llmc-sq-static    the same with one static per-tensor activation scale (the case SmoothQuant exists for)
    autoawq           AutoAWQ 0.2.9's scale + clip search (export_compatible: float weights with its scales
                      applied), then OUR min-max quantizer, so only the search differs from ours

AWQ and GPTQ: every search (ours, llm-compressor's, AutoAWQ's) sees the same token subset ours use
(AWQConfig.max_tokens = GPTQConfig.max_tokens of the selected samples). SmoothQuant: llm-compressor calibrates
on all selected samples, the same ones our statistics come from. Times are wall-clock seconds on this machine,
measured in this run; the table prints our/peer ratios. The peers need their own virtual environment (they pin
other packages):

    make peers-venv        # creates .venv-peers with llmcompressor==0.14.0.1 and autoawq==0.2.9 beside calq
    .venv-peers/bin/python benchmarks/bench_peers.py recipes/default.yaml --out runs/peers
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
import traceback
from pathlib import Path

import torch
from torch import Tensor, nn

from quant.calibrate.walker import calibration_subset
from quant.checks import REFERENCE, evaluate
from quant.files import write_text_atomic
from quant.methods import QuantSpec, quantize_variant
from quant.methods.awq import AWQConfig
from quant.models import load_model, resolve_model_path
from quant.pipeline import PeakRSS, calibrate
from quant.recipe import Recipe, load_recipe

W8_OURS = ("w8a8-static-minmax", "w8a8-static-smoothquant", "w8a8-dynamic-smoothquant")


def ours(recipe: Recipe, group_size: int) -> dict[str, QuantSpec]:
    """The `calq compare` variants (recipes/compare.yaml) the peers are measured against, W4 at `group_size` (the
    peers need it to divide every layer's input width; ours allows a ragged last group)."""
    specs = {s.name: s for s in recipe.quantize if s.name in W8_OURS}
    for s in recipe.quantize:
        if s.name in ("w4a16-g128-minmax", "w4a16-g128-awq", "w4a16-g128-gptq"):
            name = s.name.replace("g128", f"g{group_size}")
            specs[name] = s.model_copy(update={"name": name, "weights": s.weights.model_copy(
                update={"group_size": group_size})})
    return specs


QUALITY = ("perplexity", "ppl_increase_pct", "kl_to_fp", "token_ece", "mmlu_accuracy", "mmlu_ece")


def _llmc(model: nn.Module, samples: list[Tensor], recipe: list) -> nn.Module:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.pipelines.cache import IntermediatesCache

    # pinning needs an accelerator; on a CPU-only machine it raises, and a no-op loses nothing
    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    ds = Dataset.from_dict({"input_ids": [s.tolist() for s in samples],
                            "attention_mask": [[1] * len(s) for s in samples]})
    m = copy.deepcopy(model)
    oneshot(model=m, dataset=ds, recipe=recipe, num_calibration_samples=len(samples),
            max_seq_length=max(len(s) for s in samples), shuffle_calibration_samples=False)
    return m


def _quantization(scheme, modifier=None):
    """llm-compressor's quantization modifier (or `modifier`, e.g. GPTQModifier) for a preset name or a scheme."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    modifier = modifier or QuantizationModifier
    if isinstance(scheme, str):
        return modifier(ignore=["lm_head"], scheme=scheme, targets=["Linear"])
    return modifier(ignore=["lm_head"], config_groups={"group_0": scheme})


def _w4(group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, strategy="group", group_size=group_size, symmetric=False))


def llmc_awq(group_size: int):
    def run(model, samples, awq_samples, stats):
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return _llmc(model, awq_samples, [AWQModifier(), _quantization(_w4(group_size))])
    return run


def llmc_gptq(group_size: int):
    def run(model, samples, awq_samples, stats):
        from llmcompressor.modifiers.quantization import GPTQModifier

        return _llmc(model, awq_samples, [_quantization(_w4(group_size), GPTQModifier)])
    return run


def llmc_sq(static: bool, strength: float):
    def run(model, samples, awq_samples, stats):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        scheme = "W8A8"
        if static:
            scheme = QuantizationScheme(
                targets=["Linear"], weights=QuantizationArgs(num_bits=8, strategy="channel", symmetric=True),
                input_activations=QuantizationArgs(num_bits=8, strategy="tensor", symmetric=True, dynamic=False))
        return _llmc(model, samples, [SmoothQuantModifier(smoothing_strength=strength), _quantization(scheme)])
    return run


def autoawq(source: str, minmax: QuantSpec):
    def run(model, samples, awq_samples, stats):
        from awq import AutoAWQForCausalLM

        wrapper = AutoAWQForCausalLM.from_pretrained(resolve_model_path(source), torch_dtype=torch.float32)
        config = {"zero_point": True, "q_group_size": minmax.weights.group_size, "w_bit": 4, "version": "GEMM"}
        wrapper.quantize(None, config,
                         calib_data=[s.tolist() for s in awq_samples], export_compatible=True,
                         max_calib_samples=len(awq_samples), max_calib_seq_len=max(len(s) for s in awq_samples))
        return quantize_variant(wrapper.model.eval(), minmax, stats).model
    return run


PEERS = ("llmc-awq", "autoawq", "llmc-gptq", "llmc-sq-dynamic", "llmc-sq-static")


def _quality(ev, fp_ppl: float) -> dict:
    return dict(zip(QUALITY, (ev["text"]["perplexity"], 100 * (ev["text"]["perplexity"] / fp_ppl - 1),
                              ev["text"]["kl_to_reference"], ev["text"]["ece"], ev["mmlu"].get("accuracy"),
                              ev["mmlu"].get("ece"))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="recipes/compare.yaml")
    ap.add_argument("--out", type=Path, default=Path("runs/peers"),
                    help="output directory; its calibration/ and stats/ are reused when fresh, so pointing it at "
                         "a `calq compare` run directory reuses that run's samples and statistics")
    ap.add_argument("--only", nargs="*", help="run only these rows (names from the table)")
    ap.add_argument("--ours-from", type=Path, default=None,
                    help="report.json of a `calq compare` run on the same recipe: our variants are still quantized "
                         "here (for the time ratios) but their quality is read from it instead of evaluated again "
                         "(quantization and evaluation are deterministic; fp is evaluated here and checked equal)")
    ap.add_argument("--group-size", type=int, default=64, help="W4 group size for ours and the peers")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    g = args.group_size
    our_specs = ours(recipe, g)
    strength = next(s.options["smoothing_strength"] for s in recipe.quantize if s.method == "smoothquant")
    selected = [n for n in [*our_specs, *PEERS] if not args.only or n in args.only]
    weight_only = all(n in ("llmc-awq", "autoawq", "llmc-gptq") or our_specs[n].input_activations is None for n in selected)
    model, tokenizer = load_model(recipe.model)
    selection, stats = calibrate(recipe, model, tokenizer, args.out, with_stats=not weight_only)
    samples = selection.token_ids
    awq_samples = calibration_subset(samples, AWQConfig().max_tokens)
    print(f"calibration: {len(samples)} samples ({sum(map(len, samples))} tokens); AWQ searches on "
          f"{len(awq_samples)} of them ({sum(map(len, awq_samples))} tokens)")

    prior = json.loads(args.ours_from.read_text())["evaluation"] if args.ours_from else {}
    jobs = {**{n: (lambda m, s, a, st, spec=spec: quantize_variant(m, spec, st, s).model)
               for n, spec in our_specs.items()},
            "llmc-awq": llmc_awq(g), "llmc-gptq": llmc_gptq(g),
            "autoawq": autoawq(recipe.model.source, our_specs[f"w4a16-g{g}-minmax"]),
            "llmc-sq-dynamic": llmc_sq(False, strength), "llmc-sq-static": llmc_sq(True, strength)}
    pairs = (("llmc-awq", f"w4a16-g{g}-awq"), ("autoawq", f"w4a16-g{g}-awq"), ("llmc-gptq", f"w4a16-g{g}-gptq"),
             ("llmc-sq-dynamic", "w8a8-dynamic-smoothquant"), ("llmc-sq-static", "w8a8-static-smoothquant"))
    models, rows = {REFERENCE: model}, {REFERENCE: {"variant": REFERENCE}}
    for name, job in jobs.items():
        if name not in selected:
            continue
        t0 = time.perf_counter()
        try:
            with PeakRSS() as peak:
                quantized = job(model, samples, awq_samples, stats)
        except Exception as err:  # a peer that does not run here is reported, not fatal
            traceback.print_exc()
            rows[name] = {"variant": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            continue
        rows[name] = {"variant": name, "quantize_s": time.perf_counter() - t0, "peak_rss_mb": peak.mb}
        if name not in prior:
            models[name] = quantized
        print(f"{name}: {rows[name]['quantize_s']:.1f} s")

    evals = {n: {"text": e.text, "mmlu": e.mmlu}
             for n, e in evaluate(models, tokenizer, recipe.evaluation, REFERENCE).items()}
    if prior:
        if abs(prior[REFERENCE]["text"]["perplexity"] - evals[REFERENCE]["text"]["perplexity"]) > 1e-6:
            raise SystemExit(f"{args.ours_from} was evaluated on other data: its fp perplexity differs")
        evals.update({n: prior[n] for n in rows if n in prior and n != REFERENCE})
    fp_ppl = evals[REFERENCE]["text"]["perplexity"]
    for name, ev in evals.items():
        rows[name].update(_quality(ev, fp_ppl))
    cols = ["variant", *QUALITY, "quantize_s", "peak_rss_mb", "error"]
    with open(args.out / "peers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows.values())
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows.values()]
    lines += ["", "| ours vs peer | ppl increase ours / peer | KL ours / peer | time ours / peer |",
              "|---|---|---|---|"]
    for peer, mine in pairs:
        p, o = rows.get(peer, {}), rows.get(mine, {})
        if "perplexity" in p and "perplexity" in o:
            lines.append(f"| {mine} vs {peer} | {o['ppl_increase_pct']:.2f}% / {p['ppl_increase_pct']:.2f}% | "
                         f"{o['kl_to_fp'] / p['kl_to_fp']:.3f} | {o['quantize_s'] / p['quantize_s']:.3f} |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.out / "peers.md", text)
    write_text_atomic(args.out / "peers.json", json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
