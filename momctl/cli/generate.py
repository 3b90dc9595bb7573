"""`momctl generate`: sample text from a run or checkpoint (or an ONNX bundle) with constant-memory decoding."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import MomctlError
from ..sampling import SamplingConfig

err = Console(stderr=True, soft_wrap=True)
BACKENDS = ("eager", "compile", "onnx")


def generate_command(
    run: Annotated[str, typer.Argument(help="A run folder (its latest checkpoint), a checkpoint folder, or with "
                                            "--backend onnx a bundle folder from `momctl export onnx`.")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt text (repeat for a batch).")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="Read the prompt from a file.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Sample among the k likeliest tokens.")] = 50,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples per prompt.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    backend: Annotated[str, typer.Option("--backend", help="Decoding backend: eager, compile or onnx.")] = "eager",
    save_state: Annotated[Path | None, typer.Option("--save-state", help="Write the state after the generated "
                                                    "text to this file (continue it with --load-state).")] = None,
    load_state: Annotated[Path | None, typer.Option("--load-state", help="Continue the sequences saved in this "
                                                    "file; the prompt is appended to them.")] = None,
) -> None:
    """Continue a prompt (--prompt, --prompt-file, or standard input) and stream the text to stdout."""
    if backend not in BACKENDS:
        raise MomctlError(f"--backend {backend} is unknown; use one of {', '.join(BACKENDS)}")
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
    if backend == "onnx":
        run_generation = _onnx(run, prompts, sampling, device, save_state, load_state)
    else:
        run_generation = _torch(run, prompts, sampling, device, backend, save_state, load_state)
    streaming = len(prompts) * num_samples == 1
    if streaming:
        sys.stdout.write(prompts[0])

    def stream(_i: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    texts, stats, source, notes = run_generation(stream if streaming else None)
    if streaming:
        sys.stdout.write("\n")
    else:
        for i, text in enumerate(texts):
            p = i // num_samples
            sys.stdout.write(f"--- prompt {p + 1}, sample {i % num_samples + 1}\n{prompts[p]}{text}\n")
    sys.stdout.flush()
    for note in notes:  # after the streamed text's last line, not inside it
        err.print(note, highlight=False)
    err.print(f"{stats.new_tokens} tokens, {stats.decode_tokens_per_s:,.1f} tokens/s, first token after "
              f"{stats.time_to_first_token_s * 1000:.0f} ms, state {stats.state_bytes_per_sequence / 2**20:.2f} MiB "
              f"per sequence ({source})", highlight=False)


def _torch(run, prompts, sampling, device, backend, save_state, load_state):
    """Load the checkpoint (and state); returns the function that generates, given the streaming callback."""
    from ..devices import resolve_device
    from ..generation import generate, load_for_inference
    from ..state_file import check_writable
    from ..state_file import load_state as read_state
    from ..state_file import save_state as write_state

    if save_state is not None:
        check_writable(save_state)
    loaded = load_for_inference(run, resolve_device(device))
    config = loaded.model.config
    resume = None
    if load_state is not None:
        resume = read_state(load_state, config, loaded.tokenizer, loaded.model.output_weight.device)

    def run_generation(on_text):
        result = generate(loaded, prompts, sampling, on_text=on_text, backend=backend, resume=resume,
                          keep_state=save_state is not None)
        notes = []
        if result.compile_seconds is not None:
            notes.append(f"compiled the decode step in {result.compile_seconds:.1f} s")
        if save_state is not None:
            write_state(save_state, result.saved, config, loaded.tokenizer)
            notes.append(f"saved the state to {save_state}")
        return result.texts, result.stats, loaded.checkpoint, notes

    return run_generation


def _onnx(run, prompts, sampling, device, save_state, load_state):
    """Load the bundle; returns the function that generates, given the streaming callback."""
    from ..export.runtime import OnnxBundle

    if save_state is not None or load_state is not None:
        raise MomctlError("--save-state and --load-state work with --backend eager or compile, not onnx; drop them "
                          "or pick another backend")
    bundle = OnnxBundle(run, device=device)

    def run_generation(on_text):
        texts, stats = bundle.generate(prompts, sampling, on_text=on_text)
        return texts, stats, bundle.folder, []

    return run_generation
