"""The method table: every quantization method by name, the one place the pipeline, recipes and the CLI look one up.

Adding a method is one file (its options, its per-layer transform and its `Method`, see quant.methods.step) and one
entry here.
"""

from __future__ import annotations

from quant.methods import awq, gptq, smoothquant
from quant.methods.step import Method, NoOptions

MINMAX = Method("minmax", NoOptions, None, integer_only=False)
"""Round to nearest between each group's min and max: no transform, the shared quantizer alone."""

METHODS: dict[str, Method] = {m.name: m for m in (MINMAX, smoothquant.METHOD, awq.METHOD, gptq.METHOD)}
