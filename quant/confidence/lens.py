"""Layer-wise calibration (the logit lens): where in the network quantization moves confidence.

Every decoder layer's residual stream is read out through the model's own final norm and unembedding,
as if the network stopped there. Per layer we measure next-token accuracy, mean confidence, ECE and MCE.
Typically accuracy settles in the middle layers and the upper layers mostly correct confidence, so
comparing full precision with a quantized variant layer by layer shows whether quantization hurt what
the model knows (early divergence) or only how sure it is (late divergence).

Using the model's own norm module handles Gemma's (1 + w) scaling and any re-calibration temperature
folded into the norm; using its output embeddings handles tied embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from pydantic import Field  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from quant.confidence import metrics  # noqa: E402
from quant.confidence.recalibrate import Models, forward_groups  # noqa: E402
from quant.confidence.softmax import SoftmaxScratch  # noqa: E402
from quant.files import atomic_path  # noqa: E402
from quant.errors import CalqError  # noqa: E402
from quant.models import Readout  # noqa: E402
from quant.schema import StrictModel  # noqa: E402

COLUMNS = ("accuracy", "mean_confidence", "ece", "mce")


class LensConfig(StrictModel):
    """Held-out windows for the logit lens: the first `windows` of the evaluation split (a small subset:
    every layer is projected onto the whole vocabulary; measured on SmolLM2-135M, 2 CPU cores, about 28 CPU
    seconds per window and model with every position read out)."""

    windows: int = Field(4, ge=1)
    seq_len: int = Field(512, ge=16)
    positions: int | None = Field(None, ge=1)
    """Positions per window read out through every layer, evenly spaced (null: all). The window still runs
    whole, so every position keeps its full context; only the per-layer projections onto the vocabulary, most
    of the lens's cost, are limited: more windows with fewer positions each sample more text per second."""


def lens_positions(length: int, positions: int | None) -> Tensor:
    """Evenly spaced positions (sorted, distinct) of a window of `length` predictions, the last one included."""
    if positions is None or positions >= length:
        return torch.arange(length, device="cpu")
    return torch.linspace(0, length - 1, positions, device="cpu").round().long().unique()


@dataclass
class LensResult:
    """Per model, one row per layer: layer 0 is the embedding output, layer L the last decoder layer
    (identical to the model's own prediction)."""

    layers: dict[str, list[dict[str, float]]]
    tokens: int

    def table(self) -> dict:
        return {"tokens": self.tokens, "columns": ["layer", *COLUMNS], "layers": self.layers}

    def plot(self, path: Path, title: str) -> None:
        """Accuracy (solid) and mean confidence (dashed), ECE, and MCE against depth, one line per model."""
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        panels = [("accuracy", "next-token accuracy (solid) / mean confidence (dashed)"),
                  ("ece", "ECE"), ("mce", "MCE")]
        for ax, (key, label) in zip(axes, panels):
            for color, (name, rows) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], self.layers.items()):
                depth = [r["layer"] for r in rows]
                ax.plot(depth, [r[key] for r in rows], marker=".", color=color, label=name)
                if key == "accuracy":
                    ax.plot(depth, [r["mean_confidence"] for r in rows], "--", color=color)
            ax.set_xlabel("layer (0 = embeddings)")
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title}: logit lens on {self.tokens} held-out tokens")
        fig.tight_layout()
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)


def markdown(table: dict) -> str:
    """The report's per-layer table, from `LensResult.table()` (as stored in report.json)."""
    layers = table["layers"]
    names = list(layers)
    lines = ["| layer | " + " | ".join(f"{n}: acc / conf / ECE / MCE" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for i in range(len(layers[names[0]])):
        cells = [" / ".join(f"{layers[n][i][c]:.3f}" for c in COLUMNS) for n in names]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.inference_mode()
def _layer_predictions(model: nn.Module, ids: Tensor, pos: Tensor, temperatures: list[float]
                       ) -> list[tuple[Tensor, Tensor]]:
    """(confidence, predicted token) per layer at positions `pos`, (L + 1, len(pos)) each, for each temperature."""
    dev = next(model.parameters()).device
    pos = pos.to(dev)
    output = model(input_ids=ids[None].to(dev), output_hidden_states=True, use_cache=False, logits_to_keep=pos)
    hidden = [h[:, pos] for h in output.hidden_states]
    fix = "set evaluation.logit_lens: null for this model"
    readout = Readout(model, "the logit lens", fix)
    out = [([], []) for _ in temperatures]
    scratch = SoftmaxScratch()
    for i, h in enumerate(hidden):
        z = readout(h[0], last=i == len(hidden) - 1)
        if i == len(hidden) - 1:  # the last layer's lens must be the model's own prediction
            own = output.logits[0].float()
            if (z - own).abs().max() > 1e-3 * (1 + own.abs().max()):
                raise CalqError(f"the logit lens cannot reproduce {type(model).__name__}'s logits from its final "
                                f"norm, output head and scaling after it ({readout.after.source}); {fix}")
        for (conf, pred), temperature in zip(out, temperatures):
            s = scratch.stats(z, temperature)
            conf.append(s.conf.cpu())
            pred.append(s.pred.cpu())
    return [(torch.stack(conf), torch.stack(pred)) for conf, pred in out]


def layer_calibration(models: Models, windows: list[Tensor], n_bins: int = 15,
                      positions: int | None = None) -> LensResult:
    """Logit-lens accuracy, mean confidence, ECE and MCE of every layer of every model on the same windows, at
    `positions` evenly spaced positions of each (all if None; `lens_positions`). A `Tempered` model's layers
    read through its base model's pass: T scales every layer's logits alike."""
    conf: dict[str, list[Tensor]] = {name: [] for name in models}
    correct: dict[str, list[Tensor]] = {name: [] for name in models}
    picks = [lens_positions(len(ids) - 1, positions) for ids in windows]
    for model, views in forward_groups(models):
        for ids, pos in tqdm(list(zip(windows, picks)), desc=f"logit lens {views[0][0]}", unit="window"):
            for (name, _), (c, p) in zip(views, _layer_predictions(model, ids[:-1], pos, [t for _, t in views])):
                conf[name].append(c)
                correct[name].append(p == ids[1:][pos])
    layers = {}
    for name in models:
        conf_all, correct_all = torch.cat(conf[name], 1).double().numpy(), torch.cat(correct[name], 1).numpy()
        layers[name] = [{"layer": i, "accuracy": float(k.mean()), "mean_confidence": float(c.mean()),
                         "ece": metrics.ece(c, k, n_bins), "mce": metrics.mce(c, k, n_bins)}
                        for i, (c, k) in enumerate(zip(conf_all, correct_all))]
    return LensResult(layers, sum(len(p) for p in picks))
