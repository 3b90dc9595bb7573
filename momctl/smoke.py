"""Build a model from a config and run it both ways (parallel forward, recurrent decode) on random tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import MomctlError
from .model import MoMForCausalLM


@dataclass
class SmokeReport:
    parameters: int
    device: str
    batch_size: int
    seq_len: int
    forward_tokens_per_s: float
    decode_tokens_per_s: float
    state_bytes_per_sequence: int
    max_rel_error: float  # recurrent decode vs parallel forward, over every position


@torch.no_grad()
def run_smoke(config: ModelConfig, batch_size: int, seq_len: int, device: torch.device, seed: int = 0) -> SmokeReport:
    """Random weights and tokens; forward over `seq_len` tokens, then prefill 1 token and step through the rest."""
    if batch_size < 1 or seq_len < 2:
        raise MomctlError(f"batch size {batch_size} / seq len {seq_len} too small; use batch >= 1 and seq len >= 2")
    torch.manual_seed(seed)
    model = MoMForCausalLM(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)

    start = time.perf_counter()
    reference = model(ids).logits.float()
    _sync(device)
    forward_s = time.perf_counter() - start

    logits, state = model.prefill(ids[:, :1])
    decoded = [logits[:, 0]]
    start = time.perf_counter()
    for t in range(1, seq_len):
        step_logits, state = model.step(ids[:, t], state)
        decoded.append(step_logits)
    _sync(device)
    decode_s = time.perf_counter() - start

    recurrent = torch.stack(decoded, dim=1).float()
    error = ((recurrent - reference).norm() / reference.norm().clamp(min=1e-12)).item()
    return SmokeReport(
        parameters=model.num_parameters(), device=str(device), batch_size=batch_size, seq_len=seq_len,
        forward_tokens_per_s=batch_size * seq_len / forward_s,
        decode_tokens_per_s=batch_size * (seq_len - 1) / max(decode_s, 1e-9),
        state_bytes_per_sequence=state.nbytes // batch_size, max_rel_error=error,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
