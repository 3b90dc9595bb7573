"""Pure-PyTorch reference of one MoM decode step on slot-indexed states (the truth for `fused_step.py`)."""
# Shapes: B batch, P packed projection columns, E routed memories, S slots, H heads, K key dim, V value dim,
# C conv channels (q | k | v).

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mom_step_ref(proj: Tensor, columns, conv_weights: tuple[Tensor, Tensor, Tensor], A_log: Tensor | None,
                 dt_bias: Tensor | None, memory: Tensor, conv: Tensor, *, num_memories: int, top_k: int, delta: bool,
                 conv_every_slot: bool = False, scale: float | None = None,
                 conv_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Every slot computed, the touched ones kept: arguments and results as `fused_mom_step` (in at least fp32).

    Routing: softmax of the E router logits, top k, renormalised (ties as torch.topk breaks them); the shared slot
    (s >= E) always, weight 1. Per slot: y = SiLU(conv([window, u])) for u = (q, k_s, v_s), q and k L2-normalised,
    alpha = exp(-exp(A_log) softplus(a_s + dt_bias)) (1 without decay), u' = beta_s (v - alpha S^T k) (delta rule,
    beta_s = sigmoid(b_s)) or v; S' = alpha S + k u'^T, o = w_s scale S'^T q.

    memory may also come as `[B, S*H, K, V]` (the ONNX layout; the new memory then has it too): an exported graph
    reshaping its state inputs and outputs would copy the whole state twice a step.
    """
    B, S = conv.shape[:2]
    K, V = memory.shape[-2:]
    H = memory.shape[1] // S if memory.dim() == 4 else memory.shape[2]
    lead = memory.shape[:-2]  # (B, S, H) or (B, S*H)
    E = num_memories
    HK, HV = H * K, H * V
    scale = K ** -0.5 if scale is None else scale
    x = proj.to(torch.promote_types(proj.dtype, torch.float32))
    f = x.dtype

    weight_BS, touched_BS = routing_weights(x, columns, E, top_k, S)

    def block(start: int, width: int) -> Tensor:
        """Columns start .. start + S * width as `[B, S, width]`."""
        return x[:, start:start + S * width].reshape(B, S, width)

    u_BSC = torch.cat([x[:, columns.q:columns.q + HK, None].transpose(1, 2).expand(B, S, HK),
                       block(columns.k, HK), block(columns.v, HV)], dim=-1)
    w_CW = torch.cat([w.reshape(w.shape[0], -1) for w in conv_weights]).to(f)
    full_BSWC = torch.cat([conv.to(f), u_BSC[:, :, None]], dim=2)
    y_BSC = F.silu((full_BSWC * w_CW.T).sum(2))
    advance_BS = touched_BS | conv_every_slot
    new_conv = torch.where(advance_BS[..., None, None], full_BSWC[:, :, 1:], conv.to(f))

    q, k, v = y_BSC.split([HK, HK, HV], dim=-1)
    q, k = (_l2norm(t.reshape(B, S, H, K)) for t in (q, k))
    v = v.reshape(B, S, H, V)
    # The state is read once, by one batched product with q and k stacked (a matmul: ONNX Runtime's CUDA Einsum is
    # slow): with S' = alpha S + k u^T, q^T S' = alpha q^T S + (q . k) u. An untouched slot gets alpha 1 and u 0, so
    # its S' is S bit for bit.
    state = memory.to(f)
    qS, kS = torch.matmul(torch.stack([q, k], dim=-2).reshape(*lead, 2, K), state).reshape(B, S, H, 2, V).unbind(-2)
    alpha = torch.ones_like(q[..., 0])
    if A_log is not None:
        g = -A_log.to(f).exp() * F.softplus(block(columns.a, H) + dt_bias.to(f))
        alpha = g.exp()
    u = v
    if delta:
        beta = block(columns.b, H).sigmoid()
        u = beta[..., None] * (v - alpha[..., None] * kS)
    touched = touched_BS[..., None]
    o = scale * (alpha[..., None] * qS + (q * k).sum(-1, keepdim=True) * u) * weight_BS[..., None, None]
    o = torch.where(touched[..., None], o, 0)
    alpha, u = torch.where(touched, alpha, 1), torch.where(touched[..., None], u, 0)
    new_memory = alpha.reshape(*lead, 1, 1) * state + k.reshape(*lead, K, 1) * u.reshape(*lead, 1, V)
    if conv_out is not None:
        return o, memory.copy_(new_memory), conv_out.copy_(new_conv)
    return o, new_memory, new_conv


def routing_weights(x: Tensor, columns, num_memories: int, top_k: int, num_slots: int) -> tuple[Tensor, Tensor]:
    """Each slot's mixing weight `[B, S]` and whether the token reaches it (bool `[B, S]`), from the router logits
    in the packed projection x: softmax over the E memories, top k renormalised (ties as torch.topk breaks them),
    untouched memories 0; the shared slot (s >= E) always, weight 1."""
    B, E = x.shape[0], num_memories
    # the shared slot's weight 1 is in place before the routed weights are scattered in (no concatenation)
    base_BS = torch.cat([x.new_zeros(E), x.new_ones(num_slots - E)]).expand(B, num_slots)
    if E > 1:
        probs_BE = x[:, columns.gate:columns.gate + E].softmax(-1)
        top_w, top_i = probs_BE.topk(top_k, dim=-1)
        weight_BS = base_BS.scatter(-1, top_i, top_w / top_w.sum(-1, keepdim=True))
        touched_BS = base_BS.bool().scatter(-1, top_i, True)
    else:
        weight_BS, touched_BS = torch.ones_like(base_BS), torch.ones_like(base_BS, dtype=torch.bool)
    return weight_BS, touched_BS


def _l2norm(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-6)
