"""calq's own quantized checkpoint: save, hash manifest, find it in a run directory, and `load` it back into
QuantLinear modules.

A checkpoint directory holds model.safetensors (packed codes, scales, zeros; the QuantSpec and the list of
quantized layers in its metadata), config.json, the tokenizer and manifest.json (sha256 of every file).
`load` checks every hash first: a truncated or tampered file is an error naming the file, never garbage logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quant.confidence.probe import PROBE_FILE, Probe
from quant.errors import CalqError
from quant.files import atomic_path, sha256_file
from quant.models import linearize
from quant.methods import QuantizeResult, QuantLinear, QuantSpec, prepare_kernels

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


def run_variants(run_dir: Path) -> list[str]:
    """The saved variants of a run directory (run_dir/models/<variant>)."""
    return sorted(p.name for p in (Path(run_dir) / "models").glob("*") if (p / WEIGHTS).is_file())


def checkpoint_dir(path: str | Path, variant: str | None = None) -> Path:
    """The checkpoint a path names: a checkpoint directory itself, or a run directory's variant (`variant`, or its
    only one)."""
    path = Path(path).expanduser()
    if (path / WEIGHTS).is_file() and variant is None:
        return path
    variants = run_variants(path)
    if variant is None and len(variants) == 1:
        variant = variants[0]
    if variant in variants:
        return path / "models" / variant
    if not variants:
        raise CalqError(f"{path} has no {WEIGHTS}; point at a calq checkpoint (run_dir/models/<variant>) or a run "
                        "directory")
    raise CalqError(f"{path} is a run directory: choose a variant with --variant ({', '.join(variants)}), or point "
                    f"at its directory, e.g. {path / 'models' / variants[0]}")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a calq checkpoint says about itself (safetensors metadata)."""

    spec: QuantSpec
    quantized: list[str]
    temperature: float | None
    """Temperature already folded into the final norm by re-calibration (None if not re-calibrated)."""
    direction: dict | None = None
    """The calibration-direction step already in the last down projection's bias (its fit's summary), if any."""


def checkpoint_info(directory: Path) -> CheckpointInfo:
    with safe_open(Path(directory) / WEIGHTS, framework="pt") as f:
        meta = f.metadata() or {}
    if "calq_spec" not in meta:
        raise CalqError(f"{directory / WEIGHTS} has no calq_spec metadata: it is not a calq checkpoint; "
                        "point at run_dir/models/<variant>")
    temperature = meta.get("calq_temperature")
    try:
        spec = QuantSpec.model_validate_json(meta["calq_spec"])
    except ValueError as err:
        raise CalqError(f"{directory}: its scheme was written by another calq version ({str(err).splitlines()[0]}); "
                        "re-create the checkpoint with this one") from None
    direction = meta.get("calq_direction")
    return CheckpointInfo(spec, json.loads(meta["quantized_layers"]), float(temperature) if temperature else None,
                          json.loads(direction) if direction else None)


def save_quantized(result: QuantizeResult, tokenizer: PreTrainedTokenizerBase, directory: Path,
                   metadata: dict[str, str] | None = None, probe: Probe | None = None) -> None:
    """Quantized weights (packed codes, scales, zeros) as safetensors with the scheme in the metadata,
    config, tokenizer, the confidence probe if there is one (probe.json) and a hash manifest, written atomically."""
    with atomic_path(Path(directory)) as tmp:
        tmp.mkdir()
        if probe is not None:
            (tmp / PROBE_FILE).write_text(probe.to_json())
        meta = {"calq_spec": result.spec.model_dump_json(), "quantized_layers": json.dumps(result.quantized),
                **(metadata or {})}
        save_model(result.model, str(tmp / WEIGHTS), metadata=meta)
        result.model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, "calq")


def load_probe(path: str | Path, variant: str | None = None) -> Probe | None:
    """The confidence probe saved with a checkpoint (its probe.json, hash-checked against the manifest), or None
    when the checkpoint has none."""
    directory = checkpoint_dir(path, variant)
    digest = json.loads((directory / MANIFEST).read_text())["sha256"].get(PROBE_FILE)
    if digest is None:
        return None
    if not (directory / PROBE_FILE).is_file() or sha256_file(directory / PROBE_FILE) != digest:
        raise CalqError(f"{directory / PROBE_FILE}: hash mismatch against {MANIFEST} (truncated or modified); "
                        "re-create the checkpoint")
    return Probe.load(directory)


def load(path: str | Path, device: str | torch.device | None = None, variant: str | None = None
         ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Reload a checkpoint written by `save_quantized` (hash-checked) as an eval-mode model whose quantized
    linears are QuantLinear: Triton kernels on CUDA, the torch path on CPU. `device` defaults to CUDA if present.
    The model is built on the meta device and takes the stored tensors as they are: nothing is initialised twice."""
    directory = checkpoint_dir(path, variant)
    verify_manifest(directory)
    info = checkpoint_info(directory)
    config = AutoConfig.from_pretrained(directory)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype or "float32")
    with torch.device("cpu"), init_empty_weights():  # parameters on meta; buffers (rotary frequencies) on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linearize(model)  # as the walk saw it: Conv1D and fused experts as nn.Linear
    for name in info.quantized:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise CalqError(f"{directory}: quantized layer {name!r} is not a linear layer of {type(model).__name__}; "
                            "config.json and model.safetensors do not belong together")
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, QuantLinear(
            linear.in_features, linear.out_features, info.spec.weights, info.spec.input_activations,
            linear.bias is not None, dtype))
    unexpected = model.load_state_dict(load_file(directory / WEIGHTS), strict=False, assign=True).unexpected_keys
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and out is not None and inp.weight.is_meta:
        inp.weight = out.weight  # safetensors stores a tied pair once, under either name
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise CalqError(f"{directory / WEIGHTS} does not match its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); re-create the checkpoint")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval().requires_grad_(False)
    prepare_kernels(model)
    return model, AutoTokenizer.from_pretrained(directory)
