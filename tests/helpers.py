"""Shared test helpers: one error metric and small model builders."""

import torch

from momctl import ModelConfig, MoMForCausalLM


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """||actual - expected|| / ||expected|| (NaN anywhere fails as inf)."""
    if not torch.isfinite(actual).all():
        return float("inf")
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp(min=floor)).item()


def small_config(**overrides) -> ModelConfig:
    base = dict(d_model=32, num_layers=2, num_heads=2, head_dim=8, num_memories=4, top_k=2, vocab_size=50,
                intermediate_size=48, attn_num_heads=4, tie_embeddings=False)
    return ModelConfig(**{**base, **overrides})


def random_model(config: ModelConfig, seed: int = 0, dtype=torch.float64) -> MoMForCausalLM:
    """A model with O(1) random weights so that every part of every layer moves the output."""
    torch.manual_seed(seed)
    model = MoMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 8)))
            elif name.endswith("dt_bias"):
                p.uniform_(-3, 0)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()


_TRAINED = {}


def trained_tiny_run(tmp_path_factory):
    """A `tiny` model trained for 40 steps (enough to write varied text), once per test session."""
    if "run" not in _TRAINED:
        from momctl.run_config import build_run_config
        from momctl.training import train

        folder = tmp_path_factory.mktemp("trained")
        corpus = folder / "corpus.txt"
        corpus.write_text("\n".join(f"Entry {i}: routers pick memories." for i in range(300)), encoding="utf-8")
        run, explicit = build_run_config("tiny", flags={"data.source": str(corpus), "data.seq_len": 32,
                                                         "train.batch_size": 4, "train.steps": 40,
                                                         "train.save_every": 40})
        train(run, folder / "run", explicit=explicit, reporter=lambda *_: None)
        _TRAINED["run"] = folder / "run"
    return _TRAINED["run"]
