"""The static step compiled (`momctl generate --backend compile`): torch.compile, and on CUDA captured CUDA graphs
over ping-pong state buffers.

The step is traced whole (`fullgraph=True`, `dynamic=False`: each batch size compiles once) with the layers' input
projections packed first (export/step_weights.py). On a CPU that is all. On CUDA each batch size also gets two state
buffers A and B and two captured CUDA graphs, one reading A and writing B, the other reading B and writing A, so
nothing is copied between steps. Only the conv windows and positions really ping-pong: the MoM memories are one
buffer shared by A and B that the fused step advances in place (a memory a token does not reach is neither read nor
written: at batch 16 that saves about 40% of the step's memory traffic), and the attention layers' KV caches are
one buffer that a step appends to past the entries it reads. So the state a call returns is valid until the next
call, which advances it; passing an older one raises. A state from elsewhere (a prefilled one, or a copy) is copied
into the buffers first and never written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..state import KVCache, MemoryState, StepState
from .step import decode_step
from .step_weights import pack_for_decoding


@dataclass
class _PingPong:
    """The graphs of one batch size and KV capacity: `graphs[i]` reads `buffers[i]` and writes `buffers[1 - i]`."""

    token_B: torch.Tensor
    buffers: tuple[StepState, StepState]
    graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]
    logits: tuple[torch.Tensor, torch.Tensor]
    in_place: tuple[torch.Tensor, ...]  # the memories A and B share (advanced in place)
    current: int = 0  # the buffer holding the latest state


class CompiledStep:
    """`decode_step(model, token_ids, state)` compiled; call it like `MoMForCausalLM.step` (the KV caches must have
    room for every token: allocate `StepState.from_inference(state, capacity=...)` once, outside).

    Args:
        model: a `MoMForCausalLM` in eval mode (its projections get packed; make a new CompiledStep after moving
            or reloading the model).
        inductor: compile with torch.compile; False captures the eager step as it is (CUDA graphs only).
        step_fn: the step to compile, `decode_step`'s signature (one layer's step, for benchmarks).
    """

    def __init__(self, model: nn.Module, inductor: bool = True, step_fn=decode_step) -> None:
        self.model = model
        self.cuda_graphs = next(model.parameters()).is_cuda
        self._step_fn = step_fn
        self.compile_seconds: float | None = None
        self._layout: tuple[type, ...] | None = None
        self._graphs: dict[tuple[int, int | None], _PingPong] = {}  # (batch size, KV capacity)
        pack_for_decoding(model)
        self._compiled = self._flat_step
        if inductor or not self.cuda_graphs:
            # Coordinate-descent tuning of the generated kernels (reductions and pointwise ops of a small batch). On
            # CUDA the matmuls are autotuned too, cuBLAS against Triton templates that fuse the norm before them
            # (mom-340m at batch 16 on an H100, one run: 2.02 ms a step with cuBLAS alone, 1.95 ms autotuned).
            options = {"coordinate_descent_tuning": True}
            if self.cuda_graphs:
                options.update(max_autotune_gemm=True, max_autotune_gemm_backends="CUBLAS,TRITON")
            self._compiled = torch.compile(self._flat_step, dynamic=False, fullgraph=True, options=options)

    def _flat_step(self, token_ids_B: torch.Tensor, *tensors: torch.Tensor):
        """The step over flat tensors: the state's, then (CUDA graphs) the output buffer's."""
        n = len(tensors) // 2 if self.cuda_graphs else len(tensors)
        state = StepState.from_tensors(self._layout, list(tensors[:n]), cache_length=0)
        out = StepState.from_tensors(self._layout, list(tensors[n:]), cache_length=0) if self.cuda_graphs else None
        logits_BW, new_state = self._step_fn(self.model, token_ids_B, state, out)
        return logits_BW, *([] if self.cuda_graphs else new_state.tensors())

    @torch.no_grad()
    def __call__(self, token_ids_B: torch.Tensor, state: StepState) -> tuple[torch.Tensor, StepState]:
        if state.capacity is not None and state.cache_length >= state.capacity:
            raise ValueError(f"the KV caches are full ({state.capacity} positions): allocate the state with "
                             f"StepState.from_inference(state, capacity=...) for every token to come")
        self._layout = state.layout
        cache_length = state.cache_length + 1 if state.capacity is not None else 0
        if not self.cuda_graphs:
            logits_BW, *tensors = self._compiled(token_ids_B, *state.tensors())
            return logits_BW, StepState.from_tensors(state.layout, tensors, cache_length)
        key = (token_ids_B.shape[0], state.capacity)
        pp = self._graphs.get(key) or self._capture(token_ids_B, state)
        if not _same_tensors(state, pp.buffers[pp.current]):
            if any(t is m for t in state.tensors() for m in pp.in_place):
                raise ValueError("this state was advanced in place by a later step (a compiled step keeps only the "
                                 "latest state): pass the state the last call returned, or keep a "
                                 "StepState.clone() of one to come back to")
            for buffer, tensor in zip(pp.buffers[pp.current].tensors(), state.tensors(), strict=True):
                buffer.copy_(tensor)
        pp.token_B.copy_(token_ids_B)
        pp.graphs[pp.current].replay()
        logits_BW = pp.logits[pp.current].clone()
        pp.current = 1 - pp.current
        new = pp.buffers[pp.current]
        return logits_BW, StepState(layers=new.layers, positions=new.positions, cache_length=cache_length)

    def _capture(self, token_ids_B: torch.Tensor, state: StepState) -> _PingPong:
        """Allocate the two buffers of this batch size, compile, and capture both directions."""
        dense = torch.contiguous_format
        a = StepState.from_tensors(state.layout, [t.clone(memory_format=dense) for t in state.tensors()],
                                   state.cache_length)
        b_tensors = [t if isinstance(layer, KVCache) or name == "memory" else torch.empty_like(t, memory_format=dense)
                     for layer in a.layers for name, t in vars(layer).items()]
        b = StepState.from_tensors(state.layout, [*b_tensors, torch.empty_like(a.positions)], state.cache_length)
        token_B = token_ids_B.clone()
        buffers = (a, b)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and warm up outside the capture
            for i in (0, 1, 0):
                self._compiled(token_B, *buffers[i].tensors(), *buffers[1 - i].tensors())
        torch.cuda.current_stream().wait_stream(stream)
        graphs, logits = [], []
        for i in (0, 1):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits_BW, = self._compiled(token_B, *buffers[i].tensors(), *buffers[1 - i].tensors())
            graphs.append(graph)
            logits.append(logits_BW)
        in_place = tuple(layer.memory for layer in a.layers if isinstance(layer, MemoryState))
        pp = _PingPong(token_B, buffers, tuple(graphs), tuple(logits), in_place)
        self._graphs[(token_ids_B.shape[0], state.capacity)] = pp
        return pp

    def warm_up(self, token_ids_B: torch.Tensor, state: StepState) -> float:
        """Compile (and capture the CUDA graphs) for this batch size by stepping `state` (one from elsewhere: it is
        copied, not written) and dropping the result. Returns the seconds it took; `compile_seconds` keeps the
        first."""
        start = time.perf_counter()
        self(token_ids_B, state)
        if self.cuda_graphs:
            torch.cuda.synchronize(token_ids_B.device)
        seconds = time.perf_counter() - start
        if self.compile_seconds is None:
            self.compile_seconds = seconds
        return seconds


def _same_tensors(a: StepState, b: StepState) -> bool:
    return all(x is y for x, y in zip(a.tensors(), b.tensors(), strict=True))
