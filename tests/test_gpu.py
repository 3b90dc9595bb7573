"""GPU checks (run on the GPU machine: `pytest -m gpu`): parity on CUDA, sync-free decode, bf16."""

import pytest
import torch
from helpers import random_model, rel_err, small_config
from test_parity_fla import META, TENSORS, TOLERANCE, fla_model

from momctl import MoMForCausalLM, get_preset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("tag", sorted(META["configs"]))
@pytest.mark.parametrize("case", sorted(META["cases"]))
def test_logits_match_fla_on_cuda(tag, case):
    model = fla_model(tag).cuda()
    ids, lengths = TENSORS[f"{tag}.{case}.input_ids"], TENSORS[f"{tag}.{case}.lengths"]
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    with torch.no_grad():
        ours = model(ids.cuda(), attention_mask=mask.long().cuda()).logits.cpu()
    assert rel_err(ours[mask], TENSORS[f"{tag}.{case}.logits"][mask]) < TOLERANCE[case]


@pytest.mark.parametrize("overrides", [dict(), dict(conv_scope="time"), dict(num_layers=3, attention_layers=(1,))])
def test_step_makes_no_host_synchronisation(overrides):
    model = random_model(small_config(**overrides), dtype=torch.float32).cuda()
    _, state = model.prefill(torch.randint(0, 50, (4, 20), device="cuda"))
    token = torch.randint(0, 50, (4,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_decode_equals_forward_on_cuda_fp32():
    model = random_model(small_config(), dtype=torch.float32).cuda()
    ids = torch.randint(0, 50, (3, 40), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
    logits, state = model.prefill(ids[:, :10])
    steps = [model.step(ids[:, t], state) for t in range(10, 11)]
    assert rel_err(logits, full[:, :10]) < 1e-5
    assert rel_err(steps[0][0], full[:, 10]) < 1e-5


@pytest.mark.parametrize("preset,attention_layers", [("mom-340m", ()), ("hybrid-340m", (5,))])
def test_paper_layers_forward_backward_bf16_autocast(preset, attention_layers):
    """Six blocks of the paper's 340M shapes (the pure-PyTorch path), bf16 autocast, loss with the aux term."""
    torch.manual_seed(0)
    config = get_preset(preset).replace(num_layers=6, attention_layers=attention_layers)
    model = MoMForCausalLM(config).cuda().train()
    ids = torch.randint(0, 32000, (2, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, targets=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("autocast", [False, True])
def test_project_copies_on_the_grouped_gemm_matches_the_fp64_product(top_k, autocast):
    """The CUDA path of the per-memory projections (grouped GEMMs forward and backward, copies gathered again in
    the backward) against fp64 autograd on the CPU, with empty memories and under bf16 autocast of fp32 tensors."""
    from test_packed import grouped_projection_case

    from momctl.packing import grouped_linear, project_copies

    x, w, packing = grouped_projection_case(torch.float32 if autocast else torch.bfloat16, "cuda", top_k, 2056, 1024)
    dy = torch.randn(packing.num_copies, 2056, device="cuda", dtype=torch.bfloat16)
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = project_copies(xi, wi, packing)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and xi.grad.dtype == x.dtype and wi.grad.dtype == w.dtype
    cpu = [t.detach().cpu().double().requires_grad_() for t in (x, w)]
    ends = packing.slot_ends_S.cpu()
    expected = grouped_linear(cpu[0][packing.token_of_copy_M.cpu()], cpu[1], ends)
    expected.backward(dy.cpu().double())
    assert rel_err(y.double().cpu(), expected) < 5e-3
    assert rel_err(xi.grad.double().cpu(), cpu[0].grad) < 5e-3
    assert rel_err(wi.grad.double().cpu(), cpu[1].grad) < 5e-3
    if top_k == 1:
        assert wi.grad[[0, 1, 3]].eq(0).all()

