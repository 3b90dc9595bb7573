"""What every decoding backend shares, without torch: sampling settings, prompt encoding, streaming the text of a
batch of sequences, timing statistics. (The ONNX runtime imports this; it must not import torch.)"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import MomctlError

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


def encode_prompts(tokenizer, prompts: list[str], num_samples: int, *, continuing: bool,
                   max_tokens: int = MAX_PROMPT_TOKENS) -> list[list[int]]:
    """Token ids of each prompt, `num_samples` times each (prompts-major).

    An empty prompt starts a new document (one end-of-document token, as after a document in training), unless the
    sequences continue a saved state (`continuing`): then it adds nothing.
    """
    eos = tokenizer.eos_id
    encoded = [tokenizer.encode(p) for p in prompts for _ in range(num_samples)]
    if not continuing:
        encoded = [ids if ids else [eos] for ids in encoded]
    longest = max(len(ids) for ids in encoded)
    if longest > max_tokens:
        raise MomctlError(f"a prompt has {longest} tokens; the limit is {max_tokens}")
    return encoded


class TextStreams:
    """The generated tokens and text of B sequences: stops a sequence at EOS, streams stable text pieces.

    Args:
        tokenizer: has `decode` and `eos_id`.
        batch_size: B.
        stop_at_eos: a sequence ends (without the EOS) when it samples EOS.
        on_text: called as `on_text(i, piece)` with each new piece of text of sequence i.
    """

    def __init__(self, tokenizer, batch_size: int, stop_at_eos: bool,
                 on_text: Callable[[int, str], None] | None = None) -> None:
        self.tokenizer, self.stop_at_eos, self.on_text = tokenizer, stop_at_eos, on_text
        self.ids: list[list[int]] = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.new_tokens = 0
        self._emitted = [""] * batch_size

    def push(self, tokens: list[int]) -> None:
        """One sampled token per sequence; sequences that are done ignore theirs."""
        for i, t in enumerate(tokens):
            if self.done[i]:
                continue
            if self.stop_at_eos and t == self.tokenizer.eos_id:
                self.done[i] = True
                continue
            self.ids[i].append(t)
            self.new_tokens += 1
            if self.on_text is not None:
                text = self.tokenizer.decode(self.ids[i])
                # Hold back a trailing replacement char: it may be half of a multi-byte character.
                self._send(i, text[:-1] if text.endswith("\ufffd") else text)

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def finish(self) -> list[str]:
        """The texts of every sequence (the rest of each streamed out)."""
        texts = [self.tokenizer.decode(ids) for ids in self.ids]
        if self.on_text is not None:
            for i, text in enumerate(texts):
                self._send(i, text)
        return texts

    def _send(self, i: int, text: str) -> None:
        if len(text) > len(self._emitted[i]):
            self.on_text(i, text[len(self._emitted[i]):])
            self._emitted[i] = text
