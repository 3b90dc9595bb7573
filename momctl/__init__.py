"""momctl: train, run, measure and ship Mixture-of-Memories (MoM) language models."""

from .config import ModelConfig
from .model import CausalLMOutput, MoMForCausalLM
from .presets import PRESETS, get_preset
from .state import AttentionState, InferenceState, MemoryState

__version__ = "0.1.0"

__all__ = [
    "AttentionState",
    "CausalLMOutput",
    "InferenceState",
    "MemoryState",
    "ModelConfig",
    "MoMForCausalLM",
    "PRESETS",
    "get_preset",
]
