"""Evaluate full precision and quantized models side by side on held-out data.

Two signals: next-token prediction on held-out text (perplexity, top-1 accuracy, confidence
calibration, and KL / top-1 agreement against the reference model, computed on the fly so no logits
are stored) and MMLU letter scoring on a stratified subset (accuracy, ECE, Brier, answer spread).
All models see the same batches in the same order, so the comparison is paired.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quant import metrics
from quant.cache import CalqError
from quant.data import MCItem, load_documents, load_mmlu
from quant.lens import LensConfig
from quant.schema import StrictModel

LETTERS = "ABCD"


class TextEvalConfig(StrictModel):
    sources: tuple[str, ...] = ("wikipedia",)
    windows: int = Field(40, ge=1)
    seq_len: int = Field(512, ge=16)


class MMLUConfig(StrictModel):
    per_subject: int = Field(5, ge=1)
    chat_template: bool = True
    batch_size: int = Field(8, ge=1)
    seed: int = 0


class EvalConfig(StrictModel):
    text: TextEvalConfig = TextEvalConfig()
    mmlu: MMLUConfig | None = MMLUConfig()
    ece_bins: int = Field(15, ge=2)
    logit_lens: LensConfig | None = None
    """Layer-wise calibration (quant/lens.py) on a few evaluation windows; null skips it."""


@dataclass
class Predictions:
    """Per-item confidence and correctness: what calibration metrics and plots are computed from."""

    confidence: np.ndarray
    correct: np.ndarray

    def summary(self, n_bins: int) -> dict[str, float]:
        return metrics.summarize(self.confidence, self.correct, n_bins=n_bins)


@dataclass
class ModelEval:
    text: dict[str, float] = field(default_factory=dict)
    mmlu: dict[str, float] = field(default_factory=dict)
    answer_distribution: dict[str, int] = field(default_factory=dict)
    token_predictions: Predictions | None = None
    mmlu_predictions: Predictions | None = None


# ----------------------------------------------------------------------------------------------
# Held-out text
# ----------------------------------------------------------------------------------------------

def eval_windows(tokenizer: PreTrainedTokenizerBase, cfg: TextEvalConfig) -> list[Tensor]:
    """The first `windows` non-overlapping windows of the evaluation split, documents in order."""
    docs = [d for s in cfg.sources for d in load_documents(s, "evaluation")]
    ids = tokenizer("\n\n".join(d.text for d in docs), add_special_tokens=False)["input_ids"]
    n = len(ids) // cfg.seq_len
    if n < cfg.windows:
        raise CalqError(f"evaluation text has {n} windows of {cfg.seq_len} tokens, {cfg.windows} requested; "
                        "lower evaluation.text.windows or add sources")
    return [torch.tensor(ids[i * cfg.seq_len:(i + 1) * cfg.seq_len]) for i in range(cfg.windows)]


@torch.inference_mode()
def _text_eval(models: dict[str, nn.Module], windows: list[Tensor], reference: str) -> dict[str, dict]:
    acc = {name: {"nll": [], "conf": [], "correct": [], "brier": [], "kl": [], "agree": []} for name in models}
    for ids in tqdm(windows, desc="eval text", unit="window"):
        x, target = ids[None, :-1], ids[1:]
        ref_logp = None
        for name in [reference, *[n for n in models if n != reference]]:
            model = models[name]
            logits = model(input_ids=x.to(next(model.parameters()).device), use_cache=False).logits[0].float().cpu()
            logp = F.log_softmax(logits, dim=-1)
            p = logp.exp()
            conf, pred = p.max(-1)
            a = acc[name]
            a["nll"].append(-logp.gather(-1, target[:, None])[:, 0])
            a["conf"].append(conf)
            a["correct"].append(pred == target)
            # multiclass Brier over the vocabulary: sum_c p_c^2 - 2 p_y + 1
            a["brier"].append((p * p).sum(-1) - 2 * p.gather(-1, target[:, None])[:, 0] + 1)
            if ref_logp is None:
                ref_logp, ref_p, ref_pred = logp, p, pred
            a["kl"].append((ref_p * (ref_logp - logp)).sum(-1))
            a["agree"].append(pred == ref_pred)
    return {name: {k: torch.cat(v).numpy() for k, v in a.items()} for name, a in acc.items()}


# ----------------------------------------------------------------------------------------------
# MMLU letter scoring
# ----------------------------------------------------------------------------------------------

def stratified_items(items: list[MCItem], per_subject: int, seed: int) -> list[MCItem]:
    """`per_subject` items of every subject, chosen by a seeded hash (stable across runs and machines)."""
    by_subject: dict[str, list[MCItem]] = {}
    for it in items:
        by_subject.setdefault(it.subject, []).append(it)
    key = lambda it: hashlib.sha1(f"{seed}:{it.item_id}".encode()).hexdigest()  # noqa: E731
    return [it for subj in sorted(by_subject) for it in sorted(by_subject[subj], key=key)[:per_subject]]


def mmlu_prompt(item: MCItem, tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> str:
    subject = item.subject.replace("_", " ")
    body = (f"The following is a multiple choice question about {subject}.\n\n{item.question}\n"
            + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(item.choices))
            + "Answer with the letter of the correct option.")
    if chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
    return body + "\nAnswer:"


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> list[int]:
    """Token id of each answer letter as it would follow the prompt."""
    ids = []
    for letter in LETTERS:
        toks = tokenizer.encode(letter if chat_template else f" {letter}", add_special_tokens=False)
        if len(toks) != 1:
            raise CalqError(f"the tokenizer splits answer letter {letter!r} into {len(toks)} tokens; "
                            "MMLU letter scoring needs single-token letters (set evaluation.mmlu: null)")
        ids.append(toks[0])
    return ids


@torch.inference_mode()
def _mmlu_eval(models: dict[str, nn.Module], tokenizer: PreTrainedTokenizerBase, items: list[MCItem],
               cfg: MMLUConfig) -> dict[str, np.ndarray]:
    letters = letter_token_ids(tokenizer, cfg.chat_template)
    encoded = [tokenizer(mmlu_prompt(it, tokenizer, cfg.chat_template), add_special_tokens=False)["input_ids"]
               for it in items]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probs = {name: np.zeros((len(items), len(LETTERS))) for name in models}
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    for batch in tqdm(batches, desc="eval mmlu", unit="batch"):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: the answer position is the last column
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        for name, model in models.items():
            dev = next(model.parameters()).device
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False, logits_to_keep=1)
            probs[name][batch] = out.logits[:, -1, letters].float().softmax(-1).cpu().numpy()
    return probs


# ----------------------------------------------------------------------------------------------
# The stage's verb
# ----------------------------------------------------------------------------------------------

def evaluate(models: dict[str, nn.Module], tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig,
             reference: str) -> dict[str, ModelEval]:
    """Evaluate every model on the same held-out data; KL and agreement are measured against `reference`."""
    if reference not in models:
        raise ValueError(f"reference model {reference!r} is not among {sorted(models)}")
    results = {name: ModelEval() for name in models}
    text = _text_eval(models, eval_windows(tokenizer, cfg.text), reference)
    for name, t in text.items():
        preds = Predictions(t["conf"], t["correct"])
        r = results[name]
        r.token_predictions = preds
        r.text = {"perplexity": float(np.exp(t["nll"].mean())), "nll": float(t["nll"].mean()),
                  "brier": float(t["brier"].mean()), "kl_to_reference": float(t["kl"].mean()),
                  "top1_agreement": float(t["agree"].mean()), **preds.summary(cfg.ece_bins)}
    if cfg.mmlu is not None:
        items = stratified_items(load_mmlu("report"), cfg.mmlu.per_subject, cfg.mmlu.seed)
        labels = np.array([it.answer for it in items])
        for name, p in _mmlu_eval(models, tokenizer, items, cfg.mmlu).items():
            preds = Predictions(p.max(1), p.argmax(1) == labels)
            r = results[name]
            r.mmlu_predictions = preds
            r.mmlu = {"brier": metrics.brier(p, labels), "nll": metrics.nll(p, labels), **preds.summary(cfg.ece_bins)}
            counts = Counter(LETTERS[i] for i in p.argmax(1))
            r.answer_distribution = {letter: counts.get(letter, 0) for letter in LETTERS}
    return results
