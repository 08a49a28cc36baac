"""The one hook mechanism: what every nn.Linear of a block reads, while the block runs.

Statistics (quant.calibrate.stats) reduce each linear's input per channel; AWQ and GPTQ need, per distinct input
tensor, the linears reading it and the tensor's Gram matrix (`input_sites`). Which linears share an input is read
off the forward itself (the same tensor object reaches q, k and v), not from a table of module names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from quant.models import Layer


@contextlib.contextmanager
def capturing(module: nn.Module, prefix: str, on_input: Callable[[str, Tensor], None],
              skip: str | None = None) -> Iterator[list[str]]:
    """Call on_input(full name, input) for every nn.Linear inside `module` (named `prefix`) each time it runs;
    names starting with `skip` are not hooked. Yields the hooked names."""
    handles, names = [], []
    for name, mod in module.named_modules(prefix=prefix):
        if isinstance(mod, nn.Linear) and not (skip is not None and name.startswith(skip)):
            names.append(name)
            handles.append(mod.register_forward_pre_hook(lambda _m, args, name=name: on_input(name, args[0])))
    try:
        yield names
    finally:
        for h in handles:
            h.remove()


@dataclass
class Site:
    """Linears that read one tensor, and running statistics of that tensor: sum of |x| per channel, the Gram
    matrix X^T X and the token count."""

    names: tuple[str, ...]
    linears: tuple[nn.Linear, ...]
    sum_abs: Tensor | float = 0.0
    gram: Tensor | float = 0.0
    tokens: int = 0

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_abs = self.sum_abs + x.abs().sum(0)
        self.gram = self.gram + x.T @ x
        self.tokens += x.shape[0]


def input_sites(layer: Layer, hidden: list[Tensor], kwargs: list[dict]) -> list[Site]:
    """Run `layer` on its inputs (one per sample, with the matching keyword arguments) and return one Site per
    distinct tensor its linears read, in the order the forward reads them."""
    linears = {f"{layer.name}.{n}": m for n, m in layer.module.named_modules() if isinstance(m, nn.Linear)}
    sites: dict[tuple[str, ...], Site] = {}
    call: list[tuple[str, Tensor]] = []  # this sample's (name, input); holding the inputs keeps identities unique
    with capturing(layer.module, layer.name, lambda name, x: call.append((name, x))):
        for h, kw in zip(hidden, kwargs):
            call.clear()
            layer.module(h, **kw)
            shared: list[tuple[list[str], Tensor]] = []
            for name, x in call:
                same = next((names for names, seen in shared if seen is x), None)
                if same is None:
                    shared.append(([name], x))
                else:
                    same.append(name)
            for names, x in shared:
                key = tuple(names)
                if key not in sites:
                    sites[key] = Site(key, tuple(linears[n] for n in key))
                sites[key].update(x)
    call.clear()
    return list(sites.values())
