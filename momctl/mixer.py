"""The MoM layer (FLA `MomAttention` parameter names): route, group, project, convolve, update memories, mix.

Legend: B batch, T time, D d_model, E memories, A top-k, S slots (E routed memories + the shared one),
P position in a segment (P = T), H heads, K key head dim, V value head dim, C channels, W conv width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backend import use_kernels
from .config import ModelConfig
from .modules import GatedRMSNorm, ShortConvWeight, at_least_fp32, short_conv, short_conv_varlen
from .packing import convolve_copies, convolve_projection, mix_copies, pack_tokens, project_copies
from .recurrence import memory_update
from .routing import gather_segments, group_tokens
from .routing import mix_segments as mix
from .state import MemoryState


@dataclass
class MixerOutput:
    y_BTD: torch.Tensor
    state: MemoryState | None
    router_logits_BTE: torch.Tensor | None  # None for a single memory (no router)
    tokens_per_memory_E: torch.Tensor  # int64, real tokens routed to each memory


def _linears(n: int, d_in: int, d_out: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(d_in, d_out, bias=False) for _ in range(n))


def slot_linear(x: torch.Tensor, weight_SCD: torch.Tensor) -> torch.Tensor:
    """Each slot's own projection: x `[B, L, D]` (every slot sees the same rows) or `[B, S, L, D]` -> `[B, S, L, C]`."""
    if x.dim() == 3:
        return torch.einsum("bld,scd->bslc", x, weight_SCD.to(x.dtype))
    return torch.einsum("bsld,scd->bslc", x, weight_SCD.to(x.dtype))


class MoMMixer(nn.Module):
    """One Mixture-of-Memories layer, as in shared/mom-spec.md."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D, E, H = config.d_model, config.num_memories, config.num_heads
        HK, HV = config.key_dim, config.value_dim
        if E > 1:
            self.gate = nn.Linear(D, E, bias=False)
        self.q_proj = nn.Linear(D, HK, bias=False)
        self.k_proj = _linears(E, D, HK)
        self.v_proj = _linears(E, D, HV)
        if config.has_beta:
            self.b_proj = _linears(E, D, H)
        if config.has_decay:
            self.a_proj = _linears(E, D, H)
        if config.shared_memory:
            self.shared_k = nn.Linear(D, HK, bias=False)
            self.shared_v = nn.Linear(D, HV, bias=False)
            if config.has_beta:
                self.shared_b = nn.Linear(D, H, bias=False)
            if config.has_decay:
                self.shared_a = nn.Linear(D, H, bias=False)
        if config.has_decay:
            self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(0, 16)))
            # dt log-uniform in [1e-3, 0.1]; dt_bias is its inverse softplus.
            dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            self.A_log._no_weight_decay = True
            self.dt_bias._no_weight_decay = True
        self.q_conv1d = ShortConvWeight(HK, config.conv_size)
        self.k_conv1d = ShortConvWeight(HK, config.conv_size)
        self.v_conv1d = ShortConvWeight(HV, config.conv_size)
        self.g_proj = nn.Linear(D, HV, bias=False)
        self.o_norm = GatedRMSNorm(config.head_v_dim, config.norm_eps)
        self.o_proj = nn.Linear(HV, D, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=2 ** -2.5)

    @property
    def conv_channels(self) -> int:
        return 2 * self.config.key_dim + self.config.value_dim

    def init_state(self, batch_size: int, device: torch.device | None = None) -> MemoryState:
        c = self.config
        memory = torch.zeros(batch_size, c.num_slots, c.num_heads, c.head_dim, c.head_v_dim, device=device)
        conv = torch.zeros(batch_size, c.num_slots, c.conv_size - 1, self.conv_channels, device=device)
        return MemoryState(memory=memory, conv=conv)

    def _slot_weights(self, name: str) -> torch.Tensor:
        """Stacked per-slot weights `[S, C, D]` of `k`, `v`, `b` or `a` (the E memories, then the shared one)."""
        weights = [proj.weight for proj in getattr(self, f"{name}_proj")]
        if self.config.shared_memory:
            weights.append(getattr(self, f"shared_{name}").weight)
        return torch.stack(weights)

    def route(self, x_BTD: torch.Tensor):
        """Top-k routing. Returns router logits, each token's slots `[B, T, A]` (the top-k memories, then the shared
        one) and their mixing weights `[B, T, A]` (renormalised top-k probabilities; 1 for the shared memory)."""
        B, T, _ = x_BTD.shape
        c = self.config
        if c.num_memories > 1:
            router_logits_BTE = self.gate(x_BTD)
            probs_BTE = F.softmax(at_least_fp32(router_logits_BTE), dim=-1)
            w_BTA, slots_BTA = probs_BTE.topk(c.top_k, dim=-1)
            w_BTA = (w_BTA / w_BTA.sum(-1, keepdim=True)).to(x_BTD.dtype)
        else:
            router_logits_BTE = None
            w_BTA = x_BTD.new_ones(B, T, 1)
            slots_BTA = torch.zeros(B, T, 1, dtype=torch.long, device=x_BTD.device)
        if c.shared_memory:
            slots_BTA = torch.cat([slots_BTA, slots_BTA.new_full((B, T, 1), c.num_memories)], dim=-1)
            w_BTA = torch.cat([w_BTA, x_BTD.new_ones(B, T, 1)], dim=-1)
        return router_logits_BTE, slots_BTA, w_BTA

    def _membership(self, slots_BTA: torch.Tensor, w_BTA: torch.Tensor, valid_BT: torch.Tensor):
        """Slot membership `[B, T, S]` (bool, real tokens only) and mixing weights `[B, T, S]`."""
        B, T, _ = slots_BTA.shape
        S = self.config.num_slots
        member_BTS = torch.zeros(B, T, S, dtype=torch.bool, device=slots_BTA.device).scatter(-1, slots_BTA, True)
        weight_BTS = w_BTA.new_zeros(B, T, S).scatter(-1, slots_BTA, w_BTA)
        return member_BTS & valid_BT[..., None], weight_BTS

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor, state: MemoryState | None,
                return_state: bool) -> MixerOutput:
        c = self.config
        B, T, _ = x_BTD.shape
        S, H, K, V = c.num_slots, c.num_heads, c.head_dim, c.head_v_dim
        HK, HV = c.key_dim, c.value_dim

        # 1-2. Router, then each (sequence, slot) segment's tokens in time order.
        router_logits_BTE, slots_BTA, w_BTA = self.route(x_BTD)
        if use_kernels(x_BTD) and T > 1:
            return self._forward_packed(x_BTD, valid_BT, state, return_state, router_logits_BTE, slots_BTA, w_BTA)
        member_BTS, weight_BTS = self._membership(slots_BTA, w_BTA, valid_BT)
        segments = group_tokens(member_BTS)

        # 3-4. Projections (q once per token) and the short conv, over each segment or over the real timeline.
        q_BTC = self.q_proj(x_BTD)
        if c.conv_scope == "segment":
            rows, lengths_BS = gather_segments(x_BTD, segments), segments.lengths_BS
            q_BSLC = gather_segments(q_BTC, segments)
        else:
            timeline = group_tokens(valid_BT[..., None])
            rows = gather_segments(x_BTD, timeline)[:, 0]  # [B, L, D], the real tokens in order
            q_BSLC = gather_segments(q_BTC, timeline).expand(B, S, T, HK)
            lengths_BS = timeline.lengths_BS.expand(B, S)
        u_BSLC = torch.cat([q_BSLC, slot_linear(rows, self._slot_weights("k")),
                            slot_linear(rows, self._slot_weights("v"))], dim=-1)
        conv_weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])[:, 0]
        cache = state.conv.reshape(B * S, c.conv_size - 1, -1) if state is not None else \
            u_BSLC.new_zeros(B * S, c.conv_size - 1, self.conv_channels)
        u_NLC, new_conv = short_conv(u_BSLC.reshape(B * S, T, -1), conv_weight, cache, lengths_BS.reshape(-1))
        if c.conv_scope == "time":
            # Slot s's segment position p holds token source[b, s, p]; fetch its row of the timeline.
            time_index_BT = timeline.position_BTS[..., 0].clamp(min=0)
            time_index_N = time_index_BT.gather(1, segments.source_BSP.reshape(B, S * T)).reshape(B * S, T)
            u_NLC = u_NLC.gather(1, time_index_N[..., None].expand_as(u_NLC))
        q_NPC, k_NPC, v_NPC = u_NLC.split([HK, HK, HV], dim=-1)

        # 5. Memory update per segment; positions past a segment's end are identity steps (k = beta = g = 0).
        x_BSPD = rows if c.conv_scope == "segment" else gather_segments(x_BTD, segments)
        valid_NP1 = segments.valid_BSP.reshape(B * S, T, 1)
        q = q_NPC.reshape(B * S, T, H, K)
        k = torch.where(valid_NP1, k_NPC, 0).reshape(B * S, T, H, K)
        v = v_NPC.reshape(B * S, T, H, V)
        beta = g = None
        if c.has_beta:
            beta = slot_linear(x_BSPD, self._slot_weights("b")).reshape(B * S, T, H).sigmoid()
            beta = torch.where(valid_NP1, beta, 0)
        if c.has_decay:
            g = self._log_decay(slot_linear(x_BSPD, self._slot_weights("a"))).reshape(B * S, T, H)
            g = torch.where(valid_NP1, g, 0)
        initial = state.memory.reshape(B * S, H, K, V) if state is not None else None
        o_NPHV, final = memory_update(c.update_rule, q, k, v, beta, g, initial, return_state)

        # 6-7. Mix the routed memories by their weights and add the shared memory (weight 1).
        o_BTHV = mix(o_NPHV.reshape(B, S, T, HV), segments, weight_BTS).reshape(B, T, H, V)

        new_state = None
        if return_state:
            new_state = MemoryState(memory=at_least_fp32(final.reshape(B, S, H, K, V)),
                                    conv=at_least_fp32(new_conv.reshape(B, S, c.conv_size - 1, -1)))
        return self._output(x_BTD, o_BTHV, new_state, router_logits_BTE, member_BTS)

    def _gates(self, gates: list[torch.Tensor], M: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """beta `[1, M, H]` (or None) and the log decay g `[1, M, H]` (or None) from the gate projections of M rows."""
        H = self.config.num_heads
        beta = gates[0].sigmoid().reshape(1, M, H) if self.config.has_beta else None
        g = self._log_decay(gates[-1]).reshape(1, M, H) if self.config.has_decay else None
        return beta, g

    def _log_decay(self, a: torch.Tensor) -> torch.Tensor:
        """g = -exp(A_log) * softplus(a + dt_bias), the log of the per-head decay, at least fp32."""
        a = at_least_fp32(a)
        return -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype))

    def _output(self, x_BTD, o_BTHV, new_state, router_logits_BTE, member_BTS) -> MixerOutput:
        """8. Gated per-head RMSNorm and output projection."""
        B, T, H, V = o_BTHV.shape
        o_BTHV = self.o_norm(o_BTHV, self.g_proj(x_BTD).reshape(B, T, H, V))
        y_BTD = self.o_proj(o_BTHV.reshape(B, T, H * V))
        tokens_per_memory_E = member_BTS[..., :self.config.num_memories].sum((0, 1))
        return MixerOutput(y_BTD, new_state, router_logits_BTE, tokens_per_memory_E)

    def _forward_packed(self, x_BTD, valid_BT, state, return_state, router_logits_BTE, slots_BTA,
                        w_BTA) -> MixerOutput:
        """Steps 2-7 on packed copies (momctl/packing.py): one grouped GEMM for the per-memory projections, q once
        per token, the varlen conv and recurrence kernels over all (sequence, slot) segments in one launch each."""
        c = self.config
        B, T, D = x_BTD.shape
        S, H, K, V, W = c.num_slots, c.num_heads, c.head_dim, c.head_v_dim, c.conv_size
        HK, HV = c.key_dim, c.value_dim
        packing = pack_tokens(slots_BTA, w_BTA, valid_BT, S)
        M = packing.num_copies
        x_ND = x_BTD.reshape(B * T, D)
        names = ["k", "v"] + ["b"] * c.has_beta + ["a"] * c.has_decay
        widths = [HK, HV] + [H] * c.has_beta + [H] * c.has_decay
        weight_SND = torch.cat([self._slot_weights(name) for name in names], dim=1)
        cache_NWC = None
        if state is not None:  # slot-major order (s, b)
            cache_NWC = state.conv.to(x_BTD.dtype).transpose(0, 1).reshape(S * B, W - 1, self.conv_channels)
        if c.conv_scope == "segment":
            # Without autograd (prefill) each buffer here dies at its last use: the projections (gates included) once
            # convolved. With autograd the backward keeps what it needs, except the copies of x (gathered again).
            proj_MC = project_copies(x_ND, weight_SND, packing)
            if cache_NWC is not None:  # the padding segment starts from zeros
                cache_NWC = torch.cat([cache_NWC, cache_NWC.new_zeros(1, *cache_NWC.shape[1:])])
            # q, k, v convolved apart (the filter is depthwise): q from its token rows (gathered in the conv), k and
            # v read in place from the projection.
            caches = [None] * 3 if cache_NWC is None else cache_NWC.split([HK, HK, HV], dim=-1)
            q_out = convolve_copies(self.q_proj(x_ND), self.q_conv1d.weight[:, 0], packing, caches[0], return_state)
            (k, v), gates_MX, kv_caches = convolve_projection(
                proj_MC, [self.k_conv1d.weight[:, 0], self.v_conv1d.weight[:, 0]], list(caches[1:]),
                packing.cu_seqlens, return_state)
            del proj_MC
            beta, g = self._gates(gates_MX.split(widths[2:], dim=-1), M)
            q, k, v = (y.reshape(1, M, H, -1) for y in (q_out[0], k, v))
            new_conv = torch.cat([q_out[1], *kv_caches], dim=-1) if return_state else None
            del q_out, kv_caches, gates_MX
        else:
            conv_weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])[:, 0]
            u_MC, gates, new_conv = self._conv_over_time(x_ND, valid_BT, packing, weight_SND, widths, conv_weight,
                                                         cache_NWC, return_state)
            q, k, v = (t.reshape(1, M, H, -1) for t in u_MC.split([HK, HK, HV], dim=-1))
            beta, g = self._gates(gates, M)
        initial = None
        if state is not None:  # slot-major, zeros for the padding segment
            initial = state.memory.transpose(0, 1).reshape(S * B, H, K, V)
            initial = torch.cat([initial, initial.new_zeros(1, H, K, V)])
        o_MHV, final = memory_update(c.update_rule, q, k, v, beta, g, initial, return_state,
                                     cu_seqlens=packing.cu_seqlens)
        o_BTHV = mix_copies(o_MHV.reshape(M, HV), packing).reshape(B, T, H, V)
        new_state = None
        if return_state:
            def batch_major(x):
                return at_least_fp32(x[:S * B].reshape(S, B, *x.shape[1:]).transpose(0, 1))

            new_state = MemoryState(memory=batch_major(final), conv=batch_major(new_conv))
        return self._output(x_BTD, o_BTHV, new_state, router_logits_BTE, packing.member_BTS)

    def _conv_over_time(self, x_ND, valid_BT, packing, weight_SND, widths, conv_weight, cache_NWC, return_state):
        """conv_scope=time on packed copies: every slot's projections of every real token (each slot's conv sees
        the whole timeline), one varlen conv over the (slot, sequence) timelines, then each copy's row.

        Each timeline is the sequence's real tokens in order, then its padding as a separate segment (ignored)."""
        c = self.config
        B, T = valid_BT.shape
        S, W, C = c.num_slots, c.conv_size, self.conv_channels
        timeline = group_tokens(valid_BT[..., None])
        rows_N = (timeline.source_BSP[:, 0] + torch.arange(B, device=x_ND.device)[:, None] * T).reshape(-1)
        x_timeline_ND = x_ND[rows_N]
        proj_NSC = (x_timeline_ND @ weight_SND.reshape(-1, weight_SND.shape[-1]).T.to(x_ND.dtype)).reshape(B * T, S, -1)
        k_NSC, v_NSC, *gates = proj_NSC.split(widths, dim=-1)
        q_NSC = self.q_proj(x_timeline_ND)[:, None].expand(-1, S, -1)
        u_SBTC = torch.cat([q_NSC, k_NSC, v_NSC], dim=-1).reshape(B, T, S, C).permute(2, 0, 1, 3)
        starts = torch.arange(S * B, device=x_ND.device) * T
        ends = starts + timeline.lengths_BS[:, 0].repeat(S)
        cu = torch.stack([starts, ends], 1).reshape(-1)
        cu = torch.cat([cu, cu.new_full((1,), S * B * T)]).to(torch.int32)
        if cache_NWC is not None:  # the padding segments start from zeros
            cache_NWC = torch.stack([cache_NWC, torch.zeros_like(cache_NWC)], 1).reshape(2 * S * B, W - 1, C)
        u_NC, new_conv = short_conv_varlen(u_SBTC.reshape(S * B * T, C), conv_weight, cu, cache_NWC, return_state)
        # Copy m is token (b, t) of slot s, at timeline position p: row (s*B + b)*T + p of the conv output.
        token_M, slot_M = packing.token_of_copy_M, packing.slot_of_copy_M
        position_M = timeline.position_BTS[..., 0].reshape(-1).clamp(min=0)[token_M]
        timeline_row_M = token_M - token_M % T + position_M  # b*T + p
        u_MC = u_NC[(slot_M * B + token_M // T) * T + position_M]
        gates = [gate_NSC.reshape(B * T * S, -1)[timeline_row_M * S + slot_M] for gate_NSC in gates]
        if new_conv is not None:  # the real segments' caches, plus one for the padding segment of the packing
            new_conv = torch.cat([new_conv[0::2], new_conv.new_zeros(1, W - 1, C)])
        return u_MC, gates, new_conv
