"""What one `momctl bench` run measures: modes, models, lengths, batches, dtype, repeats; parsed and checked here.

Every user mistake raises MomctlError naming the option, the value and the fix. Defaults depend on the device: a
GPU gets the paper's 340M configuration at 1K-8K tokens, a CPU the tiny preset at 64-256 tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import MomctlError

MODES = ("train", "prefill", "decode", "generate")
MODELS = ("mom", "gdn", "transformer", "hybrid", "reference", "reference-gdn")
BACKENDS = ("eager", "compile", "onnx", "onnx-cuda", "onnx-standard")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Modes that need the recurrent state: they run the whole causal LM.
STATE_MODES = ("decode", "generate")
# Untimed calls before the timed repeats; their wall time (compile, autotune, allocator) is reported apart.
WARMUP_CALLS = 2

DEFAULTS = {
    "cuda": dict(preset="mom-340m", seq_lens=(1024, 2048, 4096, 8192), batch_tokens=32768, decode_batch=(1, 16),
                 generate_batch=(1,), repeats=10, new_tokens=128, dtype="bfloat16"),
    "cpu": dict(preset="tiny", seq_lens=(64, 128, 256), batch_tokens=1024, decode_batch=(1, 4),
                generate_batch=(1,), repeats=3, new_tokens=32, dtype="float32"),
}
DEFAULT_MODELS = ("mom", "gdn", "transformer", "reference")


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """A resolved benchmark run.

    Args:
        modes: subset of `train` (forward + backward), `prefill` (forward, no autograd), `decode` (one token per
            step after a context), `generate` (prompt, then `new_tokens` tokens).
        models: names from MODELS.
        seq_lens: sequence lengths (train/prefill), context lengths (decode) or prompt lengths (generate).
        scope: `layer` (one mixer layer) or `model` (the whole causal LM).
        batch_tokens: tokens per batch in train/prefill (batch = batch_tokens // seq_len); None when batch_sizes
            is given.
        batch_sizes: explicit batch sizes (every mode); None = batch_tokens for train/prefill and the device's
            defaults for decode/generate.
        decode_batch_sizes: batch sizes of decode/generate when batch_sizes is None.
        dtype: `float32`, `bfloat16` or `float16`: weights and activations (no autocast).
        device: a torch device string.
        repeats: timed calls per cell (median, p20, p80).
        new_tokens: tokens generated per prompt in `generate`.
        backend: decoding backend of decode/generate: `eager`, `compile`, `onnx`, `onnx-cuda`, `onnx-standard`.
        baseline: the model speed-ups are relative to.
        profile: add a profiler breakdown of GPU time to train/prefill/decode cells.
        seed: seed of the random weights and inputs.
    """

    modes: tuple[str, ...]
    models: tuple[str, ...]
    seq_lens: tuple[int, ...]
    scope: str
    batch_tokens: int | None
    batch_sizes: tuple[int, ...] | None
    decode_batch_sizes: tuple[int, ...] = (1,)
    generate_batch_sizes: tuple[int, ...] = (1,)
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    new_tokens: int = 32
    backend: str = "eager"
    baseline: str = "transformer"
    profile: bool = False
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def batches(self, mode: str, seq_len: int) -> tuple[int, ...]:
        """The batch sizes measured for `mode` at `seq_len`."""
        if self.batch_sizes is not None:
            return self.batch_sizes
        if mode == "decode":
            return self.decode_batch_sizes
        if mode == "generate":
            return self.generate_batch_sizes
        assert self.batch_tokens is not None
        return (self.batch_tokens // seq_len,)

    def to_dict(self) -> dict:
        return {"modes": list(self.modes), "models": list(self.models), "seq_lens": list(self.seq_lens),
                "scope": self.scope, "batch_tokens": self.batch_tokens,
                "batch_sizes": None if self.batch_sizes is None else list(self.batch_sizes),
                "decode_batch_sizes": list(self.decode_batch_sizes),
                "generate_batch_sizes": list(self.generate_batch_sizes), "dtype": self.dtype,
                "device": self.device, "repeats": self.repeats, "warmup_calls": WARMUP_CALLS,
                "new_tokens": self.new_tokens, "backend": self.backend, "baseline": self.baseline,
                "profile": self.profile, "seed": self.seed}


def parse_names(option: str, text: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """`a,b` -> ("a", "b"), each one of `choices`, duplicates dropped, order kept."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise MomctlError(f"{option} {text!r} names nothing; write e.g. {option} {','.join(choices[:2])}")
    for name in names:
        if name not in choices:
            raise MomctlError(f"unknown {option.lstrip('-').rstrip('s')} {name!r} in {option} {text!r}; "
                              f"choose from {', '.join(choices)}")
    return names


def parse_ints(option: str, text: str) -> tuple[int, ...]:
    """`1024,2048` -> (1024, 2048): whole numbers >= 1, duplicates dropped, order kept."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise MomctlError(f"{option} {text!r}: {part!r} is not a whole number; write e.g. "
                              f"{option} 1024,2048") from None
        if value < 1:
            raise MomctlError(f"{option} {text!r}: {value} is below 1; every value must be at least 1")
        values.append(value)
    return tuple(dict.fromkeys(values))


def resolve_settings(*, device: torch.device, modes: str, models: str | None, seq_lens: str | None,
                     scope: str | None, batch_tokens: int | None, batch_sizes: str | None, dtype: str,
                     repeats: int | None, new_tokens: int | None, backend: str, baseline: str | None,
                     profile: bool, seed: int) -> BenchSettings:
    """Check the command's options and fill in the device's defaults (None = default)."""
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    mode_names = parse_names("--mode", modes, MODES)
    model_names = parse_names("--models", models, MODELS) if models is not None else DEFAULT_MODELS
    lengths = parse_ints("--seq-len", seq_lens) if seq_lens is not None else defaults["seq_lens"]
    state_modes = [m for m in mode_names if m in STATE_MODES]
    if scope is None:
        scope = "model" if state_modes else "layer"
    if scope == "layer" and "generate" in state_modes:
        raise MomctlError("--mode generate runs the whole model (prompt, then sampled tokens); drop --layer or use "
                          "--mode train,prefill,decode")
    if batch_tokens is not None and batch_sizes is not None:
        raise MomctlError("--batch-tokens and --batch-size both given; choose one (--batch-tokens sets "
                          "batch = tokens // seq_len in train/prefill)")
    if batch_tokens is not None and batch_tokens < 1:
        raise MomctlError(f"--batch-tokens {batch_tokens} must be at least 1")
    sizes = parse_ints("--batch-size", batch_sizes) if batch_sizes is not None else None
    batch_tokens_given = batch_tokens is not None
    if sizes is None:
        batch_tokens = batch_tokens if batch_tokens is not None else defaults["batch_tokens"]
        if any(m in ("train", "prefill") for m in mode_names) and max(lengths) > batch_tokens:
            default = "" if batch_tokens_given else " (the default)"
            raise MomctlError(f"--batch-tokens {batch_tokens}{default} is smaller than --seq-len {max(lengths)}; "
                              f"raise --batch-tokens to at least {max(lengths)} or give --batch-size")
    dtype = defaults["dtype"] if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise MomctlError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    new_tokens_given = new_tokens is not None
    repeats = defaults["repeats"] if repeats is None else repeats
    if repeats < 1:
        raise MomctlError(f"--repeats {repeats} must be at least 1")
    new_tokens = defaults["new_tokens"] if new_tokens is None else new_tokens
    if new_tokens < 1:
        raise MomctlError(f"--new-tokens {new_tokens} must be at least 1")
    if backend not in BACKENDS:
        raise MomctlError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    _warn_unused(mode_names, device, batch_tokens_given=batch_tokens_given, new_tokens_given=new_tokens_given,
                 backend=backend, profile=profile)
    if baseline is None:
        baseline = "transformer" if "transformer" in model_names else model_names[0]
    elif baseline not in model_names:
        raise MomctlError(f"--baseline {baseline!r} is not among --models {','.join(model_names)}; add it to "
                          "--models or pick one of them")
    return BenchSettings(modes=mode_names, models=model_names, seq_lens=lengths, scope=scope,
                         batch_tokens=None if sizes is not None else batch_tokens, batch_sizes=sizes,
                         decode_batch_sizes=defaults["decode_batch"], generate_batch_sizes=defaults["generate_batch"],
                         dtype=dtype, device=str(device), repeats=repeats, new_tokens=new_tokens, backend=backend,
                         baseline=baseline, profile=profile, seed=seed)


def _warn_unused(modes: tuple[str, ...], device: torch.device, *, batch_tokens_given: bool, new_tokens_given: bool,
                 backend: str, profile: bool) -> None:
    """A setting that has no effect in this run says so."""
    if batch_tokens_given and not any(m in ("train", "prefill") for m in modes):
        warnings.warn("--batch-tokens only sizes train/prefill batches; use --batch-size for decode/generate",
                      stacklevel=3)
    if new_tokens_given and "generate" not in modes:
        warnings.warn("--new-tokens only applies to --mode generate", stacklevel=3)
    if backend != "eager" and not any(m in STATE_MODES for m in modes):
        warnings.warn(f"--backend {backend} only applies to --mode decode/generate", stacklevel=3)
    if profile and device.type != "cuda":
        warnings.warn("--profile breaks down GPU time and has no effect on a CPU", stacklevel=3)
