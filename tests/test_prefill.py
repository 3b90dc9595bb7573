"""Prompt prefill in chunks: eager, and (GPU) replayed from a captured CUDA graph per chunk."""

import pytest
import torch
from helpers import random_model, rel_err, small_config

from momctl.prefill import GraphedPrefill, prefill_in_chunks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _assert_same_state(a, b, tolerance):
    assert torch.equal(a.positions, b.positions)
    for x, y in zip(a.layers, b.layers, strict=True):
        for name in vars(x):
            assert rel_err(getattr(x, name).float(), getattr(y, name).float()) < tolerance, name


@pytest.mark.parametrize("overrides", [dict(), dict(conv_scope="time"), dict(update_rule="gated")])
def test_the_zero_state_prefills_like_no_state(overrides):
    """GraphedPrefill starts a prompt from `init_state`: it must be the state of no tokens."""
    model = random_model(small_config(**overrides))
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    fresh = model.prefill(ids, None, mask, last_logits_only=True)
    zero = model.prefill(ids, model.init_state(2), mask, last_logits_only=True)
    assert rel_err(zero[0], fresh[0]) < 1e-6
    _assert_same_state(zero[1], fresh[1], 1e-6)


def test_prefill_in_chunks_equals_one_prefill_and_returns_the_last_logits():
    model = random_model(small_config())
    ids = torch.randint(0, 50, (2, 11))
    logits, state = model.prefill(ids)
    last_BW, chunked = prefill_in_chunks(model, ids, chunk=4)
    assert last_BW.shape == (2, logits.shape[-1]) and rel_err(last_BW, logits[:, -1]) < 1e-5
    _assert_same_state(chunked, state, 1e-5)


def test_graphed_prefill_refuses_models_it_cannot_hold():
    model = random_model(small_config())
    assert not GraphedPrefill.supports(model)  # on the CPU
    with pytest.raises(ValueError, match="CUDA device without attention layers"):
        GraphedPrefill(model)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("overrides", [dict(), dict(conv_scope="time"), dict(num_memories=1, top_k=1,
                                                                               shared_memory=False)])
def test_graphed_prefill_equals_eager_chunks_on_cuda(overrides):
    """Left padding to whole chunks, prompts of different lengths, a continued state and a second batch size."""
    torch.manual_seed(0)
    model = random_model(small_config(**overrides), dtype=torch.float32).cuda()
    graphed = GraphedPrefill(model, chunk=16)
    for B, T in [(2, 37), (2, 5), (3, 16)]:
        ids = torch.randint(0, 50, (B, T), device="cuda")
        mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
        mask[0, :3] = False  # a shorter, left-padded prompt
        with torch.no_grad():
            want_BW, want = prefill_in_chunks(model, ids, mask, chunk=16)
        got_BW, got = graphed(ids, mask)
        assert rel_err(got_BW, want_BW) < 1e-5
        _assert_same_state(got, want, 1e-5)
        more = torch.randint(0, 50, (B, 21), device="cuda")
        with torch.no_grad():
            want_BW, want = prefill_in_chunks(model, more, None, want, chunk=16)
        got_BW, got = graphed(more, None, got)
        assert rel_err(got_BW, want_BW) < 1e-5
        _assert_same_state(got, want, 1e-5)
    assert sorted(graphed._graphs) == [2, 3]


@pytest.mark.gpu
@cuda
def test_graphed_prefill_makes_no_host_synchronisation_after_capture():
    model = random_model(small_config(), dtype=torch.float32).cuda()
    graphed = GraphedPrefill(model, chunk=16)
    ids = torch.randint(0, 50, (2, 40), device="cuda")
    graphed(ids)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graphed(ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
