"""The effective configuration of a training run: model, optimiser, data and loop, from preset + file + overrides.

Precedence, lowest first: the preset, a `--config` file (YAML or JSON), the command's own flags, `--set` overrides
with dotted paths (`--set model.top_k=1 --set optim.lr=1e-3`). The result is written into the run folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import MomctlError
from .presets import get_preset


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup (at most a tenth of the run) then cosine decay to `min_lr_ratio * lr`; clipping."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "a positive learning rate")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a value >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", (self.beta1, self.beta2),
               "values in [0, 1)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "a value >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "a value in [0, 1]")
        _check(self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "a positive norm")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from: `builtin:python-docs|python-code|all`, `mqar[:k=v,...]`, or a path."""

    source: str = "builtin:python-docs"
    tokenizer: str | None = None  # None = byte-level; or a local tokenizer.json
    text_field: str = "text"
    seq_len: int = 128

    def __post_init__(self) -> None:
        _check(isinstance(self.seq_len, int) and self.seq_len >= 1, "data.seq_len", self.seq_len, "an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """The training loop. `batch_size` is the global batch in sequences per optimiser step, split over ranks and
    `grad_accum` micro-steps, so runs on 1 or N processes with the same batch_size take the same steps."""

    steps: int = 400
    max_tokens: int | None = None  # if set, steps = max_tokens // (batch_size * seq_len)
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 200
    keep_last: int | None = 3
    log_every: int = 10
    on_nan: str = "stop"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "log_every"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"train.{name}", value, "an integer >= 1")
        _check(self.max_tokens is None or self.max_tokens >= 1, "train.max_tokens", self.max_tokens, "a positive count")
        _check(self.keep_last is None or self.keep_last >= 1, "train.keep_last", self.keep_last, "None or >= 1")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "train.dtype", self.dtype,
               "auto, float32, bfloat16 or float16")
        _check(self.on_nan in ("stop", "skip"), "train.on_nan", self.on_nan, "stop or skip")
        _check(self.batch_size % self.grad_accum == 0, "train.batch_size", self.batch_size,
               f"a multiple of train.grad_accum={self.grad_accum}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: get_preset("tiny"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": self.model.to_dict(), "optim": dataclasses.asdict(self.optim),
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train)}


_SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "train": LoopConfig}


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


def build_run_config(preset: str = "tiny", file: Path | None = None, flags: dict[str, Any] | None = None,
                     overrides: list[str] | None = None,
                     base: dict[str, Any] | None = None) -> tuple[RunConfig, set[str]]:
    """Resolve the effective RunConfig. Returns it and the dotted keys set explicitly (file, flags or --set).

    `base` (a saved `RunConfig.to_dict()`) replaces the preset as the starting point, e.g. when resuming a run.
    """
    if base is not None:
        preset = base.get("preset", preset)
        tree: dict[str, Any] = {name: dict(base.get(name, {})) for name in _SECTIONS}
    else:
        tree = {"model": get_preset(preset).to_dict()}
    explicit: set[str] = set()
    if file is not None:
        loaded = load_config_file(file)
        preset = loaded.pop("preset", preset)
        tree["model"] = get_preset(preset).to_dict()
        for key, value in _flatten(loaded):
            _assign(tree, key, value)
            explicit.add(key)
    for key, value in (flags or {}).items():
        if value is not None:
            _assign(tree, key, value)
            explicit.add(key)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MomctlError(f"--set {item!r} is not KEY=VALUE; write e.g. --set model.top_k=1")
        _assign(tree, key.strip(), _parse_value(raw))
        explicit.add(key.strip())
    sections = {}
    for name, cls in _SECTIONS.items():
        data = tree.get(name, {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MomctlError(f"unknown setting {name}.{unknown[0]}; {name} has: {', '.join(sorted(known))}")
        if name == "model" and "attention_layers" in data:
            data["attention_layers"] = tuple(data["attention_layers"])
        try:
            sections[name] = cls(**data)
        except TypeError as err:
            raise MomctlError(f"bad {name} setting: {err}") from None
    return RunConfig(preset=preset, **sections), explicit


def load_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON mapping of sections (`model`, `optim`, `data`, `train`) and optionally `preset`."""
    path = Path(path)
    if not path.is_file():
        raise MomctlError(f"config file {path} does not exist; pass a .yaml or .json file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml and json raise different types
        raise MomctlError(f"config file {path} could not be parsed: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MomctlError(f"config file {path} must hold a mapping of sections (model, optim, data, train)")
    unknown = sorted(set(data) - set(_SECTIONS) - {"preset"})
    if unknown:
        raise MomctlError(f"config file {path} has unknown section {unknown[0]!r}; use model, optim, data, train")
    for name in set(data) & set(_SECTIONS):
        if not isinstance(data[name], dict):
            raise MomctlError(f"config file {path}: section {name!r} must be a mapping of settings, not "
                              f"{type(data[name]).__name__}")
    return data


def _flatten(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and key in _SECTIONS and not prefix:
            yield from _flatten(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


def _assign(tree: dict[str, Any], dotted: str, value: Any) -> None:
    section, sep, name = dotted.partition(".")
    if not sep or section not in _SECTIONS or not name or "." in name:
        raise MomctlError(f"setting {dotted!r} is not SECTION.NAME with SECTION one of {', '.join(_SECTIONS)}")
    tree.setdefault(section, {})[name] = value


def _parse_value(raw: str) -> Any:
    """JSON where it parses (numbers, true/false/null, lists), the plain string otherwise."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw
