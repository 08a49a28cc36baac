"""Every matrix product of a model as an nn.Linear, once, at load: the one form the walk, the statistics, every
method, the quantizer and the checkpoints handle.

Two layouts transformers ships are not nn.Linear and would otherwise stay in full precision without a word:
- GPT-2's `Conv1D` stores its weight transposed ([in, out]); it becomes an nn.Linear with weight.T (exact);
- transformers 5.x MoE experts (MixtralExperts, Qwen2/3MoeExperts, DeepseekV3Experts, ...) fuse every expert into
  3-D parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]); they become `Experts`, one (gate_proj, up_proj,
  down_proj) triple of nn.Linear per expert with the same forward, so each expert has its own statistics and
  scales, and checkpoints name experts as vLLM does (experts.<e>.gate_proj, ...).
Calibration routes every token through every expert (`route_all_experts`, as llm-compressor's
moe_calibrate_all_experts) so no expert is left without statistics; the block's output is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

_ROUTE_ALL = contextvars.ContextVar("calq_route_all_experts", default=False)


@contextlib.contextmanager
def route_all_experts() -> Iterator[None]:
    """While the block runs, every `Experts` runs every expert on every token (so each expert's linears see the
    calibration tokens) and still adds only the routed experts' outputs: the model's output is unchanged."""
    token = _ROUTE_ALL.set(True)
    try:
        yield
    finally:
        _ROUTE_ALL.reset(token)


class Expert(nn.Module):
    """One expert's MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype, device) -> None:
        super().__init__()
        like = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden, intermediate, **like)
        self.up_proj = nn.Linear(hidden, intermediate, **like)
        self.down_proj = nn.Linear(intermediate, hidden, **like)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.ModuleList):
    """transformers' fused experts as a list of `Expert` (named experts.<e>.gate_proj, ... as vLLM loads them);
    same call signature and result."""

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        route_all = _ROUTE_ALL.get()
        for e, expert in enumerate(self):
            token_idx, top_k_pos = torch.where(top_k_index == e)
            if route_all:
                y = expert(hidden_states)[token_idx]
            elif len(token_idx):
                y = expert(hidden_states[token_idx])
            else:
                continue
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn") and getattr(module, "gate_up_proj_bias", None) is None
            and getattr(module, "down_proj_bias", None) is None)


@torch.no_grad()
def _linear_from_conv1d(conv: Conv1D) -> nn.Linear:
    w = conv.weight
    linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, dtype=w.dtype, device=w.device)
    if not w.is_meta:
        linear.weight.copy_(w.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


@torch.no_grad()
def _experts_from_fused(fused: nn.Module) -> Experts:
    gate_up, down = fused.gate_up_proj, fused.down_proj
    n, two_i, hidden = gate_up.shape
    inter = two_i // 2
    experts = [Expert(hidden, inter, fused.act_fn, gate_up.dtype, gate_up.device) for _ in range(n)]
    if not gate_up.is_meta:
        for e, expert in enumerate(experts):
            expert.gate_proj.weight.copy_(gate_up[e, :inter])
            expert.up_proj.weight.copy_(gate_up[e, inter:])
            expert.down_proj.weight.copy_(down[e])
    return Experts(experts)


_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""What linearize converted, per module it was called on: a second call converts nothing and still answers."""


def linearize(module: nn.Module, prefix: str = "") -> dict[str, str]:
    """Replace, in place, every Conv1D and every fused-experts module inside `module` (named `prefix`) by its
    nn.Linear form, with the same function. Returns everything converted in `module` so far, by full name (shown in
    the report)."""
    converted = _CONVERTED.setdefault(module, {})
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, Conv1D) or _fused_experts(m)]
    for rel, old in found:
        if isinstance(old, Conv1D):
            new, what = _linear_from_conv1d(old), f"Conv1D [{old.nx}, {old.nf}] -> nn.Linear (weight transposed)"
        else:
            new = _experts_from_fused(old)
            what = (f"{type(old).__name__} (fused 3-D experts) -> {new.num_experts} experts x "
                    "(gate_proj, up_proj, down_proj) nn.Linear")
        parent, _, child = rel.rpartition(".")
        module.get_submodule(parent).register_module(child, new)
        converted[f"{prefix}.{rel}" if prefix and rel else prefix or rel] = what
    return dict(converted)


class HubNames:
    """How Hugging Face checkpoints of a model name what its linearized form holds, read off transformers' own
    conversion mapping for the model (by type and class): the key renamings transformers applies at load (GPT-NeoX's
    embed_out -> lm_head, Mixtral's .block_sparse_moe. -> .mlp.), then the per-expert projection names its expert
    converters merge (Mixtral's experts.<e>.w1 -> experts.<e>.gate_proj). Streaming reads a checkpoint through
    `to_model`; exports write through `to_hub`, so a checkpoint is named as the hub's, which vLLM and transformers
    load."""

    def __init__(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_checkpoint_conversion_mapping

        rules = [rule for key in (model.config.model_type, type(model).__name__)
                 for rule in get_checkpoint_conversion_mapping(key) or []]
        self.renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
        self.experts: dict[str, str] = {}
        """Hub projection name -> ours, where they differ (Mixtral: w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj)."""
        for rule in rules:
            target = rule.target_patterns[0] if isinstance(rule, WeightConverter) else ""
            if target.endswith(("experts.gate_up_proj", "experts.down_proj")):
                ours = ("down_proj",) if target.endswith("down_proj") else ("gate_proj", "up_proj")
                for pattern, name in zip(rule.source_patterns, ours):  # ".experts.*.w1.weight"
                    hub = pattern.rpartition("*.")[2].removesuffix(".weight")
                    if hub != name:
                        self.experts[hub] = name

    def _experts(self, key: str, names: dict[str, str]) -> str:
        for old, new in names.items():
            key = re.sub(rf"\.experts\.(\d+)\.{old}\.", rf".experts.\1.{new}.", key)
        return key

    def to_model(self, key: str) -> str:
        """A checkpoint's tensor key, or module name, as the linearized model names it."""
        from transformers.core_model_loading import rename_source_key

        return self._experts(rename_source_key(key + ".", self.renamings, [])[0], self.experts)[:-1]

    def to_hub(self, key: str) -> str:
        """A tensor key, or module name, of the linearized model as the hub's checkpoints name it."""
        from transformers.core_model_loading import rename_source_key

        key = self._experts(key + ".", {v: k for k, v in self.experts.items()})
        reverse = [rule.reverse_transform() for rule in self.renamings[::-1]]
        return rename_source_key(key, reverse, [], reverse=True)[0][:-1]


def checkpoint_tensors(converted: dict[str, str], module: nn.Module, prefix: str, tensors: dict[str, Tensor]
                       ) -> dict[str, Tensor]:
    """A Hugging Face checkpoint's tensors of `module` (named `prefix`, already linearized: `converted`; keys named as
    the model names them, `HubNames.to_model`) in linearize's layouts, so a skeleton built from the config loads the
    original checkpoint: fused 3-D experts split per expert, Conv1D weights transposed."""
    out = dict(tensors)
    for name in converted:
        rel = name.removeprefix(prefix).lstrip(".")
        new = module.get_submodule(rel)
        if isinstance(new, nn.Linear):
            if f"{name}.weight" in out:
                out[f"{name}.weight"] = out[f"{name}.weight"].T.contiguous()
        elif isinstance(new, Experts) and f"{name}.gate_up_proj" in out:
            gate_up, down = out.pop(f"{name}.gate_up_proj"), out.pop(f"{name}.down_proj")
            inter = gate_up.shape[1] // 2
            for e in range(new.num_experts):
                out[f"{name}.{e}.gate_proj.weight"] = gate_up[e, :inter].contiguous()
                out[f"{name}.{e}.up_proj.weight"] = gate_up[e, inter:].contiguous()
                out[f"{name}.{e}.down_proj.weight"] = down[e].contiguous()
    return out


_KINDS: dict[str, frozenset[str]] = {}


def converted_kinds(config) -> frozenset[str]:
    """Which layouts linearize converts in models of `config` ("Conv1D", "experts"), read off a meta skeleton (cached
    per model type): what exporters check, since runtimes load those layouts in their original form."""
    if config.model_type not in _KINDS:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        kinds = {"Conv1D" if what.startswith("Conv1D") else "experts" for what in linearize(model).values()}
        _KINDS[config.model_type] = frozenset(kinds)
    return _KINDS[config.model_type]
