"""The exported graphs' MoM step on ONNX Runtime's fused ops (export/ort_step.py): in PyTorch it is the reference
step's function for every update rule and conv scope, untouched slots stay bit for bit, and each fused op's PyTorch
semantics are ONNX Runtime's (one-op graphs run in ONNX Runtime's CPU kernels)."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import random_model, rel_err, small_config
from test_step import FAMILIES

from momctl import StepState
from momctl.export.onnx_export import export_bundle
from momctl.export.onnx_io import layer_to_graph_layout
from momctl.export.ort_ops import (
    TRANSLATIONS,
    UPDATE_RULES,
    add_rms_norm,
    causal_conv_silu,
    decay_gate,
    gated_delta_net,
    gated_rms_norm,
    linear_attention,
)
from momctl.export.ort_step import _routing, _smallest_positive, mom_step_ort, mom_step_ort_cuda, ort_add_norm
from momctl.export.step import decode_step
from momctl.kernels.common import naive_step
from momctl.state import KVCache, MemoryState
from momctl.tokenizers import ByteTokenizer


def to_graph_layout(state: StepState, ops: str = "onnxruntime") -> StepState:
    """A StepState with the MoM layers' tensors in the layouts of a graph on `ops`, without a dtype change."""
    layers = [layer if isinstance(layer, KVCache) else
              MemoryState(*layer_to_graph_layout(layer.memory, layer.conv, ops)) for layer in state.layers]
    return StepState(layers, state.positions, state.cache_length)


STEPS = {"onnxruntime": mom_step_ort, "onnxruntime-cuda": mom_step_ort_cuda}


@pytest.mark.parametrize("ops", STEPS)
@pytest.mark.parametrize("family", [*FAMILIES, "value width 2K", "value width 2K, delta"])
def test_fused_op_step_is_the_reference_step(family, ops, monkeypatch):
    """Logits and every state tensor equal the reference step's over fed-back steps after a prefill (fp64; the
    residual adds fused with their norms as in the graphs). GatedDeltaNet's q/k l2 norm adds 1e-12 to |x|^2, the
    model's 1e-6: the reference takes GatedDeltaNet's for that step. With V != K the CUDA graphs' conv windows are
    3-d (`conv_shape`)."""
    if ops == "onnxruntime-cuda":
        monkeypatch.setattr(naive_step, "_l2norm", lambda x: x * torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-12))
    wide = {"value width 2K": dict(expand_v=2.0), "value width 2K, delta": dict(expand_v=2.0, update_rule="delta")}
    model = random_model(small_config(**{**FAMILIES, **wide}[family]))
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    _, prefilled = model.prefill(ids[:, :5])
    state = StepState.from_inference(prefilled, capacity=16 if model.config.attention_layers else None)
    graph_state = to_graph_layout(state, ops)
    with torch.no_grad():
        for t in range(5, 10):
            want, state = model.step(ids[:, t], state)
            got, graph_state = decode_step(model, ids[:, t], graph_state, memory_step=STEPS[ops],
                                           add_norm=ort_add_norm)
            assert rel_err(got, want) < 1e-12, (family, t)
            for a, b in zip(graph_state.tensors(), to_graph_layout(state, ops).tensors(), strict=True):
                assert rel_err(a, b) < 1e-12, (family, t)


@pytest.mark.parametrize("ops", STEPS)
@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_untouched_slots_keep_memory_and_conv_window_bit_for_bit(rule, ops):
    model = random_model(small_config(num_memories=4, top_k=1, update_rule=rule))
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    _, prefilled = model.prefill(ids[:, :6])
    before = to_graph_layout(StepState.from_inference(prefilled), ops)
    with torch.no_grad():
        _, after = decode_step(model, ids[:, 6], before, memory_step=STEPS[ops])
    c = model.config
    if ops == "onnxruntime-cuda":  # back to slot-major conv windows
        before, after = (StepState([MemoryState(s.layers[0].memory, torch.cat(
            [p.unflatten(1, (c.num_slots, -1)) for p in s.layers[0].conv.flatten(1, -2).split(
                [c.key_dim * c.num_slots] * 2
                                                                                + [c.value_dim * c.num_slots], 1)],
            2).flatten(1, 2))], s.positions) for s in (before, after))
    memory, new_memory, conv, new_conv = (getattr(s.layers[0], name).unflatten(1, (c.num_slots, -1))
                                          for name in ("memory", "conv") for s in (before, after))
    for b in range(3):
        changed = [not torch.equal(memory[b, s], new_memory[b, s]) for s in range(c.num_slots)]
        moved = [not torch.equal(conv[b, s], new_conv[b, s]) for s in range(c.num_slots)]
        assert sum(changed[:4]) == 1 and changed[4] and moved == changed, (b, changed, moved)


def export_and_run(module: torch.nn.Module, args: tuple, tmp_path) -> list[np.ndarray]:
    """The module exported with TRANSLATIONS, run in ONNX Runtime's CPU kernels on args."""
    path = tmp_path / "op.onnx"
    torch.onnx.export(module.eval(), args, dynamo=True, custom_translation_table=TRANSLATIONS).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)})


class OneOp(torch.nn.Module):
    def __init__(self, op, *extra):
        super().__init__()
        self.op, self.extra = op, extra

    def forward(self, *args):
        return self.op(*args, *self.extra)


@pytest.mark.parametrize("rule", UPDATE_RULES)
@pytest.mark.parametrize("N,M,V", [(3, 3, 6), (12, 3, 1), (6, 2, 2)])
def test_linear_attention_is_onnx_runtimes(rule, N, M, V, tmp_path):
    """N heads of value width V reading M q/k heads (head n reads q/k head n // (N/M)), as the memories' value
    columns read their head's q and k."""
    gen = torch.Generator().manual_seed(2)
    B, K = 2, 8
    q, k = (torch.nn.functional.normalize(torch.randn(B, 1, M, K, generator=gen), dim=-1).reshape(B, 1, M * K)
            for _ in range(2))
    v, state = torch.randn(B, 1, N * V, generator=gen), torch.randn(B, N, K, V, generator=gen)
    decay = -torch.rand(B, 1, N, generator=gen) if "gated" in rule else None
    beta = torch.rand(B, 1, N, generator=gen) if "delta" in rule else None
    tensors = [t for t in (q, k, v, state, decay, beta)]

    class Op(torch.nn.Module):  # absent decay/beta stay absent in the graph
        def forward(self, q, k, v, state, *rest):
            rest = iter(rest)
            return linear_attention(q, k, v, state, next(rest) if decay is not None else None,
                                    next(rest) if beta is not None else None, rule)

    args = tuple(t for t in tensors if t is not None)
    got = export_and_run(Op(), args, tmp_path)
    want = Op()(*args)
    assert all(rel_err(torch.from_numpy(g), w) < 1e-6 for g, w in zip(got, want, strict=True))


def test_conv_and_gate_are_onnx_runtimes(tmp_path):
    gen = torch.Generator().manual_seed(3)
    x, weight, window = torch.randn(2, 5, 1, generator=gen), torch.randn(5, 1, 4, generator=gen), torch.randn(
        2, 5, 3, generator=gen)
    got = export_and_run(OneOp(causal_conv_silu), (x, weight, window), tmp_path)
    assert all(rel_err(torch.from_numpy(g), w) < 1e-6 for g, w in zip(got, causal_conv_silu(x, weight, window),
                                                                         strict=True))
    a, b = torch.randn(2, 1, 6, generator=gen), torch.randn(2, 1, 6, generator=gen)
    a[0, 0, 1] = b[0, 0, 1] = b[1, 0, 4] = a[1, 0, 5] = float("-inf")  # the step's untouched slots: decay 0, beta 0
    dt_bias, decay_scale = torch.randn(6, generator=gen), -torch.rand(6, generator=gen)
    got = export_and_run(OneOp(decay_gate), (a, dt_bias, decay_scale, b), tmp_path)
    assert all(rel_err(torch.from_numpy(g), w) < 1e-6 for g, w in zip(got, decay_gate(a, dt_bias, decay_scale, b),
                                                                         strict=True))


def test_every_norm_is_one_node_at_wide_heads(tmp_path):
    """At K = 128 the q/k L2 norm's epsilon over K (7.8e-9) is below the exporter's zero tolerance: written as a
    scalar, its Add was dropped (the norm then neither had its epsilon nor fused into one node)."""
    model = random_model(small_config(num_layers=1, head_dim=128), dtype=torch.float32)
    report = export_bundle(model, ByteTokenizer(), tmp_path / "bundle", verify_steps=1)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(report.folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    # attn_norm, q/k L2 norm; the gated o_norm; mlp_norm and the final norm with their residual adds
    assert ops["SimplifiedLayerNormalization"] == 2 and ops["GatedRMSNorm"] == 1, ops
    assert ops["SkipSimplifiedLayerNormalization"] == 2, ops
    assert not ops["Pow"] and not ops["Sqrt"], ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_is_onnx_runtimes(dtype, tmp_path):
    gen = torch.Generator().manual_seed(4)
    x, skip = (torch.randn(3, 16, generator=gen).to(dtype) for _ in range(2))
    weight = 1 + 0.2 * torch.randn(16, generator=gen)  # fp32, as the models keep norm weights
    got = export_and_run(OneOp(add_rms_norm, weight, 1e-6), (x, skip), tmp_path)
    want = add_rms_norm(x, skip, weight, 1e-6)
    assert torch.equal(torch.from_numpy(got[1]), want[1]) and torch.equal(want[1], x + skip)
    # the normalised output: to fp32 rounding, and to one fp16 rounding step of it
    assert rel_err(torch.from_numpy(got[0]).float(), want[0].float()) < (1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_rms_norm_is_onnx_runtimes(dtype, tmp_path):
    """Per head: x [B, H, V] normalised over V, times the weight and SiLU of the gate."""
    gen = torch.Generator().manual_seed(5)
    x, gate = (torch.randn(3, 2, 16, generator=gen).to(dtype) for _ in range(2))
    weight = 1 + 0.2 * torch.randn(16, generator=gen)
    got = torch.from_numpy(export_and_run(OneOp(gated_rms_norm, weight, 1e-5), (x, gate), tmp_path)[0])
    want = gated_rms_norm(x, gate, weight, 1e-5)
    assert got.dtype == want.dtype == dtype
    assert rel_err(got.float(), want.float()) < (1e-6 if dtype == torch.float32 else 1e-3)
    ref = torch.nn.functional.rms_norm(x.double(), (16,), weight.to(dtype).double(), 1e-5) * F.silu(gate.double())
    assert rel_err(want.double(), ref) < (1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_gated_delta_net_is_the_other_fused_ops(rule):
    """GatedDeltaNet (no CPU kernel to run) against the ops ONNX Runtime's CPU kernels check above: its l2 norm, then
    LinearAttentionGate's gates and LinearAttention's update on the state it takes V-major; gate inputs of -inf (the
    step's untouched slots) leave the state bit for bit."""
    gen = torch.Generator().manual_seed(6)
    B, N, K, V = 3, 4, 8, 6
    qkv, state = torch.randn(B, 2 * N * K + N * V, generator=gen), torch.randn(B, N, V, K, generator=gen)
    a_log, dt_bias = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    gated, delta = "gated" in rule, "delta" in rule
    decay = torch.randn(B, N, generator=gen) if gated else None
    beta = torch.randn(B, N, generator=gen) if delta else None
    for raw in (decay, beta):
        if raw is not None:
            raw[0, 1] = float("-inf")
    q, k, v = qkv.split([N * K, N * K, N * V], dim=-1)
    o, new_state = gated_delta_net(q.reshape(B, N, K), k.reshape(B, N, K), v.reshape(B, N, V), decay, beta, state,
                                   a_log, dt_bias, rule)
    q, k = (t.reshape(B, N, K) * torch.rsqrt(t.reshape(B, N, K).square().sum(-1, keepdim=True) + 1e-12)
            for t in (q, k))
    g, b = decay_gate(decay if gated else torch.zeros(B, N), dt_bias, -a_log.exp(),
                      beta if delta else torch.zeros(B, N))
    want_o, want_state = linear_attention(q.reshape(B, 1, N * K), k.reshape(B, 1, N * K), v[:, None],
                                          state.transpose(-1, -2), g[:, None] if gated else None,
                                          b[:, None] if delta else None, rule)
    assert rel_err(o, want_o.reshape(B, N, V)) < 1e-6 and rel_err(new_state, want_state.transpose(-1, -2)) < 1e-6
    if gated and delta:
        assert torch.equal(new_state[0, 1], state[0, 1])


def test_cuda_graph_routing_keeps_the_subnormal_untouched_weight_through_export(tmp_path):
    """The onnxruntime-cuda step's routing row (no Relu): a routed memory the token does not reach has weight -2^-24
    in fp16, fp16's smallest subnormal, which must survive the exporter's constant folding and compare below 0 in
    ONNX Runtime (flushed to -0 it would count as touched); a top-k weight that underflows to 0 still counts."""
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(3)).half()
    logits[0] = torch.tensor([30.0, -20.0, 0.0, 1.0])  # the second weight, e^-29, is 0 in fp16
    routing = OneOp(lambda x: _routing(x, 4, 2, 5, x, untouched_weight=-_smallest_positive(x.dtype)))
    weight, touched = export_and_run(routing, (logits,), tmp_path)
    want_weight, want_touched = routing(logits)
    assert np.array_equal(weight.view(np.uint16), want_weight.numpy().view(np.uint16))
    assert np.array_equal(touched, want_touched.numpy())
    assert weight.view(np.uint16)[0].tolist() == [0x3C00, 0x8001, 0x8001, 0, 0x3C00]
    assert touched[0].tolist() == [True, False, False, True, True] and touched.sum(1).tolist() == [3] * 5
