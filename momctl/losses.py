"""Load-balancing auxiliary losses for the router (added in training only, never to the eval loss).

Legend: Y layers, B batch, T time, E memories, A top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def global_balance_loss(router_logits_YBTE: torch.Tensor, valid_BT: torch.Tensor, top_k: int) -> torch.Tensor:
    """FLA's loss over all layers' rows together: E * sum_j sum_e f[j, e] * P[e] (masked means over real tokens)."""
    E = router_logits_YBTE.shape[-1]
    probs = F.softmax(router_logits_YBTE.float(), dim=-1)
    chosen_YBTAE = F.one_hot(probs.topk(top_k, dim=-1).indices, E).float()
    m_YBT = valid_BT.float().expand(router_logits_YBTE.shape[:-1])
    count = m_YBT.sum().clamp(min=1)
    f_AE = (chosen_YBTAE * m_YBT[..., None, None]).sum((0, 1, 2)) / count
    p_E = (probs * m_YBT[..., None]).sum((0, 1, 2)) / count
    return E * (f_AE * p_E).sum()


def layerwise_balance_loss(router_logits_YBTE: torch.Tensor, valid_BT: torch.Tensor, top_k: int) -> torch.Tensor:
    """The published checkpoints' loss: per layer E^2 * mean_{b,e}(f * p) with a softmax over the top-k logits only."""
    E = router_logits_YBTE.shape[-1]
    top = router_logits_YBTE.float().topk(top_k, dim=-1)
    w_YBTE = torch.zeros_like(router_logits_YBTE, dtype=torch.float32).scatter(-1, top.indices,
                                                                               F.softmax(top.values, dim=-1))
    chosen_YBTE = torch.zeros_like(w_YBTE).scatter(-1, top.indices, 1.0)
    m_BT1 = valid_BT.float()[..., None]
    count_B1 = m_BT1.sum(1).clamp(min=1)  # [B, 1]
    f_YBE = (chosen_YBTE * m_BT1).sum(2) / count_B1
    p_YBE = (w_YBTE * m_BT1).sum(2) / count_B1
    return (E * E * (f_YBE * p_YBE).mean((1, 2))).mean()


def balance_loss(kind: str, router_logits: list[torch.Tensor], valid_BT: torch.Tensor, top_k: int) -> torch.Tensor:
    """The aux loss of `kind` (`global` | `layerwise`) over the MoM layers' router logits `[B, T, E]` each."""
    stacked = torch.stack(router_logits)
    if kind == "global":
        return global_balance_loss(stacked, valid_BT, top_k)
    return layerwise_balance_loss(stacked, valid_BT, top_k)
