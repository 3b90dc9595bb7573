"""An inference state as a file: save a conversation's state, load it later to continue it (`momctl generate
--save-state / --load-state`).

The file is safetensors: `positions [B]`, `next_logits [B, W]` (the model's prediction after the last token) and per
layer `layers.{i}.memory` / `layers.{i}.conv` (MoM) or `layers.{i}.keys` / `.values` / `.valid` (attention; the
`InferenceState` layout). Its metadata names the model config and tokenizer it belongs to and a sha256 of the tensor
bytes; loading checks all three and every shape.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .config import ModelConfig
from .errors import MomctlError
from .state import AttentionState, InferenceState, MemoryState
from .tokenizers import temp_path_beside, tokenizer_fingerprint

FORMAT = "momctl-state"
VERSION = "1"


@dataclass
class SavedState:
    """A batch of sequences paused between tokens: the state after their last token and what comes next.

    state: the state after every token so far.
    next_logits: `[B, W]` fp32, the logits after the last token (the next token is sampled from them).
    """

    state: InferenceState
    next_logits: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def repeat(self, times: int) -> SavedState:
        """Each sequence `times` times in a row (samples of one conversation)."""
        def rep(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(times, dim=0)

        layers = [type(layer)(*(rep(t) for t in vars(layer).values())) for layer in self.state.layers]
        return SavedState(InferenceState(layers, rep(self.state.positions)), rep(self.next_logits))


def config_sha256(config: ModelConfig) -> str:
    """The sha256 of the model config's canonical JSON: equal hashes mean the same function."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def save_state(path: str | Path, saved: SavedState, config: ModelConfig, tokenizer) -> None:
    """Write `saved` to `path` (through a temporary file: a failure leaves any previous file intact).

    Args:
        path: the file to write.
        saved: the state and next logits.
        config: the model's config (stored, and checked on load).
        tokenizer: the model's tokenizer (its fingerprint is stored, and checked on load).
    """
    path = Path(path)
    tensors = {"positions": saved.state.positions, "next_logits": saved.next_logits.float()}
    for i, layer in enumerate(saved.state.layers):
        for name, tensor in vars(layer).items():
            tensors[f"layers.{i}.{name}"] = tensor
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {"format": FORMAT, "version": VERSION, "config": json.dumps(config.to_dict(), sort_keys=True),
                "config_sha256": config_sha256(config), "tokenizer": tokenizer_fingerprint(tokenizer),
                "tensors_sha256": _tensors_sha256(tensors)}
    check_writable(path)
    tmp = temp_path_beside(path)
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except (OSError, safetensors.SafetensorError) as err:
        raise MomctlError(f"cannot write the state file {path} ({_one_line(err)}); check the disk and the folder's "
                          f"permissions") from None
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | Path) -> None:
    """MomctlError now, rather than after a long generation, when `path` cannot become a state file."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise MomctlError(f"cannot write the state file {path}: {path.parent} is not a writable folder (or {path.name} "
                          f"is a folder); pass a file path in an existing folder")


def load_state(path: str | Path, config: ModelConfig, tokenizer, device: torch.device | str = "cpu") -> SavedState:
    """Read a state `save_state` wrote, checking that it belongs to this model and tokenizer and is intact.

    Args:
        path: the state file.
        config: the config of the model that will continue it.
        tokenizer: that model's tokenizer.
        device: where the tensors go.
    """
    path = Path(path)
    if not path.is_file():
        raise MomctlError(f"state file {path} not found: pass a file written by momctl generate --save-state")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise MomctlError(f"{path} is not a readable state file ({_one_line(err)}): it is truncated, corrupt or not "
                          f"from momctl generate --save-state") from None
    if metadata.get("format") != FORMAT:
        raise MomctlError(f"{path} is a safetensors file but not a momctl state file (no format={FORMAT!r} in its "
                          f"metadata): pass a file written by momctl generate --save-state")
    if metadata.get("version") != VERSION:
        raise MomctlError(f"{path} is a version {metadata.get('version')!r} state file, this momctl reads version "
                          f"{VERSION}: save the state again with this momctl")
    _check_model(path, metadata, config, tokenizer)
    if metadata.get("tensors_sha256") != _tensors_sha256(tensors):
        raise MomctlError(f"{path} is corrupt (sha256 of its tensors does not match): its bytes changed after "
                          f"saving; save the state again")
    saved = _build(path, tensors, config)
    state = saved.state
    layers = [type(layer)(*(t.to(device) for t in vars(layer).values())) for layer in state.layers]
    return SavedState(InferenceState(layers, state.positions.to(device)), saved.next_logits.to(device))


def _check_model(path: Path, metadata: dict, config: ModelConfig, tokenizer) -> None:
    """MomctlError naming the first difference when the file belongs to another model or tokenizer."""
    if metadata.get("config_sha256") != config_sha256(config):
        try:
            theirs = json.loads(metadata.get("config", ""))
        except ValueError:
            theirs = {}
        ours = config.to_dict()
        diffs = [f"{key}={theirs.get(key)!r} there, {ours.get(key)!r} here" for key in sorted(set(ours) | set(theirs))
                 if theirs.get(key) != ours.get(key)]
        what = "; ".join(diffs[:3]) if diffs else "its config hash differs"
        raise MomctlError(f"state file {path} belongs to another model ({what}): continue it with the checkpoint "
                          f"that saved it")
    fingerprint = tokenizer_fingerprint(tokenizer)
    if metadata.get("tokenizer") != fingerprint:
        raise MomctlError(f"state file {path} was saved with tokenizer {metadata.get('tokenizer')!r}, this "
                          f"checkpoint uses {fingerprint!r}: continue it with the checkpoint that saved it")


def _build(path: Path, tensors: dict[str, torch.Tensor], config: ModelConfig) -> SavedState:
    """The SavedState of checked tensors; MomctlError names a missing tensor or a wrong shape."""
    def take(name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        if name not in tensors:
            raise MomctlError(f"state file {path} lacks the tensor {name!r}: it is corrupt; save the state again")
        tensor = tensors[name]
        if tensor.dim() != len(shape) or any(e not in (None, s) for s, e in zip(tensor.shape, shape, strict=True)):
            want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise MomctlError(f"state file {path}: {name} has shape {list(tensor.shape)}, expected {want}; it is "
                              f"corrupt, save the state again")
        return tensor

    positions = take("positions", (None,))
    B = positions.shape[0]
    c = config
    layers = []
    for i in range(c.num_layers):
        prefix = f"layers.{i}."
        if c.is_attention_layer(i):
            h, d = c.attn_num_kv_heads or c.attn_num_heads, c.d_model // c.attn_num_heads
            keys = take(prefix + "keys", (B, h, None, d))
            L = keys.shape[2]
            layers.append(AttentionState(keys, take(prefix + "values", (B, h, L, d)), take(prefix + "valid", (B, L))))
        else:
            channels = 2 * c.key_dim + c.value_dim
            layers.append(MemoryState(take(prefix + "memory", (B, c.num_slots, c.num_heads, c.head_dim, c.head_v_dim)),
                                      take(prefix + "conv", (B, c.num_slots, c.conv_size - 1, channels))))
    extra = sorted(set(tensors) - {"positions", "next_logits"} - {f"layers.{i}.{n}" for i, layer in enumerate(layers)
                                                                   for n in vars(layer)})
    if extra:
        raise MomctlError(f"state file {path} holds unexpected tensors {extra[:3]}: it is corrupt; save it again")
    return SavedState(InferenceState(layers, positions), take("next_logits", (B, c.vocab_size)))


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _one_line(err: BaseException) -> str:
    text = " ".join((str(err) or type(err).__name__).split())
    return text if len(text) <= 200 else text[:197] + "..."
