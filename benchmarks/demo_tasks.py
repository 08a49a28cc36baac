"""Measure the shipped demo tasks (recipes/default.yaml evaluation.tasks) on the default model: fp and the first N
variants of the default recipe, scored in one pass per task (README, "Your own tasks").

    python benchmarks/demo_tasks.py 1      # fp and w8a8
"""
import time, json, sys
import calq_kernels as kernels
from quant.models import load_model
from quant.recipe import load_recipe
from quant.methods import quantize_variant
from quant.data.tasks import load_task
from quant.checks.tasks import collect_tasks
from quant.checks.evaluation import reduce
T0 = time.time()
recipe = load_recipe("recipes/default.yaml")
print("recipe load", time.time() - T0, flush=True)
model, tok = load_model(recipe.model)
models = {"fp": model}
for spec in recipe.quantize[:int(sys.argv[1])]:
    models[spec.name] = quantize_variant(model, spec).model
print("models", time.time() - T0, flush=True)
preds = {}
with kernels.weight_cache(max_bytes=8 * 2**30):
    for cfg in recipe.evaluation.tasks:
        t0 = time.time()
        preds.update(collect_tasks(models, tok, [load_task(cfg.model_copy(update={"batch_size": 16}))]))
        print(cfg.name, "seconds", time.time() - t0, flush=True)
res = reduce(preds, recipe.evaluation, "fp")
out = {n: {"tasks": r.tasks, "intervals": {k: [v.value, v.low, v.high] for k, v in r.intervals.items()}} for n, r in res.items()}
json.dump(out, open(f"demo_tasks_{sys.argv[1]}.json", "w"), indent=1)
for sec in res["fp"].tasks:
    for m in ("accuracy", "acc_norm", "mean_confidence", "ece", "auroc", "brier"):
        if m in res["fp"].tasks[sec]:
            print(sec, m, " | ".join(f"{n}: {r.intervals[f'task.{sec}.{m}']}" for n, r in res.items()), flush=True)
print("total", time.time() - T0, flush=True)
