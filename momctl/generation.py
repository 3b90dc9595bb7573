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
from .tokenizers import load_saved_tokenizer

# Prompts are prefilled in pieces of this many tokens, so prefill memory is bounded whatever the prompt length.
PREFILL_CHUNK = 2048
MAX_PROMPT_TOKENS = 1_000_000


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50
    top_p: float = 1.0
    seed: int = 0
    num_samples: int = 1
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MomctlError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise MomctlError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise MomctlError(f"--top-k {self.top_k} must be at least 1 (or omitted)")
        if not 0 < self.top_p <= 1:
            raise MomctlError(f"--top-p {self.top_p} must be in (0, 1]")
        if self.num_samples < 1:
            raise MomctlError(f"--num-samples {self.num_samples} must be at least 1")


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    state_bytes_per_sequence: int


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


@torch.no_grad()
def generate(loaded: LoadedModel, prompts: list[str], sampling: SamplingConfig,
             on_text: Callable[[int, str], None] | None = None) -> tuple[list[str], GenerationStats]:
    """Continue each prompt `num_samples` times. `on_text(i, piece)` streams decoded text of sequence i.

    Returns the generated texts (prompt excluded), prompts-major then samples, and timing statistics.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    device = model.output_weight.device
    eos = getattr(tokenizer, "eos_id", None)
    encoded = [tokenizer.encode(p) for p in prompts for _ in range(sampling.num_samples)]
    # An empty prompt starts a new document, as after an end-of-document token in training.
    encoded = [ids if ids else [eos] for ids in encoded]
    longest = max(len(ids) for ids in encoded)
    if longest > MAX_PROMPT_TOKENS:
        raise MomctlError(f"a prompt has {longest} tokens; the limit is {MAX_PROMPT_TOKENS}")
    B = len(encoded)
    ids_BT = torch.zeros(B, longest, dtype=torch.long)
    mask_BT = torch.zeros(B, longest, dtype=torch.long)
    for i, ids in enumerate(encoded):  # left padding: every sequence ends at the last column
        ids_BT[i, longest - len(ids):] = torch.tensor(ids)
        mask_BT[i, longest - len(ids):] = 1
    ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)

    generator = torch.Generator().manual_seed(sampling.seed)
    start = time.perf_counter()
    state = None
    for s in range(0, longest, PREFILL_CHUNK):
        logits_BTW, state = model.prefill(ids_BT[:, s:s + PREFILL_CHUNK], state, mask_BT[:, s:s + PREFILL_CHUNK])
    token_B = sample_next(logits_BTW[:, -1], sampling, generator)
    first_token_s = time.perf_counter() - start

    out_ids: list[list[int]] = [[] for _ in range(B)]
    emitted = [""] * B
    done = [False] * B
    decode_start = time.perf_counter()
    new_tokens = 0
    for n in range(sampling.max_new_tokens):
        for i, t in enumerate(token_B.tolist()):
            if done[i]:
                continue
            if sampling.stop_at_eos and t == eos:
                done[i] = True
                continue
            out_ids[i].append(t)
            new_tokens += 1
            if on_text is not None:
                text = tokenizer.decode(out_ids[i])
                # Hold back a trailing replacement char: it may be half of a multi-byte character.
                stable = text[:-1] if text.endswith("\ufffd") else text
                if len(stable) > len(emitted[i]):
                    on_text(i, stable[len(emitted[i]):])
                    emitted[i] = stable
        if all(done) or n == sampling.max_new_tokens - 1:
            break
        logits_BW, state = model.step(token_B, state)
        token_B = sample_next(logits_BW, sampling, generator)
    decode_s = time.perf_counter() - decode_start
    texts = [tokenizer.decode(ids) for ids in out_ids]
    if on_text is not None:
        for i, text in enumerate(texts):
            if len(text) > len(emitted[i]):
                on_text(i, text[len(emitted[i]):])
    stats = GenerationStats(prompt_tokens=sum(len(e) for e in encoded), new_tokens=new_tokens,
                            time_to_first_token_s=first_token_s,
                            decode_tokens_per_s=new_tokens / max(decode_s, 1e-9),
                            state_bytes_per_sequence=state.nbytes // B)
    return texts, stats
