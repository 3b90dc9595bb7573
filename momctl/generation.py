"""Sampling text with constant-memory recurrent decoding: prefill the prompts (in bounded chunks), then step.

Legend: B batch (prompts x samples), T prompt tokens, W vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ModelConfig
from .errors import MomctlError
from .model import MoMForCausalLM
from .prefill import PREFILL_CHUNK, GraphedPrefill, prefill_in_chunks
from .sampling import MAX_PROMPT_TOKENS, GenerationStats, SamplingConfig, TextStreams, encode_prompts
from .state import StepState
from .state_file import SavedState
from .tokenizers import load_saved_tokenizer

__all__ = ["GenerationStats", "LoadedModel", "SamplingConfig", "generate", "load_for_inference", "sample_next"]

BACKENDS = ("eager", "compile")


@dataclass
class LoadedModel:
    model: MoMForCausalLM
    tokenizer: object
    checkpoint: Path
    generation_config: dict


def load_for_inference(path: str | Path, device: torch.device) -> LoadedModel:
    """The model, tokenizer and generation defaults of a run folder (latest complete checkpoint) or checkpoint."""
    folder = ckpt.resolve_checkpoint(path)
    config = ckpt.read_config(folder)
    model_config = ModelConfig.from_dict(config["momctl"]["model"])
    tokenizer = load_saved_tokenizer(folder)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise MomctlError(f"the tokenizer in {folder} has {tokenizer.vocab_size} ids but the model only "
                          f"{model_config.vocab_size}; the checkpoint is inconsistent")
    model = MoMForCausalLM(model_config)
    model.load_state_dict(ckpt.load_state_dict(folder, "cpu"))
    return LoadedModel(model.to(device).eval(), tokenizer, folder, ckpt.read_generation_config(folder))


def sample_next(logits_BW: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0, else temperature, top-k and top-p (nucleus) sampling. Returns ids `[B]`."""
    if sampling.temperature == 0:
        return logits_BW.argmax(-1)
    logits = logits_BW.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already hold top_p of the mass (the first always stays).
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= sampling.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits_BW.device)


@dataclass
class GenerationResult:
    texts: list[str]  # the generated text of each sequence (prompt excluded), prompts-major then samples
    stats: GenerationStats
    saved: SavedState | None  # the state after the last token of each sequence, when asked for
    compile_seconds: float | None = None  # the compile backend's one-off compile time


@torch.no_grad()
def generate(loaded: LoadedModel, prompts: list[str], sampling: SamplingConfig,
             on_text: Callable[[int, str], None] | None = None, *, backend: str = "eager",
             resume: SavedState | None = None, keep_state: bool = False) -> GenerationResult:
    """Continue each prompt `num_samples` times. `on_text(i, piece)` streams decoded text of sequence i.

    Args:
        loaded: the model and tokenizer.
        prompts: the prompt texts; with `resume`, the text appended to each saved sequence (may be empty).
        sampling: sampling settings.
        on_text: streams text as it is decoded.
        backend: `eager` (the static step as it is) or `compile` (torch.compile of it).
        resume: continue these sequences (one per prompt x sample; a single saved sequence is repeated).
        keep_state: also return the state after every emitted token (a sequence that stopped at EOS keeps the
            state before its EOS), to save and continue later.
    """
    if backend not in BACKENDS:
        raise MomctlError(f"--backend {backend} is not a torch backend; use one of {', '.join(BACKENDS)}")
    model, tokenizer = loaded.model, loaded.tokenizer
    device = model.output_weight.device
    encoded = encode_prompts(tokenizer, prompts, sampling.num_samples, continuing=resume is not None,
                             max_tokens=MAX_PROMPT_TOKENS)
    B, longest = len(encoded), max(len(ids) for ids in encoded)
    if resume is not None:
        resume = _match_batch(resume, B)
    ids_BT, mask_BT = _left_pad(encoded, longest, device)

    generator = torch.Generator().manual_seed(sampling.seed)
    start = time.perf_counter()
    state = resume.state if resume is not None else None
    next_logits_BW = resume.next_logits.to(model.output_weight.dtype) if resume is not None else None
    if longest:
        # The compile backend replays a CUDA graph per prefill chunk when the prompt spans more than two chunks (the
        # capture costs about two eager chunks).
        if backend == "compile" and longest > 2 * PREFILL_CHUNK and GraphedPrefill.supports(model):
            last_BW, state = GraphedPrefill(model)(ids_BT, mask_BT, state)
        else:
            last_BW, state = prefill_in_chunks(model, ids_BT, mask_BT, state)
        has_new_B = torch.tensor([len(ids) > 0 for ids in encoded], device=device)
        next_logits_BW = last_BW if next_logits_BW is None else torch.where(has_new_B[:, None], last_BW,
                                                                            next_logits_BW)
    # KV room for every token to come, allocated once: the step never reallocates.
    state = StepState.from_inference(state, capacity=state.cache_length + sampling.max_new_tokens + 1)
    token_B = sample_next(next_logits_BW, sampling, generator)
    first_token_s = time.perf_counter() - start

    step = model.step
    compile_seconds = None
    if backend == "compile":
        from .export.compiled import CompiledStep

        step = CompiledStep(model)
        compile_seconds = step.warm_up(token_B, state)

    streams = TextStreams(tokenizer, B, sampling.stop_at_eos, on_text)
    decode_start = time.perf_counter()
    for n in range(sampling.max_new_tokens):
        streams.push(token_B.tolist())
        last = n == sampling.max_new_tokens - 1
        if streams.all_done or (last and not keep_state):
            break
        done_B = torch.tensor(streams.done, device=device) if keep_state and any(streams.done) else None
        # Finished sequences keep the state of their text: a copy, since the compiled step advances memories in place.
        before = state.clone() if done_B is not None else None
        logits_BW, new_state = step(token_B, state)
        if done_B is not None:
            new_state = new_state.where(done_B, before)
            logits_BW = torch.where(done_B[:, None], next_logits_BW, logits_BW)
        state, next_logits_BW = new_state, logits_BW
        if last:
            break
        token_B = sample_next(logits_BW, sampling, generator)
    decode_s = time.perf_counter() - decode_start
    texts = streams.finish()
    stats = GenerationStats(prompt_tokens=sum(len(e) for e in encoded), new_tokens=streams.new_tokens,
                            time_to_first_token_s=first_token_s,
                            decode_tokens_per_s=streams.new_tokens / max(decode_s, 1e-9),
                            state_bytes_per_sequence=state.nbytes // B)
    saved = SavedState(state.to_inference(), next_logits_BW.float()) if keep_state else None
    return GenerationResult(texts, stats, saved, compile_seconds)


def _match_batch(resume: SavedState, batch_size: int) -> SavedState:
    """The saved sequences for `batch_size` sequences: as many as saved, or a single one repeated."""
    if resume.batch_size == batch_size:
        return resume
    if resume.batch_size == 1:
        return resume.repeat(batch_size)
    raise MomctlError(f"the loaded state holds {resume.batch_size} sequences but this run has {batch_size} "
                      f"(prompts x samples): pass {resume.batch_size} prompts, or save a single sequence")


def _left_pad(encoded: list[list[int]], length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask `[B, length]`, each sequence ending at the last column."""
    B = len(encoded)
    ids_BT = torch.zeros(B, length, dtype=torch.long)
    mask_BT = torch.zeros(B, length, dtype=torch.long)
    for i, ids in enumerate(encoded):
        if ids:
            ids_BT[i, length - len(ids):] = torch.tensor(ids)
            mask_BT[i, length - len(ids):] = 1
    return ids_BT.to(device), mask_BT.to(device)
