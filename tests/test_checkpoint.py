"""Checkpoint folders: round trips, layout, crash safety (raised errors, full disks, killed processes), corruption."""

import errno
import hashlib
import io
import json
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import random_model, small_config

from momctl import ModelConfig, MoMForCausalLM
from momctl import checkpoint as ckpt
from momctl.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_state_dict,
    load_training_state,
    read_config,
    read_generation_config,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from momctl.errors import MomctlError

GENERATION = {"max_new_tokens": 32, "temperature": 0.7, "top_p": 0.9}


def write_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": {"a": 0, "b": 1}}))
    (folder / "extra").mkdir()
    (folder / "extra" / "merges.txt").write_text("a b\n")


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16)}


def save(run: Path, step: int, seed: int | None = None, **kwargs) -> Path:
    kwargs.setdefault("write_tokenizer", write_tokenizer)
    return save_checkpoint(run, step, state_dict=weights(step if seed is None else seed), config={"seed": seed},
                           generation_config=GENERATION, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-"))


def steps(run: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run)]


def test_round_trip_is_bitwise_and_the_tokenizer_writer_gets_the_temporary_folder(tmp_path):
    config = small_config(attention_layers=(1,))
    model = random_model(config)
    extra = {"bf16": torch.randn(5, 3).to(torch.bfloat16), "int": torch.arange(7), "transposed": torch.randn(3, 5).t(),
             "scalar": torch.tensor(2.5), "empty": torch.empty(0)}
    state = {**model.state_dict(), **{f"extra.{k}": v for k, v in extra.items()}}
    calls = []

    def tokenizer(folder: Path) -> None:
        calls.append((folder, folder.is_dir(), checkpoint_path(tmp_path, 12).exists()))
        write_tokenizer(folder)

    folder = save_checkpoint(tmp_path, 12, state_dict=state, config=config.to_dict(), generation_config=GENERATION,
                             write_tokenizer=tokenizer)
    assert folder == tmp_path / "checkpoints" / "step-00000012"
    [(called_with, existed, final_existed)] = calls
    assert called_with.parent == tmp_path / "checkpoints" and called_with.name.startswith(".tmp-")
    assert existed and not final_existed
    loaded = load_state_dict(folder)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape and torch.equal(loaded[key], value)
    assert read_config(folder) == config.to_dict() and read_generation_config(folder) == GENERATION
    assert (folder / "tokenizer.json").read_text() == json.dumps({"vocab": {"a": 0, "b": 1}})
    rebuilt = MoMForCausalLM(ModelConfig.from_dict(read_config(folder))).double()
    rebuilt.load_state_dict({k: v for k, v in loaded.items() if not k.startswith("extra.")})
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    assert torch.equal(rebuilt(tokens).logits, model(tokens).logits)


def test_layout_and_manifest(tmp_path):
    (tmp_path / "train.log").write_text("trainer files beside checkpoints are left alone")
    folder = save(tmp_path, 7, training_state={"step": 7})
    assert checkpoint_path(tmp_path, 7) == folder and checkpoint_path(tmp_path, 123456789).name == "step-123456789"
    names = {"config.json", "model.safetensors", "generation_config.json", "training_state.pt", "tokenizer.json",
             "extra/merges.txt"}
    assert set(snapshot(folder)) == names | {"manifest.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == verify_checkpoint(folder)
    assert (manifest["format"], manifest["version"], manifest["step"]) == ("momctl-checkpoint", 1, 7)
    assert manifest["files"] == {name: {"bytes": (folder / name).stat().st_size,
                                        "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
                                 for name in sorted(names)}
    assert leftovers(tmp_path) == [] and (tmp_path / "train.log").exists()
    for bad in (-1, "3", 2.0, True):
        with pytest.raises(ValueError, match="step="):
            checkpoint_path(tmp_path, bad)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsynced files through /proc")
def test_every_file_is_fsynced_and_the_manifest_is_written_last(tmp_path, monkeypatch):
    save(tmp_path, 1)
    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "rename", rename)
    final = save(tmp_path, 1, seed=5)  # a re-save: the old folder is moved aside first
    [commit] = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final)]
    tmp = Path(events[commit][1])
    last_fsync = {e[1]: i for i, e in enumerate(events) if e[0] == "fsync"}

    def synced(path: Path) -> int:
        return last_fsync[os.path.realpath(path)]

    others = [synced(tmp / name) for name in snapshot(final) if name != "manifest.json"]
    assert max(others) < synced(tmp / "manifest.json") < synced(tmp) < commit
    assert synced(tmp / "extra") < commit < synced(final.parent)
    aside = [e for e in events[:commit] if e[0] == "rename" and e[1] == str(final)]
    assert len(aside) == 1 and Path(aside[0][2]).name.startswith(".tmp-")


def test_latest_and_resolve_on_run_folders_and_checkpoint_folders(tmp_path):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    missing = tmp_path / "nope"
    with pytest.raises(MomctlError) as info:
        resolve_checkpoint(missing)
    assert str(info.value) == f"no checkpoint at {missing}: pass a run folder or a checkpoints/step-N folder"
    with pytest.raises(MomctlError, match="no checkpoint at"):
        resolve_checkpoint(save(tmp_path, 3) / "model.safetensors")
    save(tmp_path, 10)
    with pytest.warns(UserWarning, match="below step-00000010"):
        save(tmp_path, 2)
    assert steps(tmp_path) == ["step-00000002", "step-00000003", "step-00000010"]
    latest = checkpoint_path(tmp_path, 10)
    assert latest_checkpoint(tmp_path) == latest
    assert resolve_checkpoint(tmp_path) == resolve_checkpoint(str(tmp_path / "checkpoints")) == latest
    assert resolve_checkpoint(str(checkpoint_path(tmp_path, 3)), checksums=True) == checkpoint_path(tmp_path, 3)
    with pytest.raises(MomctlError, match="is a run folder, not a checkpoint"):
        load_state_dict(tmp_path)
    empty_run = tmp_path / "empty"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(MomctlError, match="has no complete checkpoint"):
        resolve_checkpoint(empty_run)


def test_keep_last_prunes_older_checkpoints_but_never_the_one_just_written(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert steps(tmp_path) == ["step-00000004", "step-00000005"] and leftovers(tmp_path) == []
    with pytest.warns(UserWarning, match="latest_checkpoint"):
        save(tmp_path, 3, keep_last=1)
    assert steps(tmp_path) == ["step-00000003", "step-00000005"]
    save(tmp_path, 6)
    assert len(steps(tmp_path)) == 3
    with pytest.raises(ValueError, match="keep_last=0"):
        save(tmp_path, 7, keep_last=0)
    assert not checkpoint_path(tmp_path, 7).exists()


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 5, seed=1)
    folder = save(tmp_path, 5, seed=2)
    assert torch.equal(load_state_dict(folder)["w"], weights(2)["w"]) and read_config(folder) == {"seed": 2}
    assert steps(tmp_path) == ["step-00000005"] and leftovers(tmp_path) == []


def raise_after_writing(folder: Path) -> None:
    write_tokenizer(folder)
    raise RuntimeError("tokenizer exploded")


def full_disk(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


@pytest.mark.parametrize("failed_step", [200, 100], ids=["new-step", "resave"])
@pytest.mark.parametrize("failure", ["tokenizer", "enospc"])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, failure, failed_step):
    previous = save(tmp_path, 100)
    before = snapshot(previous)
    if failure == "enospc":
        monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
        kwargs, reason = {}, r"writing model\.safetensors: \[Errno 28\] No space left on device.*\(free disk space on"
    else:
        kwargs, reason = {"write_tokenizer": raise_after_writing}, "write_tokenizer: tokenizer exploded"
    with pytest.raises(MomctlError) as info:
        save(tmp_path, failed_step, seed=9, **kwargs)
    message = str(info.value)
    assert message.startswith(f"saving checkpoint step {failed_step} failed: ") and "\n" not in message
    assert re.search(reason, message)
    assert message.endswith(f"; the previous checkpoint {previous} is intact")
    assert leftovers(tmp_path) == [] and snapshot(previous) == before
    assert steps(tmp_path) == ["step-00000100"] and not checkpoint_path(tmp_path, 200).exists()
    verify_checkpoint(previous)


@pytest.mark.parametrize("failed_step", [200, 100], ids=["new-step", "resave"])
@pytest.mark.parametrize("call", ["fsync", "rename"])
def test_a_failure_at_any_fsync_or_rename_never_loses_a_checkpoint(tmp_path, monkeypatch, call, failed_step):
    real, count, fail_at = getattr(os, call), [0], [0]

    def counting(*args):
        count[0] += 1
        if count[0] == fail_at[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(ckpt.os, call, counting)

    def attempt(n: int):
        """Save step 100, then save `failed_step` with the n-th call failing (0: none)."""
        run = tmp_path / f"fail-at-{n}"
        previous = save(run, 100)
        before = snapshot(previous)
        count[0], fail_at[0] = 0, n
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                save(run, failed_step, seed=7)
                error = None
            except MomctlError as exc:
                error = exc
        fail_at[0] = 0
        return run, previous, before, error, [str(w.message) for w in caught]

    *_, error, _ = attempt(0)
    total = count[0]
    assert error is None and total >= 1
    for n in range(1, total + 1):
        run, previous, before, error, caught = attempt(n)
        if error is None:  # only a failed fsync of checkpoints/ after the rename warns instead of failing
            assert (call, n) == ("fsync", total) and any("syncing" in w for w in caught)
            assert torch.equal(load_state_dict(checkpoint_path(run, failed_step))["w"], weights(7)["w"])
        else:
            assert "No space left on device" in str(error) and f"previous checkpoint {previous} is intact" in str(error)
            assert snapshot(previous) == before and not checkpoint_path(run, 200).exists()
        assert leftovers(run) == [] and "step-00000100" in steps(run)
        for folder in (run / "checkpoints").iterdir():
            verify_checkpoint(folder)


def killed_save(run: Path, step: int, kill_at: int) -> int:
    """Run a save in a forked child that dies (no cleanup, no except blocks) at its `kill_at`-th os.rename."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            calls, real = [], os.rename

            def rename(src, dst):
                calls.append(dst)
                if len(calls) == kill_at:
                    os._exit(9)
                real(src, dst)

            ckpt.os.rename = rename
            save(run, step, seed=0)
        finally:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked save")
@pytest.mark.parametrize("step,kill_at", [(200, 1), (100, 2)], ids=["before-commit", "resave-between-renames"])
def test_a_killed_save_leaves_only_tmp_folders_that_readers_ignore_and_the_next_save_cleans(tmp_path, step, kill_at):
    save(tmp_path, 50)
    previous = save(tmp_path, 100)
    before = snapshot(previous)
    assert killed_save(tmp_path, step, kill_at) == 9
    assert leftovers(tmp_path) and not checkpoint_path(tmp_path, 200).exists()
    assert latest_checkpoint(tmp_path) == (previous if kill_at == 1 else checkpoint_path(tmp_path, 50))
    (tmp_path / "checkpoints" / ".tmp-step-00000999-1-dead").mkdir()
    save(tmp_path, 300)
    assert leftovers(tmp_path) == [] and snapshot(previous) == before
    assert steps(tmp_path) == ["step-00000050", "step-00000100", "step-00000300"]


@pytest.fixture
def loads(monkeypatch):
    """Counts the files actually handed to safetensors / torch.load."""
    calls = []
    real_st, real_torch = safetensors.torch.load_file, torch.load
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: calls.append(a[0]) or real_st(*a, **k))
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a[0]) or real_torch(*a, **k))
    return calls


def test_a_folder_without_manifest_is_reported_and_never_loaded(tmp_path, loads):
    folder = save(tmp_path, 1)
    (folder / "manifest.json").unlink()
    assert list_checkpoints(tmp_path) == []
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint step-00000001"):
        assert latest_checkpoint(tmp_path) is None
    with pytest.raises(MomctlError) as info:
        resolve_checkpoint(folder)
    assert str(info.value) == (f"{folder} has no manifest.json: it is a partial checkpoint (the save was interrupted) "
                               f"or not a momctl checkpoint; use an earlier step or the run folder")
    for load in (load_state_dict, load_training_state, read_config):
        with pytest.raises(MomctlError, match="has no manifest.json"):
            load(folder)
    with pytest.warns(UserWarning), pytest.raises(MomctlError, match="has no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_a_truncated_model_is_reported_and_never_loaded(tmp_path, loads):
    good = save(tmp_path, 100)
    folder = save(tmp_path, 200)
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    assert list_checkpoints(tmp_path) == [good]
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint step-00000200"):
        assert resolve_checkpoint(tmp_path) == good
    for check in (verify_checkpoint, load_state_dict, resolve_checkpoint):
        with pytest.raises(MomctlError, match="model.safetensors has .* bytes, its manifest says .*truncated"):
            check(folder)
    assert loads == []


def test_a_truncated_safetensors_file_is_a_momctl_error_even_when_the_manifest_agrees(tmp_path):
    folder = save(tmp_path, 1)
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size - 5)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"bytes": path.stat().st_size,
                                              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MomctlError, match="is not a readable safetensors file .*truncated or corrupt"):
        load_state_dict(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "training_state.pt", "extra/merges.txt"])
def test_a_flipped_byte_is_reported_and_never_loaded(tmp_path, loads, name):
    folder = save(tmp_path, 1, training_state={"step": 1, "m": torch.ones(100)})
    loads.clear()  # the save itself proves training_state.pt loads
    data = bytearray((folder / name).read_bytes())
    data[len(data) * 2 // 3] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    assert list_checkpoints(tmp_path) == [folder]  # sizes are right: only the checksum sees it
    verify_checkpoint(folder, checksums=False)
    message = f"{folder / name} is corrupt \\(sha256 mismatch\\)"
    for check in (verify_checkpoint, lambda f: resolve_checkpoint(f, checksums=True)):
        with pytest.raises(MomctlError, match=message):
            check(folder)
    load = {"model.safetensors": load_state_dict, "config.json": read_config, "training_state.pt": load_training_state}
    if name in load:
        with pytest.raises(MomctlError, match=message):
            load[name](folder)
    assert loads == []


def test_a_renamed_checkpoint_and_a_foreign_manifest_are_reported(tmp_path):
    folder = save(tmp_path, 1)
    moved = folder.rename(folder.with_name("step-00000002"))
    with pytest.raises(MomctlError, match="named step-00000002 but holds step 1"):
        verify_checkpoint(moved)
    (moved / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(MomctlError, match="not a valid momctl manifest"):
        verify_checkpoint(moved)
    (moved / "manifest.json").write_text("{not json")
    with pytest.raises(MomctlError, match="manifest.json is unreadable"):
        verify_checkpoint(moved)


def draws() -> list:
    return [random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(3).tolist(), torch.randn(2).tolist()]


def test_rng_state_round_trips_through_weights_only_load_and_repeats_the_draws():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second gaussian in both Python and numpy states
    np.random.standard_normal()
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    expected = draws()
    draws()
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))
    assert draws() == expected
    with pytest.raises(ValueError, match="capture_rng_state"):
        restore_rng_state({"torch": torch.get_rng_state()})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the warning of a CPU-only machine")
def test_restoring_cuda_rng_state_without_cuda_warns():
    state = {**capture_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)]}
    with pytest.warns(UserWarning, match="CUDA is not available"):
        restore_rng_state(state)


def train_steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        x = torch.randn(8, 4) + float(np.random.rand()) + random.random()
        loss = torch.nn.functional.dropout(model(x), 0.3).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def make_trainer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    return model, optimizer, scheduler


def test_training_state_round_trips_and_resuming_repeats_training_exactly(tmp_path):
    model, optimizer, scheduler = make_trainer(0)
    random.seed(0)
    np.random.seed(0)
    train_steps(model, optimizer, scheduler, 3)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": 3,
             "data": {"epoch": 0, "position": 24}, "rng": capture_rng_state()}
    folder = save_checkpoint(tmp_path, 3, state_dict=model.state_dict(), config={}, generation_config={},
                             write_tokenizer=lambda f: None, training_state=state)
    train_steps(model, optimizer, scheduler, 2)

    assert torch.load(folder / "training_state.pt", weights_only=True).keys() == state.keys()
    loaded = load_training_state(folder)
    assert (loaded["step"], loaded["data"]) == (3, {"epoch": 0, "position": 24})
    resumed, resumed_optimizer, resumed_scheduler = make_trainer(1)
    resumed.load_state_dict(load_state_dict(folder))
    resumed_optimizer.load_state_dict(loaded["optimizer"])
    resumed_scheduler.load_state_dict(loaded["scheduler"])
    restore_rng_state(loaded["rng"])
    train_steps(resumed, resumed_optimizer, resumed_scheduler, 2)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()


@pytest.mark.parametrize("bad,where", [
    ({"data": {"position": np.int64(5)}}, "training_state['data']['position'] is a numpy.int64"),
    ({"rng": np.random.get_state()}, "training_state['rng'][1] is a numpy.ndarray"),
])
def test_training_state_that_weights_only_load_refuses_fails_the_save(tmp_path, bad, where):
    previous = save(tmp_path, 1)
    with pytest.raises(MomctlError) as info:
        save(tmp_path, 2, training_state=bad)
    assert where in str(info.value) and "capture_rng_state()" in str(info.value)
    assert steps(tmp_path) == ["step-00000001"] and leftovers(tmp_path) == []
    with pytest.raises(MomctlError, match="has no training_state.pt"):
        load_training_state(previous)


def test_arguments_that_cannot_be_stored_fail_before_anything_is_written(tmp_path):
    for kwargs, words in [
        ({"config": small_config()}, "to_dict"),
        ({"state_dict": {"w": [1.0]}}, "state_dict\\['w'\\] is a list"),
        ({"training_state": [1]}, "training_state is a list"),
    ]:
        with pytest.raises(ValueError, match=words):
            save_checkpoint(tmp_path, 1, **{"state_dict": weights(1), "config": {}, "generation_config": {},
                                            "write_tokenizer": write_tokenizer, **kwargs})
    assert not (tmp_path / "checkpoints").exists()
    for kwargs, words in [
        ({"write_tokenizer": lambda f: (f / "config.json").write_text("{}")}, "config.json, names the checkpoint"),
        ({"config": {"dtype": torch.float32}},
         "writing config.json: Object of type dtype is not JSON serializable; no checkpoint was in"),
    ]:
        with pytest.raises(MomctlError, match=words):
            save_checkpoint(tmp_path, 1, **{"state_dict": weights(1), "config": {}, "generation_config": {},
                                            "write_tokenizer": write_tokenizer, **kwargs})
    assert leftovers(tmp_path) == [] and steps(tmp_path) == []


def test_tensors_sharing_storage_are_saved_as_copies(tmp_path):
    shared = torch.randn(6)
    state = {"embed": shared, "head": shared, "half": shared[:3], "e1": torch.empty(0), "e2": torch.empty(0)}
    loaded = load_state_dict(save_checkpoint(tmp_path, 1, state_dict=state, config={}, generation_config={},
                                             write_tokenizer=lambda f: None))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
