"""`momctl bench` on CUDA (run on the GPU machine: `pytest -m gpu`): CUDA-event timing, peak memory, a real OOM."""

import pytest
import torch
from test_bench import check_document

from momctl import get_preset
from momctl.bench import resolve_settings, run_bench

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def settings(**overrides):
    options = dict(device=torch.device("cuda"), modes="train", models="mom,transformer", seq_lens="64,128",
                   scope=None, batch_tokens=None, batch_sizes="2", dtype="auto", repeats=3, new_tokens=4,
                   backend="eager", baseline=None, profile=False, seed=0)
    return resolve_settings(**{**options, **overrides})


@pytest.mark.parametrize("modes", ["train,prefill", "decode,generate"])
def test_every_mode_on_cuda(modes):
    doc = run_bench(settings(modes=modes, models="mom,gdn,transformer,hybrid" if "decode" in modes else
                             "mom,gdn,transformer", profile="train" in modes), get_preset("tiny"), "preset tiny",
                    raise_errors=True)
    check_document(doc)
    assert [c["status"] for c in doc["results"]] == ["ok"] * len(doc["results"])
    if "train" in modes:
        assert all(sum(c["profile"]["time_fractions"].values()) == pytest.approx(1) for c in doc["results"])


def test_the_reference_decodes_eagerly_beside_our_compiled_step():
    doc = run_bench(settings(modes="decode", models="mom,reference", seq_lens="64", backend="compile"),
                    get_preset("tiny"), "preset tiny")
    check_document(doc)
    mom, reference = doc["results"]
    assert mom["status"] == "ok" and mom["reason"] is None
    if reference["status"] == "ok":  # FLA installed: timed, and the cell says with which backend
        assert reference["reason"] == "the reference decodes eagerly only: eager backend"
    else:
        assert reference["status"] == "skipped" and "flash-linear-attention" in reference["reason"]


def test_real_out_of_memory_is_a_cell_and_the_sweep_goes_on():
    # 256 x 1M tokens of width 64 in fp32 is 64 GiB per activation: more than any GPU here holds several times over.
    doc = run_bench(settings(modes="prefill", models="transformer", seq_lens="1048576,64", batch_sizes="256",
                             scope="layer"), get_preset("tiny"), "preset tiny")
    check_document(doc)
    assert [c["status"] for c in doc["results"]] == ["oom", "ok"]


def test_paper_layer_against_the_reference():
    """The paper's 340M layer in training at 1K tokens; FLA's MoM when it is installed (skipped cells otherwise)."""
    doc = run_bench(settings(seq_lens="1024", batch_sizes="4", models="mom,gdn,transformer,reference",
                             baseline="reference"), get_preset("mom-340m"), "preset mom-340m")
    check_document(doc)
    status = {c["model"]: c["status"] for c in doc["results"]}
    assert status["mom"] == status["gdn"] == status["transformer"] == "ok"
    assert status["reference"] in ("ok", "skipped"), doc["results"]
    assert all(c["tflops_per_s"] > 1 for c in doc["results"] if c["status"] == "ok")
