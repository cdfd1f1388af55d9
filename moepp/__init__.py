"""moepp: a reference MoE++ implementation (Mixture-of-Experts with zero-computation experts) in PyTorch.

    from moepp import load_pretrained
    model = load_pretrained("path/to/checkpoint_dir")      # official MoE++ format or ours
    out = model(input_ids, return_routing=True)            # input_ids: LongTensor [B, S]
    out.logits                                             # [B, S, vocab]
    out.routing[i].topk_ids                                # LongTensor [B*S, K]: experts chosen in MoE layer i
"""

from .checkpoint import CheckpointError, CheckpointInfo, load_pretrained, save_pretrained, set_backend
from .config import (BACKENDS, EXPERT_TYPES, GATE_MODES, PRESETS, ModelConfig, MoEConfig, layer_preset,
                     model_preset)
from .layer import MoELayer, MoEOutput, RoutingRecord
from .model import LMOutput, MoEDecoderLM

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "EXPERT_TYPES", "GATE_MODES", "PRESETS", "CheckpointError", "CheckpointInfo", "LMOutput",
    "ModelConfig", "MoEConfig", "MoEDecoderLM", "MoELayer", "MoEOutput", "RoutingRecord", "layer_preset",
    "load_pretrained", "model_preset", "save_pretrained", "set_backend",
]
