"""Models: where they come from (load) and where their parts are (structure)."""

from quant.models.load import REGISTRY, ModelConfig, load_model, model_fingerprint, resolve_model_path
from quant.models.linears import Experts, checkpoint_tensors, linearize, route_all_experts
from quant.models.structure import Layer, decoder_layers, final_norm, fold_scales, layers_path

__all__ = ["REGISTRY", "Experts", "Layer", "checkpoint_tensors", "linearize", "route_all_experts", "ModelConfig", "decoder_layers", "final_norm", "fold_scales", "layers_path",
           "load_model", "model_fingerprint", "resolve_model_path"]
