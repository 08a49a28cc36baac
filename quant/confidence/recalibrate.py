"""Post-quantization temperature re-calibration, folded into the checkpoint.

Quantization moves a model's confidence. One scalar temperature T (logits / T) fixes most of it:
- `labelled`: T minimizes next-token NLL on calibration text (never the evaluation split);
- `label_free`: T minimizes KL(full precision || quantized / T) on positions where both models agree
  on the top token: the full-precision model is the reference, no labels needed (DACA: the confidence half of
  Dual-Align);
- `dual_align`: `label_free` plus the process half of Dual-Align, where quantization moved the decision itself.
  Both models' residual streams are read out at every layer through their own final norm and head (the logit
  lens); the Jensen-Shannon divergence between the two readouts, averaged over positions, gives a profile over
  depth, and the *peak divergence layer* l* is where it rises most from one layer to the next. On the positions
  where the two models' top tokens disagree (which `label_free` leaves out), the quantized readouts of layers
  l*..L are pulled toward full precision's at the same layer. A folded T scales every layer's readout alike,
  so one temperature minimizes
      f(T) = mean_agree CE(p_fp,L, softmax(z_q,L / T)) + w * mean_{disagree, l >= l*} CE(p_fp,l, softmax(z_q,l / T))
  (w = `process_weight`; CE differs from KL by full precision's entropy, a constant in T). Every term is the
  same convex function of 1/T as label_free's, so the same solver fits it; with no disagreeing position the
  second term is empty and the fit is label_free's exactly. The published description leaves the loss open;
  this is the reading calq implements: the peak layer is where the two processes part, and after it a single
  T can only align confidence, so the disagreeing positions contribute their alignment from there on.
T is folded into the final norm's weight (the head's product is linear in it; a constant scale after the head,
Cohere's or Granite's, commutes with it), so every runtime that loads the checkpoint applies it without knowing
about calq. Under final-logit soft-capping, cap(z) / T = cap'(z / T) with cap' = cap / T, so the config's cap is
divided by T too: still exact, and written to config.json with the checkpoint.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from quant.errors import CalqError
from quant.models import Readout, final_norm, fold_scales, logit_map
from quant.schema import StrictModel

Method = Literal["labelled", "label_free", "dual_align"]
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
    process_weight: float = Field(1.0, ge=0)
    """dual_align: the weight w of the process term (0: label_free's fit)."""
    profile_positions: int = Field(512, ge=16)
    """dual_align: fit positions whose every layer is read out for the divergence profile (each costs a
    projection onto the vocabulary per layer and model); the process rows are capped at `positions`."""

    @property
    def needs_reference(self) -> bool:
        return self.method != "labelled"


@dataclass(frozen=True)
class Process:
    """What dual_align's process half saw."""

    js_by_layer: list[float]
    """Mean Jensen-Shannon divergence (nats) between the two models' readouts, layer 0 (embeddings) to L."""
    peak_layer: int
    disagree: int
    """Fit positions where the two models' top tokens differ."""
    rows: int
    """Readouts (position, layer) in the process term: disagreeing positions x layers peak..L, capped."""
    weight: float


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    method: Method
    positions: int
    objective_before: float  # the fitted objective at T = 1 ...
    objective_after: float  # ... and at the fitted T
    at_bound: bool = False
    """The search ended at a bound of T_BOUNDS: the best temperature may lie outside (shown in the report)."""
    process: Process | None = None
    """dual_align only."""


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


def fit_positions(samples: list[Tensor], cfg: RecalibrateConfig) -> list[tuple[Tensor, Tensor]]:
    """(sample, sorted positions) pairs the fit reads: the same for every model given the same samples."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # positions: host-side index arithmetic
    samples = samples[::-(-len(samples) // cfg.max_samples)]  # ceil division: at most max_samples, spread out
    per_sample = max(cfg.positions // len(samples), 1)
    return [(ids, torch.randperm(len(ids) - 1, generator=gen, device="cpu")[:per_sample].sort().values) for ids in samples]


@dataclass
class States:
    """A model at the fit positions, on CPU."""

    logits: list[Tensor]
    """Per sample, float16 (positions, vocab): 4096 x 49k vocab = 400 MB."""
    hidden: list[Tensor] | None = None
    """dual_align: per sample, float16 (layers + 1, positions, hidden), every layer's residual stream there."""
    readout: Readout | None = None
    """dual_align: the model's own tail, to read `hidden` out."""


@torch.inference_mode()
def _states_at(model: nn.Module, picks: list[tuple[Tensor, Tensor]], desc: str, layers: bool) -> States:
    """`model` at each pick's positions; the output head runs at those positions only."""
    device = next(model.parameters()).device
    logits, hidden = [], []
    for ids, pos in tqdm(picks, desc=desc, unit="sample", leave=False):
        pos = pos.to(device)
        out = model(input_ids=ids[None, :-1].to(device), use_cache=False, logits_to_keep=pos,
                    output_hidden_states=layers)
        logits.append(out.logits[0].half().cpu())
        if layers:
            hidden.append(torch.stack([h[0, pos] for h in out.hidden_states]).half().cpu())
    if not layers:
        return States(logits)
    return States(logits, hidden, Readout(model, "dual_align re-calibration", "use recalibrate.method: label_free"))


def reference_logits(reference: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig) -> States:
    """The full-precision model at the fit positions: computed once, it serves the fit of every variant
    (`fit_temperature(..., reference=this)`)."""
    return _states_at(reference, fit_positions(samples, cfg), "reference logits", cfg.method == "dual_align")


def _collect(model: nn.Module, reference: States | None, samples: list[Tensor], cfg: RecalibrateConfig):
    """`model` at the fit positions, its logits there, and the fit target: the next token, or the reference's
    probabilities reduced to what the objective needs (p_ref . z and the agreement mask)."""
    picks = fit_positions(samples, cfg)
    if reference is not None and ([len(r) for r in reference.logits] != [len(pos) for _, pos in picks]
                                  or (reference.hidden is None) == (cfg.method == "dual_align")):
        raise ValueError("the reference logits were computed on other samples or another recalibrate config; "
                         "compute them with reference_logits on the same ones")
    states = _states_at(model, picks, f"fit temperature ({cfg.method})", cfg.method == "dual_align")
    targets, agree = [], []
    for i, ((ids, pos), z) in enumerate(zip(picks, states.logits)):
        if reference is None:
            targets.append(ids[1:][pos])
            agree.append(torch.ones(len(pos), dtype=torch.bool, device="cpu"))
        else:
            p_ref = reference.logits[i].float().softmax(-1)
            targets.append(_cross_target(p_ref, z))
            agree.append(p_ref.argmax(-1) == z.argmax(-1))
    return states, torch.cat(states.logits), torch.cat(targets), torch.cat(agree)


def _cross_target(p_ref: Tensor, z: Tensor) -> Tensor:
    """p_ref . z per row: cross-entropy(p_ref, softmax(z/T)) = lse(z/T) - (p_ref . z)/T."""
    return (p_ref * z.float()).sum(-1)


@torch.inference_mode()
def _js(z_a: Tensor, z_b: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between softmax(z_a) and softmax(z_b), per row."""
    la, lb = z_a.float().log_softmax(-1), z_b.float().log_softmax(-1)
    lm = torch.logaddexp(la, lb) - math.log(2)
    return 0.5 * ((la.exp() * (la - lm)).sum(-1) + (lb.exp() * (lb - lm)).sum(-1))


@torch.inference_mode()
def _readouts(states: States, flat: Tensor, rows: Tensor, layer: int) -> Tensor:
    """Logits of the fit positions `rows` read out at `layer`; `flat` is states.hidden joined over the samples
    (layers + 1, positions, hidden), so `rows` index the positions as `agree` does."""
    device = next(states.readout.head.parameters()).device
    return states.readout(flat[layer, rows].to(device).float(), last=layer == len(flat) - 1).cpu()


def _process_rows(states: States, reference: States, agree: Tensor, cfg: RecalibrateConfig, chunk: int = 256
                  ) -> tuple[Tensor, Tensor, Process]:
    """dual_align's process term: the divergence profile over depth, its peak layer, and the quantized readouts
    (with their p_ref . z targets) of the disagreeing positions at layers peak..L."""
    layers = len(states.hidden[0])
    flat_q, flat_ref = torch.cat(states.hidden, 1), torch.cat(reference.hidden, 1)  # once, not per chunk
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    profile = torch.randperm(len(agree), generator=gen, device="cpu")[:cfg.profile_positions].sort().values
    js = []
    for layer in tqdm(range(layers), desc="dual_align profile", unit="layer", leave=False):
        total = 0.0
        for i in range(0, len(profile), chunk):
            rows = profile[i:i + chunk]
            total += float(_js(_readouts(reference, flat_ref, rows, layer), _readouts(states, flat_q, rows, layer)).sum())
        js.append(total / len(profile))
    peak = 1 + int(torch.tensor(js).diff().argmax())
    disagree = torch.nonzero(~agree)[:, 0]
    per_layer = max(cfg.positions // (layers - peak), 1)
    chosen = disagree[torch.randperm(len(disagree), generator=gen, device="cpu")[:per_layer]].sort().values
    z, target = [], []
    for layer in range(peak, layers):
        for i in range(0, len(chosen), chunk):
            rows = chosen[i:i + chunk]
            zq = _readouts(states, flat_q, rows, layer)
            z.append(zq.half())
            target.append(_cross_target(_readouts(reference, flat_ref, rows, layer).softmax(-1), zq.half()))
    vocab = states.logits[0].shape[-1]
    z = torch.cat(z) if z else torch.empty(0, vocab, dtype=torch.half)
    target = torch.cat(target) if target else torch.empty(0)
    return z, target, Process(js, peak, len(disagree), len(z), cfg.process_weight)


def _derivatives(z: Tensor, target: Tensor, labelled: bool, beta: float, weights: Tensor | None = None,
                 chunk: int = 256) -> tuple[float, float, float]:
    """The objective f(beta) = mean(lse(beta z) - beta t) at inverse temperature beta and its first two derivatives,
    in one pass: f' = mean(E_p[z] - t), f'' = mean(Var_p[z]) >= 0 (p = softmax(beta z)), so f is convex in beta.
    t is the target's logit (labelled) or p_ref . z (label_free: cross-entropy to the reference up to a constant).
    `weights` (one per row, summing to 1) replace the mean's 1/len(z) (dual_align's two terms)."""
    if weights is None:
        weights = torch.full((len(z),), 1 / len(z), dtype=torch.float64, device=z.device)
    f = d1 = d2 = 0.0
    for i in range(0, len(z), chunk):
        zi, wi = z[i:i + chunk].float(), weights[i:i + chunk]
        t = zi.gather(-1, target[i:i + chunk, None])[:, 0] if labelled else target[i:i + chunk]
        top = zi.amax(-1, keepdim=True)
        w = zi.sub(top).mul_(beta).exp_()  # softmax weights, unnormalised: one exp per logit
        total = w.sum(-1)
        first = w.mul_(zi).sum(-1) / total
        second = w.mul_(zi).sum(-1) / total
        f += float(((beta * top[:, 0] + total.log() - beta * t).double() * wi).sum())
        d1 += float(((first - t).double() * wi).sum())
        d2 += float(((second - first * first).clamp(min=0).double() * wi).sum())
    return f, d1, d2


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


Reference = nn.Module | States
"""The full-precision model, or its states from `reference_logits` on the same samples and config."""


@dataclass(frozen=True)
class FitRows:
    """What a temperature is fitted on: logits (rows, vocab), their targets and each row's weight."""

    z: Tensor
    target: Tensor
    weights: Tensor | None = None
    """None: the plain mean."""
    process: Process | None = None


def fit_rows(model: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig,
             reference: Reference | None = None) -> FitRows:
    """The rows `cfg.method`'s objective sums over. `reference` is required for label_free and dual_align."""
    if cfg.needs_reference != (reference is not None):
        raise ValueError(f"{cfg.method} re-calibration needs the full-precision reference model" if cfg.needs_reference
                         else "labelled re-calibration takes no reference model")
    if isinstance(reference, nn.Module):
        reference = reference_logits(reference, samples, cfg)
    states, z, target, agree = _collect(model, reference, samples, cfg)
    if cfg.method != "dual_align":
        return FitRows(z[agree], target[agree])
    pz, ptarget, process = _process_rows(states, reference, agree, cfg)
    n_agree = int(agree.sum())
    weights = torch.cat([torch.full((n_agree,), 1 / max(n_agree, 1), dtype=torch.float64, device="cpu"),
                         torch.full((len(pz),), cfg.process_weight / max(len(pz), 1), dtype=torch.float64,
                                    device="cpu")])
    return FitRows(torch.cat([z[agree], pz]), torch.cat([target[agree], ptarget]), weights / weights.sum(), process)


def fit_temperature(model: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig,
                    reference: Reference | None = None) -> TemperatureFit:
    """Fit T on calibration samples. `reference` is required for label_free and dual_align."""
    rows = fit_rows(model, samples, cfg, reference)
    fit = solve_temperature(rows.z, rows.target, cfg.method, rows.weights)
    return replace(fit, process=rows.process)


def solve_temperature(z: Tensor, target: Tensor, method: Method, weights: Tensor | None = None) -> TemperatureFit:
    """The temperature minimizing the objective over logits `z` (rows, vocab) and their targets (next tokens,
    labelled; p_ref . z per row otherwise), searched within T_BOUNDS."""
    if len(z) < 16:
        raise CalqError(f"only {len(z)} usable positions to fit a temperature; add calibration samples")
    fd = lambda beta: _derivatives(z, target, method == "labelled", beta, weights)  # noqa: E731
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
