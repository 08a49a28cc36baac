"""`calq`: a thin command-line layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from quant.cache import CalqError, write_text_atomic


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


def _gate(args: argparse.Namespace) -> int:
    from quant.gate import GateReport

    path = Path(args.run_dir)
    report = GateReport.load(path / "gate.json" if path.is_dir() else path)
    for r in report.results:
        print(r.line())
    print(f"gate: {'PASS' if report.passed else 'FAIL'} ({sum(r.passed for r in report.results)}/{len(report.results)})")
    if args.junit:
        write_text_atomic(args.junit, report.junit())
        print(f"junit: {args.junit}")
    return 0 if report.passed else 1


def _ask(args: argparse.Namespace) -> int:
    from quant.ask import ask, load_for_ask
    from quant.bands import BandConfig

    try:
        bands = BandConfig(abstain_below=args.abstain_below, very_sure=args.very_sure)
    except ValueError as err:
        raise CalqError(f"bad --abstain-below / --very-sure: {err.errors()[0]['msg']}") from None
    model, tokenizer = load_for_ask(args.model, args.variant)
    answer = ask(model, tokenizer, args.question, args.choices, bands, args.max_new_tokens)
    print("\n".join(answer.lines()))
    return 0


def _export(args: argparse.Namespace) -> int:
    from quant.export import ExportConfig, export

    result = export(args.path, ExportConfig(format=args.format, variant=args.variant, dtype=args.dtype), args.out)
    print(f"{result.format}: {result.out} ({result.weight_bytes / 2**20:.1f} MB of weights)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calq", description="Calibration-aware post-training quantization for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a recipe end to end (select, stats, quantize, evaluate, gate, report)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/default.yaml")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: the recipe's `output`)")
    p.add_argument("--enforce-gates", action="store_true", help="exit 1 when a gate fails")
    p.set_defaults(fn=_run)
    p = sub.add_parser("compare", help="min-max vs SmoothQuant vs AWQ vs GPTQ (W8A8, W4A16 g128/g32) on the same samples")
    p.add_argument("recipe", help="recipe YAML whose model, calibration and evaluation are used")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: <recipe output>/compare)")
    p.set_defaults(fn=_compare)
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
