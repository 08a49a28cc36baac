"""calq's own quantized checkpoint: save, hash manifest, and `load` back into QuantLinear modules.

A checkpoint directory holds model.safetensors (packed codes, scales, zeros; the QuantSpec and the list of
quantized layers in its metadata), config.json, the tokenizer and manifest.json (sha256 of every file).
`load` checks every hash first: a truncated or tampered file is an error naming the file, never garbage logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quant.cache import CalqError, atomic_path, sha256_file
from quant.methods import QuantSpec
from quant.quantize import QuantizeResult, QuantLinear

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def write_manifest(directory: Path, fmt: str, **extra) -> None:
    """Record the sha256 of every file under `directory` (call it last, inside the atomic write)."""
    files = {p.relative_to(directory).as_posix(): sha256_file(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format": fmt, **extra, "sha256": files}, indent=1))


def verify_manifest(directory: Path) -> dict:
    """Check every file the manifest lists against its hash; return the manifest."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CalqError(f"{directory} has no {MANIFEST}, so its files cannot be verified; "
                        "re-create it with `calq run` or `calq export`")
    manifest = json.loads(path.read_text())
    for name, digest in manifest["sha256"].items():
        file = directory / name
        if not file.is_file():
            raise CalqError(f"{file} is missing (listed in {MANIFEST}); re-create the checkpoint")
        if sha256_file(file) != digest:
            raise CalqError(f"{file}: hash mismatch against {MANIFEST} (truncated or modified); "
                            "re-create the checkpoint")
    return manifest


@dataclass(frozen=True)
class CheckpointInfo:
    """What a calq checkpoint says about itself (safetensors metadata)."""

    spec: QuantSpec
    quantized: list[str]
    temperature: float | None
    """Temperature already folded into the final norm by re-calibration (None if not re-calibrated)."""


def checkpoint_info(directory: Path) -> CheckpointInfo:
    with safe_open(Path(directory) / WEIGHTS, framework="pt") as f:
        meta = f.metadata() or {}
    if "calq_spec" not in meta:
        raise CalqError(f"{directory / WEIGHTS} has no calq_spec metadata: it is not a calq checkpoint; "
                        "point at run_dir/models/<variant>")
    temperature = meta.get("calq_temperature")
    return CheckpointInfo(QuantSpec.model_validate_json(meta["calq_spec"]), json.loads(meta["quantized_layers"]),
                          float(temperature) if temperature is not None else None)


def save_quantized(result: QuantizeResult, tokenizer: PreTrainedTokenizerBase, directory: Path,
                   metadata: dict[str, str] | None = None) -> None:
    """Quantized weights (packed codes, scales, zeros) as safetensors with the scheme in the metadata,
    config, tokenizer and a hash manifest, written atomically."""
    with atomic_path(Path(directory)) as tmp:
        tmp.mkdir()
        meta = {"calq_spec": result.spec.model_dump_json(), "quantized_layers": json.dumps(result.quantized),
                **(metadata or {})}
        save_model(result.model, str(tmp / WEIGHTS), metadata=meta)
        result.model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, "calq")


def _checkpoint_dir(path: Path) -> Path:
    if (path / WEIGHTS).is_file():
        return path
    variants = sorted(p.name for p in (path / "models").glob("*") if (p / WEIGHTS).is_file())
    if variants:
        raise CalqError(f"{path} is a run directory; load one of its variants: "
                        + ", ".join(str(path / "models" / v) for v in variants))
    raise CalqError(f"{path} has no {WEIGHTS}; point at a calq checkpoint (run_dir/models/<variant>)")


def load(path: str | Path, device: str | torch.device | None = None
         ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Reload a checkpoint written by `save_quantized` (hash-checked) as an eval-mode model whose quantized
    linears are QuantLinear: Triton kernels on CUDA, the torch path on CPU. `device` defaults to CUDA if present."""
    directory = _checkpoint_dir(Path(path).expanduser())
    verify_manifest(directory)
    info = checkpoint_info(directory)
    config = AutoConfig.from_pretrained(directory)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype or "float32")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    act_mode = info.spec.activations.mode if info.spec.activations else None
    for name in info.quantized:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise CalqError(f"{directory}: quantized layer {name!r} is not a linear layer of {type(model).__name__}; "
                            "config.json and model.safetensors do not belong together")
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, QuantLinear(
            linear.in_features, linear.out_features, info.spec.weights, act_mode, linear.bias is not None, dtype))
    missing, unexpected = load_model(model, directory / WEIGHTS, strict=False)
    if missing or unexpected:
        raise CalqError(f"{directory / WEIGHTS} does not match its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); re-create the checkpoint")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(directory)
