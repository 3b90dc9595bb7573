"""`momctl generate`: sample text from a run or checkpoint with constant-memory recurrent decoding."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..devices import resolve_device
from ..errors import MomctlError
from ..generation import SamplingConfig, generate, load_for_inference

err = Console(stderr=True, soft_wrap=True)


def generate_command(
    run: Annotated[str, typer.Argument(help="A run folder (its latest checkpoint) or a checkpoint folder.")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt text (repeat for a batch).")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="Read the prompt from a file.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Sample among the k likeliest tokens.")] = 50,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples per prompt.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    backend: Annotated[str, typer.Option("--backend", help="Decoding backend: eager.")] = "eager",
) -> None:
    """Continue a prompt (--prompt, --prompt-file, or standard input) and stream the text to stdout."""
    if backend != "eager":
        raise MomctlError(f"--backend {backend} is not available yet; use --backend eager")
    prompts = list(prompt or [])
    if prompt_file is not None:
        try:
            prompts.append(prompt_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise MomctlError(f"cannot read --prompt-file {prompt_file}: {error}") from None
    if not prompts and not sys.stdin.isatty():
        prompts.append(sys.stdin.read())
    if not prompts:
        prompts = [""]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, num_samples=num_samples)
    loaded = load_for_inference(run, resolve_device(device))
    streaming = len(prompts) * num_samples == 1
    if streaming:
        sys.stdout.write(prompts[0])

    def stream(_i: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    texts, stats = generate(loaded, prompts, sampling, on_text=stream if streaming else None)
    if streaming:
        sys.stdout.write("\n")
    else:
        for i, text in enumerate(texts):
            p = i // num_samples
            sys.stdout.write(f"--- prompt {p + 1}, sample {i % num_samples + 1}\n{prompts[p]}{text}\n")
    sys.stdout.flush()
    err.print(f"{stats.new_tokens} tokens, {stats.decode_tokens_per_s:,.1f} tokens/s, first token after "
              f"{stats.time_to_first_token_s * 1000:.0f} ms, state {stats.state_bytes_per_sequence / 2**20:.2f} MiB "
              f"per sequence ({loaded.checkpoint})", highlight=False)
