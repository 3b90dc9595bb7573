"""ONNX Runtime's fused ops (domain `com.microsoft`) as torch custom ops that export to one ONNX node each.

`LinearAttention` (one token of the update rules on a `[B, heads, K, V]` state), `CausalConvWithState` (depthwise
causal conv + SiLU with its window), `LinearAttentionGate` (the decay and beta gates),
`SkipSimplifiedLayerNormalization` (residual add + RMS norm) and `GatedRMSNorm` (RMS norm times SiLU of a gate) have
CPU and CUDA kernels in ONNX Runtime (checked with 1.31.1); `GatedDeltaNet` (l2 norm, gates and update rule of one
token in one node) has a CUDA kernel only. Each op here runs in PyTorch with the semantics of ONNX
Runtime's kernel (written out below; tests/test_ort_step.py checks them against ONNX Runtime's CPU kernels, and
GatedDeltaNet against the other ops; tests/test_onnx.py's GPU tests run its graphs on the CUDA provider), traces as
one opaque node under torch.export, and `TRANSLATIONS` tells torch.onnx.export which ONNX node it becomes. One
standard op is here too, `greater_or_equal`, to keep it in fp16 (the exporter would put a Cast before it).

Shapes as ONNX Runtime takes them: B batch, N heads (all slots' heads), K key dim, V value dim, C channels, W filter
width; a `[B, 1, N*K]` tensor is one token's heads packed along the last axis.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
import torch.nn.functional as F
from torch import Tensor

DOMAIN = "com.microsoft"
_OPSET = onnxscript.values.Opset(DOMAIN, 1)
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schema(name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]],
            attributes: dict[str, onnx.defs.OpSchema.AttrType], types: dict[str, list[str]]) -> onnx.defs.OpSchema:
    """The op's signature as ONNX Runtime registers it (onnx itself does not know the domain): inputs as
    (name, type, optional)."""
    param = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    single = onnx.defs.OpSchema.FormalParameterOption.Single
    return onnx.defs.OpSchema(
        name, DOMAIN, 1,
        inputs=[param(n, t, param_option=optional if opt else single) for n, t, opt in inputs],
        outputs=[param(n, t) for n, t in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in types.items()],
        attributes=[onnx.defs.OpSchema.Attribute(a, kind, "", required=False) for a, kind in attributes.items()])


_ATTR = onnx.defs.OpSchema.AttrType
_LINEAR_ATTENTION = onnxscript.values.Op(_OPSET, "LinearAttention", _schema(
    "LinearAttention",
    [("query", "T", False), ("key", "T", False), ("value", "T", False), ("past_state", "S", True),
     ("decay", "T", True), ("beta", "T", True)],
    [("output", "T"), ("present_state", "S")],
    {"q_num_heads": _ATTR.INT, "kv_num_heads": _ATTR.INT, "update_rule": _ATTR.STRING, "scale": _ATTR.FLOAT},
    {"T": _FLOATS, "S": _FLOATS}))
_CAUSAL_CONV = onnxscript.values.Op(_OPSET, "CausalConvWithState", _schema(
    "CausalConvWithState",
    [("input", "T", False), ("weight", "T", False), ("bias", "T", True), ("past_state", "T", True)],
    [("output", "T"), ("present_state", "T")], {"activation": _ATTR.STRING}, {"T": _FLOATS}))
_GATE = onnxscript.values.Op(_OPSET, "LinearAttentionGate", _schema(
    "LinearAttentionGate",
    [("a", "T", False), ("dt_bias", "TF", False), ("decay_scale", "TF", False), ("b", "T", True)],
    [("decay", "T"), ("beta", "T")], {}, {"T": _FLOATS, "TF": ["tensor(float)"]}))

_SKIP_NORM = onnxscript.values.Op(_OPSET, "SkipSimplifiedLayerNormalization", _schema(
    "SkipSimplifiedLayerNormalization",
    [("input", "T", False), ("skip", "T", False), ("gamma", "T", False), ("bias", "T", True)],
    [("output", "T"), ("mean", "U"), ("inv_std_var", "U"), ("input_skip_bias_sum", "T")],
    {"epsilon": _ATTR.FLOAT}, {"T": _FLOATS, "U": ["tensor(float)"]}))

_GATED_NORM = onnxscript.values.Op(_OPSET, "GatedRMSNorm", _schema(
    "GatedRMSNorm", [("X", "T", False), ("scale", "T", False), ("gate", "T", False)], [("Y", "T")],
    {"activation": _ATTR.STRING, "epsilon": _ATTR.FLOAT}, {"T": _FLOATS}))

_GATED_DELTA_NET = onnxscript.values.Op(_OPSET, "GatedDeltaNet", _schema(
    "GatedDeltaNet",
    [("query", "T", False), ("key", "T", True), ("value", "T", True), ("cu_seqlens", "TI", True),
     ("decay", "TS", True), ("beta", "TS", True), ("initial_state", "TS", True), ("a_log", "TS", True),
     ("dt_bias", "TS", True)],
    [("output", "T"), ("final_state", "TS")],
    {"update_rule": _ATTR.STRING, "gate_activation": _ATTR.STRING, "beta_activation": _ATTR.STRING,
     "qk_l2_norm": _ATTR.INT},
    {"T": _FLOATS, "TS": ["tensor(float)"], "TI": ["tensor(int32)"]}))

UPDATE_RULES = ("linear", "gated", "delta", "gated_delta")


@torch.library.custom_op("momctl_ort::linear_attention", mutates_args=())
def linear_attention(query: Tensor, key: Tensor, value: Tensor, past_state: Tensor, decay: Tensor | None,
                     beta: Tensor | None, update_rule: str) -> tuple[Tensor, Tensor]:
    """One token of `update_rule` for every head n: with alpha = exp(decay) (1 without) and beta (1 without),
    S' = alpha S + k (beta (v - alpha S^T k))^T for the delta rules, S' = alpha S + k v^T otherwise;
    o = K^-0.5 q^T S'. Takes the state `[B, N, K, D]`, v `[B, 1, N*D]`, decay and beta `[B, 1, N]`, and q, k
    `[B, 1, M*K]` for M heads dividing N: head n reads q and k head n // (N / M) (ONNX Runtime's grouped heads).
    Returns o `[B, 1, N*D]` and S'."""
    B, N, K, D = past_state.shape
    M = query.shape[-1] // K
    q, k = (t.reshape(B, M, 1, K).expand(B, M, N // M, K).reshape(B, N, K) for t in (query, key))
    v = value.reshape(B, N, D)
    state = past_state
    if decay is not None:
        state = decay.reshape(B, N, 1, 1).exp() * state
    u = v
    if update_rule in ("delta", "gated_delta"):
        u = beta.reshape(B, N, 1) * (v - torch.einsum("bnk,bnkd->bnd", k, state))
    new_state = state + k[..., None] * u[:, :, None]
    o = torch.einsum("bnk,bnkd->bnd", q, new_state) * K ** -0.5
    return o.reshape(B, 1, N * D), new_state


@linear_attention.register_fake
def _(query, key, value, past_state, decay, beta, update_rule):
    return value.new_empty(value.shape), torch.empty_like(past_state)


def _linear_attention_onnx(query, key, value, past_state, decay, beta, update_rule: str):
    return _LINEAR_ATTENTION(query, key, value, past_state, decay, beta,
                             q_num_heads=query.shape[-1] // past_state.shape[2], kv_num_heads=past_state.shape[1],
                             update_rule=update_rule, _num_outputs=2)


@torch.library.custom_op("momctl_ort::causal_conv_silu", mutates_args=())
def causal_conv_silu(x: Tensor, weight: Tensor, past_state: Tensor) -> tuple[Tensor, Tensor]:
    """One step of a depthwise causal conv + SiLU: x `[B, C, 1]`, weight `[C, 1, W]`, the window `[B, C, W-1]`;
    returns y = SiLU(sum_j w_j [window, x]_j) `[B, C, 1]` and the window moved on by x."""
    full = torch.cat([past_state, x], dim=-1)
    return F.silu((full * weight[:, 0]).sum(-1, keepdim=True)), full[..., 1:]


@causal_conv_silu.register_fake
def _(x, weight, past_state):
    return torch.empty_like(x), torch.empty_like(past_state)


def _causal_conv_silu_onnx(x, weight, past_state):
    return _CAUSAL_CONV(x, weight, None, past_state, activation="silu", _num_outputs=2)


@torch.library.custom_op("momctl_ort::decay_gate", mutates_args=())
def decay_gate(a: Tensor, dt_bias: Tensor, decay_scale: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """decay = decay_scale * softplus(a + dt_bias) and beta = sigmoid(b), for a, b `[B, 1, N]` and per-head fp32
    dt_bias, decay_scale `[N]`."""
    return (decay_scale * F.softplus(a + dt_bias)).to(a.dtype), b.sigmoid()


@decay_gate.register_fake
def _(a, dt_bias, decay_scale, b):
    return torch.empty_like(a), torch.empty_like(b)


def _decay_gate_onnx(a, dt_bias, decay_scale, b):
    return _GATE(a, dt_bias, decay_scale, b, _num_outputs=2)


@torch.library.custom_op("momctl_ort::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, skip: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add and the RMS norm after it, as ONNX Runtime's kernel computes them: s = x + skip in at least
    fp32, y = s / sqrt(mean(s^2) + eps) * weight (weight rounded to x's dtype); returns y and s in x's dtype (y
    normalises the unrounded sum)."""
    f = torch.promote_types(x.dtype, torch.float32)
    s = x.to(f) + skip.to(f)
    y = s / torch.sqrt(s.square().mean(-1, keepdim=True) + eps) * weight.to(x.dtype).to(f)
    return y.to(x.dtype), s.to(x.dtype)


@add_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _add_rms_norm_onnx(x, skip, weight, eps: float):
    y, _, _, s = _SKIP_NORM(x, skip, onnxscript.opset18.CastLike(weight, x), None, epsilon=eps, _num_outputs=4)
    return y, s


@torch.library.custom_op("momctl_ort::gated_rms_norm", mutates_args=())
def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """ONNX Runtime's GatedRMSNorm with the SiLU gate: y = x / sqrt(mean(x^2) + eps) * weight * SiLU(gate) over the
    last axis (of width `weight`'s length), computed in fp32 (for x and gate of one dtype; weight is cast to it)."""
    f = torch.promote_types(x.dtype, torch.float32)
    y = x.to(f) / torch.sqrt(x.to(f).square().mean(-1, keepdim=True) + eps) * weight.to(x.dtype).to(f)
    return (y * F.silu(gate.to(f))).to(x.dtype)


@gated_rms_norm.register_fake
def _(x, gate, weight, eps):
    return torch.empty_like(x)


def _gated_rms_norm_onnx(x, gate, weight, eps: float):
    return _GATED_NORM(x, onnxscript.opset18.CastLike(weight, x), gate, activation="silu", epsilon=eps)


@torch.library.custom_op("momctl_ort::gated_delta_net", mutates_args=())
def gated_delta_net(q: Tensor, k: Tensor, v: Tensor, decay: Tensor | None, beta: Tensor | None, past_state: Tensor,
                    a_log: Tensor, dt_bias: Tensor, update_rule: str) -> tuple[Tensor, Tensor]:
    """ONNX Runtime's GatedDeltaNet (CUDA only) for one token, with q, k `[B, N, K]` and v `[B, N, V]` (token-major,
    one token per sequence), the V-major state `[B, N, V, K]`, and the raw gate inputs `[B, N]` it activates itself:
    q and k l2-normalised as x / sqrt(|x|^2 + 1e-12); alpha = exp(-exp(a_log) * softplus(decay + dt_bias)) (1
    without decay), beta = sigmoid(beta) (1 without); S' = alpha S + k (beta (v - alpha S^T k))^T for the delta
    rules, alpha S + k v^T otherwise; o = K^-0.5 q^T S'. Returns o `[B, N, V]` and S' (V-major). q, k, v and o
    have the graph's dtype; the gates, the state, a_log and dt_bias are the state's (float in ONNX Runtime), and
    the op computes in it.

    q, k and v go in as three inputs: given them packed in one (the op's other form), ONNX Runtime 1.31.1 made four
    device-to-device copies per node in an H100 profile, where one Split of the packed tensor is one launch."""
    K = past_state.shape[-1]
    f = past_state.dtype  # computed in the state's type (fp32 in the graphs); o comes back in v's
    q, k = (t.to(f) * torch.rsqrt(t.to(f).square().sum(-1, keepdim=True) + 1e-12) for t in (q, k))
    state = past_state.transpose(-1, -2)  # [B, N, K, V]
    if decay is not None:
        state = torch.exp(-a_log.exp() * F.softplus(decay + dt_bias))[..., None, None] * state
    u = v.to(f)
    if update_rule in ("delta", "gated_delta"):
        u = (beta.sigmoid() if beta is not None else 1)[..., None] * (u - torch.einsum("bnk,bnkv->bnv", k, state))
    new_state = state + k[..., None] * u[:, :, None]
    o = torch.einsum("bnk,bnkv->bnv", q, new_state) * K ** -0.5
    return o.to(v.dtype), new_state.transpose(-1, -2).contiguous()


@gated_delta_net.register_fake
def _(q, k, v, decay, beta, past_state, a_log, dt_bias, update_rule):
    return torch.empty_like(v), torch.empty_like(past_state)


def _gated_delta_net_onnx(q, k, v, decay, beta, past_state, a_log, dt_bias, update_rule: str):
    gated = decay is not None
    return _GATED_DELTA_NET(q, k, v, None, decay, beta, past_state, a_log if gated else None,
                            dt_bias if gated else None, update_rule=update_rule, qk_l2_norm=1,
                            gate_activation="qwen" if gated else "none",
                            beta_activation="sigmoid" if beta is not None else "none", _num_outputs=2)


@torch.library.custom_op("momctl_ort::greater_or_equal", mutates_args=())
def greater_or_equal(x: Tensor, y: Tensor) -> Tensor:
    """x >= y (y a scalar tensor of x's dtype) as one standard GreaterOrEqual node in x's dtype: the exporter's own
    decomposition compares fp16 in fp32, after a Cast (a launch more a layer)."""
    return x >= y


@greater_or_equal.register_fake
def _(x, y):
    return torch.empty_like(x, dtype=torch.bool)


def _greater_or_equal_onnx(x, y):
    return onnxscript.opset18.GreaterOrEqual(x, y)


# torch.onnx.export's custom_translation_table
TRANSLATIONS = {
    torch.ops.momctl_ort.linear_attention.default: _linear_attention_onnx,
    torch.ops.momctl_ort.causal_conv_silu.default: _causal_conv_silu_onnx,
    torch.ops.momctl_ort.decay_gate.default: _decay_gate_onnx,
    torch.ops.momctl_ort.add_rms_norm.default: _add_rms_norm_onnx,
    torch.ops.momctl_ort.gated_rms_norm.default: _gated_rms_norm_onnx,
    torch.ops.momctl_ort.gated_delta_net.default: _gated_delta_net_onnx,
    torch.ops.momctl_ort.greater_or_equal.default: _greater_or_equal_onnx,
}
