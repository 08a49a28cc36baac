"""Post-quantization temperature re-calibration, folded into the checkpoint.

Quantization moves a model's confidence. One scalar temperature T (logits / T) fixes most of it:
- `labelled`: T minimizes next-token NLL on calibration text (never the evaluation split);
- `label_free`: T minimizes KL(full precision || quantized / T) on positions where both models agree
  on the top token: the full-precision model is the reference, no labels needed (the idea of DACA /
  Dual-Align).
T is folded into the final norm's weight (the head's product is linear in it; a constant scale after the head,
Cohere's or Granite's, commutes with it), so every runtime that loads the checkpoint applies it without knowing
about calq. Under final-logit soft-capping, cap(z) / T = cap'(z / T) with cap' = cap / T, so the config's cap is
divided by T too: still exact, and written to config.json with the checkpoint.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from quant.errors import CalqError
from quant.models import final_norm, fold_scales, logit_map
from quant.schema import StrictModel

Method = Literal["labelled", "label_free"]
SUFFIX = "+T"
"""Appended to a variant's name for its re-calibrated copy (`w4a16-g128` -> `w4a16-g128+T`)."""


class RecalibrateConfig(StrictModel):
    method: Method = "label_free"
    positions: int = Field(4096, ge=64)
    """Token positions sampled from the calibration samples for the fit (logits are kept for these)."""
    max_samples: int = Field(64, ge=1)
    """Calibration samples the positions come from (evenly spaced over the selection): each costs a forward
    pass of the model (label_free: and of the reference, once for all variants), so fewer samples with more
    positions each."""
    seed: int = 0


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    method: Method
    positions: int
    objective_before: float  # the fitted objective at T = 1 ...
    objective_after: float  # ... and at the fitted T
    at_bound: bool = False
    """The search ended at a bound of T_BOUNDS: the best temperature may lie outside (shown in the report)."""


T_BOUNDS = (0.25, 4.0)
"""Temperatures searched; a fit that ends at a bound is reported as such (TemperatureFit.at_bound)."""


@torch.no_grad()
def apply_temperature(model: nn.Module, temperature: float) -> None:
    """Divide the model's logits by `temperature`, in place, by scaling its final norm (and the soft-cap, if any)."""
    norm = final_norm(model, "folding a temperature", "set recalibrate: null for this model")
    fold_scales(norm, [], torch.full((norm.weight.numel(),), float(temperature), device=norm.weight.device))
    cap = logit_map(model).cap
    if cap is not None:
        model.config.final_logit_softcapping = cap / float(temperature)


def _fit_positions(samples: list[Tensor], cfg: RecalibrateConfig) -> list[tuple[Tensor, Tensor]]:
    """(sample, sorted positions) pairs the fit reads: the same for every model given the same samples."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # positions: host-side index arithmetic
    samples = samples[::-(-len(samples) // cfg.max_samples)]  # ceil division: at most max_samples, spread out
    per_sample = max(cfg.positions // len(samples), 1)
    return [(ids, torch.randperm(len(ids) - 1, generator=gen, device="cpu")[:per_sample].sort().values) for ids in samples]


@torch.inference_mode()
def _logits_at(model: nn.Module, picks: list[tuple[Tensor, Tensor]], desc: str) -> list[Tensor]:
    """float16 logits (positions, vocab) of `model` at each pick's positions (4096 x 49k vocab = 400 MB), on CPU;
    the output head runs at those positions only."""
    device = next(model.parameters()).device
    return [model(input_ids=ids[None, :-1].to(device), use_cache=False,
                  logits_to_keep=pos.to(device)).logits[0].half().cpu()
            for ids, pos in tqdm(picks, desc=desc, unit="sample", leave=False)]


def reference_logits(reference: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig) -> list[Tensor]:
    """The full-precision model's logits at the fit positions: computed once, they serve the label-free fit
    of every variant (`fit_temperature(..., reference=these)`)."""
    return _logits_at(reference, _fit_positions(samples, cfg), "reference logits")


def _collect(model: nn.Module, reference: list[Tensor] | None, samples: list[Tensor], cfg: RecalibrateConfig):
    """Logits of `model` at the fit positions, plus the fit target: the next token, or the reference's
    probabilities reduced to what the objective needs (p_ref . z and the agreement mask)."""
    picks = _fit_positions(samples, cfg)
    if reference is not None and [len(r) for r in reference] != [len(pos) for _, pos in picks]:
        raise ValueError("the reference logits were computed on other samples or another recalibrate config; "
                         "compute them with reference_logits on the same ones")
    logits = _logits_at(model, picks, f"fit temperature ({cfg.method})")
    targets, agree = [], []
    for i, ((ids, pos), z) in enumerate(zip(picks, logits)):
        if reference is None:
            targets.append(ids[1:][pos])
            agree.append(torch.ones(len(pos), dtype=torch.bool, device="cpu"))
        else:
            p_ref = reference[i].float().softmax(-1)
            targets.append((p_ref * z.float()).sum(-1))  # cross-entropy(p_ref, softmax(z/T)) = lse(z/T) - (p_ref.z)/T
            agree.append(p_ref.argmax(-1) == z.argmax(-1))
    return torch.cat(logits), torch.cat(targets), torch.cat(agree)


def _derivatives(z: Tensor, target: Tensor, labelled: bool, beta: float, chunk: int = 256) -> tuple[float, float, float]:
    """The objective f(beta) = mean(lse(beta z) - beta t) at inverse temperature beta and its first two derivatives,
    in one pass: f' = mean(E_p[z] - t), f'' = mean(Var_p[z]) >= 0 (p = softmax(beta z)), so f is convex in beta.
    t is the target's logit (labelled) or p_ref . z (label_free: cross-entropy to the reference up to a constant)."""
    f = d1 = d2 = 0.0
    for i in range(0, len(z), chunk):
        zi = z[i:i + chunk].float()
        t = zi.gather(-1, target[i:i + chunk, None])[:, 0] if labelled else target[i:i + chunk]
        top = zi.amax(-1, keepdim=True)
        w = zi.sub(top).mul_(beta).exp_()  # softmax weights, unnormalised: one exp per logit
        total = w.sum(-1)
        first = w.mul_(zi).sum(-1) / total
        second = w.mul_(zi).sum(-1) / total
        f += float((beta * top[:, 0] + total.log() - beta * t).sum())
        d1 += float((first - t).sum())
        d2 += float((second - first * first).clamp(min=0).sum())
    return f / len(z), d1 / len(z), d2 / len(z)


def _minimize_convex(fd, lo: float, hi: float, rtol: float = 1e-7, max_steps: int = 60
                     ) -> tuple[float, float, float]:
    """(argmin, f there, f at the start 1) of a convex f on [lo, hi] from f' and f'' (`fd` returns all three):
    Newton steps kept inside a bracket of the sign change of f', bisecting where a step would leave it (rtsafe);
    4-6 passes over the logits where a derivative-free search takes ~20."""
    beta, start = min(max(1.0, lo), hi), None
    for _ in range(max_steps):
        f, d1, d2 = fd(beta)
        start = f if start is None else start
        if d1 > 0:
            hi = beta
        else:
            lo = beta
        new = beta - d1 / d2 if d2 > 0 else math.inf
        if not lo < new < hi:
            new = (lo + hi) / 2
        if abs(new - beta) <= rtol * beta:
            break
        beta = new
    return beta, f, start


Reference = nn.Module | list[Tensor]
"""The full-precision model, or its logits from `reference_logits` on the same samples and config."""


def fit_temperature(model: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig,
                    reference: Reference | None = None) -> TemperatureFit:
    """Fit T on calibration samples. `reference` is required for label_free."""
    if (cfg.method == "label_free") != (reference is not None):
        raise ValueError("label_free re-calibration needs the full-precision reference model; labelled needs none")
    if isinstance(reference, nn.Module):
        reference = reference_logits(reference, samples, cfg)
    z, target, agree = _collect(model, reference, samples, cfg)
    return solve_temperature(z[agree], target[agree], cfg.method)


def solve_temperature(z: Tensor, target: Tensor, method: Method) -> TemperatureFit:
    """The temperature minimizing the objective over logits `z` (positions, vocab) and their targets (next tokens,
    labelled; p_ref . z per position, label_free), searched within T_BOUNDS."""
    if len(z) < 16:
        raise CalqError(f"only {len(z)} usable positions to fit a temperature; add calibration samples")
    fd = lambda beta: _derivatives(z, target, method == "labelled", beta)  # noqa: E731
    lo, hi = 1 / T_BOUNDS[1], 1 / T_BOUNDS[0]
    beta, after, before = _minimize_convex(fd, lo, hi)
    at_bound = min(abs(math.log(beta / lo)), abs(math.log(beta / hi))) < 1e-3
    return TemperatureFit(1 / beta, method, len(z), before, after, at_bound)


@dataclass(frozen=True)
class Tempered:
    """Another model's logits divided by a temperature: what folding T into its final norm gives
    (quant.recalibrate), evaluated from the base model's forward pass instead of a second one."""

    base: str
    temperature: float


Models = dict[str, nn.Module | Tempered]
"""Models to evaluate by name; a `Tempered` entry names another entry's module as its base."""


def forward_groups(models: Models) -> list[tuple[nn.Module, list[tuple[str, float]]]]:
    """One entry per module to run: the module and the (name, temperature) views read from its logits."""
    views: dict[str, list[tuple[str, float]]] = {n: [(n, 1.0)] for n, m in models.items() if isinstance(m, nn.Module)}
    for name, m in models.items():
        if isinstance(m, Tempered):
            if m.base not in views:
                raise ValueError(f"{name!r} is tempered from {m.base!r}, which is not a module among the models")
            views[m.base].append((name, m.temperature))
    return [(models[base], v) for base, v in views.items()]


@dataclass
class Recalibrated:
    model: nn.Module
    fit: TemperatureFit


def recalibrate(model: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig,
                reference: Reference | None = None) -> Recalibrated:
    """A copy of `model` with the temperature fitted on `samples` folded in (the input is not modified)."""
    fit = fit_temperature(model, samples, cfg, reference)
    return Recalibrated(folded(model, fit.temperature), fit)


def folded(model: nn.Module, temperature: float) -> nn.Module:
    """A copy of `model` with `temperature` folded in (the input is not modified)."""
    calibrated = copy.deepcopy(model)
    apply_temperature(calibrated, temperature)
    return calibrated
