"""The training loop: AdamW with warmup + cosine, gradient clipping, aux loss, eval, crash-safe checkpoints, exact
resume, SIGTERM/SIGINT handling, NaN guard, and DistributedDataParallel under torchrun (nccl on GPU, gloo on CPU).

Determinism: batch number s is a pure function of (seed, s) (see `TokenDataset.get_batch`), the schedule is a pure
function of the step, and the optimiser state and RNG states travel in every checkpoint, so a resumed run takes
bitwise the same steps as an uninterrupted one on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import ModelConfig
from .data import load_dataset
from .devices import resolve_device
from .errors import MomctlError
from .fla_compat import config_to_fla
from .model import MoMForCausalLM
from .run_config import RunConfig, build_run_config
from .tokenizers import load_saved_tokenizer, load_tokenizer, save_tokenizer, tokenizer_fingerprint

RUN_CONFIG = "run_config.json"
TRAIN_LOG = "train_log.jsonl"


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    step: int
    train_loss: float | None
    val_loss: float | None
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value


Reporter = Callable[[str, dict[str, Any]], None]


def _plain_reporter(event: str, info: dict[str, Any]) -> None:
    if event == "log":
        import sys

        print(info["line"], file=sys.stderr, flush=True)


def lr_at(step: int, total_steps: int, optim) -> float:
    """Linear warmup, then cosine from lr down to min_lr_ratio * lr at the last step.

    The warmup lasts `warmup_steps`, but at most a tenth of the run, so that short runs still decay.
    """
    warmup = min(optim.warmup_steps, total_steps // 10)
    if warmup and step < warmup:
        return optim.lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = optim.min_lr_ratio * optim.lr
    return floor + 0.5 * (optim.lr - floor) * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and filters; none on norms, biases, A_log and dt_bias (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _distributed_from_env(device_name: str) -> tuple[Distributed, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), resolve_device(device_name)
    info = Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info, torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")


def _autocast(device: torch.device, dtype_name: str):
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    if dtype_name == "float32":
        return nullcontext(), dtype_name
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name)), dtype_name


def _check_writable(out: Path) -> None:
    """Fail early on a run folder that cannot be written, leaving behind no folder it had to create for the check
    (a run that then fails on bad input leaves nothing; the folder is made again when the run starts writing)."""
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".momctl-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise MomctlError(f"output folder {out} is not writable ({err.strerror}); pass --out to a folder you own") \
            from None
    finally:
        for folder in created:  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _resume_source(out: Path, resume: str | None) -> Path | None:
    if resume is None:
        if ckpt.latest_checkpoint(out) is not None:
            raise MomctlError(f"{out} already holds checkpoints; pass --resume auto to continue it or --out for a "
                              "new run")
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(out)
    return ckpt.resolve_checkpoint(resume)


def _merge_saved_run(saved: dict[str, Any], run: RunConfig, explicit: set[str]) -> RunConfig:
    """The saved run config with this invocation's explicit settings on top; the model may not change."""
    current = run.to_dict()
    overrides = []
    for key in sorted(explicit):
        section, name = key.split(".", 1)
        overrides.append(f"{key}={json.dumps(current[section][name])}")
    merged, _ = build_run_config(overrides=overrides, base=saved)
    original, _ = build_run_config(base=saved)
    if merged.model != original.model:
        old, new = original.model.to_dict(), merged.model.to_dict()
        name = next(k for k in new if new[k] != old[k])
        raise MomctlError(f"cannot resume with a changed model config: model.{name} was {old[name]!r}, now "
                          f"{new[name]!r}; drop the change or start a new run with --out")
    return merged


def _adopt_init_checkpoint(folder: Path, run: RunConfig, explicit: set[str]):
    """--init-from: the model config and tokenizer of `folder`; explicit model settings must agree with them."""
    saved = ckpt.read_config(folder)["momctl"]
    model = saved["model"]
    for key in sorted(k for k in explicit if k.startswith("model.")):
        name = key.split(".", 1)[1]
        if getattr(run.model, name) != getattr(ModelConfig.from_dict(model), name):
            raise MomctlError(f"--init-from {folder} has model.{name}={model[name]!r}, but this run sets "
                              f"{getattr(run.model, name)!r}; drop the setting to fine-tune that model")
    tokenizer = load_saved_tokenizer(folder)
    if "data.tokenizer" in explicit and run.data.tokenizer is not None:
        if tokenizer_fingerprint(load_tokenizer(run.data.tokenizer)) != tokenizer_fingerprint(tokenizer):
            raise MomctlError(f"--tokenizer {run.data.tokenizer} differs from the tokenizer of {folder}")
    adopted = RunConfig(preset=run.preset, model=ModelConfig.from_dict(model), optim=run.optim, data=run.data,
                        train=run.train)
    return adopted, tokenizer


def _model_vocab(run: RunConfig, explicit: set[str], tokenizer_vocab: int) -> RunConfig:
    if "model.vocab_size" in explicit:
        if run.model.vocab_size < tokenizer_vocab:
            raise MomctlError(f"model.vocab_size={run.model.vocab_size} is smaller than the tokenizer's vocabulary "
                              f"({tokenizer_vocab}); raise it or drop the setting")
        return run
    vocab = 64 * math.ceil(tokenizer_vocab / 64)
    return RunConfig(preset=run.preset, model=run.model.replace(vocab_size=vocab), optim=run.optim, data=run.data,
                     train=run.train)


def _checkpoint_config(model_config, run: RunConfig, tokenizer_info: dict[str, Any]) -> dict[str, Any]:
    return {**config_to_fla(model_config), "momctl": {"model": model_config.to_dict(), "run": run.to_dict(),
                                                      "tokenizer": tokenizer_info}}


def train(run: RunConfig, out: Path, *, explicit: set[str] | None = None, resume: str | None = None,
          init_from: str | None = None, reporter: Reporter = _plain_reporter) -> TrainResult:
    """Train `run` into the run folder `out`.

    Args:
        run: the effective run configuration (see `build_run_config`).
        out: run folder: run_config.json, train_log.jsonl and checkpoints/step-N/ go there.
        explicit: dotted keys the user set (they override a resumed run's saved config; model keys may not change).
        resume: None (fresh run; `out` must hold no checkpoint), "auto" (latest complete checkpoint in `out`, or a
            fresh start), or a checkpoint / run folder.
        init_from: start from these weights (fresh optimiser and step 0).
        reporter: receives ("start" | "step" | "log" | "end", info) events for progress display.
    """
    explicit = explicit or set()
    dist_info, device = _distributed_from_env(run.train.device)
    out = Path(out)
    if dist_info.is_main:
        _check_writable(out)
    source = _resume_source(out, resume)
    state: dict[str, Any] | None = None
    if source is not None:
        saved = ckpt.read_config(source)["momctl"]
        run = _merge_saved_run(saved["run"], run, explicit)
        tokenizer = load_saved_tokenizer(source)
        if run.data.tokenizer is not None and "data.tokenizer" in explicit:
            wanted = load_tokenizer(run.data.tokenizer)
            if tokenizer_fingerprint(wanted) != tokenizer_fingerprint(tokenizer):
                raise MomctlError(f"--tokenizer {run.data.tokenizer} differs from the tokenizer of {source}; "
                                  "resume with the run's own tokenizer")
        state = ckpt.load_training_state(source)
    elif init_from is not None:
        init_from = ckpt.resolve_checkpoint(init_from)
        run, tokenizer = _adopt_init_checkpoint(init_from, run, explicit)
    else:
        tokenizer = load_tokenizer(run.data.tokenizer)
    if run.data.source.startswith("mqar"):
        dataset = load_dataset(run.data.source, tokenizer, text_field=run.data.text_field, seq_len=run.data.seq_len)
        # MQAR ids are not text; the vocabulary also covers the run's tokenizer so that generate still works.
        vocab_needed = max(dataset.vocab_size, tokenizer.vocab_size)
    else:
        vocab_needed = tokenizer.vocab_size
        dataset = None
    if source is None and init_from is None:
        run = _model_vocab(run, explicit, vocab_needed)
    if dataset is None:
        # Rank 0 builds the corpus cache first; the others then read it.
        if dist_info.is_main:
            dataset = load_dataset(run.data.source, tokenizer, text_field=run.data.text_field,
                                   seq_len=run.data.seq_len)
        dist_info.barrier()
        if dataset is None:
            dataset = load_dataset(run.data.source, tokenizer, text_field=run.data.text_field,
                                   seq_len=run.data.seq_len)

    loop, optim_cfg, seq_len = run.train, run.optim, run.data.seq_len
    total_steps = loop.max_tokens // (loop.batch_size * seq_len) if loop.max_tokens else loop.steps
    if total_steps < 1:
        raise MomctlError(f"--max-tokens {loop.max_tokens} is less than one step of {loop.batch_size * seq_len} "
                          "tokens; raise it or lower --batch-size / --seq-len")
    shards = dist_info.world_size * loop.grad_accum
    if loop.batch_size % shards:
        raise MomctlError(f"--batch-size {loop.batch_size} does not split over {dist_info.world_size} process(es) x "
                          f"{loop.grad_accum} accumulation steps; use a multiple of {shards}")
    micro = loop.batch_size // shards

    torch.manual_seed(loop.seed)
    model = MoMForCausalLM(run.model).to(device)
    if source is not None or init_from is not None:
        model.load_state_dict(ckpt.load_state_dict(source if source is not None else init_from, device))
    optimizer = torch.optim.AdamW(parameter_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                                  betas=(optim_cfg.beta1, optim_cfg.beta2), fused=False, foreach=False)
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng_state(state["rng"])
        start_step = int(state["step"])
    trained = model
    if dist_info.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if loop.compile:
        trained = torch.compile(trained)
    autocast, dtype_name = _autocast(device, loop.dtype)

    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        _truncate_log(out / TRAIN_LOG, start_step)
    tokenizer_info: dict[str, Any] = {}

    def write_tokenizer(folder: Path) -> None:
        tokenizer_info.update(save_tokenizer(tokenizer, folder))

    generation_config = {"bos_token_id": getattr(tokenizer, "bos_id", None),
                         "eos_token_id": getattr(tokenizer, "eos_id", None),
                         "pad_token_id": getattr(tokenizer, "pad_id", None),
                         "temperature": 0.8, "top_k": 50, "top_p": 1.0, "max_new_tokens": 256}

    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    history: list[dict[str, Any]] = []
    last_ckpt: Path | None = source
    last_val: float | None = state.get("val_loss") if state else None
    last_loss: float | None = state.get("train_loss") if state else None
    bytes_per_token = _bytes_per_token(dataset, tokenizer)

    def save(step: int) -> Path | None:
        nonlocal last_ckpt
        if dist_info.is_main:
            payload = {"step": step, "optimizer": optimizer.state_dict(), "rng": ckpt.capture_rng_state(),
                       "train_loss": last_loss, "val_loss": last_val, "world_size": dist_info.world_size}
            last_ckpt = ckpt.save_checkpoint(
                out, step, state_dict=model.state_dict(), config=_checkpoint_config(run.model, run, tokenizer_info),
                generation_config=generation_config, write_tokenizer=write_tokenizer, training_state=payload,
                keep_last=loop.keep_last)
            reporter("log", {"line": f"saved {last_ckpt}"})
        dist_info.barrier()
        return last_ckpt

    def evaluate() -> float:
        model.eval()
        total = torch.zeros((), device=device)
        per_rank = max(1, loop.batch_size // dist_info.world_size)
        with torch.no_grad(), autocast:
            for i in range(loop.eval_batches):
                x, y = dataset.get_batch("val", i, seq_len, per_rank * dist_info.world_size,
                                         dist_info.rank * per_rank, per_rank, loop.seed)
                total += model(x.to(device), targets=y.to(device)).ce_loss.float()
        model.train()
        return dist_info.mean(total / loop.eval_batches).item()

    reporter("start", {"total_steps": total_steps, "start_step": start_step, "device": str(device),
                       "dtype": dtype_name, "world_size": dist_info.world_size,
                       "parameters": model.num_parameters(), "run_dir": str(out)})
    model.train()
    step = start_step
    window_start, window_tokens, times = time.perf_counter(), 0, []
    log_path = out / TRAIN_LOG
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps, optim_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ce_sum = torch.zeros((), device=device)
            load = None
            for m in range(loop.grad_accum):
                first = (m * dist_info.world_size + dist_info.rank) * micro
                x, y = dataset.get_batch("train", step, seq_len, loop.batch_size, first, micro, loop.seed)
                sync = nullcontext()
                if dist_info.world_size > 1 and m < loop.grad_accum - 1:
                    sync = trained.no_sync()
                with sync:
                    with autocast:
                        result = trained(x.to(device), targets=y.to(device))
                    (result.loss / loop.grad_accum).backward()
                ce_sum += result.ce_loss.detach().float()
                if result.tokens_per_memory is not None:
                    layer_load = result.tokens_per_memory.sum(0).float()
                    load = layer_load if load is None else load + layer_load
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
            loss = dist_info.mean(ce_sum / loop.grad_accum)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                if loop.on_nan == "stop":
                    raise MomctlError(f"loss or gradient is NaN/inf at step {step + 1}; {where}; lower --lr, or pass "
                                      "--on-nan skip to skip such steps")
                optimizer.zero_grad(set_to_none=True)
                reporter("log", {"line": f"step {step + 1}: NaN/inf loss or gradient, step skipped"})
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            last_loss = loss.item()
            times.append(time.perf_counter() - t0)
            window_tokens += loop.batch_size * seq_len
            record: dict[str, Any] = {"step": done, "loss": last_loss, "lr": lr, "grad_norm": grad_norm.item()}
            if done % loop.eval_every == 0 or done == total_steps:
                last_val = evaluate()
                record["val_loss"] = last_val
                if bytes_per_token:
                    record["val_bpb"] = last_val / math.log(2) / bytes_per_token
            if done % loop.log_every == 0 or done == total_steps or "val_loss" in record:
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                record["peak_mem_gib"] = _peak_memory_gib(device)
                if load is not None:
                    record["memory_load"] = (load / load.sum()).tolist()
                record["eta_s"] = (total_steps - done) * sum(times[-20:]) / len(times[-20:])
                window_start, window_tokens = time.perf_counter(), 0
                reporter("log", {"line": format_record(record)})
            history.append(record)
            if dist_info.is_main:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
            reporter("step", {"step": done, "loss": last_loss})
            if stop["signal"] is not None:
                reporter("log", {"line": f"{stop['signal']} received: saving at step {done} and stopping"})
                save(done)
                return TrainResult(out, last_ckpt, done, last_loss, last_val, True, history)
            if done % loop.save_every == 0 and done != total_steps:
                save(done)
        step = total_steps
        if start_step < total_steps or last_ckpt is None:
            save(total_steps)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _check_ranks_agree(model, dist_info)
    if dist_info.world_size > 1:
        dist.destroy_process_group()
    reporter("end", {"checkpoint": str(last_ckpt), "step": step})
    return TrainResult(out, last_ckpt, step, last_loss, last_val, False, history)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past `step` (written after the checkpoint a resumed run starts from)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _bytes_per_token(dataset, tokenizer) -> float | None:
    """UTF-8 bytes per token on a sample of the validation split (for bits per byte); None for MQAR."""
    val = getattr(dataset, "val", None)
    if val is None or len(val) == 0:
        return None
    sample = [int(t) for t in val[:20_000]]
    return len(tokenizer.decode(sample).encode("utf-8")) / len(sample)


def format_record(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}" + (f" ({r['val_bpb']:.3f} bpb)" if "val_bpb" in r else ""))
    parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.2f}", f"{r['tokens_per_s']:,.0f} tok/s",
              f"mem {r['peak_mem_gib']:.2f} GiB"]
    if "memory_load" in r:
        parts.append("load " + "/".join(f"{x:.2f}" for x in r["memory_load"]))
    parts.append(f"eta {_duration(r['eta_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _check_ranks_agree(model: torch.nn.Module, dist_info: Distributed) -> None:
    """DDP keeps replicas identical; a cheap parameter checksum across ranks proves it at the end of training."""
    if dist_info.world_size == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise MomctlError("DDP replicas diverged (parameter checksums differ across ranks)")
