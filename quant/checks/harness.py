"""lm-evaluation-harness bridge: lm-eval's tasks run on calq's models, with calq's calibration metrics.

`CalqLM` is an lm-eval model (lm_eval.api.model.LM) over calq's models: every log-likelihood request lm-eval sends is
scored by full precision and every variant in one pass (`continuation_loglikelihoods`, the same scoring as the task
files), lm-eval gets the first model's answers, and each request's log-likelihood is kept for every model. After
`simple_evaluate`, `harness_predictions` groups them per document into choice scores, so a multiple-choice lm-eval
task gets the same predictions (confidence = softmax over the choices' summed log-likelihoods, acc, acc_norm) and so
the same metrics, intervals and gates as a task file. Needs the optional extra: pip install 'calq[lm-eval]'.

Offline, tasks whose data are local work (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`, found with
`include_path`); with a hub, any task lm-eval knows.
"""

from __future__ import annotations

import numpy as np
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from transformers import PreTrainedTokenizerBase

from quant.checks.scoring import Predictions, continuation_loglikelihoods, encode_pair, loglikelihood_predictions
from quant.confidence.recalibrate import Models
from quant.errors import CalqError


class CalqLM(LM):
    """lm-eval's view of calq's models: the first answers, all are scored."""

    def __init__(self, models: Models, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8,
                 add_special_tokens: bool = False) -> None:
        super().__init__()
        self.models, self.tokenizer, self.batch_size = models, tokenizer, batch_size
        self.add_special_tokens = add_special_tokens
        """lm-eval's HFLM adds no special tokens to causal models' prompts by default; neither does this."""
        self.scored: list[tuple[str, int, int, str, dict[str, float]]] = []
        """(task, doc id, choice index, continuation, {model: log-likelihood}) of every request, in order."""

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, r.args[0], r.args[1], self.add_special_tokens) for r in requests]
        ll, greedy = continuation_loglikelihoods(self.models, self.tokenizer, pairs, self.batch_size,
                                                 "lm-eval loglikelihood")
        first = next(iter(self.models))
        for k, r in enumerate(requests):
            self.scored.append((r.task_name, r.doc_id, r.idx, r.args[1], {n: float(v[k]) for n, v in ll.items()}))
        return [(float(ll[first][k]), bool(greedy[first][k])) for k in range(len(requests))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise CalqError("the lm-eval bridge scores multiple-choice (loglikelihood) tasks; this task asks for "
                        "rolling log-likelihoods (perplexity): calq's own text evaluation measures that")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise CalqError("the lm-eval bridge scores multiple-choice (loglikelihood) tasks; for generation use a "
                        "calq free-text task (evaluation.tasks, kind: free_text)")


def harness_predictions(lm: CalqLM, results: dict) -> dict[str, dict[str, Predictions]]:
    """Per-document predictions of every model on every task of a `simple_evaluate(..., log_samples=True)` run with
    `lm`, by section `lm_eval.<task>` (extra per-item values: acc, acc_norm, as lm-eval defines them). Tasks with
    one request per document (output_type loglikelihood) have no choices to take a softmax over and are left out;
    `lm_eval_predictions` refuses them by name."""
    out = {}
    for task, samples in results.get("samples", {}).items():
        rows = [s for s in lm.scored if s[0] == task]
        if not rows:
            continue
        docs = sorted({d for _, d, _, _, _ in rows})
        where = {d: k for k, d in enumerate(docs)}
        width = max(i for _, _, i, _, _ in rows) + 1
        if width < 2:  # one request per document: not multiple choice (lm-eval's own metrics still hold)
            continue
        labels = np.zeros(len(docs), dtype=np.int64)
        for s in samples:
            if s["doc_id"] in where:
                labels[where[s["doc_id"]]] = int(s["target"])
        chars = np.ones((len(docs), width))
        for _, d, i, cont, _ in rows:
            chars[where[d], i] = len(cont.lstrip(" "))  # lm-eval's acc_norm: the choice's length in characters
        scores = {name: np.full((len(docs), width), -np.inf) for name in lm.models}
        for _, d, i, _, ll in rows:
            for name in lm.models:
                scores[name][where[d], i] = ll[name]
        out[f"lm_eval.{task}"] = loglikelihood_predictions(scores, chars, labels)
    return out


def run_harness(models: Models, tokenizer: PreTrainedTokenizerBase, tasks: list[str], include_path: str | None = None,
                limit: int | None = None, batch_size: int = 8) -> tuple[dict[str, dict[str, Predictions]], dict]:
    """lm-eval's `simple_evaluate` on every model in one pass: (calq predictions by section, lm-eval's results for
    the first model)."""
    lm = CalqLM(models, tokenizer, batch_size)
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=include_path),
                              limit=limit, log_samples=True, bootstrap_iters=0)
    return harness_predictions(lm, results), results
