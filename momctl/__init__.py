"""momctl: train, run, measure and ship Mixture-of-Memories (MoM) language models.

The names below are imported on first use, so that torch-free parts (`momctl.export.runtime`, `momctl.tokenizers`)
can be imported without importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_SOURCES = {
    "AttentionState": ".state",
    "CausalLMOutput": ".model",
    "InferenceState": ".state",
    "KVCache": ".state",
    "MemoryState": ".state",
    "ModelConfig": ".config",
    "MoMForCausalLM": ".model",
    "PRESETS": ".presets",
    "StepState": ".state",
    "get_preset": ".presets",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'momctl' has no attribute {name!r}")
    return getattr(import_module(_SOURCES[name], __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])
