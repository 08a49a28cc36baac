"""Where scales can be folded (smoothing groups), for SmoothQuant and AWQ: found from the model by tracing one
forward of each decoder layer, or from a table for the architectures it lists.

A smoothing group is an op and the linears that read its output. Dividing the op's output channels by s and
multiplying the linears' input columns by s (quant.models.fold_scales) leaves the model's function unchanged while
moving magnitude between activations and weights, which is what SmoothQuant and AWQ exploit.

`traced_groups` finds them on a probe (one short calibration sample through the layer): a norm whose output tensor
(or a view of it) is what linears read is a group with those readers (an MoE router reading it too has its columns
scaled along, unquantized); a linear feeding a sibling linear through an elementwise product or attention (up_proj
-> down_proj, v_proj -> o_proj) is a candidate; every group is kept only if folding random scales into a float32
copy of the layer (of their parent, for siblings: one expert, not the whole MoE layer) leaves its output unchanged
(the exactness test), so a fold that is not exact (GQA's v_proj ->
o_proj, fused qkv -> o_proj, a norm another op also reads) is skipped with the reason. The table (ARCHITECTURES)
of the six architectures listed before tracing existed is the fallback where there is no calibration sample to trace
on; their traced groups are the table's (a test pins it), so their numbers did not change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quant.calibrate.walker import LayerInputs, hidden_out
from quant.errors import CalqError
from quant.models import Layer, decoder_layers, fold_scales, route_all_experts
from quant.models.structure import norm_offset


@dataclass(frozen=True)
class GroupSpec:
    prev: str
    """The op whose output the linears read, relative to the decoder layer."""
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    groups: tuple[GroupSpec, ...]
    unclipped: tuple[str, ...]
    """Linears AWQ's clip search leaves alone: clipping q/k distorts attention scores (as AutoAWQ)."""


_ATTENTION = (GroupSpec("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              GroupSpec("self_attn.v_proj", ("self_attn.o_proj",)))
_LLAMA = Architecture(
    groups=(*_ATTENTION, GroupSpec("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            GroupSpec("mlp.up_proj", ("mlp.down_proj",))),
    unclipped=("self_attn.q_proj", "self_attn.k_proj"),
)
# Gemma3 normalizes the attention output after o_proj; the MLP reads pre_feedforward_layernorm.
_GEMMA3 = Architecture(
    groups=(*_ATTENTION, GroupSpec("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            GroupSpec("mlp.up_proj", ("mlp.down_proj",))),
    unclipped=_LLAMA.unclipped,
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": _GEMMA3,
    "gemma3": _GEMMA3,
}


@dataclass(frozen=True)
class Group:
    prev: nn.Module
    names: tuple[str, ...]
    """Full module names of the linears (the keys of ActivationStats)."""
    linears: tuple[nn.Linear, ...]
    also: tuple[nn.Module, ...] = ()
    """Other readers of prev's output whose input columns take the scales too, left unquantized (MoE routers)."""

    @property
    def readers(self) -> tuple[nn.Module, ...]:
        return (*self.linears, *self.also)


def _norm_like(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return not isinstance(module, nn.Linear) and isinstance(w, Tensor) and w.dim() == 1


def check_model(model: nn.Module, method: str) -> None:
    """The model's (1 + w) norms are held in float32: (1 + w) / s - 1 rounded to bfloat16 moves the effective
    multiplier by several percent for the large s SmoothQuant and AWQ pick (Gemma). Checked before any work (at
    recipe load, on a meta skeleton); which groups fold is decided per layer, by tracing (or the table)."""
    layer = decoder_layers(model)[0]
    for name, prev in layer.module.named_children():
        if _norm_like(prev) and prev.weight.dtype != torch.float32 and norm_offset(prev):
            raise CalqError(f"{method} folds scales into {layer.name}.{name} ({type(prev).__name__}, "
                            f"y = x * (1 + w)), which {prev.weight.dtype} cannot hold exactly; load the model with "
                            "dtype: float32")


def _as_float(value):
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_as_float(v) for v in value)
    return value


def _key(t: Tensor) -> tuple[int, int, int]:
    """Which tensor this is, views included (Mixtral's router reads the norm output reshaped)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())


@torch.no_grad()
def _output(scope: nn.Module, call: tuple[tuple, dict]) -> Tensor:
    """scope's output on `call` (its traced positional and keyword arguments), every expert run."""
    args, kwargs = call
    with route_all_experts():
        return hidden_out(scope(*args, **kwargs))


@torch.no_grad()
def _exact(scope: nn.Module, call: tuple[tuple, dict], ref: Tensor, prev: str, readers: tuple[str, ...]) -> bool:
    """Whether folding random scales into prev and its readers (named relative to `scope`) leaves scope's output on
    `call` unchanged (`ref`: that output). The scope is the smallest module holding both: one expert for up_proj ->
    down_proj, so checking 128 experts costs 128 expert forwards, not 128 layer forwards."""
    trial = copy.deepcopy(scope)
    p = trial.get_submodule(prev)
    width = p.out_features if isinstance(p, nn.Linear) else p.weight.numel()
    g = torch.Generator(device="cpu").manual_seed(0)
    s = torch.exp(torch.rand(width, generator=g, device="cpu") - 0.5).to(p.weight.device)
    fold_scales(p, [trial.get_submodule(r) for r in readers], s)
    out = _output(trial, call)
    return bool((out - ref).abs().max() <= 1e-4 * (1 + ref.abs().max()))


@torch.no_grad()
def traced_groups(layer: Layer, probe: LayerInputs) -> tuple[tuple[Group, ...], dict[str, str]]:
    """The smoothing groups of one decoder layer found on `probe` (one sample of its inputs), each checked exact,
    and the candidates skipped with the reason. Order: by where the group's first reader runs in the forward."""
    module = copy.deepcopy(layer.module).float()  # the exactness test runs in float32
    probe = LayerInputs([probe.hidden[0].float()], [_as_float(probe.kwargs[0])])
    produced: dict[tuple, str] = {}
    reads: list[tuple[str, tuple]] = []
    calls: dict[str, tuple[tuple, dict]] = {}  # each linear's parent: its first call, the scope of a sibling fold
    alive: list[Tensor] = []  # held so no storage is reused while tracing
    handles = []
    for name, m in module.named_modules():
        if any(isinstance(c, nn.Linear) for c in m.children()):
            def called(mod, args, kwargs, name=name):
                calls.setdefault(name, (args, kwargs))
            handles.append(m.register_forward_pre_hook(called, with_kwargs=True))
        if _norm_like(m) or isinstance(m, nn.Linear):
            def post(mod, _args, out, name=name):
                if isinstance(out, Tensor):
                    produced.setdefault(_key(out), name)
                    alive.append(out)
            handles.append(m.register_forward_hook(post))
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) or (isinstance(w, Tensor) and w.dim() == 2 and not isinstance(m, nn.Embedding)):
            def pre(mod, args, name=name):
                if args and isinstance(args[0], Tensor):
                    reads.append((name, _key(args[0])))
                    alive.append(args[0])
            handles.append(m.register_forward_pre_hook(pre))
    try:
        whole = (tuple(probe.hidden), probe.kwargs[0])
        ref = _output(module, whole)  # every expert reads the norm's output itself, not its routed rows
    finally:
        for h in handles:
            h.remove()
    refs = {"": ref}  # each scope's output, computed once (the layer's from the trace)
    order = {name: i for i, (name, _) in enumerate(reads)}
    by_prev: dict[str, list[str]] = {}
    for name, key in reads:
        prev = produced.get(key)
        if prev is not None and prev != name and name not in by_prev.get(prev, []):
            by_prev.setdefault(prev, []).append(name)
    fed = {r for readers in by_prev.values() for r in readers}
    checked: set[str] = set()  # sibling folds, found exact on their parent already
    unfed: dict[str, str] = {}  # linears whose sibling candidates all failed, with the reason
    for name, m in module.named_modules():  # a linear feeding a sibling through a product or attention
        if not isinstance(m, nn.Linear) or name in fed or name not in order:
            continue
        parent, _, child = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        tried = [sib for sib, other in module.get_submodule(parent).named_children()
                 if isinstance(other, nn.Linear) and sib != child and other.out_features == m.in_features
                 and prefix + sib in order and order[prefix + sib] < order[name]]
        scope = module.get_submodule(parent)
        if tried and parent not in refs:
            refs[parent] = _output(scope, calls[parent])
        for sib in tried:
            if _exact(scope, calls[parent], refs[parent], sib, (child,)):
                by_prev[prefix + sib] = [name]
                fed.add(name)
                checked.add(prefix + sib)
                break
        else:
            if tried:
                unfed[f"{layer.name}.{prefix}{'/'.join(tried)} -> {name}"] = (
                    "no exact fold from a sibling (a nonlinearity between, or grouped-query attention, whose v_proj "
                    "is narrower): its input is not smoothed")
    groups, skipped = [], dict(unfed)
    for prev, readers in sorted(by_prev.items(), key=lambda kv: min(order[r] for r in kv[1])):
        p = module.get_submodule(prev)
        if not isinstance(p, nn.Linear) and not _norm_like(p):
            continue
        linears = tuple(r for r in readers if isinstance(module.get_submodule(r), nn.Linear))
        if not linears:
            continue
        label = f"{layer.name}.{prev} -> {', '.join(linears)}"
        if prev not in checked and not _exact(module, whole, ref, prev, tuple(readers)):
            skipped[label] = (f"folding scales into {prev} changes the layer's output (another op reads it, or it is "
                              "not a per-channel multiple): no exact fold")
            continue
        real = layer.module
        groups.append(Group(real.get_submodule(prev), tuple(f"{layer.name}.{r}" for r in linears),
                            tuple(real.get_submodule(r) for r in linears),
                            tuple(real.get_submodule(r) for r in readers if r not in linears)))
    return tuple(groups), skipped


UNCLIPPED = ("q_proj", "k_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "q_a_proj", "q_b_proj",
             "kv_a_proj_with_mqa")
"""Linears AWQ's clip search leaves alone in traced architectures, by module name: those producing attention
queries or keys (clipping them distorts attention scores, as AutoAWQ)."""


def layer_groups(layer: Layer, model_type: str | None, probe: LayerInputs | None, method: str
                 ) -> tuple[tuple[Group, ...], dict[str, str], frozenset[str]]:
    """One decoder layer's smoothing groups, the ones skipped with the reason, and the linears not to clip: traced on
    `probe`, or, without calibration samples to trace on, from the table for the architectures it lists."""
    if probe is not None:
        groups, skipped = traced_groups(layer, probe)
        keep = frozenset(n for n, m in layer.module.named_modules(prefix=layer.name)
                         if isinstance(m, nn.Linear) and n.rpartition(".")[2] in UNCLIPPED)
        return groups, skipped, keep
    if model_type in ARCHITECTURES:
        arch = ARCHITECTURES[model_type]
        return (*smoothing_groups(layer, arch), unclipped(layer, arch))
    raise CalqError(f"{method} traces the smoothing groups of {model_type!r} on a calibration sample, and has "
                    "none; give calibration samples")


def _width(prev: nn.Module) -> int:
    return prev.out_features if isinstance(prev, nn.Linear) else prev.weight.numel()


def smoothing_groups(layer: Layer, arch: Architecture) -> tuple[tuple[Group, ...], dict[str, str]]:
    """The smoothing groups of one decoder layer, and the ones skipped with the reason (shown in the report).

    A group whose op is narrower or wider than its linears' input is skipped: v_proj -> o_proj under
    grouped-query attention, where one v channel feeds several o columns (AutoAWQ skips it too).
    """
    groups, skipped = [], {}
    for spec in arch.groups:
        prev = layer.module.get_submodule(spec.prev)
        linears = tuple(layer.module.get_submodule(n) for n in spec.linears)
        if all(_width(prev) == lin.in_features for lin in linears):
            groups.append(Group(prev, tuple(f"{layer.name}.{n}" for n in spec.linears), linears))
        else:
            skipped[f"{layer.name}.{spec.prev} -> {', '.join(spec.linears)}"] = (
                f"{spec.prev} has {_width(prev)} output channels, its readers {linears[0].in_features} inputs "
                "(grouped-query attention): no exact per-channel fold")
    return tuple(groups), skipped


def unclipped(layer: Layer, arch: Architecture) -> frozenset[str]:
    return frozenset(f"{layer.name}.{n}" for n in arch.unclipped)
