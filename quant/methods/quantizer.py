"""The shared quantizer: every method ends here. It takes schemes, not a method: a method's transform (SmoothQuant,
AWQ) has already changed the float weights, or its codes (GPTQ) are handed in.

The quantized linear calls the kernels, which run Triton on CUDA and a torch path on CPU.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

import calq_kernels as kernels
import torch
from torch import Tensor, nn

from quant.calibrate.stats import LayerStats
from quant.errors import CalqError
from quant.methods.schemes import ActScheme, Codes, WeightScheme, quantize_weight
from quant.models import Experts

IGNORED = "ignored by recipe"
"""The reason a linear matched by `ignore` stays in full precision (shown in the report)."""
NO_TOKENS = "no calibration token reached it, so it has no static activation scale"
"""The reason a linear stays in full precision under static activations when its statistics saw no token."""
ROUTER = "MoE router: its scores pick the experts, kept in full precision (as vLLM and llm-compressor)"
UNHANDLED = "not an nn.Linear: calq quantizes nn.Linear (Conv1D and fused experts are converted to it)"


class QuantLinear(nn.Module):
    """A linear layer with int4 (packed, group-wise) or int8 (per-channel) weights.

    int8 weights run W8A8 when `activations` is set (dynamic per-token or static per-tensor int8
    activations), else W8A16. Buffers are what checkpoints store; forward calls the kernels.
    """

    def __init__(self, in_features: int, out_features: int, weights: WeightScheme, activations: ActScheme | None,
                 bias: bool, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weights, self.activations = weights, activations
        groups = 1 if weights.group_size is None else -(-in_features // weights.group_size)
        like = {"device": device}
        if weights.num_bits == 4:
            self.register_buffer("qweight", torch.zeros(out_features, -(-in_features // 8), dtype=torch.int32, **like))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype, **like))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, **like))
        else:
            codes = torch.float8_e4m3fn if weights.type == "float" else torch.int8
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=codes, **like))
            self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32, **like))
        static = activations is not None and not activations.dynamic
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, **like) if static else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **like) if bias else None)

    @property
    def op(self) -> str:
        """The kernel this layer calls: w4a16, w8a8, w8a16 or fp8."""
        if self.weights.type == "float":
            return "fp8"
        if self.weights.num_bits == 4:
            return "w4a16"
        return "w8a8" if self.activations is not None else "w8a16"

    @property
    def act_mode(self) -> str | None:
        return self.activations.mode if self.activations is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: WeightScheme, activations: ActScheme | None = None,
                    act_absmax: Tensor | None = None, codes: Codes | None = None) -> QuantLinear:
        """Round the linear's weight (min-max), or store `codes` a method chose for it."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, weights, activations, linear.bias is not None, w.dtype,
                  w.device)
        if codes is not None and codes.q.shape != w.shape:
            raise ValueError(f"codes of shape {tuple(codes.q.shape)} for a weight of shape {tuple(w.shape)}")
        q, scale, zero = (codes.q, codes.scale, codes.zero) if codes is not None else quantize_weight(w, weights)
        if weights.num_bits == 4:
            mod.qweight.copy_(kernels.pack_int4(q.to(torch.uint8)))
            mod.scales.copy_(scale.to(w.dtype))
            mod.zeros.copy_(zero.to(torch.uint8))
        else:
            mod.qweight.copy_(q.to(mod.qweight.dtype))
            mod.scales.copy_(scale[:, 0])
        if mod.act_scale is not None:
            if act_absmax is None:
                raise ValueError("static activation quantization needs activation statistics for this layer")
            mod.act_scale.fill_(float(act_absmax.max().clamp(min=1e-8)) / 127)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def forward(self, x: Tensor) -> Tensor:
        if self.weights.type == "float":
            return kernels.fp8_linear(x, self.qweight, self.scales, self.bias)
        if self.weights.num_bits == 4:
            return kernels.int4_linear(x, self.qweight, self.scales, self.zeros,
                                       self.weights.group_size or self.in_features, self.bias)
        act = self.act_mode or "none"
        return kernels.int8_linear(x, self.qweight, self.scales, self.bias, act=act,
                                   act_scale=self.act_scale if act == "static" else None)

    def extra_repr(self) -> str:
        act = f"A8-{self.act_mode}" if self.activations else "A16"
        kind = "FP" if self.weights.type == "float" else "W"
        return (f"{self.in_features}, {self.out_features}, {kind}{self.weights.num_bits} "
                f"g{self.weights.group_size or 'channel'} {'sym' if self.weights.symmetric else 'asym'} {act}")


def prepare_kernels(model: nn.Module) -> None:
    """Reserve, before any decode (and any CUDA graph capture), the split-K workspace of the model's widest W4 layer
    on each GPU it sits on."""
    widest: dict[torch.device, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.op == "w4a16" and m.qweight.is_cuda:
            widest[m.qweight.device] = max(widest.get(m.qweight.device, 0), m.out_features)
    for device, n in widest.items():
        kernels.reserve_split_k(device, n)


def kernel_paths(model: nn.Module) -> dict[str, int]:
    """How many quantized linears run which kernel path where they are: Triton (or cuBLAS for FP8) on CUDA, on CPU
    the paths the CPU dispatch chose for their op and the model's activation dtype (kernels.cpu.plan)."""
    counts: dict[str, int] = {}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.qweight.is_cuda:
                key = f"{m.op}: {'cuBLAS (torch._scaled_mm)' if m.op == 'fp8' else 'Triton'} on {m.qweight.device}"
            elif m.op == "fp8":
                key = "fp8: CPU reference (exact emulation)"
            else:
                prefill, decode = (kernels.cpu.plan(m.op, rows, dtype) for rows in (kernels.cpu.DECODE_MAX_M + 1, 1))
                key = f"{m.op}: CPU {prefill} (prefill), {decode} (decode), {str(dtype).removeprefix('torch.')} x"
            counts[key] = counts.get(key, 0) + 1
    return counts


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a module is kept in full precision by `ignore` fnmatch patterns."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


@dataclass
class Quantized:
    """Which linears a quantizer call replaced, and which it kept in full precision (with the reason)."""

    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def add(self, other: Quantized) -> None:
        self.quantized += other.quantized
        self.kept.update(other.kept)


def routers(module: nn.Module) -> set[str]:
    """The linears inside `module` that score experts or gate a shared expert (qwen2_moe's shared_expert_gate), by
    relative name: direct nn.Linear children of a block that holds `Experts`. Kept in full precision (ROUTER), as
    vLLM builds them (plain unquantized linears) and llm-compressor's MoE recipes ignore them."""
    found = set()
    for name, block in module.named_modules():
        if any(isinstance(child, Experts) for child in block.children()):
            found |= {f"{name}.{n}" if name else n for n, c in block.named_children() if isinstance(c, nn.Linear)}
    return found


@torch.no_grad()
def quantize_linears(module: nn.Module, weights: WeightScheme, activations: ActScheme | None,
                     ignore: tuple[str, ...], stats: Mapping[str, LayerStats] | None = None,
                     codes: Mapping[str, Codes] | None = None, prefix: str = "",
                     skip: str | None = None) -> Quantized:
    """Replace, in place, every nn.Linear inside `module` (named `prefix`) by a QuantLinear: rounded min-max, or
    the `codes` a method chose. Linears matching `ignore` stay in full precision; names under `skip` are left
    alone (the decoder layers, when the walk quantized them already). Static activation scales come from `stats`."""
    codes = codes or {}
    static = activations is not None and not activations.dynamic
    done = Quantized()
    linears = [(f"{prefix}.{n}" if prefix and n else prefix or n, n, m) for n, m in module.named_modules()
               if isinstance(m, nn.Linear)]
    scorers = routers(module)
    for name, rel, linear in linears:
        if skip is not None and name.startswith(skip):
            continue
        if rel in scorers:
            done.kept[name] = ROUTER
            continue
        if is_ignored(name, ignore):
            done.kept[name] = IGNORED
            continue
        absmax = None
        if static:
            if stats is None or name not in stats:
                raise CalqError(f"{name} uses a static activation scale but has no activation statistics; "
                                "collect statistics on the same model first")
            if stats[name].tokens == 0:
                done.kept[name] = NO_TOKENS
                continue
            absmax = stats[name].absmax
        parent, _, child = rel.rpartition(".")
        module.get_submodule(parent).register_module(
            child, QuantLinear.from_linear(linear, weights, activations, absmax, codes.get(name)))
        done.quantized.append(name)
    return done


UNREACHED = "no calibration token reached it: min-max from its weights alone"
"""What a calibrating method (AWQ, GPTQ) does with a linear its layer's forward never ran (counted in the report)."""


def unreached(layer, sites, ignore: tuple[str, ...]) -> dict[str, str]:
    """The linears of `layer` no calibration input reached (in no Site), not ignored: the quantizer rounds them min-max
    from their weights, and this says so."""
    seen = {name for site in sites for name in site.names}
    return {name: UNREACHED for name, m in layer.module.named_modules(prefix=layer.name)
            if isinstance(m, nn.Linear) and name not in seen and not is_ignored(name, ignore)}


@dataclass(frozen=True)
class Coverage:
    """How much of a model's matrix-product weights (elements) a variant quantized, and each one it kept."""

    quantized: int
    total: int
    kept: dict[str, str]
    """Every matmul weight left in full precision, by module name, with the reason."""

    @property
    def share(self) -> float:
        return self.quantized / self.total if self.total else 1.0

    def line(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.kept.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        kept = "; ".join(f"{n} kept: {r}" for r, n in reasons.items())
        return f"{self.share:.1%} of matmul weights quantized ({self.quantized:,} of {self.total:,})" + (
            f"; {kept}" if kept else "")


def coverage(model: nn.Module, kept: Mapping[str, str]) -> Coverage:
    """Every matrix-product weight of `model`: QuantLinear (quantized), nn.Linear (kept, with `kept`'s reason) and
    any other module's 2-D or larger parameter except embeddings (kept: a router, or a layout calq does not
    handle)."""
    quantized, total, out = 0, 0, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            quantized += m.in_features * m.out_features
            total += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            total += m.weight.numel()
            out[name] = kept.get(name, "left in full precision")
        elif not isinstance(m, nn.Embedding):
            params = [p for p in m.parameters(recurse=False) if p.dim() >= 2]
            if params:
                total += sum(p.numel() for p in params)
                out[name] = ROUTER if "router" in type(m).__name__.lower() else f"{type(m).__name__} {UNHANDLED}"
    return Coverage(quantized, total, out)
