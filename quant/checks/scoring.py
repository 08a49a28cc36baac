"""The scoring primitives every evaluation shares: per-item predictions, letter probabilities after a prompt, and the
log-likelihood of continuations. MMLU, the task files and the lm-eval bridge all score through these, every model
(and every tempered view of one, `forward_groups`) on the same batch before the next batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quant.confidence.recalibrate import Models, forward_groups
from quant.errors import CalqError

LETTERS = "ABCD"
"""MMLU's answer letters."""
SUMMARY = ("n", "accuracy", "mean_confidence", "ece", "ece_mass", "mce", "auroc", "aurc", "selective_coverage",
           "selective_accuracy", "nll", "brier")
"""The metrics reported for every set of predictions (quant.confidence.metrics.summarize, plus nll and brier)."""


@dataclass
class Predictions:
    """Raw per-item arrays of one model on one kind of data (text tokens, MMLU or task items): everything its
    metrics, intervals and plots are reduced from."""

    confidence: np.ndarray
    correct: np.ndarray
    prediction: np.ndarray
    """Predicted class: token id (text), answer index (multiple choice), 0/1 correctness (free text)."""
    cluster: np.ndarray
    """Bootstrap resampling unit of each item: its window (text) or the item itself (MMLU, tasks)."""
    values: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-item quantities reported as their mean: nll, brier, kl_to_reference, top1_agreement, acc_norm, ..."""
    probabilities: np.ndarray | None = None
    """Multiple choice: the probabilities over the choices (items, choices) the confidence is the top one of (what
    a confidence probe reads); None for text tokens and free text."""

    @classmethod
    def concatenate(cls, parts: list[Predictions]) -> Predictions:
        """Join shards (in order); cluster ids are offset so clusters of different shards stay distinct."""
        offsets = np.cumsum([0] + [int(p.cluster.max()) + 1 if len(p.cluster) else 0 for p in parts[:-1]])
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("confidence", "correct", "prediction")),
                   np.concatenate([p.cluster + o for p, o in zip(parts, offsets)]),
                   {k: np.concatenate([p.values[k] for p in parts]) for k in parts[0].values},
                   None if parts[0].probabilities is None else _stack_padded([p.probabilities for p in parts]))


def _stack_padded(blocks: list[np.ndarray]) -> np.ndarray:
    """Rows of (items, choices) blocks, the narrower ones padded with probability 0 (as a shorter choice list is)."""
    width = max(b.shape[1] for b in blocks)
    return np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1]))) for b in blocks])


def choice_predictions(probs: dict[str, np.ndarray], labels: np.ndarray,
                       extra: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Predictions]:
    """Per-item predictions from probabilities over choices (items, choices; padded columns 0): confidence is the
    top probability, nll and the multiclass Brier score are of the right choice. `extra` adds per-item values."""
    rows = np.arange(len(labels))
    out = {}
    for name, p in probs.items():
        p_true = p[rows, labels]
        out[name] = Predictions(p.max(1), p.argmax(1) == labels, p.argmax(1), rows,
                                {"nll": -np.log(np.clip(p_true, np.finfo(np.float64).eps, 1.0)),
                                 "brier": (p * p).sum(1) - 2 * p_true + 1, **(extra or {}).get(name, {})}, p)
    return out


def loglikelihood_predictions(scores: dict[str, np.ndarray], chars: np.ndarray, labels: np.ndarray,
                              normalization: str = "sum") -> dict[str, Predictions]:
    """Predictions from each choice's summed log-likelihood (items, choices; missing choices -inf), as lm-eval's
    multiple_choice (see `loglikelihood_choices`)."""
    return choice_predictions(*loglikelihood_choices(scores, chars, labels, normalization))


def loglikelihood_choices(scores: dict[str, np.ndarray], chars: np.ndarray, labels: np.ndarray,
                          normalization: str = "sum") -> tuple[dict[str, np.ndarray], np.ndarray,
                                                               dict[str, dict[str, np.ndarray]]]:
    """(probabilities over the choices, labels, extra per-item values) per model from each choice's summed
    log-likelihood: acc is the argmax of the sums, acc_norm the argmax per character (`chars`, the choices'
    lengths); the probabilities, the softmax over the scores, use `normalization` (sum | per_char)."""
    probs, extra = {}, {}
    for name, summed in scores.items():
        per_char = summed / chars
        extra[name] = {"acc": (summed.argmax(1) == labels).astype(np.float64),
                       "acc_norm": (per_char.argmax(1) == labels).astype(np.float64)}
        z = summed if normalization == "sum" else per_char
        z = np.exp(z - z.max(1, keepdims=True))
        probs[name] = z / z.sum(1, keepdims=True)
    return probs, labels, extra


def _pad(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def padded(rows: list[list[int]], pad: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), host side: left-padded, each row ends in the last column (prompts whose next token is
    scored); right-padded, each row starts in the first (continuations after a cache)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device="cpu")  # token ids: host data
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long, device="cpu")
        mask[i, cols] = 1
    return ids, mask


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, use_template: bool, letters: str = LETTERS) -> list[int]:
    """Token id of each answer letter as it follows the prompt."""
    ids = []
    for letter in letters:
        toks = tokenizer.encode(letter if use_template else f" {letter}", add_special_tokens=False)
        if len(toks) != 1:
            raise CalqError(f"the tokenizer splits answer letter {letter!r} into {len(toks)} tokens; "
                            "letter scoring needs single-token letters (set evaluation.mmlu: null, or score tasks by "
                            "loglikelihood)")
        ids.append(toks[0])
    return ids


@torch.inference_mode()
def letter_probabilities(models: Models, tokenizer: PreTrainedTokenizerBase, encoded: list[list[int]],
                         letters: list[int], n_choices: list[int], batch_size: int, desc: str,
                         shard: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
    """Probabilities (items, len(letters)) of the answer letters at the last position of each prompt, renormalised
    over the item's own n_choices letters (the other columns stay 0). `shard` = (rank, world) scores only every
    world-th batch from rank (the other rows stay 0), so processes share the work with the same batches."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    probs = {name: np.zeros((len(encoded), len(letters))) for name in models}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][shard[0]::shard[1]]
    groups = forward_groups(models)
    for batch in tqdm(batches, desc=desc, unit="batch"):
        ids, mask = padded([encoded[i] for i in batch], _pad(tokenizer))
        off = torch.tensor([[k >= n_choices[i] for k in range(len(letters))] for i in batch], device="cpu")
        for model, views in groups:
            dev = next(model.parameters()).device
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False, logits_to_keep=1)
            z = out.logits[:, -1, letters].float().cpu()
            for name, temperature in views:
                probs[name][batch] = (z / temperature).masked_fill(off, -torch.inf).softmax(-1).numpy()
    return probs


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str,
                add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-eval's HFLM splits them: trailing spaces of the context move to the
    continuation, the whole is encoded once and the continuation is what follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def continuation_loglikelihoods(models: Models, tokenizer: PreTrainedTokenizerBase,
                                requests: list[tuple[list[int], list[int]]], batch_size: int,
                                desc: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Summed log-probability (natural log) of each request's continuation tokens after its context, per model,
    and whether the continuation is the model's greedy one (every token its argmax; lm-eval's is_greedy).

    Requests with the same context (a question's choices) share one forward pass of it: the context runs once,
    left-padded with explicit positions among other contexts of similar length, and its KV cache is repeated
    for the choices, which run as one right-padded batch after it (a 4-choice item costs its context once, not
    four times). `batch_size` bounds the continuations per batch."""
    for ctx, cont in requests:
        if not ctx or not cont:
            raise CalqError("a log-likelihood request has an empty context or continuation; give every prompt and "
                            "every choice some text")
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        by_context.setdefault(tuple(ctx), []).append(i)
    contexts = sorted(by_context, key=len, reverse=True)  # similar lengths share a batch
    batches, current, size = [], [], 0
    for ctx in contexts:
        if current and size + len(by_context[ctx]) > batch_size:
            batches.append(current)
            current, size = [], 0
        current.append(ctx)
        size += len(by_context[ctx])
    batches += [current] if current else []
    out = {name: np.zeros(len(requests)) for name in models}
    greedy = {name: np.zeros(len(requests), dtype=bool) for name in models}
    pad = _pad(tokenizer)
    for batch in tqdm(batches, desc=desc, unit="batch"):
        ids, mask = padded([list(c) for c in batch], pad)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [(g, i) for g, ctx in enumerate(batch) for i in by_context[ctx]]  # (context row, request)
        row_of = torch.tensor([g for g, _ in rows], device="cpu")
        # the last continuation token is never an input
        cont, cont_mask = padded([requests[i][1][:-1] for _, i in rows], pad, side="right")
        width = cont.shape[1]
        cont_positions = positions[row_of, -1:] + 1 + torch.arange(width, device="cpu")
        for model, views in forward_groups(models):
            dev = next(model.parameters()).device
            first = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                          use_cache=True, logits_to_keep=1)
            logits = first.logits[row_of.to(dev), -1:].float()  # predicts each continuation's first token
            if width > 0:
                cache = first.past_key_values
                cache.reorder_cache(row_of.to(dev))  # each context's cache, once per continuation
                rest = model(input_ids=cont.to(dev), attention_mask=torch.cat([mask[row_of], cont_mask], 1).to(dev),
                             position_ids=cont_positions.to(dev), past_key_values=cache, use_cache=True).logits
                logits = torch.cat([logits, rest.float()], 1)
            for r, (_, i) in enumerate(rows):
                target = torch.tensor(requests[i][1], dtype=torch.long, device="cpu")
                z = logits[r, :len(target)]
                for name, temperature in views:
                    logp = F.log_softmax(z / temperature, dim=-1).cpu()
                    out[name][i] = float(logp.gather(-1, target[:, None]).sum())
                    greedy[name][i] = bool((logp.argmax(-1) == target).all())
    return out, greedy
