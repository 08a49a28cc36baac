"""Post-quantization re-calibration of confidence, folded into the checkpoint.

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
- `direction`: not a temperature but a step along the *calibration direction* ("Calibration Across Layers", 2025:
  the final layers of an LLM correct its confidence along a low-dimensional direction of the residual stream).
  The direction d is full precision's: the top right singular vector of its successive updates h_{l+1} - h_l over
  the last `direction_layers` layers at the fit positions (signed along their sum). The quantized model's residual
  stream entering the final norm, h, becomes h + alpha * s * d (s: its median norm, so alpha is in typical norms),
  with the scalar alpha minimizing
      label_free: mean_agree CE(p_fp, softmax(readout(h + alpha s d)))    labelled: mean NLL(next token)
  over |alpha| <= 1 (a bounded scalar search: the readout passes through the norm, so this is not convex in alpha).
  If the optimum changes more than `max_top1_change` of the fit positions' top-1 tokens, the step is cut back to the
  longest that does not (the best allowed step if the objective is unimodal along the segment). The step
  is the bias of the last decoder layer's down projection, whose output is added to h: with the config's
  `mlp_bias` on (zero biases on every other MLP projection) transformers, vLLM and llama.cpp apply it without calq.
  A model whose config has no such switch is refused, and the fit checks on one sample that the folded model
  computes what was fitted. With the quantized model equal to full precision, alpha is 0.
T is folded into the final norm's weight (the head's product is linear in it; a constant scale after the head,
Cohere's or Granite's, commutes with it), so every runtime that loads the checkpoint applies it without knowing
about calq. Under final-logit soft-capping, cap(z) / T = cap'(z / T) with cap' = cap / T, so the config's cap is
divided by T too: still exact, and written to config.json with the checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

import torch
from accelerate import init_empty_weights
from pydantic import Field
from scipy.optimize import minimize_scalar
from torch import Tensor, nn
from tqdm.auto import tqdm

from quant.errors import CalqError
from quant.models import Readout, decoder_layers, final_norm, fold_scales, logit_map
from quant.schema import StrictModel

Method = Literal["labelled", "label_free", "dual_align", "direction"]
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

    direction_layers: int = Field(4, ge=1)
    """direction: the final layers whose successive updates of full precision's residual stream define the
    calibration direction (all of them in a shallower model)."""
    direction_target: Literal["label_free", "labelled"] = "label_free"
    """direction: fit the step to full precision's distribution where both models agree, or to the next token."""
    max_top1_change: float = Field(0.0, ge=0, le=1)
    """direction: the share of fit positions whose top-1 token the step may change; a longer optimum is shortened
    until it holds (shown in the report)."""

    @property
    def needs_reference(self) -> bool:
        """label_free and dual_align fit against full precision; direction takes its direction from it."""
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

    def fold(self, model: nn.Module) -> nn.Module:
        """A copy of `model` with the temperature in its final norm (the input is not modified)."""
        return folded(model, self.temperature)

    def view(self, base: str, model: nn.Module) -> Tempered:
        """What the evaluation runs for the re-calibrated variant: its base's logits divided by T, no second pass."""
        return Tempered(base, self.temperature)

    def metadata(self) -> dict[str, str]:
        return {"calq_temperature": repr(self.temperature)}

    def summary(self) -> dict:
        return asdict(self)


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
    residual: list[Tensor] | None = None
    """direction: per sample, float32 (r, positions, hidden; the step is fitted on them, and float16 would move
    near-tied top-1 tokens): the residual stream of the last r - 1 layers' inputs
    and the one entering the final norm (what transformers' hidden states leave out: their last is normed)."""


@torch.inference_mode()
def _states_at(model: nn.Module, picks: list[tuple[Tensor, Tensor]], desc: str, layers: bool, residual: int = 0
               ) -> States:
    """`model` at each pick's positions; the output head runs at those positions only. `layers`: every layer's
    hidden state too (dual_align); `residual`: the last `residual` pre-norm residual streams (direction)."""
    device = next(model.parameters()).device
    logits, hidden, streams, entering = [], [], [], []
    hook = None
    if residual:
        norm = final_norm(model, "the calibration direction", "use recalibrate.method: label_free")
        hook = norm.register_forward_pre_hook(lambda _, args: entering.append(args[0]))
    try:
        for ids, pos in tqdm(picks, desc=desc, unit="sample", leave=False):
            pos = pos.to(device)
            out = model(input_ids=ids[None, :-1].to(device), use_cache=False, logits_to_keep=pos,
                        output_hidden_states=layers or residual > 1)
            logits.append(out.logits[0].half().cpu())
            if layers:
                hidden.append(torch.stack([h[0, pos] for h in out.hidden_states]).half().cpu())
            if residual:
                before = out.hidden_states[max(len(out.hidden_states) - residual, 0):-1] if residual > 1 else ()
                streams.append(torch.stack([h[0, pos] for h in (*before, entering.pop())]).float().cpu())
    finally:
        if hook is not None:
            hook.remove()
    readout = Readout(model, "dual_align re-calibration", "use recalibrate.method: label_free") if layers else None
    return States(logits, hidden if layers else None, readout, streams if residual else None)


def reference_logits(reference: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig) -> States:
    """The full-precision model at the fit positions: computed once, it serves the fit of every variant
    (`fit_temperature(..., reference=this)`)."""
    return _states_at(reference, fit_positions(samples, cfg), "reference logits", cfg.method == "dual_align",
                      cfg.direction_layers + 1 if cfg.method == "direction" else 0)


def _check_reference(reference: States | None, picks: list[tuple[Tensor, Tensor]], cfg: RecalibrateConfig) -> None:
    if reference is not None and ([len(r) for r in reference.logits] != [len(pos) for _, pos in picks]
                                  or (reference.hidden is None) == (cfg.method == "dual_align")
                                  or (reference.residual is None) == (cfg.method == "direction")):
        raise ValueError("the reference logits were computed on other samples or another recalibrate config; "
                         "compute them with reference_logits on the same ones")


def _collect(model: nn.Module, reference: States | None, samples: list[Tensor], cfg: RecalibrateConfig):
    """`model` at the fit positions, its logits there, and the fit target: the next token, or the reference's
    probabilities reduced to what the objective needs (p_ref . z and the agreement mask)."""
    picks = fit_positions(samples, cfg)
    _check_reference(reference, picks, cfg)
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


DIRECTION_BOUND = 1.0
"""Steps along the calibration direction searched: |alpha| <= this many typical residual norms (DirectionFit.scale)."""


@dataclass(frozen=True)
class DirectionFit:
    """A step along full precision's calibration direction, added to the residual stream entering the final norm."""

    target: Literal["label_free", "labelled"]
    alpha: float
    """The step, in units of `scale`."""
    scale: float
    """Median norm of the quantized model's residual stream entering the final norm, at the fit positions."""
    explained: float
    """The direction's share of the energy of the final layers' updates (its singular value squared over all)."""
    layers: int
    """Final layers whose updates gave the direction."""
    layer: str
    """The linear whose bias carries the step: the last decoder layer's down projection."""
    positions: int
    objective_before: float  # at alpha = 0 ...
    objective_after: float  # ... and at the fitted alpha
    top1_changed: float
    """Share of the fit positions whose top-1 token the step changes (at most max_top1_change)."""
    shortened: bool
    """The objective's optimum changed more top-1 tokens than allowed: the step was cut back to the longest that
    does not."""
    optimum: tuple[float, float]
    """(alpha, share of top-1 tokens changed) at the objective's optimum, before any shortening."""
    at_bound: bool
    vector: Tensor = field(repr=False, compare=False)
    """alpha * scale * direction, float32 (hidden,): the bias added."""
    method: Literal["direction"] = "direction"

    def fold(self, model: nn.Module) -> nn.Module:
        """A copy of `model` with the step in its checkpoint (the input is not modified)."""
        repaired = copy.deepcopy(model)
        apply_direction(repaired, self.vector, self.layer)
        return repaired

    def view(self, base: str, model: nn.Module) -> nn.Module:
        """What the evaluation runs for the repaired variant: the folded copy (a step is not a view of logits)."""
        return self.fold(model)

    def metadata(self) -> dict[str, str]:
        return {"calq_direction": json.dumps(self.summary())}

    def summary(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "vector"}


def calibration_direction(residual: list[Tensor]) -> tuple[Tensor, float]:
    """The unit direction along which the final layers update the residual stream most: the top right singular
    vector of the successive differences h_{l+1} - h_l over the fit positions, signed along their sum, and its share
    of their energy. `residual` is the reference's States.residual."""
    updates = torch.cat([r.float().diff(dim=0).flatten(0, 1) for r in residual]).double()
    values, vectors = torch.linalg.eigh(updates.T @ updates)
    direction = vectors[:, -1]
    if float((updates @ direction).sum()) < 0:
        direction = -direction
    return direction.float(), float(values[-1] / values.sum().clamp(min=1e-300))


def _mlp_biases(model: nn.Module) -> list[str]:
    """The linears that the config's `mlp_bias` switch gives a bias (built on the meta device, so no table)."""
    found = []
    for flag in (False, True):
        config = copy.deepcopy(model.config)
        config.mlp_bias = flag
        with torch.device("cpu"), init_empty_weights():
            skeleton = type(model)(config)
        found.append({n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and m.bias is not None})
    return sorted(found[1] - found[0])


def direction_carrier(model: nn.Module) -> str:
    """The linear whose bias adds to the residual stream entering the final norm: the last decoder layer's down
    projection, with a bias as the config's `mlp_bias` builds it, so transformers, vLLM and llama.cpp load it."""
    config = model.config
    if not hasattr(config, "mlp_bias"):
        raise CalqError(f"recalibrate.method direction: {config.model_type} has no mlp_bias switch in its config, so a "
                        "bias on its last down projection would not load in transformers or vLLM; use "
                        "recalibrate.method: label_free")
    last = decoder_layers(model)[-1].name + "."
    carriers = [n for n in _mlp_biases(model)
                if n.startswith(last) and model.get_submodule(n).out_features == config.hidden_size]
    if len(carriers) != 1:
        raise CalqError(f"recalibrate.method direction: {type(model).__name__}'s mlp_bias gives {len(carriers)} "
                        "projections back to the residual stream in the last layer, not one; use "
                        "recalibrate.method: label_free")
    return carriers[0]


@torch.no_grad()
def apply_direction(model: nn.Module, vector: Tensor, layer: str) -> None:
    """Add `vector` to the residual stream entering the final norm, in place, as the bias of `layer`: config.mlp_bias
    is switched on and every other projection it gives a bias gets a zero one, so the checkpoint loads as saved."""
    for name in _mlp_biases(model):
        module = model.get_submodule(name)
        if module.bias is None:
            like = next(t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point())
            zeros = torch.zeros(module.out_features, dtype=like.dtype, device=like.device)
            module.bias = nn.Parameter(zeros, requires_grad=False) if isinstance(module, nn.Linear) else zeros
    model.config.mlp_bias = True
    carrier = model.get_submodule(layer)
    carrier.bias.add_(vector.to(carrier.bias))


@torch.inference_mode()
def fit_direction(model: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig, reference: Reference
                  ) -> DirectionFit:
    """The step along full precision's calibration direction that best aligns `model`'s confidence (cfg.direction_target),
    changing at most cfg.max_top1_change of the fit positions' top-1 tokens."""
    layer = direction_carrier(model)  # refused before any forward pass
    if isinstance(reference, nn.Module):
        reference = reference_logits(reference, samples, cfg)
    picks = fit_positions(samples, cfg)
    _check_reference(reference, picks, cfg)
    h = torch.cat([r[-1] for r in _states_at(model, picks, "fit direction", False, residual=1).residual])
    direction, explained = calibration_direction(reference.residual)
    scale = float(h.float().norm(dim=-1).median())
    readout = Readout(model, "the calibration direction", "use recalibrate.method: label_free")
    device = next(readout.head.parameters()).device
    labels = torch.cat([ids[1:][pos] for ids, pos in picks])
    p_ref = torch.cat(reference.logits)  # float16; softmax per chunk

    def logits(rows: slice, alpha: float) -> Tensor:
        return readout((h[rows].float() + alpha * scale * direction).to(device), last=False).cpu()

    top = torch.cat([logits(slice(i, i + 256), 0.0).argmax(-1) for i in range(0, len(h), 256)])
    agree = p_ref.argmax(-1) == top
    rows = agree if cfg.direction_target == "label_free" else torch.ones_like(agree)
    if int(rows.sum()) < 16:
        raise CalqError(f"only {int(rows.sum())} usable positions to fit a calibration direction; add calibration "
                        "samples")

    def evaluate(alpha: float) -> tuple[float, float]:
        """(objective, share of top-1 tokens changed) at step alpha."""
        total, changed = 0.0, 0
        for i in range(0, len(h), 256):
            z = logits(slice(i, i + 256), alpha)
            changed += int((z.argmax(-1) != top[i:i + 256]).sum())
            keep = rows[i:i + 256]
            lse = z[keep].logsumexp(-1)
            if cfg.direction_target == "label_free":
                total += float((lse - (p_ref[i:i + 256][keep].float().softmax(-1) * z[keep]).sum(-1)).sum())
            else:
                total += float((lse - z[keep].gather(-1, labels[i:i + 256][keep, None])[:, 0]).sum())
        return total / int(rows.sum()), changed / len(h)

    steps = tqdm(desc="fit direction (step)", unit="pass", leave=False)

    def objective(alpha: float) -> float:
        steps.update()
        return evaluate(alpha)[0]

    alpha = float(minimize_scalar(objective, bounds=(-DIRECTION_BOUND, DIRECTION_BOUND), method="bounded",
                                  options={"xatol": 1e-3}).x)
    after, changed = evaluate(alpha)
    optimum = (alpha, changed)
    shortened = changed > cfg.max_top1_change
    if shortened:  # the optimum is beyond the allowed change: the longest allowed step toward it
        lo, hi = 0.0, 1.0
        for _ in range(12):
            mid = (lo + hi) / 2
            if evaluate(mid * alpha)[1] <= cfg.max_top1_change:
                lo = mid
            else:
                hi = mid
        alpha *= lo
        after, changed = evaluate(alpha)
    steps.close()
    before = evaluate(0.0)[0]
    at_bound = abs(alpha) > 0.999 * DIRECTION_BOUND
    fit = DirectionFit(cfg.direction_target, alpha, scale, explained, len(reference.residual[0]) - 1, layer,
                       int(rows.sum()), before, after, changed, shortened, optimum, at_bound,
                       alpha * scale * direction)
    _check_carried(model, fit, picks[0], h[:len(picks[0][1])], readout)
    return fit


def _check_carried(model: nn.Module, fit: DirectionFit, pick: tuple[Tensor, Tensor], entering: Tensor,
                   readout: Readout) -> None:
    """The folded bias computes what the fit assumed (the step reaches the final norm unchanged), checked on one
    sample: an architecture that transforms the down projection's output first is refused. `entering`: the
    unrepaired model's residual stream entering the final norm at the pick's positions."""
    device = next(readout.head.parameters()).device
    expected = readout(entering.float().to(device) + fit.vector.to(device), last=False).cpu()
    ids, pos = pick
    repaired = fit.fold(model)
    got = repaired(input_ids=ids[None, :-1].to(device), use_cache=False, logits_to_keep=pos.to(device)).logits[0]
    if (got.float().cpu() - expected).abs().max() > 0.02 * expected.abs().max() + 1e-3:
        raise CalqError(f"recalibrate.method direction: the bias on {fit.layer} does not reach {type(model).__name__}'s "
                        "final norm unchanged; use recalibrate.method: label_free")


Fit = TemperatureFit | DirectionFit


def fit_recalibration(model: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig,
                      reference: Reference | None = None) -> Fit:
    """cfg.method's repair fitted on calibration samples: a temperature, or a step along the calibration direction."""
    if cfg.method == "direction":
        if reference is None:
            raise ValueError("direction re-calibration needs the full-precision reference model")
        return fit_direction(model, samples, cfg, reference)
    return fit_temperature(model, samples, cfg, reference)


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
    fit: Fit


def recalibrate(model: nn.Module, samples: list[Tensor], cfg: RecalibrateConfig,
                reference: Reference | None = None) -> Recalibrated:
    """A copy of `model` with the repair fitted on `samples` folded in (the input is not modified)."""
    fit = fit_recalibration(model, samples, cfg, reference)
    return Recalibrated(fit.fold(model), fit)


def folded(model: nn.Module, temperature: float) -> nn.Module:
    """A copy of `model` with `temperature` folded in (the input is not modified)."""
    calibrated = copy.deepcopy(model)
    apply_temperature(calibrated, temperature)
    return calibrated
