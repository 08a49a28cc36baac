"""Evaluate full precision and quantized models side by side on held-out data.

Two signals: next-token prediction on held-out text (perplexity, top-1 accuracy, confidence
calibration, and KL / top-1 agreement against the reference model, computed on the fly so no logits
are stored) and MMLU letter scoring on a stratified subset (accuracy, calibration, answer spread).
All models see the same batches in the same order, so the comparison is paired.

Two steps, kept apart so a distributed wrapper can shard windows / items, gather the raw arrays and reduce:
`collect_text` / `collect_mmlu` produce per-token / per-item arrays (`Predictions`), `reduce` turns them into
metrics, each with a bootstrap interval, and changes against the reference with a paired bootstrap interval.
Tokens of one window are correlated, so text resamples whole windows (cluster bootstrap); MMLU resamples items.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quant.confidence import metrics
from quant.confidence.lens import LensConfig
from quant.confidence.recalibrate import Models, forward_groups
from quant.confidence.softmax import SoftmaxScratch
from quant.checks.scoring import LETTERS, SUMMARY, Predictions, choice_predictions, letter_probabilities, letter_token_ids
from quant.checks.tasks import collect_tasks
from quant.data import MCItem, load_documents, load_mmlu, special_prefix
from quant.data.tasks import TASK_NAME, TaskConfig, load_task
from quant.errors import CalqError
from quant.schema import StrictModel

METRICS = {"text": (*SUMMARY, "perplexity", "kl_to_reference", "top1_agreement"), "mmlu": SUMMARY,
           "coverage": ("share",)}
"""Every metric the evaluation reports, by section: what a gate rule may name (checked when the recipe loads). Task
sections (`task.<name>`) have theirs in quant.checks.tasks.task_sections, checked against the recipe's tasks."""
REFERENCE = "fp"
"""The name of the full-precision model among the evaluated ones: what KL, agreement and gates compare against."""


class TextEvalConfig(StrictModel):
    sources: tuple[str, ...] = ("wikipedia",)
    windows: int = Field(40, ge=1)
    seq_len: int = Field(512, ge=16)


class MMLUConfig(StrictModel):
    per_subject: int = Field(5, ge=1)
    chat_template: bool = True
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    shots: int = Field(0, ge=0, le=10)
    """0: zero-shot. k: k-shot with the standard prompt (Hendrycks et al., lm-eval's mmlu), the examples being the
    first k items of the subject's fit split in seeded order (the packaged MMLU has no dev split; fit items are
    never reported)."""

    @model_validator(mode="after")
    def _plain_for_shots(self) -> MMLUConfig:
        if self.shots and self.chat_template:
            raise ValueError("MMLU k-shot uses the standard plain prompt; set evaluation.mmlu.chat_template: false "
                             "(or shots: 0)")
        return self

    @property
    def mode(self) -> str:
        """What the report calls this MMLU: zero-shot or k-shot."""
        return f"{self.shots}-shot" if self.shots else "zero-shot"


class BootstrapConfig(StrictModel):
    resamples: int = Field(1000, ge=20)
    level: float = Field(0.95, gt=0.5, lt=1)
    """Confidence level of every interval (0.95: the 2.5th and 97.5th percentiles of the resamples)."""
    seed: int = 0


class LMEvalConfig(StrictModel):
    tasks: tuple[str, ...] = Field(min_length=1)
    """lm-eval task names (multiple choice); each is also calq's task name in the report and in gates."""
    include_path: str | None = None
    """A folder of lm-eval task YAML files (offline: dataset_path: json with local data_files)."""
    limit: int | None = Field(None, ge=1)
    """At most this many documents per task (lm-eval's limit)."""
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _names(self) -> LMEvalConfig:
        bad = [t for t in self.tasks if not re.fullmatch(TASK_NAME, t)]
        if bad:
            raise ValueError(f"lm-eval task name {bad[0]!r}: calq names it in gates as task.<name>.<metric>, so use "
                             "letters, digits, '_' and '-' (a task group: list its tasks)")
        return self

    def sections(self) -> dict[str, tuple[str, ...]]:
        return {f"task.{t}": (*SUMMARY, "acc", "acc_norm") for t in self.tasks}


class EvalConfig(StrictModel):
    text: TextEvalConfig = TextEvalConfig()
    mmlu: MMLUConfig | None = MMLUConfig()
    ece_bins: int = Field(15, ge=2)
    selective_threshold: float = Field(0.75, gt=0, le=1)
    """Selective prediction: accuracy and coverage of the predictions at least this confident."""
    bootstrap: BootstrapConfig = BootstrapConfig()
    weight_cache_gb: float = Field(8.0, ge=0)
    """CPU: prepared weights (dequantized W4, W8A8 codes as float) kept while the models run, at most this much;
    0 prepares each weight on every call (slow, no memory)."""
    logit_lens: LensConfig | None = None
    """Layer-wise calibration (quant/confidence/lens.py) on a few evaluation windows; null skips it."""
    tasks: tuple[TaskConfig, ...] = ()
    """The user's own tasks (quant/data/tasks.py), each reported and gated as task.<name>.<metric>."""
    lm_eval: LMEvalConfig | None = None
    """lm-evaluation-harness tasks through the bridge (quant/checks/harness.py; the lm-eval extra), reported and
    gated as task.<lm-eval task>.<metric> like task files; null: none."""

    @model_validator(mode="after")
    def _unique_tasks(self) -> EvalConfig:
        names = [t.name for t in self.tasks] + list(self.lm_eval.tasks if self.lm_eval else ())
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation.tasks and evaluation.lm_eval.tasks names must be unique (got {names})")
        return self


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass
class ModelEval:
    text: dict[str, float] = field(default_factory=dict)
    mmlu: dict[str, float] = field(default_factory=dict)
    answer_distribution: dict[str, int] = field(default_factory=dict)
    intervals: dict[str, Estimate] = field(default_factory=dict)
    """`text.ece` -> point and bootstrap interval, for every metric of `text` and `mmlu` (except n)."""
    vs_reference: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    """`text.ece` -> {"difference": this - reference, "ratio": this / reference}, paired bootstrap intervals
    (the same resampled windows / items for both models); empty for the reference itself."""
    token_predictions: Predictions | None = None
    mmlu_predictions: Predictions | None = None
    coverage: dict[str, float] = field(default_factory=dict)
    """`share`: the fraction of the variant's matmul weights quantized (0 for the reference), for gate rules."""
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    """Metrics of each task section (`facts`, `facts.mean_token`, ...: the section without its `task.` prefix)."""
    task_predictions: dict[str, Predictions] = field(default_factory=dict)

    def section(self, section: str) -> dict[str, float]:
        """The metrics of a report section: `text`, `mmlu` or `task.<name>[.mean_token]`."""
        if section.startswith("task."):
            return self.tasks.get(section.removeprefix("task."), {})
        return getattr(self, section)


def split_metric(metric: str) -> tuple[str, str]:
    """(section, metric name) of a dotted metric: `text.ece` -> (text, ece), `task.qa.mean_token.ece` ->
    (task.qa.mean_token, ece)."""
    section, _, name = metric.rpartition(".") if metric.startswith("task.") else metric.partition(".")
    return section, name


# ----------------------------------------------------------------------------------------------
# Held-out text
# ----------------------------------------------------------------------------------------------

def eval_windows(tokenizer: PreTrainedTokenizerBase, cfg: TextEvalConfig) -> list[Tensor]:
    """The first `windows` non-overlapping windows of the evaluation split, documents in order, each starting with
    the tokenizer's special prefix (its BOS, if it has one; never a target)."""
    docs = [d for s in cfg.sources for d in load_documents(s, "evaluation")]
    ids = tokenizer("\n\n".join(d.text for d in docs), add_special_tokens=False)["input_ids"]
    prefix = special_prefix(tokenizer)
    step = cfg.seq_len - len(prefix)
    n = len(ids) // step
    if n < cfg.windows:
        raise CalqError(f"evaluation text has {n} windows of {cfg.seq_len} tokens, {cfg.windows} requested; "
                        "lower evaluation.text.windows or add sources")
    return [torch.tensor(prefix + ids[i * step:(i + 1) * step], device="cpu") for i in range(cfg.windows)]


@torch.inference_mode()
def collect_text(models: Models, windows: list[Tensor], reference: str) -> dict[str, Predictions]:
    """Per-token predictions of every model on `windows`; KL and agreement are against `reference`."""
    if not isinstance(models.get(reference), nn.Module):
        raise ValueError(f"reference {reference!r} must be a module among the models")
    acc = {name: {"conf": [], "pred": [], "correct": [], "nll": [], "brier": [], "kl": [], "agree": []}
           for name in models}
    groups = sorted(forward_groups(models), key=lambda g: g[1][0][0] != reference)  # the reference first
    scratch = SoftmaxScratch()
    for ids in tqdm(windows, desc="eval text", unit="window"):
        x, target = ids[None, :-1], ids[1:]
        ref = None
        for model, views in groups:
            raw = model(input_ids=x.to(next(model.parameters()).device), use_cache=False).logits[0].float().cpu()
            for name, temperature in views:
                s = scratch.stats(raw, temperature, target, keep_reference=ref is None)
                ref = s if ref is None else ref
                for key, value in (("conf", s.conf), ("pred", s.pred), ("correct", s.pred == target), ("nll", s.nll),
                                   # multiclass Brier over the vocabulary: sum_c p_c^2 - 2 p_y + 1
                                   ("brier", s.sum_sq - 2 * (-s.nll).exp() + 1),
                                   ("kl", s.kl), ("agree", s.pred == ref.pred)):
                    acc[name][key].append(value)
    cluster = np.repeat(np.arange(len(windows)), [len(w) - 1 for w in windows])
    out = {}
    for name, a in acc.items():
        t = {k: torch.cat(v).numpy() for k, v in a.items()}
        out[name] = Predictions(t["conf"].astype(np.float64), t["correct"], t["pred"], cluster,
                                {"nll": t["nll"], "brier": t["brier"], "kl_to_reference": t["kl"],
                                 "top1_agreement": t["agree"].astype(np.float64)})
    return out


# ----------------------------------------------------------------------------------------------
# MMLU letter scoring
# ----------------------------------------------------------------------------------------------

def stratified_items(items: list[MCItem], per_subject: int, seed: int) -> list[MCItem]:
    """`per_subject` items of every subject, chosen by a seeded hash (stable across runs and machines)."""
    by_subject = _by_subject(items)
    key = lambda it: hashlib.sha1(f"{seed}:{it.item_id}".encode()).hexdigest()  # noqa: E731
    return [it for subj in sorted(by_subject) for it in sorted(by_subject[subj], key=key)[:per_subject]]


def templated(tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> bool:
    """Whether prompts go through the tokenizer's chat template: asked for, and the tokenizer has one. This one
    decision drives the prompt, its special tokens and the answer letters' tokens ("A" after the template's
    assistant turn, " A" after "Answer:")."""
    return chat_template and bool(tokenizer.chat_template)


def mmlu_shots(cfg: MMLUConfig) -> dict[str, list[MCItem]]:
    """The k-shot examples of every subject: its first `shots` fit items in the seeded order (none for zero-shot)."""
    return {} if not cfg.shots else {
        subject: items for subject, items in _by_subject(stratified_items(load_mmlu("fit"), cfg.shots, cfg.seed)).items()}


def _by_subject(items: list[MCItem]) -> dict[str, list[MCItem]]:
    out: dict[str, list[MCItem]] = {}
    for it in items:
        out.setdefault(it.subject, []).append(it)
    return out


def _question_block(item: MCItem) -> str:
    return f"{item.question}\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(item.choices)) + "Answer:"


def mmlu_prompt(item: MCItem, tokenizer: PreTrainedTokenizerBase, use_template: bool,
                shots: list[MCItem] | tuple[MCItem, ...] = ()) -> str:
    subject = item.subject.replace("_", " ")
    if shots:  # the standard k-shot prompt, plain text
        return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                + "".join(f"{_question_block(s)} {LETTERS[s.answer]}\n\n" for s in shots) + _question_block(item))
    body = (f"The following is a multiple choice question about {subject}.\n\n{item.question}\n"
            + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(item.choices))
            + "Answer with the letter of the correct option.")
    if use_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
    return body + "\nAnswer:"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, use_template: bool) -> list[int]:
    """A chat template writes its own special tokens (Llama-3's and Gemma's BOS among them); a plain prompt gets
    the tokenizer's, as in deployment."""
    return tokenizer(prompt, add_special_tokens=not use_template)["input_ids"]


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig) -> None:
    """What the evaluation needs of the tokenizer, checked as soon as it loads (not after statistics and methods)."""
    if cfg.mmlu is not None:
        letter_token_ids(tokenizer, templated(tokenizer, cfg.mmlu.chat_template))


def mmlu_probabilities(models: Models, tokenizer: PreTrainedTokenizerBase, items: list[MCItem],
                       cfg: MMLUConfig, shard: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
    """Letter probabilities (items, 4) of every model. `shard` = (rank, world) scores only every world-th
    batch from rank (the other rows stay 0), so processes share the work with the same batches."""
    use_template = templated(tokenizer, cfg.chat_template)
    return letter_probabilities(models, tokenizer, mmlu_encoded(tokenizer, items, cfg),
                                letter_token_ids(tokenizer, use_template), [len(LETTERS)] * len(items), cfg.batch_size,
                                f"eval mmlu ({cfg.mode})", shard)


def mmlu_encoded(tokenizer: PreTrainedTokenizerBase, items: list[MCItem], cfg: MMLUConfig) -> list[list[int]]:
    """Each item's prompt tokens, as the letters are scored after them."""
    use_template = templated(tokenizer, cfg.chat_template)
    shots = mmlu_shots(cfg)
    return [encode_prompt(tokenizer, mmlu_prompt(it, tokenizer, use_template, shots.get(it.subject, ())),
                          use_template) for it in items]


def mmlu_fit_items(cfg: MMLUConfig, n: int) -> list[MCItem]:
    """About `n` items of the fit split, n // 57 per subject (at least 1), in the seeded order after the k-shot
    examples (never one of them, never a reported item)."""
    fit = load_mmlu("fit")
    per = max(n // len({it.subject for it in fit}), 1)
    return [it for items in _by_subject(stratified_items(fit, cfg.shots + per, cfg.seed)).values()
            for it in items[cfg.shots:]]


def letter_scoring(mode: str, use_template: bool) -> str:
    """How MMLU-style letters were scored, in words: a probe fitted on one scoring applies to answers scored alike."""
    return f"MMLU letters, {mode}, {'chat template' if use_template else 'plain prompt'}"


def collect_mmlu(models: Models, tokenizer: PreTrainedTokenizerBase, items: list[MCItem],
                 cfg: MMLUConfig) -> dict[str, Predictions]:
    """Per-item predictions of every model on `items` (letter probabilities renormalized over A-D)."""
    return mmlu_predictions(mmlu_probabilities(models, tokenizer, items, cfg), items)


def mmlu_predictions(probs: dict[str, np.ndarray], items: list[MCItem]) -> dict[str, Predictions]:
    return choice_predictions(probs, np.array([it.answer for it in items]))


# ----------------------------------------------------------------------------------------------
# Reduction: metrics with bootstrap intervals
# ----------------------------------------------------------------------------------------------

def reduce_section(preds: dict[str, Predictions], cfg: EvalConfig, reference: str, perplexity: bool = False
                   ) -> dict[str, tuple[dict[str, float], dict[str, Estimate], dict[str, dict[str, Estimate]]]]:
    """(points, intervals, changes vs reference) per model. All models share one set of resamples."""
    cluster = preds[reference].cluster
    for name, p in preds.items():
        if not np.array_equal(p.cluster, cluster):
            raise ValueError(f"{name!r} was evaluated on other items than {reference!r}; paired intervals need the same")
    kw = dict(n_bins=cfg.ece_bins, threshold=cfg.selective_threshold)
    points = {name: metrics.summarize(p.confidence, p.correct, means=p.values, **kw) for name, p in preds.items()}
    chunks: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in preds}
    for w in metrics.cluster_resamples(cluster, cfg.bootstrap.resamples, cfg.bootstrap.seed):
        for name, p in preds.items():
            chunks[name].append(metrics.summarize_batched(p.confidence, p.correct, w, means=p.values, **kw))
    samples = {name: {k: np.concatenate([c[k] for c in cs]) for k in cs[0] if k != "n"} for name, cs in chunks.items()}
    if perplexity:
        for name in preds:
            points[name]["perplexity"] = float(np.exp(points[name]["nll"]))
            samples[name]["perplexity"] = np.exp(samples[name]["nll"])
    alpha = 1 - cfg.bootstrap.level

    def estimate(value: float, resampled: np.ndarray) -> Estimate:
        return Estimate(float(value), *metrics.percentile_interval(resampled, alpha))

    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in preds:
            pt, sm, ref_pt, ref_sm = points[name], samples[name], points[reference], samples[reference]
            intervals = {k: estimate(pt[k], sm[k]) for k in sm}
            changes = {} if name == reference else {
                k: {"difference": estimate(pt[k] - ref_pt[k], sm[k] - ref_sm[k]),
                    "ratio": estimate(np.divide(pt[k], ref_pt[k]), sm[k] / ref_sm[k])} for k in sm}
            out[name] = (pt, intervals, changes)
    return out


def reduce(predictions: dict[str, dict[str, Predictions]], cfg: EvalConfig, reference: str) -> dict[str, ModelEval]:
    """Metrics of every model from collected predictions ({"text": {model: ...}, "mmlu": {model: ...}})."""
    names = list(next(iter(predictions.values())))
    results = {name: ModelEval() for name in names}
    for section, preds in predictions.items():
        for name, (points, intervals, changes) in reduce_section(preds, cfg, reference,
                                                                  perplexity=section == "text").items():
            r = results[name]
            if section.startswith("task."):
                r.tasks[section.removeprefix("task.")] = points
                r.task_predictions[section.removeprefix("task.")] = preds[name]
            else:
                setattr(r, section, points)
            r.intervals.update({f"{section}.{k}": v for k, v in intervals.items()})
            r.vs_reference.update({f"{section}.{k}": v for k, v in changes.items()})
    for name, r in results.items():
        r.token_predictions = predictions["text"][name] if "text" in predictions else None
        if "mmlu" in predictions:
            r.mmlu_predictions = predictions["mmlu"][name]
            counts = Counter(LETTERS[i] for i in r.mmlu_predictions.prediction)
            r.answer_distribution = {letter: counts.get(letter, 0) for letter in LETTERS}
    return results


# ----------------------------------------------------------------------------------------------
# The stage's verb
# ----------------------------------------------------------------------------------------------

def evaluate(models: Models, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig,
             reference: str) -> dict[str, ModelEval]:
    """Evaluate every model on the same held-out data; KL, agreement and the paired changes are against
    `reference`. Every metric comes with a bootstrap interval (see `reduce`)."""
    if reference not in models:
        raise ValueError(f"reference model {reference!r} is not among {sorted(models)}")
    predictions = {"text": collect_text(models, eval_windows(tokenizer, cfg.text), reference)}
    if cfg.mmlu is not None:
        items = stratified_items(load_mmlu("report"), cfg.mmlu.per_subject, cfg.mmlu.seed)
        predictions["mmlu"] = collect_mmlu(models, tokenizer, items, cfg.mmlu)
    predictions.update(collect_tasks(models, tokenizer, [load_task(t) for t in cfg.tasks]))
    if cfg.lm_eval is not None:
        predictions.update(lm_eval_predictions(models, tokenizer, cfg.lm_eval))
    return reduce(predictions, cfg, reference)


def lm_eval_predictions(models: Models, tokenizer: PreTrainedTokenizerBase,
                        cfg: LMEvalConfig) -> dict[str, dict[str, Predictions]]:
    """The lm-eval tasks' predictions by section task.<name> (the bridge is imported here: lm-eval is optional)."""
    from quant.checks.harness import run_harness  # noqa: PLC0415 (optional extra)

    preds, _ = run_harness(models, tokenizer, list(cfg.tasks), cfg.include_path, cfg.limit, cfg.batch_size)
    missing = [t for t in cfg.tasks if f"lm_eval.{t}" not in preds]
    if missing:
        raise CalqError(f"lm-eval task {missing[0]} is not multiple choice (no set of choices per document); the "
                        "bridge's calibration metrics need multiple_choice tasks")
    return {f"task.{t}": preds[f"lm_eval.{t}"] for t in cfg.tasks}
