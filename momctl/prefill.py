"""A prompt's prefill in bounded chunks, so that memory stays flat whatever the prompt length: eagerly, or on CUDA
replayed from a captured CUDA graph of one chunk.

Eager, a chunk of mom-340m costs its host about 0.1 s (some 3,500 kernel launches from Python for 24 layers) while
the H100 needs about 15 ms for 2048 tokens, so long prompts are host-bound. `GraphedPrefill` captures one chunk
(`model.prefill` of PREFILL_CHUNK tokens continuing a state, last-position logits) once per batch size and replays
it: the prompt is left-padded to a whole number of chunks (padding tokens are skipped exactly, see
`MoMForCausalLM.forward`), and each chunk's state is copied into the graph's input state for the next. A prompt
without a state starts from `init_state`, the zero state, which the model treats as no state. Models with attention
layers prefill eagerly: their KV caches grow with the prompt, which a static graph cannot hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import InferenceState, MemoryState

# Tokens per prefill chunk. A chunk costs the eager host about the same at 1024 tokens as at 2048 (see the README),
# so halving it doubled long-prompt prefill.
PREFILL_CHUNK = 2048


def prefill_in_chunks(model, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None,
                      state: InferenceState | None = None,
                      chunk: int | None = None) -> tuple[torch.Tensor, InferenceState]:
    """Eager prefill of `ids_BT` (T >= 1) in chunks of `chunk` tokens (default PREFILL_CHUNK), continuing `state`.
    Returns the last position's logits `[B, W]` and the state."""
    chunk = chunk or PREFILL_CHUNK
    for s in range(0, ids_BT.shape[1], chunk):
        logits_B1W, state = model.prefill(ids_BT[:, s:s + chunk], state,
                                          None if mask_BT is None else mask_BT[:, s:s + chunk], last_logits_only=True)
    return logits_B1W[:, -1], state


class GraphedPrefill:
    """`prefill_in_chunks` with every chunk replayed from a CUDA graph (one per batch size, captured on first use).

    Args:
        model: a `MoMForCausalLM` in eval mode on a CUDA device, without attention layers (`supports`).
        chunk: tokens per chunk (default PREFILL_CHUNK).
    """

    def __init__(self, model, chunk: int | None = None) -> None:
        if not self.supports(model):
            raise ValueError("CUDA-graph prefill needs a model on a CUDA device without attention layers; "
                             "use prefill_in_chunks")
        self.model = model
        self.chunk = chunk or PREFILL_CHUNK
        self._graphs: dict[int, _ChunkGraph] = {}

    @staticmethod
    def supports(model) -> bool:
        return model.output_weight.is_cuda and not model.config.attention_layers

    @torch.no_grad()
    def __call__(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None,
                 state: InferenceState | None = None) -> tuple[torch.Tensor, InferenceState]:
        """Same contract as `prefill_in_chunks`; the state returned is a new one (the graph's buffers are reused)."""
        B, T = ids_BT.shape
        if T == 0:
            raise ValueError("prefill needs at least one token")
        if mask_BT is None:
            mask_BT = torch.ones_like(ids_BT, dtype=torch.bool)
        pad = -T % self.chunk
        ids_BT, mask_BT = F.pad(ids_BT, (pad, 0)), F.pad(mask_BT.bool(), (pad, 0), value=False)
        graph = self._graphs.get(B) or self._capture(B)
        graph.load(state)
        for s in range(0, ids_BT.shape[1], self.chunk):
            if s:
                graph.carry_state()
            graph.ids_BT.copy_(ids_BT[:, s:s + self.chunk])
            graph.mask_BT.copy_(mask_BT[:, s:s + self.chunk])
            graph.graph.replay()
        return graph.logits_B1W[:, -1].clone(), _cloned(graph.state_out)

    def _capture(self, batch_size: int) -> _ChunkGraph:
        device = self.model.output_weight.device
        ids_BT = torch.zeros(batch_size, self.chunk, dtype=torch.long, device=device)
        mask_BT = torch.ones(batch_size, self.chunk, dtype=torch.bool, device=device)
        state_in = self.model.init_state(batch_size, device)

        def run():
            return self.model.prefill(ids_BT, state_in, mask_BT, last_logits_only=True)

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # compile and autotune the kernels outside the capture
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits_B1W, state_out = run()
        self._graphs[batch_size] = captured = _ChunkGraph(graph, ids_BT, mask_BT, state_in, state_out, logits_B1W)
        return captured


class _ChunkGraph:
    """One captured chunk: static inputs (ids, mask, state_in) and the outputs the replay writes."""

    def __init__(self, graph, ids_BT, mask_BT, state_in: InferenceState, state_out: InferenceState, logits_B1W):
        self.graph, self.ids_BT, self.mask_BT, self.logits_B1W = graph, ids_BT, mask_BT, logits_B1W
        self.state_in, self.state_out = state_in, state_out

    def load(self, state: InferenceState | None) -> None:
        """Set the input state: `state` copied in, or the zero state."""
        if state is None:
            for t in _tensors(self.state_in):
                t.zero_()
            return
        for layer in state.layers:
            if not isinstance(layer, MemoryState):
                raise ValueError("CUDA-graph prefill holds MoM layer states only")
        for buffer, t in zip(_tensors(self.state_in), _tensors(state), strict=True):
            if buffer.shape != t.shape:
                raise ValueError(f"the state's tensors {tuple(t.shape)} do not fit the captured batch "
                                 f"{tuple(buffer.shape)}")
            buffer.copy_(t)

    def carry_state(self) -> None:
        """The last replay's output state becomes the next replay's input."""
        for buffer, t in zip(_tensors(self.state_in), _tensors(self.state_out), strict=True):
            if buffer is not t:
                buffer.copy_(t)


def _tensors(state: InferenceState) -> list[torch.Tensor]:
    return [*(t for layer in state.layers for t in (layer.memory, layer.conv)), state.positions]


def _cloned(state: InferenceState) -> InferenceState:
    layers = [MemoryState(layer.memory.clone(), layer.conv.clone()) for layer in state.layers]
    return InferenceState(layers=layers, positions=state.positions.clone())
