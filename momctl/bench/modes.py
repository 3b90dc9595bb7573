"""One measurement cell: a model in one mode at one sequence length and batch size.

- train: forward + backward (gradients of the weights and, for a layer, of its input), no optimiser step;
  tokens/s = B * T / time.
- prefill: forward without autograd (a layer's output, or the model's logits and recurrent state).
- decode: the state after a context of T tokens (prefilled untimed), then one token per sequence per step; the
  steps continue the sequence, so the context grows by one token per call. tokens/s = B / time per step; GB/s =
  the bytes a step must move (traffic.py) / time per step.
- generate: a prompt of T tokens, prefilled, then greedy steps until `new_tokens` tokens per sequence; the time is
  the total latency. tokens/s = B * new_tokens / time.

Legend: B batch, T time, D d_model, W vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch

from .backends import graphed_prefill, step_function
from .flops import forward_flops
from .models import Subject
from .profile import time_breakdown
from .settings import BenchSettings
from .timing import WARMUP_CALLS, peak_memory, time_calls
from .traffic import decode_step_bytes


def measure(subject: Subject, mode: str, seq_len: int, batch: int, settings: BenchSettings,
            device: torch.device) -> dict:
    """Time `subject` in `mode` on random inputs of `batch` x `seq_len`. Returns the cell's measured fields."""
    gen = torch.Generator(device=device).manual_seed(settings.seed * 1_000_003 + seq_len * 1009 + batch)
    if mode == "train":
        call = _train_call(subject, batch, seq_len, settings.torch_dtype, device, gen)
    elif mode == "prefill":
        call = _prefill_call(subject, batch, seq_len, settings.torch_dtype, device, gen)
    elif mode == "decode":
        call, state_holder = _decode_call(subject, batch, seq_len, settings, device, gen)
    else:
        call, state_holder = _generate_call(subject, batch, seq_len, settings.new_tokens, settings.backend, device,
                                            gen)
    timing = time_calls(call, device, settings.repeats)
    out: dict[str, Any] = {**timing.to_dict(), **peak_memory(call, device)}
    seconds = timing.median_ms / 1e3
    if mode in ("train", "prefill"):
        out["tokens_per_s"] = batch * seq_len / seconds
        flops = forward_flops(subject.config, subject.scope, subject.attention_layer, batch, seq_len)
        out["tflops_per_s"] = (3 if mode == "train" else 1) * flops / seconds / 1e12
    if settings.profile and device.type == "cuda" and mode != "generate":
        out["profile"] = time_breakdown(call, device)
    if mode in ("decode", "generate"):
        new_tokens = 1 if mode == "decode" else settings.new_tokens
        out["tokens_per_s"] = batch * new_tokens / seconds
        nbytes = subject.state_bytes(state_holder["state"])
        out["state_bytes_per_sequence"] = None if nbytes is None else nbytes // batch
        if mode == "decode":
            moved = decode_step_bytes(subject.config, subject.scope, subject.attention_layer, batch, seq_len,
                                      settings.torch_dtype)
            out["gb_per_s"] = moved / seconds / 1e9
    return out


def _zero_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def _inputs(subject: Subject, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device,
            gen: torch.Generator) -> torch.Tensor:
    if subject.scope == "layer":
        return torch.randn(batch, seq_len, subject.config.d_model, device=device, dtype=dtype, generator=gen)
    return torch.randint(0, subject.config.vocab_size, (batch, seq_len), device=device, generator=gen)


def _train_call(subject, batch, seq_len, dtype, device, gen):
    subject.module.train()
    params = [p for p in subject.module.parameters() if p.requires_grad]
    inputs = _inputs(subject, batch, seq_len, dtype, device, gen)
    if subject.scope == "model":
        def call():
            _zero_grads(params)
            subject.loss(inputs).backward()
        return call
    x_BTD = inputs.requires_grad_(True)
    dy_BTD = torch.randn(x_BTD.shape, device=device, dtype=dtype, generator=gen)

    def call():
        _zero_grads([*params, x_BTD])
        subject.forward(x_BTD).backward(dy_BTD)
    return call


def _prefill_call(subject, batch, seq_len, dtype, device, gen):
    subject.module.eval()
    inputs = _inputs(subject, batch, seq_len, dtype, device, gen)
    run = subject.forward if subject.scope == "layer" else lambda ids: subject.prefill(ids, None)

    def call():
        with torch.no_grad():
            run(inputs)
    return call


def _prefill_prompt(subject: Subject, ids_BT: torch.Tensor, backend: str) -> tuple[torch.Tensor, Any]:
    """Prefill a prompt as `momctl generate` does (momctl: bounded chunks with last-position logits; with the compile
    backend a CUDA graph replayed per chunk where the model allows). Returns the last position's logits `[B, W]` and
    the state."""
    graphed = graphed_prefill(subject) if backend == "compile" else None
    if graphed is not None:
        return graphed(ids_BT)
    if subject.prompt_prefill is not None:
        return subject.prompt_prefill(ids_BT)
    logits_BTW, state = subject.prefill(ids_BT, None)
    return logits_BTW[:, -1], state


def _decode_call(subject, batch, seq_len, settings, device, gen):
    subject.module.eval()
    # KV room for every step of the cell: warm-up, repeats, the peak-memory call, and a margin
    step = step_function(subject, settings.backend, seq_len + WARMUP_CALLS + settings.repeats + 8)
    ids_BT = _inputs(subject, batch, seq_len, settings.torch_dtype, device, gen)
    if subject.scope == "layer":  # one activation per sequence
        token_B = torch.randn(batch, subject.config.d_model, device=device, dtype=settings.torch_dtype, generator=gen)
    else:
        token_B = torch.randint(0, subject.config.vocab_size, (batch,), device=device, generator=gen)
    with torch.no_grad():
        # Eagerly: the context is set-up, and a prefill graph's memory pool would count in the step's peak.
        _, state = _prefill_prompt(subject, ids_BT, "eager")
    holder = {"state": state}

    def call():
        with torch.no_grad():
            _, holder["state"] = step(token_B, holder["state"])
    return call, holder


def _generate_call(subject, batch, seq_len, new_tokens, backend, device, gen):
    subject.module.eval()
    step = step_function(subject, backend, seq_len + new_tokens + 1)
    ids_BT = _inputs(subject, batch, seq_len, None, device, gen)
    holder: dict[str, Any] = {"state": None}

    def call():
        holder["state"] = None  # the previous call's state is not counted in this call's memory
        with torch.no_grad():
            logits_BW, state = _prefill_prompt(subject, ids_BT, backend)
            token_B = logits_BW.argmax(-1)
            for _ in range(new_tokens - 1):
                logits_BW, state = step(token_B, state)
                token_B = logits_BW.argmax(-1)
        holder["state"] = state
    return call, holder
