"""A brute-force, token-by-token implementation of one MoM layer straight from shared/mom-spec.md.

Independent of momctl's grouping, conv and recurrence code: it keeps each memory's matrix and conv window in
Python lists and walks the tokens one at a time in float64. Tests compare the real layer against it.
"""

import torch
import torch.nn.functional as F


def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _rms(x, weight, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def spec_mixer(mixer, x_BTD, valid_BT=None):
    """y `[B, T, D]` of `mixer` (a momctl MoMMixer) computed per token; padding tokens (valid 0) are skipped."""
    c = mixer.config
    P = {name: p.detach().double() for name, p in mixer.named_parameters()}
    x_BTD = x_BTD.double()
    B, T, D = x_BTD.shape
    E, A, H, K, V, W = c.num_memories, c.top_k, c.num_heads, c.head_dim, c.head_v_dim, c.conv_size
    slots = E + int(c.shared_memory)
    valid_BT = torch.ones(B, T, dtype=torch.bool) if valid_BT is None else valid_BT.bool()

    def proj(kind, s, x):
        name = f"shared_{kind}.weight" if s == E else f"{kind}_proj.{s}.weight"
        return P[name] @ x

    conv_w = torch.cat([P["q_conv1d.weight"], P["k_conv1d.weight"], P["v_conv1d.weight"]])[:, 0]  # [C, W]
    y = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        memory = [torch.zeros(H, K, V, dtype=torch.float64) for _ in range(slots)]
        window = [torch.zeros(W - 1, conv_w.shape[0], dtype=torch.float64) for _ in range(slots)]
        for t in range(T):
            if not valid_BT[b, t]:
                continue
            x = x_BTD[b, t]
            if E > 1:
                p = torch.softmax(P["gate.weight"] @ x, -1)
                w, idx = p.topk(A)
                w = w / w.sum()
                routed = list(zip(idx.tolist(), w.tolist(), strict=True))
            else:
                routed = [(0, 1.0)]
            if c.shared_memory:
                routed.append((E, 1.0))
            q_tilde = P["q_proj.weight"] @ x
            inputs = {s: torch.cat([q_tilde, proj("k", s, x), proj("v", s, x)]) for s in range(slots)}
            moving = range(slots) if c.conv_scope == "time" else [s for s, _ in routed]
            conv_out = {}
            for s in moving:
                hist = torch.cat([window[s], inputs[s][None]])  # [W, C], oldest first
                conv_out[s] = F.silu((hist.T * conv_w).sum(-1))
                window[s] = hist[1:]
            o = torch.zeros(H, V, dtype=torch.float64)
            for s, weight in routed:
                q, k, v = conv_out[s].split([H * K, H * K, H * V])
                q, k, v = _l2(q.view(H, K)), _l2(k.view(H, K)), v.view(H, V)
                beta = torch.sigmoid(proj("b", s, x)) if c.has_beta else torch.ones(H, dtype=torch.float64)
                if c.has_decay:
                    alpha = torch.exp(-P["A_log"].exp() * F.softplus(proj("a", s, x) + P["dt_bias"]))
                else:
                    alpha = torch.ones(H, dtype=torch.float64)
                for h in range(H):
                    kk = k[h][:, None]
                    if c.has_beta:
                        memory[s][h] = alpha[h] * (torch.eye(K, dtype=torch.float64) - beta[h] * kk @ kk.T) @ \
                            memory[s][h] + beta[h] * kk @ v[h][None]
                    else:
                        memory[s][h] = alpha[h] * memory[s][h] + kk @ v[h][None]
                o = o + weight * (memory[s].transpose(1, 2) @ q[..., None])[..., 0] * K ** -0.5
            gate = (P["g_proj.weight"] @ x).view(H, V)
            o = _rms(o, P["o_norm.weight"], c.norm_eps) * F.silu(gate)
            y[b, t] = P["o_proj.weight"] @ o.reshape(H * V)
    return y
