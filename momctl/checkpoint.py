"""Checkpoint folders: a crash-safe save, the listing of complete checkpoints, and verified loads.

A run folder holds `checkpoints/step-<N>/` (N zero-padded to 8 digits). A checkpoint folder is portable:
`config.json`, `model.safetensors`, the tokenizer files, `generation_config.json`, optionally `training_state.pt`,
and `manifest.json` (written last) with the size and sha256 of every other file. A save builds the folder as
`checkpoints/.tmp-*` and renames it into place, so a `step-*` folder is either complete or absent; readers ignore
`.tmp-*` folders and the next successful save removes them. One process writes a run folder at a time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from .errors import MomctlError
from .export import BUNDLE_FORMAT

FORMAT = "momctl-checkpoint"
VERSION = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
CONFIG = "config.json"
MODEL = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
TRAINING_STATE = "training_state.pt"
REQUIRED_FILES = (CONFIG, MODEL, GENERATION_CONFIG)
RESERVED_NAMES = (*REQUIRED_FILES, TRAINING_STATE, MANIFEST)
TMP_PREFIX = ".tmp-"
# A checkpoint moved aside while a re-save of its step is renamed into place.
REPLACED_PREFIX = ".tmp-replaced-"

_STEP_RE = re.compile(r"step-(\d{8,})")
_REPLACED_RE = re.compile(re.escape(REPLACED_PREFIX) + r"(step-\d{8,})-")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_NO_CHECKPOINT = "no checkpoint at {}: pass a run folder or a checkpoints/step-N folder"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The folder of checkpoint `step` in a run folder (it may not exist).

    Args:
        run_dir: the run folder.
        step: the optimizer step, an int >= 0; zero-padded to 8 digits in the name.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step={step!r} is invalid: expected an int >= 0; pass the optimizer step.")
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def save_checkpoint(run_dir: Path, step: int, *, state_dict: Mapping[str, torch.Tensor], config: Mapping,
                    generation_config: Mapping, write_tokenizer: Callable[[Path], object],
                    training_state: Mapping | None = None, keep_last: int | None = None) -> Path:
    """Write `run_dir/checkpoints/step-<N>/` so that it is complete or absent, whatever happens during the save.

    Everything is written into `checkpoints/.tmp-*`, fsynced, the manifest last, then renamed into place. A re-save
    of an existing step moves the old folder aside and deletes it only once the new one is in place. On any error
    the temporary folder is removed, earlier checkpoints are untouched, and a one-line `MomctlError` says why.

    Args:
        run_dir: the run folder; `checkpoints/` is created inside it.
        step: the optimizer step, an int >= 0.
        state_dict: `model.state_dict()`; tensors on any device, saved as `model.safetensors`.
        config: the model config as a JSON-serialisable dict (`ModelConfig.to_dict()`), saved as `config.json`.
        generation_config: a JSON-serialisable dict, saved as `generation_config.json`.
        write_tokenizer: called with the temporary checkpoint folder; writes the tokenizer files into it (any names
            but the reserved `config.json`, `model.safetensors`, `generation_config.json`, `training_state.pt`,
            `manifest.json`). Its return value is ignored.
        training_state: resume state saved with `torch.save` as `training_state.pt`, or None for a weights-only
            checkpoint. It must load with `torch.load(weights_only=True)` (checked during the save): tensors, numbers,
            strings, None, lists, tuples and dicts, e.g. `{"optimizer": opt.state_dict(), "scheduler":
            sched.state_dict(), "step": step, "data": {"epoch": 0, "position": 1234}, "rng": capture_rng_state()}`.
            Convert numpy arrays and scalars (`.tolist()`, `float()`) and objects (to dicts) first.
        keep_last: after a successful save, delete complete checkpoints outside the `keep_last` highest steps (never
            the one just written, so a save below the highest step can leave `keep_last + 1`). None keeps all.

    Returns:
        The checkpoint folder `run_dir/checkpoints/step-<N>`.
    """
    final = checkpoint_path(run_dir, step)
    _check_save_args(state_dict, config, generation_config, training_state, keep_last)
    ckpt_dir = final.parent
    previous = tmp = aside = None
    stage = f"creating {ckpt_dir}"
    try:
        _restore_replaced(ckpt_dir)
        previous = (list_checkpoints(run_dir) or [None])[-1]
        if not ckpt_dir.is_dir():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(ckpt_dir.parent)
        tmp = _new_name(ckpt_dir, f"{TMP_PREFIX}{final.name}-")
        os.mkdir(tmp)
        stage = "write_tokenizer"
        write_tokenizer(tmp)
        _check_tokenizer_files(tmp)
        stage = f"writing {CONFIG}"
        _write_bytes(tmp / CONFIG, _json_bytes(config))
        stage = f"writing {MODEL}"
        safetensors.torch.save_file(_storable(state_dict), str(tmp / MODEL), metadata={"format": "pt"})
        stage = f"writing {GENERATION_CONFIG}"
        _write_bytes(tmp / GENERATION_CONFIG, _json_bytes(generation_config))
        if training_state is not None:
            stage = f"writing {TRAINING_STATE}"
            _write_training_state(tmp / TRAINING_STATE, training_state)
        stage = f"writing {MANIFEST}"
        _write_manifest(tmp, step)
        stage = f"moving it into place as {final}"
        if os.path.lexists(final):
            aside = _new_name(ckpt_dir, f"{REPLACED_PREFIX}{final.name}-")
            os.rename(final, aside)
        os.rename(tmp, final)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {previous} is intact" if previous else f"no checkpoint was in {ckpt_dir}"
        if aside is not None and not os.path.lexists(final):
            try:
                os.rename(aside, final)
            except OSError:
                kept = f"the previous checkpoint of step {step} is intact in {aside}: rename it to {final}"
        if not isinstance(exc, Exception):
            raise
        hint = f" (free disk space on {ckpt_dir})" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else ""
        raise MomctlError(f"saving checkpoint step {step} failed: {stage}: {_one_line(exc)}{hint}; {kept}") from exc

    try:
        _fsync_dir(ckpt_dir)
    except OSError as exc:
        warnings.warn(f"{final} is in place but syncing {ckpt_dir} failed ({_one_line(exc)}): a power loss now could "
                      f"lose it; check the disk.", stacklevel=2)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _remove_stale(ckpt_dir)
    complete = list_checkpoints(run_dir)
    if complete and _step_of(complete[-1]) > step:
        warnings.warn(f"saved step {step} below {complete[-1].name} in {ckpt_dir}: latest_checkpoint() still "
                      f"returns {complete[-1].name}; delete the later steps if this run rewound.", stacklevel=2)
    if keep_last is not None:
        keep = set(complete[-keep_last:]) | {final}
        for folder in complete:
            if folder not in keep:
                _delete(folder)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, ascending by step.

    Complete means a readable manifest listing every file with the right size (checksums are not read here).
    Partial `step-*` folders and `.tmp-*` folders are left out.

    Args:
        run_dir: the run folder.
    """
    return [folder for folder, problem in _scan(Path(run_dir)) if problem is None]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None; warns about incomplete later steps it skips.

    Args:
        run_dir: the run folder.
    """
    scanned = _scan(Path(run_dir))
    complete = [folder for folder, problem in scanned if problem is None]
    latest = complete[-1] if complete else None
    for folder, problem in scanned:
        if problem is not None and (latest is None or _step_of(folder) > _step_of(latest)):
            warnings.warn(f"skipping incomplete checkpoint {folder.name}: {problem}", stacklevel=2)
    return latest


def resolve_checkpoint(path: Path | str, *, checksums: bool = False) -> Path:
    """A checkpoint folder from what a user passes: a checkpoint folder (validated) or a run folder (its latest).

    Args:
        path: a `checkpoints/step-N` folder (or any folder holding a momctl manifest), a run folder, or a
            run's `checkpoints/` folder.
        checksums: also check every file's sha256 (reads the whole checkpoint); the loaders check the files they read.

    Returns:
        The checkpoint folder.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MomctlError(_NO_CHECKPOINT.format(path))
    if (path / CHECKPOINTS).is_dir() and not (path / MANIFEST).exists():
        run_dir = path
    elif path.name == CHECKPOINTS and not (path / MANIFEST).exists():
        run_dir = path.parent
    else:
        verify_checkpoint(path, checksums=checksums)
        return path
    latest = latest_checkpoint(run_dir)
    if latest is None:
        partial = len(_scan(run_dir))
        raise MomctlError(f"run folder {run_dir} has no complete checkpoint ({partial} incomplete step folders in "
                          f"{run_dir / CHECKPOINTS}): train until a checkpoint is saved, or pass a checkpoint folder")
    if checksums:
        verify_checkpoint(latest, checksums=True)
    return latest


def verify_checkpoint(folder: Path, *, checksums: bool = True) -> dict:
    """Check a checkpoint folder against its manifest and return the manifest.

    Args:
        folder: the checkpoint folder.
        checksums: compare every file's sha256 with the manifest (reads every byte); False checks sizes only.

    Returns:
        The manifest: {"format", "version", "step", "files": {name: {"bytes", "sha256"}}}.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    for name in manifest["files"]:
        _check_file(folder, manifest, name, checksums)
    return manifest


def read_config(folder: Path) -> dict:
    """The model config dict saved in a checkpoint (`config.json`), checksum verified.

    Args:
        folder: the checkpoint folder.
    """
    return _read_json(folder, CONFIG)


def read_generation_config(folder: Path) -> dict:
    """The generation config dict saved in a checkpoint (`generation_config.json`), checksum verified.

    Args:
        folder: the checkpoint folder.
    """
    return _read_json(folder, GENERATION_CONFIG)


def load_state_dict(folder: Path, device: str | torch.device = "cpu", *,
                    checksums: bool = True) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint, checked against the manifest before it is read.

    Args:
        folder: the checkpoint folder.
        device: where the tensors are loaded (default `cpu`).
        checksums: check the sha256 of `model.safetensors` first (one extra read of the file); sizes are always checked.
    """
    path = _verified_file(Path(folder), MODEL, checksums)
    try:
        return safetensors.torch.load_file(path, device=str(torch.device(device)))
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise MomctlError(f"{path} is not a readable safetensors file ({_one_line(exc)}): it is truncated or corrupt; "
                          f"use an earlier step") from exc


def load_training_state(folder: Path, *, device: str | torch.device = "cpu", checksums: bool = True) -> dict:
    """The resume state of a checkpoint (`training_state.pt`), loaded with `torch.load(weights_only=True)`.

    Args:
        folder: the checkpoint folder.
        device: `map_location` of the tensors (default `cpu`; `optimizer.load_state_dict` moves its state to the
            parameters' device).
        checksums: check the sha256 of the file first; sizes are always checked.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if TRAINING_STATE not in manifest["files"]:
        raise MomctlError(f"{folder} has no {TRAINING_STATE} (it was saved without training_state): resume from "
                          f"another checkpoint, or load only the weights with load_state_dict")
    path = _check_file(folder, manifest, TRAINING_STATE, checksums)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise MomctlError(f"{path} cannot be loaded with torch.load(weights_only=True) ({_one_line(exc)}): it is "
                          f"corrupt or holds objects other than tensors and plain Python values") from exc


def capture_rng_state() -> dict:
    """The state of every global RNG (Python `random`, numpy's global `np.random`, torch CPU, every CUDA device).

    Stored as lists, numbers and tensors, so it round-trips through `torch.save` / `torch.load(weights_only=True)`.
    Generators made with `np.random.default_rng()` or `torch.Generator()` are not global: save their states yourself.
    """
    py_version, py_internal, py_gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss_next},
        "numpy": {"bit_generator": str(np_name), "keys": np_keys.tolist(), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping) -> None:
    """Set every global RNG from `capture_rng_state()`'s dict, so that the next random draws repeat.

    Warns when CUDA states cannot all be restored (no CUDA here, or another number of devices).

    Args:
        state: the dict `capture_rng_state()` returned (possibly after a `torch.save` / `torch.load` round trip).
    """
    missing = [key for key in ("python", "numpy", "torch") if key not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing}: pass the dict capture_rng_state() returned.")
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = list(state.get("cuda", []))
    if not cuda:
        return
    if not torch.cuda.is_available():
        warnings.warn(f"the RNG state of {len(cuda)} CUDA devices was not restored: CUDA is not available.",
                      stacklevel=2)
        return
    count = torch.cuda.device_count()
    if count != len(cuda):
        warnings.warn(f"RNG state saved for {len(cuda)} CUDA devices, restoring the first {min(count, len(cuda))} of "
                      f"{count} here.", stacklevel=2)
    for index, cuda_state in enumerate(cuda[:count]):
        torch.cuda.set_rng_state(cuda_state.cpu(), index)


def _scan(run_dir: Path) -> list[tuple[Path, str | None]]:
    """Every `step-*` folder of a run, ascending by step, with why it is incomplete (None if complete)."""
    ckpt_dir = run_dir / CHECKPOINTS
    if not ckpt_dir.is_dir():
        return []
    scanned = []
    for folder in sorted((p for p in ckpt_dir.iterdir() if _STEP_RE.fullmatch(p.name) and p.is_dir()), key=_step_of):
        try:
            verify_checkpoint(folder, checksums=False)
            scanned.append((folder, None))
        except MomctlError as exc:
            scanned.append((folder, str(exc)))
    return scanned


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


def _read_manifest(folder: Path) -> dict:
    """The checked manifest of a checkpoint folder; MomctlError says what the folder is instead."""
    if not folder.is_dir():
        raise MomctlError(_NO_CHECKPOINT.format(folder))
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / CHECKPOINTS).is_dir():
            raise MomctlError(f"{folder} is a run folder, not a checkpoint: pass {folder / CHECKPOINTS}/step-N, or "
                              f"resolve_checkpoint({str(folder)!r}) for its latest checkpoint")
        raise MomctlError(f"{folder} has no {MANIFEST}: it is a partial checkpoint (the save was interrupted) or not a "
                          f"momctl checkpoint; use an earlier step or the run folder")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise MomctlError(f"{path} is unreadable ({_one_line(exc)}): the checkpoint is corrupt; use an earlier step") \
            from exc
    if isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT:
        raise MomctlError(f"{folder} is an ONNX bundle from `momctl export onnx`, not a checkpoint: run it with "
                          f"`momctl generate {folder} --backend onnx`, or pass a run folder or checkpoint here")
    problem = _manifest_problem(manifest)
    if problem is None and _STEP_RE.fullmatch(folder.name) and _step_of(folder) != manifest["step"]:
        problem = f"the folder is named {folder.name} but holds step {manifest['step']} (renamed?)"
    if problem is not None:
        raise MomctlError(f"{path} is not a valid momctl manifest: {problem}; use an earlier step")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest, or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f'expected "format": "{FORMAT}"'
    if manifest.get("version") != VERSION:
        return f"version {manifest.get('version')!r} is not {VERSION} (written by another momctl version?)"
    step, files = manifest.get("step"), manifest.get("files")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step {step!r} is not an int >= 0"
    if not isinstance(files, dict) or any(name not in files for name in REQUIRED_FILES):
        return f"files must list {', '.join(REQUIRED_FILES)}"
    for name, entry in files.items():
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or not parts or name == MANIFEST:
            return f"file name {name!r} is not a path inside the checkpoint"
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
                and _SHA256_RE.fullmatch(entry["sha256"])):
            return f"entry of {name!r} needs an int bytes and a hex sha256"
    return None


def _check_file(folder: Path, manifest: dict, name: str, checksums: bool) -> Path:
    """One file of a checkpoint checked against its manifest entry: present, same size, same sha256 if asked."""
    entry, path = manifest["files"][name], folder / name
    if not path.is_file():
        raise MomctlError(f"{path} is missing (listed in {MANIFEST}): the checkpoint is incomplete; use an earlier "
                          f"step or copy the whole folder again")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise MomctlError(f"{path} has {size} bytes, its manifest says {entry['bytes']}: the file is truncated or "
                          f"changed; use an earlier step or copy the checkpoint again")
    if checksums and _sha256(path) != entry["sha256"]:
        raise MomctlError(f"{path} is corrupt (sha256 mismatch): its bytes changed after saving (a disk or copy "
                          f"error); use an earlier step or copy the checkpoint again")
    return path


def _verified_file(folder: Path, name: str, checksums: bool) -> Path:
    return _check_file(folder, _read_manifest(folder), name, checksums)


def _read_json(folder: Path, name: str) -> dict:
    path = _verified_file(Path(folder), name, checksums=True)
    try:
        value = json.loads(path.read_bytes())
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise MomctlError(f"{path} does not hold a JSON object: the checkpoint was not written by momctl; use "
                          f"another checkpoint")
    return value


def _check_save_args(state_dict: Mapping, config: Mapping, generation_config: Mapping,
                     training_state: Mapping | None, keep_last: int | None) -> None:
    """ValueError, before anything is written, for arguments save_checkpoint cannot store."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r} is invalid: expected an int >= 1 or None; pass None to keep all.")
    for name, value in (("config", config), ("generation_config", generation_config)):
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} is a {type(value).__name__}, expected a dict: pass a dict (for a dataclass "
                             f"config, its .to_dict() or dataclasses.asdict()).")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict[{key!r}] is a {type(value).__name__}, expected a tensor: pass "
                             f"model.state_dict() (modules with extra state cannot go into safetensors).")
    if training_state is not None and not isinstance(training_state, Mapping):
        raise ValueError(f"training_state is a {type(training_state).__name__}, expected a dict or None.")


def _storable(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors wants them: contiguous, none sharing storage (tied weights are copied)."""
    tensors, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().contiguous()
        storage = (value.device, value.untyped_storage().data_ptr())
        tensors[key] = value.clone() if storage in seen and value.numel() else value
        seen.add(storage)
    return tensors


def _write_manifest(tmp: Path, step: int) -> None:
    """fsync every file of the folder while hashing it, write the manifest last, then fsync the folders."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path, sync=True)}
    _write_bytes(tmp / MANIFEST, _json_bytes({"format": FORMAT, "version": VERSION, "step": step, "files": files}))
    for folder in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(folder)
    _fsync_dir(tmp)


def _check_tokenizer_files(folder: Path) -> None:
    """write_tokenizer must leave plain files and folders only, none with a name the checkpoint itself uses."""
    for path in folder.rglob("*"):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ValueError(f"write_tokenizer created {path.name}, which is not a plain file: write real files")
    taken = [name for name in RESERVED_NAMES if os.path.lexists(folder / name)]
    if taken:
        raise ValueError(f"write_tokenizer wrote {', '.join(taken)}, names the checkpoint itself uses: "
                         f"write the tokenizer files under other names")


def _write_training_state(path: Path, training_state: Mapping) -> None:
    """torch.save the resume state, then prove it loads with weights_only=True (mmap: no tensor data is read)."""
    with open(path, "xb") as f:
        torch.save(dict(training_state), f)
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        unsafe = _first_unsafe(training_state, "training_state")
        found = f"{unsafe[0]} is a {_type_name(unsafe[1])}" if unsafe else _one_line(exc)
        raise ValueError(f"torch.load(weights_only=True) refuses it: {found}; store tensors, numbers, strings, "
                         f"lists and dicts only (numpy: .tolist() or float(); RNG: capture_rng_state())") from exc


_SAFE_MODULES = ("builtins", "torch", "collections")


def _first_unsafe(value: Any, where: str) -> tuple[str, Any] | None:
    """The key path and value of the first item whose type weights_only loading may refuse (a diagnosis only)."""
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = _first_unsafe(item, f"{where}[{key!r}]")
        if found:
            return found
    if type(value).__module__.split(".")[0] not in _SAFE_MODULES:
        return where, value
    return None


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _json_bytes(value: Mapping) -> bytes:
    return (json.dumps(dict(value), indent=2, ensure_ascii=False) + "\n").encode()


def _write_bytes(path: Path, data: bytes) -> None:
    """Create `path` (never overwrite) with `data`, flushed and fsynced."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path, *, sync: bool = False) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks; `sync` also fsyncs it (for files others wrote)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (created, renamed files) durable. Windows cannot open folders: a no-op there."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_name(folder: Path, prefix: str) -> Path:
    return folder / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"


def _restore_replaced(ckpt_dir: Path) -> None:
    """Rename back a checkpoint moved aside by a re-save that was killed before the new folder took its place."""
    if not ckpt_dir.is_dir():
        return
    for aside in ckpt_dir.iterdir():
        match = _REPLACED_RE.match(aside.name)
        if match and not os.path.lexists(ckpt_dir / match[1]):
            try:
                verify_checkpoint(aside, checksums=False)
            except MomctlError:
                continue
            os.rename(aside, ckpt_dir / match[1])
            _fsync_dir(ckpt_dir)


def _remove_stale(ckpt_dir: Path) -> None:
    """Delete `.tmp-*` leftovers of killed saves (after restoring any checkpoint moved aside); never raises."""
    try:
        _restore_replaced(ckpt_dir)
        for path in ckpt_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
    except OSError as exc:
        warnings.warn(f"could not clean up {ckpt_dir}/.tmp-* ({_one_line(exc)}); delete them by hand.", stacklevel=3)


def _delete(folder: Path) -> None:
    """Delete a checkpoint: first renamed to `.tmp-*` so that a killed delete leaves no partial `step-*` folder."""
    doomed = _new_name(folder.parent, f"{TMP_PREFIX}deleting-{folder.name}-")
    try:
        os.rename(folder, doomed)
        shutil.rmtree(doomed)
    except OSError as exc:
        warnings.warn(f"could not delete old checkpoint {folder} ({_one_line(exc)}); delete it by hand.", stacklevel=3)


def _one_line(exc: BaseException) -> str:
    """An exception as one short line; for torch's weights_only error, the line that names the refused global."""
    text = str(exc) or type(exc).__name__
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"unsupported type {found[1]}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
