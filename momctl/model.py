"""MoMForCausalLM: embeddings, blocks (RMSNorm, mixer, residual, RMSNorm, SwiGLU, residual), final norm, head.

State-dict names are FLA's `MomForCausalLM` names. Legend: B batch, T time, D d_model, W vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .export.step import decode_step
from .losses import balance_loss
from .mixer import MoMMixer
from .modules import RMSNorm, SwiGLU
from .state import CACHE_BLOCK, InferenceState, StepState


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, W] (fp32 when loss is computed)
    loss: torch.Tensor | None  # ce (+ aux_loss_scale * aux in training mode)
    ce_loss: torch.Tensor | None
    aux_loss: torch.Tensor | None
    tokens_per_memory: torch.Tensor | None  # [num MoM layers, E], int64
    state: InferenceState | None


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config) if config.is_attention_layer(layer_idx) else MoMMixer(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_size)


class MoMModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class MoMForCausalLM(nn.Module):
    """A MoM language model (or a baseline: one memory, attention layers) computing shared/mom-spec.md."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MoMModel(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """FLA's init: normal(0, initializer_range) outside the MoM layers, which initialise themselves."""
        std = self.config.initializer_range
        nn.init.normal_(self.model.embeddings.weight, std=std)
        for block in self.model.layers:
            for p in [*block.mlp.parameters(), *(block.attn.parameters() if isinstance(block.attn, Attention) else ())]:
                nn.init.normal_(p, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embeddings.weight if self.config.tie_embeddings else self.lm_head.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> InferenceState:
        """An empty state (no tokens seen) for `batch_size` sequences."""
        device = torch.device(device) if device is not None else self.output_weight.device
        layers = [block.attn.init_state(batch_size, device) for block in self.model.layers]
        return InferenceState(layers=layers, positions=torch.zeros(batch_size, dtype=torch.long, device=device))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        state: InferenceState | None = None,
        return_state: bool = False,
        last_logits_only: bool = False,
    ) -> CausalLMOutput:
        """Run the model over `input_ids [B, T]`.

        Args:
            input_ids: token ids `[B, T]`.
            attention_mask: `[B, T]`, 1 for real tokens and 0 for padding (anywhere: padding tokens are skipped
                exactly: they touch no memory, conv window or KV entry). None means all real.
            targets: next-token ids `[B, T]` (-100 = ignore); gives `loss` (+ the aux loss in training mode).
            state: continue from this state (None = start of the sequences).
            return_state: also return the state after these tokens.
            last_logits_only: logits of the last position only (`[B, 1, W]`): what a prompt's prefill needs, without
                the `[B, T, W]` tensor (the largest activation of inference); not with `targets`.
        """
        c = self.config
        B, T = input_ids.shape
        valid_BT = attention_mask.bool() if attention_mask is not None else None
        real_BT = valid_BT if valid_BT is not None else torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        offset_B = state.positions if state is not None else torch.zeros(B, dtype=torch.long, device=input_ids.device)
        positions_BT = (offset_B[:, None] + real_BT.long().cumsum(1) - 1).clamp(min=0)

        x_BTD = self.model.embeddings(input_ids)
        router_logits, loads, new_layers = [], [], []
        for i, block in enumerate(self.model.layers):
            layer_state = state.layers[i] if state is not None else None
            h_BTD = block.attn_norm(x_BTD)
            if isinstance(block.attn, Attention):
                y_BTD, layer_state = block.attn(h_BTD, valid_BT, positions_BT, layer_state, return_state)
            else:
                out = block.attn(h_BTD, real_BT, layer_state, return_state)
                y_BTD, layer_state = out.y_BTD, out.state
                loads.append(out.tokens_per_memory_E)
                if out.router_logits_BTE is not None:
                    router_logits.append(out.router_logits_BTE)
            new_layers.append(layer_state)
            x_BTD = x_BTD + y_BTD
            x_BTD = x_BTD + block.mlp(block.mlp_norm(x_BTD))
        if last_logits_only:
            if targets is not None:
                raise ValueError("last_logits_only=True computes no loss: pass targets=None")
            x_BTD = x_BTD[:, -1:]
        logits_BTW = F.linear(self.model.norm(x_BTD), self.output_weight.to(x_BTD.dtype))

        loss = ce_loss = aux_loss = None
        if targets is not None:
            logits_BTW = logits_BTW.float()
            ce_loss = F.cross_entropy(logits_BTW.reshape(B * T, -1), targets.reshape(B * T), ignore_index=-100)
            loss = ce_loss
            if self.training and router_logits and c.aux_loss_scale > 0:
                aux_loss = balance_loss(c.aux_loss, router_logits, real_BT, c.top_k)
                loss = ce_loss + c.aux_loss_scale * aux_loss
        new_state = None
        if return_state:
            new_state = InferenceState(layers=new_layers, positions=offset_B + real_BT.long().sum(1))
        return CausalLMOutput(logits=logits_BTW, loss=loss, ce_loss=ce_loss, aux_loss=aux_loss,
                              tokens_per_memory=torch.stack(loads) if loads else None, state=new_state)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, state: InferenceState | StepState | None = None,
                attention_mask: torch.Tensor | None = None,
                last_logits_only: bool = False) -> tuple[torch.Tensor, InferenceState]:
        """Consume any number of tokens `[B, T]`, continuing from `state`. Returns logits `[B, T, W]` (`[B, 1, W]`
        with `last_logits_only`) and the state."""
        if isinstance(state, StepState):
            state = state.to_inference()
        out = self(input_ids, attention_mask=attention_mask, state=state, return_state=True,
                   last_logits_only=last_logits_only)
        return out.logits, out.state

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, state: InferenceState | StepState) -> tuple[torch.Tensor, StepState]:
        """One token per sequence `[B]` -> logits `[B, W]` and the next state, by the static step
        (`momctl.export.step.decode_step`): no host synchronisation, and `state` is left as it was.

        A prefill's `InferenceState` is converted first (`StepState.from_inference`); KV caches that are full grow
        by CACHE_BLOCK positions (a decision on host-side counts, no device read).
        """
        if isinstance(state, InferenceState):
            state = StepState.from_inference(state)
        elif state.capacity is not None and state.cache_length >= state.capacity:
            state = state.grown(state.capacity + CACHE_BLOCK)
        return decode_step(self, token_ids, state)
