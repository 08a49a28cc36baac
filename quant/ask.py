"""Ask a (quantized, possibly re-calibrated) model a question and say how sure it is, in words.

Multiple choice: the letters are scored exactly as the MMLU evaluation scores them, so the confidence is
the one whose calibration the report measured. Free text: a short greedy answer, banded by the mean
probability of its tokens. (Not by the least confident token: that is usually a phrasing choice. Measured
on SmolLM2-135M-Instruct, "The capital of France is Paris." has a first token "The" at 0.15 and " Paris" at
0.95.) Free-text confidence is a heuristic whose calibration calq does not measure. Below the abstention
threshold the answer is withheld.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from quant.confidence.bands import ABSTAIN, UNSURE, BandConfig, band_of
from quant.data import MCItem
from quant.errors import CalqError
from quant.checks import REFERENCE
from quant.checks.evaluation import LETTERS, encode_prompt, letter_scoring, letter_token_ids, mmlu_prompt, templated
from quant.checks.probing import answer_state
from quant.confidence.probe import Probe, signal_matrix
from quant.formats import load, load_probe, run_variants
from quant.formats.checkpoint import MANIFEST
from quant.models import ModelConfig, load_model


@dataclass(frozen=True)
class Answer:
    text: str | None
    """The answer; None when the model abstains."""
    confidence: float
    band: str
    alternatives: list[tuple[str, float]] = field(default_factory=list)
    """Runner-up answers (choices, or tokens at the least confident position) with their probabilities."""
    weakest_token: str | None = None  # free text only: the least confident token and its probability
    weakest_confidence: float | None = None
    internal: float | None = None
    """With a probe: the model's own confidence (`confidence` is then the probe's)."""
    probe_note: str | None = None
    """Why the checkpoint's probe was not applied, if it has one that was not."""

    def lines(self) -> list[str]:
        out = [f"answer: {self.text if self.text is not None else '(withheld)'}",
               f"confidence: {self.confidence:.2f}"
               + (f" (mean token probability; least confident token {self.weakest_token!r} "
                  f"{self.weakest_confidence:.2f})" if self.weakest_token is not None else "")
               + (f" (probe; the model's own: {self.internal:.2f})" if self.internal is not None else ""),
               f"band: {self.band}"]
        if self.probe_note:
            out.append(f"probe: {self.probe_note}")
        if self.alternatives:
            where = f" to {self.weakest_token!r}" if self.weakest_token is not None else ""
            out.append(f"alternatives{where}: " + ", ".join(f"{a!r} {p:.2f}" for a, p in self.alternatives))
        return out


def load_for_ask(path: str | Path, variant: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A run directory (with `variant`; "fp" is the recipe's own model), a calq checkpoint directory, or
    any model source `load_model` accepts."""
    path = Path(path).expanduser()
    if (path / "models").is_dir():
        names = run_variants(path)
        if variant == REFERENCE:
            recipe = json.loads((path / "recipe.json").read_text())
            return load_model(ModelConfig.model_validate(recipe["model"]))
        if variant not in names:
            raise CalqError(f"{path} is a run directory: pick a model with --variant "
                            f"({', '.join([REFERENCE, *names])})")
        return load(path, variant=variant)
    if variant is not None:
        raise CalqError(f"--variant {variant} needs a run directory; {path} is a single model")
    if (path / MANIFEST).is_file():
        return load(path)
    return load_model(ModelConfig(source=str(path)))


def probe_for_ask(path: str | Path, variant: str | None = None) -> Probe | None:
    """The confidence probe saved with the checkpoint `load_for_ask` loads, if any (full precision and other model
    sources have none)."""
    path = Path(path).expanduser()
    if (path / "models").is_dir() and variant != REFERENCE or (path / MANIFEST).is_file():
        return load_probe(path, variant)
    return None


@torch.inference_mode()
def _choice_answer(model: nn.Module, tokenizer: PreTrainedTokenizerBase, question: str, choices: list[str],
                   cfg: BandConfig, probe: Probe | None) -> Answer:
    if not 2 <= len(choices) <= len(LETTERS):
        raise CalqError(f"{len(choices)} choices given; multiple choice takes 2 to {len(LETTERS)}")
    chat = templated(tokenizer, True)
    item = MCItem("ask", "general knowledge", question, tuple(choices), -1)
    ids = torch.tensor([encode_prompt(tokenizer, mmlu_prompt(item, tokenizer, chat), chat)], device="cpu")
    logits, hidden = answer_state(model, ids, torch.ones_like(ids))
    probs = logits[0, letter_token_ids(tokenizer, chat)[:len(choices)]].softmax(-1)
    ranked = [(f"{LETTERS[i]}. {choices[i]}", float(probs[i])) for i in probs.argsort(descending=True).tolist()]
    best, internal = ranked[0]
    scoring = letter_scoring("zero-shot", chat)
    applied = probe is not None and probe.scoring == scoring
    conf = float(probe.predict(signal_matrix(probs[None].numpy(), hidden.numpy(), probe.signals))[0]) if applied \
        else internal
    note = f"not applied: fitted on {probe.scoring}, this answer is {scoring}" if probe and not applied else None
    band = band_of(conf, cfg)
    return Answer(None if band == ABSTAIN else best, conf, band, ranked[1:] if band == UNSURE else [],
                  internal=internal if applied else None, probe_note=note)


@torch.inference_mode()
def _free_answer(model: nn.Module, tokenizer: PreTrainedTokenizerBase, question: str, cfg: BandConfig,
                 max_new_tokens: int) -> Answer:
    chat = templated(tokenizer, True)
    prompt = (tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                            add_generation_prompt=True) if chat else f"Question: {question}\nAnswer:")
    ids = torch.tensor([encode_prompt(tokenizer, prompt, chat)], device="cpu")
    ids = ids.to(next(model.parameters()).device)
    eos = model.generation_config.eos_token_id
    stop = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop, default=0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=sorted(stop) or None, pad_token_id=pad,
                         output_logits=True, return_dict_in_generate=True, top_p=None, top_k=None,
                         temperature=None)
    tokens = out.sequences[0, ids.shape[1]:].cpu()
    keep = [i for i, t in enumerate(tokens.tolist()) if t not in stop]  # the stop token is not the answer
    if not keep:
        return Answer(None, 0.0, ABSTAIN)
    probs = torch.stack([out.logits[i][0].float().softmax(-1).cpu() for i in keep])
    token_conf = probs[torch.arange(len(keep), device=probs.device), tokens[keep]]  # the model's own (raw) probability of each token
    weakest = int(token_conf.argmin())
    decode = functools.partial(tokenizer.decode, clean_up_tokenization_spaces=False)
    conf = float(token_conf.mean())
    band = band_of(conf, cfg)
    alternatives = []
    if band == UNSURE:
        top = probs[weakest].topk(4)
        alternatives = [(decode([t]), float(p)) for p, t in zip(top.values, top.indices)
                        if t != tokens[keep[weakest]]][:3]
    text = decode(tokens[keep], skip_special_tokens=True).strip()
    return Answer(None if band == ABSTAIN else text, conf, band, alternatives, decode([tokens[keep[weakest]]]),
                  float(token_conf[weakest]))


def ask(model: nn.Module, tokenizer: PreTrainedTokenizerBase, question: str, choices: list[str] | None = None,
        cfg: BandConfig = BandConfig(), max_new_tokens: int = 48, probe: Probe | None = None) -> Answer:
    """Answer `question` (multiple choice when `choices` are given) with its confidence and band. With a `probe`
    fitted on answers scored as this one is, its confidence is the one banded (the model's own is shown too)."""
    if choices:
        return _choice_answer(model, tokenizer, question, choices, cfg, probe)
    answer = _free_answer(model, tokenizer, question, cfg, max_new_tokens)
    return answer if probe is None else replace(answer, probe_note=f"not applied: fitted on {probe.scoring}, this "
                                                                   "answer is free text")
