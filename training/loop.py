"""The loop of the one training run (training/train.py), for `segue train` and `segue finetune` alike.

    result = run_loop(model, train_sampler, val_sampler, LoopConfig(out=..., max_steps=...), metadata)

`run_loop` reads as the loop itself: `train_step` (one optimizer step), `fit_to_budget` (the
schedule fitted to --max-minutes), `evaluate_and_save` (validation, best and last checkpoints).
The rules that end a run are plain functions of the loop state: `fitted_max_steps` (the time
budget), `record_evaluation` and `finish_reason` (the end of the schedule, early stopping).

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
from tqdm import tqdm

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


@dataclass
class Session:
    """What one invocation of the loop works with; built once by `start_session`, read by each step."""

    model: GPT
    net: torch.nn.Module  # the DDP wrapper when distributed (gradients synchronised), else the model
    optimizer: torch.optim.Optimizer
    train: WindowSampler
    val: WindowSampler
    cfg: LoopConfig
    metadata: dict  # what every checkpoint records besides the loop's numbers (tokenizer, data, base...)
    dist: Distributed
    logger: _Logger
    autocast: torch.dtype | None  # the training step's dtype (None: fp32)
    elapsed_before: float  # seconds spent by earlier invocations of this run
    session_step: int  # the step this invocation started from
    started: float = field(default_factory=time.time)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def seconds(self) -> float:
        """Wall-clock time of this invocation."""
        return time.time() - self.started

    def elapsed(self) -> float:
        """Wall-clock time of the whole run, across invocations."""
        return self.elapsed_before + self.seconds()


def start_session(model: GPT, train: WindowSampler, val: WindowSampler, cfg: LoopConfig, metadata: dict,
                  dist: Distributed) -> tuple[Session, LoopState]:
    """The optimizer, the restored state of a resumed run (weights, optimizer, RNG), DDP and the logs."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    state = LoopState(max_steps=cfg.max_steps)
    if cfg.resume:
        saved, rng_states, _ = load_training_checkpoint(Path(cfg.out) / LAST_FILE, model, optimizer)
        state = LoopState(**saved)
        if len(rng_states) == dist.world:
            train.set_state(restore_rank_rng(rng_states[dist.rank], device))
        else:
            dist.say(f"warning: the run was saved by {len(rng_states)} processes and resumes with {dist.world}: "
                     "the data order restarts from the seed")
    autocast = training_dtype(cfg.precision, device)
    if not cfg.quiet:
        dist.say(f"training steps in {'bf16 autocast' if autocast else 'fp32'} on {device.type} (--precision {cfg.precision})")
    net: torch.nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    logger = _Logger(Path(cfg.out), dist.is_main, state.step if cfg.resume else None)
    session = Session(model, net, optimizer, train, val, cfg, metadata, dist, logger, autocast,
                      elapsed_before=state.elapsed_s, session_step=state.step)
    return session, state


def train_step(s: Session, step: int, max_steps: int, warmup: int) -> tuple[float, float]:
    """One optimizer step from `step` (steps done so far): (this rank's training loss, the learning rate)."""
    cfg, device = s.cfg, s.device
    lr = lr_at(step, max_steps, warmup, cfg.lr, cfg.floor_ratio)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    x, y = s.train.batch(cfg.batch_size)
    with torch.autocast(device.type, dtype=s.autocast or torch.float32, enabled=s.autocast is not None):
        loss = window_loss(s.net, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
    s.optimizer.step()
    return loss.item(), lr


def log_train_loss(s: Session, step: int, loss: float, lr: float) -> None:
    """The training loss averaged over ranks (a collective: every rank calls it at the same steps)."""
    loss = s.dist.all_mean(loss)
    s.logger.log({"kind": "train", "step": step, "loss": loss, "lr": lr},
                 {"train/loss": loss, "train/perplexity": _perplexity(loss), "train/lr": lr})


# --- the budget: max minutes, the step schedule, early stopping -------------------------------------

REFIT_AFTER_STEPS = 20  # steps timed in this invocation before the schedule is first fitted to the clock
REFIT_EVERY = 10
BUDGET_MARGIN = 0.97  # aim a little short of the budget: the last evaluation and checkpoint take time too


def fitted_max_steps(step: int, configured: int, budget_s: float, elapsed_s: float, per_step_s: float) -> int:
    """The schedule length that ends the run at the time budget: the steps that fit in the time left
    at the current pace, never beyond the configured schedule and always at least one more step."""
    return min(configured, max(step + 1, int(step + (budget_s * BUDGET_MARGIN - elapsed_s) / per_step_s)))


def fit_to_budget(s: Session, state: LoopState) -> bool:
    """With --max-minutes, re-fit the cosine schedule to the time left, again and again: the step time
    changes when something else (a DAW, a test run) shares the machine. Rank 0 decides for all (a
    collective: every rank calls it at the same steps). True when it re-fitted."""
    steps_timed = state.step - s.session_step
    if not s.cfg.max_minutes or steps_timed < REFIT_AFTER_STEPS or state.step % REFIT_EVERY:
        return False
    per_step = s.seconds() / steps_timed
    fitted = fitted_max_steps(state.step, s.cfg.max_steps, s.cfg.max_minutes * 60, s.elapsed(), per_step)
    state.max_steps = s.dist.broadcast_int(fitted)
    return True


def record_evaluation(state: LoopState, val_loss: float, min_delta: float) -> bool:
    """Note a validation loss at the current step; True when it is the best so far (by more than min_delta)."""
    state.last_val_loss, state.last_val_step = val_loss, state.step
    improved = state.best_val_loss is None or val_loss < state.best_val_loss - min_delta
    if improved:
        state.best_val_loss, state.best_step, state.bad_evals = val_loss, state.step, 0
    else:
        state.bad_evals += 1
    return improved


def finish_reason(state: LoopState, cfg: LoopConfig) -> str | None:
    """Why the run is over after an evaluation: patience used up, or the end of the schedule (which
    is the time budget when the schedule was fitted short of the configured one); None to go on."""
    if cfg.patience and state.bad_evals >= cfg.patience:
        return "early_stop"
    if state.step >= state.max_steps:
        return "time_budget" if state.max_steps < cfg.max_steps else "max_steps"
    return None


# --- evaluation and checkpoints ----------------------------------------------------------------------

def checkpoint_meta(metadata: dict, state: LoopState) -> dict:
    """The run's metadata plus the loop's numbers, for best.safetensors and last.safetensors."""
    # Validation metrics describe these weights only when they were measured at this step.
    measured = state.last_val_loss if state.last_val_step == state.step else None
    return {**metadata, "step": state.step, "val_loss": measured, "val_perplexity": _perplexity(measured),
            "best_val_loss": state.best_val_loss, "base_val_loss": state.base_val_loss,
            "base_val_perplexity": _perplexity(state.base_val_loss), "elapsed_s": round(state.elapsed_s, 1)}


def save_last(s: Session, state: LoopState) -> None:
    """last.safetensors: weights, optimizer, loop state and every rank's RNG (a collective: all ranks call)."""
    state.elapsed_s = s.elapsed()
    rngs = [json.loads(b) for b in s.dist.gather_bytes(rank_rng_state(s.train.state(), s.device))]
    if s.dist.is_main:
        meta = {k: v for k, v in checkpoint_meta(s.metadata, state).items() if v is not None}
        save_training_checkpoint(Path(s.cfg.out) / LAST_FILE, s.model, s.optimizer, asdict(state), rngs, meta)
    s.dist.barrier()


def evaluate_start(s: Session, state: LoopState) -> None:
    """The starting model's validation loss, before the first step (the base model's, for a fine-tune)."""
    loss = validation_loss(s.model, s.val, s.cfg.batch_size, s.cfg.val_windows, s.dist)
    state.base_val_loss = loss
    state.last_val_loss, state.last_val_step = loss, state.step
    s.logger.log({"kind": "eval", "step": 0, "val_loss": loss, "val_perplexity": _perplexity(loss), "elapsed_s": 0.0},
                 {"val/loss": loss, "val/perplexity": _perplexity(loss)})


def evaluate_and_save(s: Session, state: LoopState) -> str | None:
    """Validate at this step, keep the best checkpoint, write the resumable one; the finish reason, if any."""
    val_loss = validation_loss(s.model, s.val, s.cfg.batch_size, s.cfg.val_windows, s.dist)
    improved = record_evaluation(state, val_loss, s.cfg.min_delta)
    ppl = _perplexity(val_loss)
    s.logger.log({"kind": "eval", "step": state.step, "val_loss": val_loss, "val_perplexity": ppl, "best": improved,
                  "elapsed_s": round(s.elapsed(), 1)}, {"val/loss": val_loss, "val/perplexity": ppl})
    if not s.cfg.quiet and s.dist.is_main:
        best = " (best)" if improved else f" (best {_perplexity(state.best_val_loss):.2f} at step {state.best_step})"
        tqdm.write(f"step {state.step}: validation perplexity {ppl:.2f}{best}", file=sys.stderr)
    state.finished = finish_reason(state, s.cfg)  # recorded in last.safetensors: a resumed finished run stays finished
    if improved and s.dist.is_main:
        save_checkpoint_best(Path(s.cfg.out) / BEST_FILE, s.model, checkpoint_meta(s.metadata, state))
    save_last(s, state)
    return state.finished


# --- the loop ------------------------------------------------------------------------------------------

def run_loop(model: GPT, train: WindowSampler, val: WindowSampler, cfg: LoopConfig, metadata: dict,
             dist: Distributed | None = None) -> LoopResult:
    """Train `model` (already on its device) until max_steps, early stop, time budget, pause or Ctrl-C."""
    dist = dist or Distributed()
    s, state = start_session(model, train, val, cfg, metadata, dist)
    if state.step == 0 and state.base_val_loss is None:
        evaluate_start(s, state)
    bar = tqdm(total=state.max_steps, initial=state.step, desc=cfg.desc, unit="step", dynamic_ncols=True,
               disable=cfg.quiet or not dist.is_main)
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
            loss, lr = train_step(s, state.step, state.max_steps, warmup)
            state.step += 1
            smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.3f}", ppl=f"{_perplexity(smoothed):.1f}", lr=f"{lr:.1e}")
            if state.step % cfg.log_every == 0:
                log_train_loss(s, state.step, loss, lr)
            if fit_to_budget(s, state):
                bar.total = state.max_steps
            if state.step % cfg.eval_every == 0 or state.step == state.max_steps:
                stopped = evaluate_and_save(s, state) or ""
                saved_at = state.step
            if not stopped and cfg.stop_after is not None and state.step >= cfg.stop_after:
                stopped = "paused"
            if not stopped and dist.any(stop.requested):
                stopped = "interrupted"
        if saved_at != state.step:
            save_last(s, state)
    bar.close()
    s.logger.close()
    return LoopResult(state=state, stopped=stopped, best=Path(cfg.out) / BEST_FILE, last=Path(cfg.out) / LAST_FILE,
                      seconds=s.seconds(), log=s.logger.records)


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
