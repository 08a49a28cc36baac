"""Scoring the user's tasks (quant.data.tasks) on every model, so the same calibration metrics, intervals and gates
apply to them as to MMLU.

- Multiple choice, `loglikelihood`: each choice's summed log-probability as a continuation of the prompt (lm-eval's
  multiple_choice; acc = argmax of the sums, acc_norm = argmax per character of the choice). The prediction and its
  confidence (the softmax over the choices' scores) use the task's `normalization`.
- Multiple choice, `letters`: the choices lettered A, B, ... in the prompt, the letters' probabilities at the answer
  position (as MMLU), renormalised over the item's letters.
- Free text: greedy generation (one per module: a tempered view generates the same tokens), the answer being the
  tokens before the end-of-sequence token (plain prompts: also before the first newline). Confidence is the
  probability of that answer, ended (its tokens and the stop token), in section `task.<name>`; and the mean
  probability of its tokens (what `calq ask` bands) in `task.<name>.mean_token`. NLL and Brier are binary
  (confidence as the probability that the answer is right).
"""

from __future__ import annotations

import re
import string

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quant.checks.scoring import (SUMMARY, Predictions, choice_predictions, continuation_loglikelihoods, encode_pair,
                                  padded, letter_probabilities, letter_token_ids,
                                  loglikelihood_choices)
from quant.confidence.recalibrate import Models, forward_groups
from quant.data.tasks import LETTERS, Task, TaskConfig, TaskItem

MEAN_TOKEN = "mean_token"


def task_sections(cfg: TaskConfig) -> dict[str, tuple[str, ...]]:
    """The report sections of a task and the metrics of each: what `task.<name>.<metric>` gates may name."""
    if cfg.kind == "multiple_choice":
        extra = ("acc", "acc_norm") if cfg.scoring == "loglikelihood" else ()
        return {f"task.{cfg.name}": (*SUMMARY, *extra)}
    return {f"task.{cfg.name}": (*SUMMARY, "truncated", "answer_tokens"), f"task.{cfg.name}.{MEAN_TOKEN}": SUMMARY}


def uses_template(tokenizer: PreTrainedTokenizerBase, cfg: TaskConfig) -> bool:
    return cfg.chat_template and bool(tokenizer.chat_template)


def _lettered(item: TaskItem) -> str:
    return (f"{item.question}\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(item.choices))
            + "Answer with the letter of the correct option.")


def _asked(cfg: TaskConfig, item: TaskItem) -> str:
    """What the question turn says: the question, or it with its lettered choices."""
    return _lettered(item) if cfg.scoring == "letters" and cfg.kind == "multiple_choice" else item.question


def _shown_answer(cfg: TaskConfig, item: TaskItem) -> str:
    """A k-shot example's answer as the model is shown it."""
    if cfg.kind == "free_text":
        return item.answers[0]
    return LETTERS[item.answer] if cfg.scoring == "letters" else item.choices[item.answer]


def task_context(task: Task, item: TaskItem, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt the answer follows: the k-shot examples, then the question (as chat turns with the template)."""
    cfg = task.config
    if uses_template(tokenizer, cfg):
        turns = [t for s in task.shots for t in ({"role": "user", "content": _asked(cfg, s)},
                                                  {"role": "assistant", "content": _shown_answer(cfg, s)})]
        return tokenizer.apply_chat_template([*turns, {"role": "user", "content": _asked(cfg, item)}],
                                             tokenize=False, add_generation_prompt=True)
    shots = "".join(f"{cfg.prompt.format(question=_asked(cfg, s))} {_shown_answer(cfg, s)}\n\n" for s in task.shots)
    return shots + cfg.prompt.format(question=_asked(cfg, item))


def describe(task: Task, tokenizer: PreTrainedTokenizerBase) -> str:
    """One line of how the task was scored, for the report."""
    cfg = task.config
    how = {"loglikelihood": f"log-likelihood of each choice, confidence = softmax over the choices' "
                            f"{'summed log-likelihoods' if cfg.normalization == 'sum' else 'log-likelihoods per character'}",
           "letters": "answer-letter probabilities, confidence = softmax over the item's letters"}[cfg.scoring] \
        if cfg.kind == "multiple_choice" else (f"greedy answer (<= {cfg.max_new_tokens} tokens), {cfg.match} match, "
                                               "confidence = probability of the answer (mean token probability in "
                                               f"task.{cfg.name}.{MEAN_TOKEN})")
    prompt = "chat template" if uses_template(tokenizer, cfg) else "plain prompt"
    extra = f"; {task.dropped} more report items not evaluated (max_items)" if task.dropped else ""
    return (f"{cfg.kind.replace('_', ' ')} `{cfg.path}`: {len(task.items)} report items ({task.held_out} held out for "
            f"fitting), {cfg.shots}-shot, {prompt}; {how}{extra}")


# ----------------------------------------------------------------------------------------------------
# multiple choice


def task_prompts(task: Task, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each item's encoded context: what its answer is scored after (letters: the next token; log-likelihood: the
    choices as continuations, the context's trailing spaces moved to them as lm-eval does)."""
    chat = uses_template(tokenizer, task.config)
    contexts = [task_context(task, it, tokenizer) for it in task.items]
    if task.config.scoring == "letters":
        return [tokenizer(c, add_special_tokens=not chat)["input_ids"] for c in contexts]
    return [encode_pair(tokenizer, c, "", add_special_tokens=not chat)[0] for c in contexts]


def choice_probabilities(models: Models, tokenizer: PreTrainedTokenizerBase,
                         task: Task) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """(probabilities over the choices (items, widest choice count; padded columns 0) per model, the right choices,
    extra per-item values per model: acc and acc_norm for log-likelihood scoring) of a multiple-choice task."""
    cfg, items = task.config, task.items
    chat = uses_template(tokenizer, cfg)
    labels = np.array([it.answer for it in items])
    width = max(len(it.choices) for it in items)
    desc = f"task {cfg.name}"
    if cfg.scoring == "letters":
        letters = letter_token_ids(tokenizer, chat, LETTERS[:width])
        probs = letter_probabilities(models, tokenizer, task_prompts(task, tokenizer), letters,
                                     [len(it.choices) for it in items], cfg.batch_size, desc)
        return probs, labels, {}
    contexts = [task_context(task, it, tokenizer) for it in items]
    requests, owner = [], []
    for k, (it, ctx) in enumerate(zip(items, contexts)):
        for c in it.choices:
            requests.append(encode_pair(tokenizer, ctx, c if chat else f" {c}", add_special_tokens=not chat))
            owner.append(k)
    ll, _ = continuation_loglikelihoods(models, tokenizer, requests, cfg.batch_size, desc)
    chars = np.ones((len(items), width))  # padded columns: score -inf, length 1
    col = np.concatenate([np.arange(len(it.choices)) for it in items])
    for k, it in enumerate(items):
        chars[k, :len(it.choices)] = [len(c) for c in it.choices]
    scores = {}
    for name, values in ll.items():
        scores[name] = np.full((len(items), width), -np.inf)
        scores[name][np.array(owner), col] = values
    return loglikelihood_choices(scores, chars, labels, cfg.normalization)


# ----------------------------------------------------------------------------------------------------
# free text

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def matches(answer: str, accepted: tuple[str, ...], mode: str) -> bool:
    if mode == "exact":
        return answer.strip() in accepted
    said = normalize_answer(answer)
    if mode == "normalized":
        return said in {normalize_answer(a) for a in accepted}
    return any(re.search(rf"(^| ){re.escape(normalize_answer(a))}( |$)", said) for a in accepted if normalize_answer(a))


def _stops(model, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}


@torch.inference_mode()
def _free_text(models: Models, tokenizer: PreTrainedTokenizerBase, task: Task) -> dict[str, dict[str, Predictions]]:
    cfg, items = task.config, task.items
    chat = uses_template(tokenizer, cfg)
    encoded = [tokenizer(task_context(task, it, tokenizer), add_special_tokens=not chat)["input_ids"] for it in items]
    n = len(items)
    seq = {name: np.zeros(n) for name in models}
    mean = {name: np.zeros(n) for name in models}
    correct = {name: np.zeros(n, dtype=bool) for name in models}
    truncated = {name: np.zeros(n) for name in models}
    length = {name: np.zeros(n) for name in models}
    decode = lambda t: tokenizer.decode([t], clean_up_tokenization_spaces=False)  # noqa: E731
    newline = set() if chat else {t for t in range(len(tokenizer)) if "\n" in decode(t)}
    for model, views in forward_groups(models):
        dev = next(model.parameters()).device
        stop = _stops(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop, default=0)
        for start in tqdm(range(0, n, cfg.batch_size), desc=f"task {cfg.name} ({views[0][0]})", unit="batch"):
            batch = list(range(start, min(start + cfg.batch_size, n)))
            ids, mask = padded([encoded[i] for i in batch], pad)
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=cfg.max_new_tokens, eos_token_id=sorted(stop) or None,
                                 pad_token_id=pad, output_logits=True, return_dict_in_generate=True, top_p=None,
                                 top_k=None, temperature=None)
            tokens = out.sequences[:, ids.shape[1]:].cpu()
            logits = torch.stack(out.logits, 1).float().cpu()  # (batch, steps, vocab)
            for row, i in enumerate(batch):
                toks = tokens[row].tolist()
                end = next((k for k, t in enumerate(toks) if t in stop or t in newline), None)
                answer = toks[:len(toks) if end is None else end]
                scored = len(answer) + (end is not None)  # the answer's tokens and what ended it
                text = tokenizer.decode(answer, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                for name, temperature in views:
                    logp = torch.log_softmax(logits[row, :scored] / temperature, -1)
                    tok_logp = logp.gather(-1, torch.tensor(toks[:scored], device="cpu")[:, None])[:, 0]
                    seq[name][i] = float(tok_logp.sum().exp())
                    mean[name][i] = float(tok_logp[:max(len(answer), 1)].exp().mean())
                    correct[name][i] = matches(text, items[i].answers, cfg.match)
                    truncated[name][i] = float(end is None)
                    length[name][i] = len(answer)
    sections = {f"task.{cfg.name}": {}, f"task.{cfg.name}.{MEAN_TOKEN}": {}}
    rows = np.arange(n)
    for name in models:
        for section, conf, extra in ((f"task.{cfg.name}", seq[name], {"truncated": truncated[name],
                                                                       "answer_tokens": length[name]}),
                                     (f"task.{cfg.name}.{MEAN_TOKEN}", mean[name], {})):
            right = correct[name]
            p_right = np.where(right, conf, 1 - conf)
            sections[section][name] = Predictions(
                conf, right, right.astype(np.int64), rows,
                {"nll": -np.log(np.clip(p_right, np.finfo(np.float64).eps, 1.0)),
                 "brier": (conf - right) ** 2, **extra})
    return sections


def collect_tasks(models: Models, tokenizer: PreTrainedTokenizerBase,
                  tasks: list[Task]) -> dict[str, dict[str, Predictions]]:
    """Per-item predictions of every model on every task, by report section (`task.<name>`, ...)."""
    out: dict[str, dict[str, Predictions]] = {}
    for task in tasks:
        if task.config.kind == "multiple_choice":
            out[f"task.{task.config.name}"] = choice_predictions(*choice_probabilities(models, tokenizer, task))
        else:
            out.update(_free_text(models, tokenizer, task))
    return out
