"""Models: where they come from (load) and where their parts are (structure)."""

from quant.models.load import REGISTRY, ModelConfig, load_model, model_fingerprint, resolve_model_path
from quant.models.linears import Experts, HubNames, checkpoint_tensors, converted_kinds, linearize, route_all_experts
from quant.models.structure import LogitMap, Layer, Readout, decoder_layers, final_norm, fold_scales, layers_path, logit_map

__all__ = ["REGISTRY", "Experts", "HubNames", "Layer", "LogitMap", "Readout", "checkpoint_tensors", "converted_kinds", "logit_map", "linearize", "route_all_experts", "ModelConfig", "decoder_layers", "final_norm", "fold_scales", "layers_path",
           "load_model", "model_fingerprint", "resolve_model_path"]
