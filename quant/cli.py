"""`calq`: thin verbs over the Python API.

    calq run RECIPE              the recipe end to end: select, stats, quantize, re-calibrate, evaluate, gate, export
    calq compare RECIPE          the recipe's variants side by side, as they quantize (recipes/compare.yaml)
    calq quantize MODEL --scheme W4A16 --method awq --out DIR      one variant, no evaluation
    calq eval RUN_DIR | CHECKPOINT... --reference MODEL            saved checkpoints against a reference
    calq gate RUN_DIR            the gate verdict; exit 0 if every gate passed, else 1
    calq export RUN_DIR --format compressed-tensors|awq|gguf --out DIR
    calq ask MODEL QUESTION      an answer, its confidence and its band
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import ValidationError

from quant.errors import CalqError
from quant.files import write_text_atomic


def _run(args: argparse.Namespace) -> int:
    from quant.pipeline import run
    from quant.recipe import load_recipe

    result = run(load_recipe(args.recipe), args.out)
    print((result.run_dir / "report.md").read_text())
    for r in result.gates.results:
        print(r.line())
    print(f"report: {result.run_dir / 'report.md'}")
    return 0 if result.gates.passed or not args.enforce_gates else 1


def _compare(args: argparse.Namespace) -> int:
    from quant.compare import compare
    from quant.recipe import load_recipe

    result = compare(load_recipe(args.recipe), args.out)
    print((result.run_dir / "compare.md").read_text())
    print(f"table: {result.run_dir / 'compare.csv'}, plot: {result.run_dir / 'compare.png'}")
    return 0


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CalqError(f"--option {text!r}: write KEY=VALUE, e.g. --option n_grid=10")
    return key, yaml.safe_load(value)


def _quantize(args: argparse.Namespace) -> int:
    from quant.data import SelectConfig, select_samples
    from quant.formats import ExportConfig, export, save_quantized
    from quant.methods import METHODS, QuantSpec, quantize_variant
    from quant.models import ModelConfig, load_model

    spec = {"name": args.name or Path(args.out).name or "quantized", "scheme": args.scheme, "method": args.method,
            "options": dict(_option(o) for o in args.option), "ignore": tuple(args.ignore)}
    if args.group_size is not None:
        spec["weights"] = {"group_size": args.group_size}
    try:
        spec = QuantSpec.model_validate(spec)
        model_cfg = ModelConfig(source=args.model, dtype=args.dtype)
        SelectConfig(sources=tuple(args.data), num_samples=args.num_samples, seq_len=args.seq_len)
    except ValidationError as err:
        raise CalqError(f"bad arguments: {err.errors()[0]['msg']}") from None
    model, tokenizer = load_model(model_cfg)
    samples = None
    if METHODS[spec.method].needs_inputs or METHODS[spec.method].needs_stats or spec.static_activations:
        cfg = SelectConfig(sources=tuple(args.data), num_samples=args.num_samples, seq_len=args.seq_len)
        samples = select_samples(tokenizer, cfg).token_ids
    result = quantize_variant(model, spec, samples=samples)
    if args.format == "calq":
        save_quantized(result, tokenizer, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(result, tokenizer, Path(tmp) / spec.name)
            export(Path(tmp) / spec.name, ExportConfig(format=args.format), args.out)
    print(f"{spec.name}: {len(result.quantized)} linears quantized, {len(result.kept)} kept "
          f"({', '.join(result.kept) or 'none'}); {args.format} checkpoint in {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """A run directory's fp model and saved variants, or checkpoints against --reference; under torchrun the work
    is shared by the processes (quant.checks.distributed) with the same numbers."""
    import calq_kernels as kernels
    import torch
    import torch.distributed as dist

    from quant.checks import REFERENCE, EvalConfig, check_gates, evaluate
    from quant.checks.distributed import evaluate_distributed
    from quant.formats import load, run_variants
    from quant.models import ModelConfig, load_model
    from quant.recipe import Recipe, load_recipe

    first = Path(args.paths[0])
    rules = []
    if (first / "recipe.json").is_file() and len(args.paths) == 1:
        recipe = Recipe.model_validate_json((first / "recipe.json").read_text())
        reference, cfg, rules = recipe.model, recipe.evaluation, list(recipe.gates)
        checkpoints = {name: (first, name) for name in run_variants(first)}
    else:
        if args.reference is None:
            raise CalqError("give --reference MODEL (the full-precision model the checkpoints came from), or one "
                            "run directory")
        reference = ModelConfig(source=args.reference)
        cfg = load_recipe(args.recipe).evaluation if args.recipe else EvalConfig()
        checkpoints = {Path(p).name: (Path(p), None) for p in args.paths}
    cfg = cfg.model_copy(update={"logit_lens": None})
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    try:
        model, tokenizer = load_model(reference)
        models = {REFERENCE: model.to("cuda" if torch.cuda.is_available() else "cpu")}
        models.update({name: load(path, variant=variant)[0] for name, (path, variant) in checkpoints.items()})
        with kernels.weight_cache(max_bytes=int(cfg.weight_cache_gb * 2**30)):
            evals = (evaluate_distributed if distributed else evaluate)(models, tokenizer, cfg, REFERENCE)
        if distributed and dist.get_rank() != 0:
            return 0
    finally:
        if distributed:
            dist.destroy_process_group()
    out = {name: {"text": e.text, "mmlu": e.mmlu, "tasks": e.tasks} for name, e in evals.items()}
    if args.out:
        write_text_atomic(args.out, json.dumps(out, indent=1))
    keys = [("text", "perplexity"), ("text", "accuracy"), ("text", "ece"), ("text", "kl_to_reference"),
            ("text", "top1_agreement"), ("mmlu", "accuracy"), ("mmlu", "ece")]
    print("| model | " + " | ".join(f"{s}.{k}" for s, k in keys) + " |\n|---|" + "---|" * len(keys))
    for name, e in out.items():
        print(f"| {name} | " + " | ".join(f"{e[s][k]:.4f}" if k in e[s] else "-" for s, k in keys) + " |")
    gates = check_gates(evals, rules, REFERENCE)
    for r in gates.results:
        print(r.line())
    return 0 if gates.passed else 1


def _gate(args: argparse.Namespace) -> int:
    from quant.checks import GateReport

    path = Path(args.run_dir)
    report = GateReport.load(path / "gate.json" if path.is_dir() else path)
    for r in report.results:
        print(r.line())
    passed = sum(r.passed for r in report.results)
    print(f"gate: {'PASS' if report.passed else 'FAIL'} ({passed}/{len(report.results)})")
    if args.junit:
        write_text_atomic(args.junit, report.junit())
        print(f"junit: {args.junit}")
    return 0 if report.passed else 1


def _ask(args: argparse.Namespace) -> int:
    from quant.ask import ask, load_for_ask, probe_for_ask
    from quant.confidence import BandConfig

    try:
        bands = BandConfig(abstain_below=args.abstain_below, very_sure=args.very_sure)
    except ValueError as err:
        raise CalqError(f"bad --abstain-below / --very-sure: {err.errors()[0]['msg']}") from None
    model, tokenizer = load_for_ask(args.model, args.variant)
    answer = ask(model, tokenizer, args.question, args.choices, bands, args.max_new_tokens,
                 probe_for_ask(args.model, args.variant))
    print("\n".join(answer.lines()))
    return 0


def _export(args: argparse.Namespace) -> int:
    from quant.formats import ExportConfig, export

    result = export(args.path, ExportConfig(format=args.format, variant=args.variant, dtype=args.dtype), args.out)
    print(f"{result.format}: {result.out} ({result.weight_bytes / 2**20:.1f} MB of weights)")
    for note in result.notes:
        print(note)
    return 0


def main(argv: list[str] | None = None) -> int:
    from quant.methods import METHODS, PRESETS

    parser = argparse.ArgumentParser(prog="calq", description="Calibration-aware post-training quantization for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a recipe end to end (select, stats, quantize, evaluate, gate, report)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/default.yaml")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: the recipe's `output`)")
    p.add_argument("--enforce-gates", action=argparse.BooleanOptionalAction, default=True,
                   help="exit 1 when a gate fails (the default: a release gate that passes by default is a trap in "
                        "CI); --no-enforce-gates exits 0 and leaves the verdict to `calq gate`")
    p.set_defaults(fn=_run)
    p = sub.add_parser("compare", help="the recipe's variants side by side, as they quantize (recipes/compare.yaml)")
    p.add_argument("recipe", help="recipe YAML whose model, calibration, variants and evaluation are used")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: the recipe's `output`)")
    p.set_defaults(fn=_compare)
    p = sub.add_parser("quantize", help="quantize one model with one scheme and method (no evaluation)")
    p.add_argument("model", help="a registry name (smollm2-135m-instruct), a local HF directory or a hub id")
    p.add_argument("--scheme", required=True, choices=list(PRESETS), help="compressed-tensors preset scheme")
    p.add_argument("--method", default="minmax", choices=list(METHODS))
    p.add_argument("--group-size", type=int, default=None, help="override the preset's group size (W4)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option, repeatable")
    p.add_argument("--ignore", nargs="*", default=["lm_head"], help="fnmatch patterns kept in full precision")
    p.add_argument("--data", nargs="+", default=["wikipedia", "news", "reviews"],
                   help="calibration sources: built-in names or .txt/.jsonl/.parquet files")
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples (methods that need them)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--format", default="calq", choices=["calq", "compressed-tensors", "awq", "gguf"])
    p.add_argument("--name", default=None, help="variant name (default: the output directory's name)")
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced atomically)")
    p.set_defaults(fn=_quantize)
    p = sub.add_parser("eval", help="evaluate saved checkpoints against their full-precision model (torchrun: sharded)")
    p.add_argument("paths", nargs="+", help="one run directory, or calq checkpoint directories")
    p.add_argument("--reference", default=None, help="the full-precision model source (not needed for a run directory)")
    p.add_argument("--recipe", default=None, help="take the evaluation settings from this recipe")
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    p.set_defaults(fn=_eval)
    p = sub.add_parser("gate", help="print the gate verdict of a run; exit 0 if every gate passed, else 1")
    p.add_argument("run_dir", help="a run directory (or its gate.json)")
    p.add_argument("--junit", type=Path, default=None, help="also write the verdict as JUnit XML (one test per rule)")
    p.set_defaults(fn=_gate)
    p = sub.add_parser("ask", help="ask a model a question; prints the answer, its confidence and its band")
    p.add_argument("model", help="a run directory (with --variant), a calq checkpoint directory or a model source")
    p.add_argument("question")
    p.add_argument("--variant", default=None, help="which model of a run directory: fp or a quantized variant")
    p.add_argument("--choices", nargs="+", default=None, metavar="TEXT", help="2-4 answer options (multiple choice)")
    p.add_argument("--abstain-below", type=float, default=0.40, help="withhold answers less confident than this")
    p.add_argument("--very-sure", type=float, default=0.75, help="confidence from which an answer is 'very sure'")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length limit of a free-text answer")
    p.set_defaults(fn=_ask)
    p = sub.add_parser("export", help="write a quantized variant for vLLM (compressed-tensors), AutoAWQ or llama.cpp")
    p.add_argument("path", help="a run directory (with --variant if it has several) or run_dir/models/<variant>")
    p.add_argument("--format", required=True, choices=["compressed-tensors", "awq", "gguf"])
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced atomically)")
    p.add_argument("--variant", default=None, help="which quantized variant of a run directory")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of scales and full-precision layers")
    p.set_defaults(fn=_export)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except CalqError as err:
        print(f"calq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
