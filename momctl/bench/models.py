"""The models a benchmark compares, built from one base config, as one layer or as the whole causal LM.

`mom` is the base config with every block a MoM layer; `gdn` the same with one memory (no router, no shared
memory: Gated DeltaNet); `transformer` every block softmax attention; `hybrid` MoM with attention in every sixth
block (the base config's own attention blocks when it is a hybrid); `reference` flash-linear-attention's MoM
(`MomAttention` / `MomForCausalLM`) and `reference-gdn` its `GatedDeltaNet`, when FLA is installed and a GPU is used.

Legend: B batch, T time, D d_model, W vocabulary.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attention import Attention
from ..config import ModelConfig
from ..fla_compat import config_to_fla
from ..mixer import MoMMixer
from ..model import MoMForCausalLM
from ..prefill import prefill_in_chunks
from .layer_decode import layer_prefill, layer_step

FLA_MODELS = ("reference", "reference-gdn")
FLA_INSTALL = "pip install 'momctl[reference]'"


class Unavailable(Exception):
    """A model that cannot run here (not installed, needs a GPU, no such layer): its cells are skipped."""


def model_configs(base: ModelConfig) -> dict[str, ModelConfig]:
    """The config each model name computes, derived from `base` (reference models compute mom's and gdn's)."""
    n = base.num_layers
    mom = base.replace(attention_layers=())
    gdn = mom.replace(num_memories=1, top_k=1, shared_memory=False)
    every_sixth = tuple(range(5, n, 6)) or (n - 1,)
    hybrid_layers = base.attention_layers if 0 < len(base.attention_layers) < n else every_sixth
    return {"mom": mom, "gdn": gdn, "transformer": mom.replace(attention_layers=tuple(range(n))),
            "hybrid": mom.replace(attention_layers=hybrid_layers), "reference": mom, "reference-gdn": gdn}


@dataclass
class Subject:
    """One model or layer on the device, with the calls the modes time.

    Layer scope: `forward(x [B, T, D]) -> y [B, T, D]`. Model scope: `loss(ids [B, T]) -> scalar`,
    `prefill(ids [B, T], state | None) -> (logits [B, T, W], state)`, `step(ids [B], state) -> (logits [B, W], state)`.
    """

    name: str
    scope: str
    module: nn.Module
    config: ModelConfig
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None
    prefill: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None
    step: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None
    # A whole prompt's prefill before decoding, `ids [B, T] -> (last position's logits [B, W], state)`, when it
    # differs from `prefill` in one call (momctl: bounded chunks, as `momctl generate`).
    prompt_prefill: Callable[[torch.Tensor], tuple[torch.Tensor, Any]] | None = None
    is_reference: bool = False
    backends: dict = field(default_factory=dict)  # compiled / exported steps, made once per model (backends.py)
    attention_layer: bool = False  # layer scope: a softmax attention layer (FLOP count)

    def state_bytes(self, state: Any) -> int | None:
        """Bytes a state holds, all sequences together (None for FLA's caches)."""
        return None if self.is_reference else state.nbytes


def build_subject(name: str, base: ModelConfig, scope: str, device: torch.device, dtype: torch.dtype,
                  seed: int) -> Subject:
    """Build model `name` on `device` in `dtype` with seeded random weights; Unavailable when it cannot run here."""
    config = model_configs(base)[name]
    torch.manual_seed(seed)
    if name in FLA_MODELS:
        return _build_fla(name, config, scope, device, dtype)
    if scope == "layer":
        if name == "hybrid":
            raise Unavailable("a hybrid mixes MoM and attention blocks, it has no single layer; use --model")
        return _layer(name, config, device, dtype)
    with torch.device(device):
        model = MoMForCausalLM(config)
    model = model.to(dtype)
    return Subject(name=name, scope=scope, module=model, config=config,
                   loss=lambda ids: model(ids, targets=ids).loss, prefill=model.prefill, step=model.step,
                   prompt_prefill=torch.no_grad()(lambda ids: prefill_in_chunks(model, ids)))


def _layer(name: str, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Subject:
    config = config.replace(num_layers=1, attention_layers=(0,) if name == "transformer" else ())
    with torch.device(device):
        layer = Attention(config) if name == "transformer" else MoMMixer(config)
    layer = layer.to(dtype)
    if isinstance(layer, Attention):
        def forward(x_BTD: torch.Tensor) -> torch.Tensor:
            B, T, _ = x_BTD.shape
            positions_BT = torch.arange(T, device=x_BTD.device).expand(B, T)
            return layer(x_BTD, None, positions_BT, None, False)[0]
    else:
        def forward(x_BTD: torch.Tensor) -> torch.Tensor:
            valid_BT = torch.ones(x_BTD.shape[:2], dtype=torch.bool, device=x_BTD.device)
            return layer(x_BTD, valid_BT, None, False).y_BTD
    return Subject(name=name, scope="layer", module=layer, config=config, forward=forward,
                   prefill=torch.no_grad()(lambda x, state: layer_prefill(layer, x, state)),
                   step=torch.no_grad()(lambda x, state: layer_step(layer, x, state)),
                   attention_layer=name == "transformer")


def fla_version() -> str | None:
    """The installed flash-linear-attention version, without importing it (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flash-linear-attention")
    except PackageNotFoundError:
        return None


def _fla_ready(device: torch.device) -> None:
    if importlib.util.find_spec("fla") is None:
        raise Unavailable(f"flash-linear-attention is not installed ({FLA_INSTALL})")
    if device.type != "cuda":
        raise Unavailable("flash-linear-attention's Triton kernels need a CUDA GPU")
    try:
        import fla.ops.common.chunk_o as chunk_o
    except Exception as err:  # a broken install raises anything at import
        raise Unavailable(f"flash-linear-attention could not be imported: {str(err).splitlines()[0]}") from None
    # FLA refuses gated backwards on Hopper with Triton < 3.7.1 (its issue #640, a miscompile at BK=64); with
    # head_dim 256 its kernels use BK=128, where the bug does not appear (see ../shared/gpu.md).
    chunk_o.TRITON_ABOVE_3_7_1 = True


def _build_fla(name: str, config: ModelConfig, scope: str, device: torch.device, dtype: torch.dtype) -> Subject:
    _fla_ready(device)
    if scope == "layer":
        config = config.replace(num_layers=1)
    if name == "reference":
        from fla.models import MomConfig, MomForCausalLM

        fla_config = config_to_fla(config)
        fla_config.pop("model_type")
        make = lambda: MomForCausalLM(MomConfig(**fla_config))  # noqa: E731
    else:
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

        make = lambda: GatedDeltaNetForCausalLM(GatedDeltaNetConfig(  # noqa: E731
            hidden_size=config.d_model, num_hidden_layers=config.num_layers, num_heads=config.num_heads,
            head_dim=config.head_dim, expand_v=config.expand_v, conv_size=config.conv_size,
            intermediate_size=config.mlp_size, vocab_size=config.vocab_size, norm_eps=config.norm_eps,
            tie_word_embeddings=config.tie_embeddings))
    with torch.device(device):
        model = make()
    if scope == "layer":
        from fla.models.utils import Cache

        layer = model.model.layers[0].attn.to(dtype)
        del model

        def layer_prefill(x_BTD: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
            out = layer(x_BTD, past_key_values=Cache() if cache is None else cache, use_cache=True)
            return out[0], out[2]

        def layer_step(x_BD: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
            out = layer(x_BD[:, None], past_key_values=cache, use_cache=True)
            return out[0][:, 0], out[2]

        return Subject(name=name, scope="layer", module=layer, config=config, forward=lambda x: layer(x)[0],
                       prefill=torch.no_grad()(layer_prefill), step=torch.no_grad()(layer_step), is_reference=True)
    model = model.to(dtype)

    def prefill(ids_BT: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        out = model(input_ids=ids_BT, past_key_values=state, use_cache=True)
        return out.logits, out.past_key_values

    def step(ids_B: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        out = model(input_ids=ids_B[:, None], past_key_values=state, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    # FLA's MoM mishandles continuing a cache with 2..64 new tokens (mom-spec.md): prompts go in one call.
    return Subject(name=name, scope="model", module=model, config=config,
                   loss=lambda ids: model(input_ids=ids, labels=ids).loss, prefill=torch.no_grad()(prefill),
                   step=torch.no_grad()(step), is_reference=True)
