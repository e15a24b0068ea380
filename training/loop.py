"""The training loop shared by `segue train` and `segue finetune`.

    result = run_loop(model, train_sampler, val_sampler, LoopConfig(out=..., max_steps=...), metadata)

AdamW (no weight decay on biases and norms), linear warm-up then cosine decay, gradient clipping,
a validation loss every `eval_every` steps (and once before the first step: the starting model's
loss, which is the base model's for a fine-tune), early stopping after `patience` evaluations
without improvement, `best.safetensors` on every improvement and a resumable `last.safetensors`
at every evaluation, pause and interruption. A progress bar shows loss, perplexity and the ETA;
TensorBoard logs go to OUT/tensorboard; `train_log.jsonl` holds the same numbers.

Interruption: Ctrl-C (or SIGTERM, as schedulers send) finishes the current step, writes
`last.safetensors` and returns; `--resume` then continues the same loss curve. A hard kill loses
only the steps since the last evaluation, which the resumed run replays identically.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from training.checkpoint import save_checkpoint
from training.data import WindowSampler
from training.distributed import Distributed
from training.model import GPT
from training.run_folder import BEST_FILE, LAST_FILE, LOG_FILE, TENSORBOARD_DIR, truncate_log
from training.train_state import load_training_checkpoint, rank_rng_state, restore_rank_rng, save_training_checkpoint


def lr_at(step: int, max_steps: int, warmup: int, peak: float, floor_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor_ratio * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class LoopConfig:
    out: Path
    max_steps: int
    batch_size: int = 16
    lr: float = 6e-4
    floor_ratio: float = 0.1  # the cosine ends at this fraction of the peak rate
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    val_windows: int = 64
    patience: int = 0  # evaluations without improvement before stopping (0: never stop early)
    min_delta: float = 0.0  # an improvement must lower the validation loss by more than this
    max_minutes: float | None = None
    log_every: int = 10
    stop_after: int | None = None  # pause (resumably) once this step is reached
    resume: bool = False
    quiet: bool = False
    desc: str = "training"
    precision: str = "auto"  # "fp32", "bf16" (autocast for the training step) or "auto" (see training_dtype)


@dataclass
class LoopState:
    """Everything about the loop's progress that a resumed run needs (saved as JSON)."""

    step: int = 0
    max_steps: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement
    base_val_loss: float | None = None  # before the first step
    last_val_loss: float | None = None
    last_val_step: int | None = None
    elapsed_s: float = 0.0
    finished: str | None = None  # "max_steps", "early_stop" or "time_budget" once the run is over


@dataclass
class LoopResult:
    state: LoopState
    stopped: str  # why this invocation returned: finished reasons, or "paused" / "interrupted"
    best: Path
    last: Path
    seconds: float = 0.0  # wall-clock time of this invocation
    log: list[dict] = field(default_factory=list)


PRECISIONS = ("auto", "fp32", "bf16")


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training steps, or None for plain fp32.

    bf16 autocast halves the step time where the hardware multiplies bf16 natively (CPUs with
    AVX512-BF16 or AMX, Ampere-or-newer GPUs) and keeps fp32 master weights, optimizer state and
    gradients, so nothing about checkpoints or export changes. "auto" takes it only there: emulated
    bf16 is slower than fp32. Validation always runs in fp32, so its numbers compare across runs.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else None


def make_optimizer(model: GPT, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only: decaying biases and norm gains only hurts."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def window_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GPT.loss through `net` (the DDP wrapper when distributed, so gradients are synchronised)."""
    batch, steps = x.shape
    positions = torch.arange(steps, device=x.device).unsqueeze(0).expand(batch, steps)
    logits, _ = net(x, positions)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def validation_loss(model: GPT, sampler: WindowSampler, batch_size: int, max_windows: int,
                    dist: Distributed | None = None) -> float:
    """Mean next-token loss over the first `max_windows` validation windows (shared among ranks)."""
    dist = dist or Distributed()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for x, y in sampler.sequential_batches(batch_size, max_windows, dist.rank, dist.world):
        loss = model.loss(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    total, count = dist.all_sum([total, count])
    model.train(was_training)
    if count == 0:
        raise ValueError("the validation set has no complete window")
    return total / count


class _StopRequest:
    """Ctrl-C / SIGTERM set a flag that the loop checks between steps; a second Ctrl-C aborts."""

    def __init__(self, quiet: bool):
        self.requested = False
        self.quiet = quiet
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            print("\nstopping after this step and saving a resumable checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class _Logger:
    """train_log.jsonl + TensorBoard, on the main rank only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.writer = None
        self.records: list[dict] = []
        if not enabled:
            return
        log_path = out / LOG_FILE
        if resume_step is not None:
            truncate_log(log_path, resume_step)
        else:
            log_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        self.file = open(log_path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a previous, interrupted run logged past its checkpoint.
            self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=None if resume_step is None else resume_step + 1)
        except ImportError:
            print("warning: tensorboard is not installed; logging to train_log.jsonl only", file=sys.stderr)

    def log(self, record: dict, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def run_loop(model: GPT, train: WindowSampler, val: WindowSampler, cfg: LoopConfig, metadata: dict,
             dist: Distributed | None = None) -> LoopResult:
    """Train `model` (already on its device) until max_steps, early stop, time budget, pause or Ctrl-C."""
    dist = dist or Distributed()
    out = Path(cfg.out)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    state = LoopState(max_steps=cfg.max_steps)
    if cfg.resume:
        saved, rng_states, _ = load_training_checkpoint(out / LAST_FILE, model, optimizer)
        state = LoopState(**saved)
        if len(rng_states) == dist.world:
            train.set_state(restore_rank_rng(rng_states[dist.rank], device))
        elif dist.is_main:
            print(f"warning: the run was saved by {len(rng_states)} processes and resumes with {dist.world}: "
                  "the data order restarts from the seed", file=sys.stderr)
    autocast_dtype = training_dtype(cfg.precision, device)
    if not cfg.quiet and dist.is_main:
        print(f"training steps in {'bf16 autocast' if autocast_dtype else 'fp32'} on {device.type} "
              f"(--precision {cfg.precision})", file=sys.stderr)
    net: torch.nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    logger = _Logger(out, dist.is_main, state.step if cfg.resume else None)
    started = time.time()
    session_step = state.step
    elapsed_before = state.elapsed_s

    def elapsed() -> float:
        return elapsed_before + time.time() - started

    def checkpoint_meta() -> dict:
        # Validation metrics describe these weights only when they were measured at this step.
        measured = state.last_val_loss if state.last_val_step == state.step else None
        return {**metadata, "step": state.step, "val_loss": measured,
                "val_perplexity": _perplexity(measured), "best_val_loss": state.best_val_loss,
                "base_val_loss": state.base_val_loss, "base_val_perplexity": _perplexity(state.base_val_loss),
                "elapsed_s": round(state.elapsed_s, 1)}

    def save_last() -> None:
        state.elapsed_s = elapsed()
        # Every rank's RNG is gathered so each can resume its own stream (collective: all ranks call).
        rngs = [json.loads(b) for b in dist.gather_bytes(rank_rng_state(train.state(), device))]
        if dist.is_main:
            meta = {k: v for k, v in checkpoint_meta().items() if v is not None}
            save_training_checkpoint(out / LAST_FILE, model, optimizer, asdict(state), rngs, meta)
        dist.barrier()

    def evaluate() -> float:
        loss = validation_loss(model, val, cfg.batch_size, cfg.val_windows, dist)
        state.last_val_loss, state.last_val_step = loss, state.step
        return loss

    if state.step == 0 and state.base_val_loss is None:
        state.base_val_loss = evaluate()
        logger.log({"kind": "eval", "step": 0, "val_loss": state.base_val_loss,
                    "val_perplexity": _perplexity(state.base_val_loss), "elapsed_s": 0.0},
                   {"val/loss": state.base_val_loss, "val/perplexity": _perplexity(state.base_val_loss)})

    from tqdm import tqdm

    bar = tqdm(total=state.max_steps, initial=state.step, desc=cfg.desc, unit="step", dynamic_ncols=True,
               disable=cfg.quiet or not dist.is_main)
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    # A warm-up longer than the run would never reach the peak rate (a short fine-tune with the
    # default warm-up): cap it at a fifth of the configured schedule.
    warmup = max(1, min(cfg.warmup, cfg.max_steps // 5))
    smoothed = None  # the bar shows a moving average: single-batch losses jump around
    stopped = state.finished or ""
    saved_at = state.step if cfg.resume else -1
    with _StopRequest(cfg.quiet or not dist.is_main) as stop:
        while not stopped:
            if state.step >= state.max_steps:
                stopped = state.finished = "max_steps"
                break
            lr = lr_at(state.step, state.max_steps, warmup, cfg.lr, cfg.floor_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = train.batch(cfg.batch_size)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = window_loss(net, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            state.step += 1
            step = state.step
            value = loss.item()
            bar.update(1)
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            bar.set_postfix(loss=f"{smoothed:.3f}", ppl=f"{_perplexity(smoothed):.1f}", lr=f"{lr:.1e}")
            if step % cfg.log_every == 0:
                value = dist.all_mean(value)
                logger.log({"kind": "train", "step": step, "loss": value, "lr": lr},
                           {"train/loss": value, "train/perplexity": _perplexity(value), "train/lr": lr})
            if budget and step - session_step >= 20 and step % 10 == 0:
                # Fit the cosine schedule to the time budget, again and again: the step time changes
                # when something else (a DAW, a test run) shares the machine. Rank 0 decides for all.
                per_step = (time.time() - started) / (step - session_step)
                fitted = min(cfg.max_steps, max(step + 1, int(step + (budget * 0.97 - elapsed()) / per_step)))
                state.max_steps = dist.broadcast_int(fitted)
                bar.total = state.max_steps
            if step % cfg.eval_every == 0 or step == state.max_steps:
                val_loss = evaluate()
                improved = state.best_val_loss is None or val_loss < state.best_val_loss - cfg.min_delta
                if improved:
                    state.best_val_loss, state.best_step, state.bad_evals = val_loss, step, 0
                else:
                    state.bad_evals += 1
                record = {"kind": "eval", "step": step, "val_loss": val_loss, "val_perplexity": _perplexity(val_loss),
                          "best": improved, "elapsed_s": round(elapsed(), 1)}
                logger.log(record, {"val/loss": val_loss, "val/perplexity": _perplexity(val_loss)})
                if not cfg.quiet and dist.is_main:
                    tqdm.write(f"step {step}: validation perplexity {_perplexity(val_loss):.2f}"
                               f"{' (best)' if improved else f' (best {_perplexity(state.best_val_loss):.2f} at step {state.best_step})'}",
                               file=sys.stderr)
                if cfg.patience and state.bad_evals >= cfg.patience:
                    stopped = state.finished = "early_stop"
                elif step >= state.max_steps:
                    stopped = state.finished = "time_budget" if state.max_steps < cfg.max_steps else "max_steps"
                if improved and dist.is_main:
                    save_checkpoint_best(out / BEST_FILE, model, checkpoint_meta())
                save_last()
                saved_at = step
            if not stopped and cfg.stop_after is not None and step >= cfg.stop_after:
                stopped = "paused"
            if not stopped and dist.any(stop.requested):
                stopped = "interrupted"
        if saved_at != state.step:
            save_last()
    bar.close()
    logger.close()
    return LoopResult(state=state, stopped=stopped, best=out / BEST_FILE, last=out / LAST_FILE,
                      seconds=time.time() - started, log=logger.records)


def save_checkpoint_best(path: Path, model: GPT, meta: dict) -> None:
    """The best weights alone (no optimizer state): small, and what export-onnx reads."""
    save_checkpoint(path, model, {k: v for k, v in meta.items() if v is not None})


def describe_stop(result: LoopResult, patience: int) -> str:
    reasons = {
        "max_steps": "reached the last step",
        "early_stop": f"stopped early: validation did not improve in {patience} evaluations",
        "time_budget": "stopped at the time budget",
        "paused": "paused",
        "interrupted": "interrupted",
    }
    return reasons.get(result.stopped, result.stopped)


def summary_lines(result: LoopResult, patience: int) -> list[str]:
    """The end-of-run summary: steps, best vs starting perplexity, time, where the checkpoints are."""
    s = result.state
    lines = [f"{describe_stop(result, patience)} after {s.step} steps in {_duration(s.elapsed_s)}"
             + (f" (this session {_duration(result.seconds)})" if abs(result.seconds - s.elapsed_s) > 1 else "")]
    if s.best_val_loss is not None:
        lines.append(f"best validation perplexity {_perplexity(s.best_val_loss):.2f} at step {s.best_step}"
                     + (f" (starting model: {_perplexity(s.base_val_loss):.2f} on the same validation set)"
                        if s.base_val_loss is not None else ""))
        if s.base_val_loss is not None and s.best_val_loss >= s.base_val_loss:
            lines.append("note: no checkpoint beat the starting model on the validation set "
                         "(more data, a lower --lr or fewer steps may help)")
    best = f"{result.best} (best), " if result.best.is_file() else ""
    lines.append(f"checkpoints: {best}{result.last} (last, resumable)")
    return lines
