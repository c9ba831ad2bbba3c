"""The one training loop every training command uses.

    trainer = Trainer(model, loss_fn, data, TrainerConfig(max_steps=1000, lr=1e-4), out_dir)
    result = trainer.fit()

Contracts
- `loss_fn(model, batch, generator) -> (loss, metrics)`: `model` is the plain module (any of its
  methods may be called), `loss` a scalar tensor (the mean over the micro-batch), `metrics` a dict of
  scalars (floats or 0-d tensors) that is logged averaged. `generator` is a `torch.Generator` on the
  training device for every random draw of the loss (noise, timesteps).
- `data(positions: range) -> batch`: the samples at `positions` of an endless, seeded sample stream,
  collated (tensors, or dicts/lists/tuples of tensors; they are moved to the device). Global batch
  `s` is positions `[s*B, (s+1)*B)`; each micro-batch is a contiguous slice of it. `IndexedBatches`
  makes such a source from a `sample(index)` function.

Exact resume, by construction rather than by saving RNG streams: a step depends only on the weights,
the optimizer state, the step number and the seed. Before each micro-batch the trainer reseeds
python/numpy/torch and builds `generator` from (seed, first position of the micro-batch); the data are
a pure function of the positions; the learning rate is a pure function of the step. So the checkpoint
(weights, optimizer state, EMA, step) is all the state there is, and a run stopped at step k and
resumed ends bit-identical to an uninterrupted one. Because the seeds follow sample positions,
splitting a global batch over 2 ranks or over 2 accumulation steps draws the same random numbers.

Distributed: under `torchrun` the trainer wraps the model in DDP (or FSDP2 with `fsdp: true`); rank r
takes its slice of each global batch; only rank 0 writes checkpoints, metrics and the progress bar.
Call `distributed.teardown()` when the command is done with the process group.

Files in `out_dir`: `checkpoints/step-XXXXXXXX.pt` (the latest, plus every `keep_every`-th when set;
written to a temporary name then renamed) and `metrics.jsonl` (one JSON object per logged step: step,
loss, lr, it_s, elapsed_s, grad_norm when clipping, and the loss_fn metrics).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import default_collate

from neodragon_cli.recipes import setting
from neodragon_cli.atomic import atomic_path, write_text
from neodragon_cli.errors import ArtifactError, CheckpointError, NeodragonError, UsageError
from neodragon_cli.pipelines.models.checkpoint import check_state_dict
from neodragon_cli.pipelines.train import distributed

CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})\.pt$")

LossFn = Callable[[nn.Module, Any, torch.Generator], "tuple[torch.Tensor, dict[str, Any]]"]
StepHook = Callable[["Trainer", int], None]


@dataclass
class TrainerConfig:
    """Optimisation settings shared by every training recipe (the `train:` section)."""

    seed: int = setting(0, "seed of the sample stream, the noise and dropout")
    max_steps: int = setting(1000, "optimizer updates in the whole run")
    batch_size: int = setting(8, "global batch: samples per optimizer update, over all ranks and accumulation steps")
    grad_accum: int = setting(1, "micro-batches accumulated per update on each rank")
    lr: float = setting(1e-4, "peak learning rate")
    optimizer: Literal["adamw", "adam"] = setting("adamw", "adamw (decoupled weight decay) or adam (L2 penalty)")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam moment decay rates")
    eps: float = setting(1e-8, "Adam denominator epsilon")
    weight_decay: float = setting(0.0, "on parameters with 2+ dims only (not biases, norms)")
    schedule: Literal["constant", "cosine", "linear"] = setting("constant", "learning-rate shape after warmup")
    warmup_steps: int = setting(0, "linear warmup: update s < warmup_steps uses lr*(s+1)/warmup_steps")
    min_lr: float = setting(0.0, "floor that cosine and linear decay towards")
    grad_clip: float | None = setting(1.0, "max global gradient norm; null disables clipping")
    precision: Literal["fp32", "bf16"] = setting("fp32", "bf16: forward and loss under bf16 autocast, fp32 weights")
    checkpoint_every: int = setting(500, "checkpoint every N updates (0: only at the end or when stopped)")
    keep_every: int = setting(0, "also keep the checkpoints whose step is a multiple of N, to compare them later (0: only the latest)")
    log_every: int = setting(10, "append a metrics.jsonl line every N updates")
    ema: float | None = setting(None, "EMA decay of the trainable weights (e.g. 0.999); null: none")
    fsdp: bool = setting(False, "shard weights, grads and optimizer state with FSDP2 (torchrun)")

    def validate(self) -> list[str]:
        """Cross-field problems (the recipe loader reports them with the file and line)."""
        problems = []
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "keep_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            problems.append(f"min_lr must lie in [0, lr], got {self.min_lr}")
        if self.warmup_steps >= self.max_steps > 0:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must not be negative, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append(f"grad_clip must be positive or null, got {self.grad_clip}")
        if self.ema is not None and not 0 < self.ema < 1:
            problems.append(f"ema must be a decay in (0, 1) or null, got {self.ema}")
        if self.batch_size >= 1 and self.grad_accum >= 1 and self.batch_size % self.grad_accum:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        return problems


def lr_at(step: int, config: TrainerConfig) -> float:
    """Learning rate of update `step` (0-based): linear warmup to `lr`, then the schedule's shape
    from `lr` towards `min_lr` over the remaining updates (never reaching it: the last update learns)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    return config.min_lr + (config.lr - config.min_lr) * shape


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integers (stable across runs, processes and platforms)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class IndexedBatches:
    """A resumable batch source from `sample(index) -> sample`.

    With `length=None` position p of the stream is sample p (an endless procedural world derives the
    sample from its index). With a finite `length` the stream walks epochs, each a fresh permutation
    of `range(length)` seeded by (seed, epoch)."""

    def __init__(self, sample: Callable[[int], Any], *, length: int | None = None, seed: int = 0,
                 collate: Callable[[list], Any] = default_collate):
        if length is not None and length < 1:
            raise UsageError(f"a dataset of {length} samples cannot be trained on", hint="check the data folder")
        self.sample, self.length, self.seed, self.collate = sample, length, seed, collate
        self._epoch, self._order = -1, None  # the permutation of the epoch last read

    def index(self, position: int) -> int:
        """The sample index at stream position `position`."""
        if self.length is None:
            return position
        epoch, offset = divmod(position, self.length)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(self.length, generator=generator).tolist()
        return self._order[offset]

    def __call__(self, positions: range) -> Any:
        return self.collate([self.sample(self.index(p)) for p in positions])


@dataclass
class TrainResult:
    """How `fit` ended: the last completed update, whether a stop request ended it early, and the
    last logged metrics line."""

    step: int
    stopped: bool
    metrics: dict[str, float]


class _LossModule(nn.Module):
    """One loss evaluation as the forward of a module: DDP and FSDP hook into forward, so wrapping
    this (not the model) keeps them correct whichever of the model's methods `loss_fn` calls."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        # Not registered as a submodule: a loss network (a perceptual net) keeps its own mode and
        # is neither synchronised nor sharded.
        self.__dict__["loss_fn"] = loss_fn

    def forward(self, batch, generator):
        return self.loss_fn(self.model, batch, generator)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (gathers an FSDP shard; collective under FSDP)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint file in `out_dir/checkpoints`, or None."""
    folder = Path(out_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _CHECKPOINT_NAME.match(p.name))]
    return max(found)[1] if found else None


class Trainer:
    """Seeded, resumable, distributed training of `model` on `loss_fn` over `data`.

    `model` may be on any device; the trainer moves it to its device (see `distributed.setup`) and
    optimizes its parameters that require grad. `fit` puts it in train mode: keep frozen networks
    that must stay in eval mode (a teacher) outside it, in `loss_fn`'s closure.
    `resume=True` continues from the latest checkpoint in `out_dir` (or starts fresh when there is
    none); without it an `out_dir` that holds checkpoints is refused. `progress=False` hides the
    progress bar (it also hides itself off a terminal and off rank 0)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Callable[[range], Any], config: TrainerConfig,
                 out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 device: str | torch.device | None = None):
        problems = config.validate()
        if problems:
            raise UsageError(f"invalid trainer settings: {'; '.join(problems)}",
                             hint="fix the train: section of the recipe")
        self.config = config
        self.out_dir = Path(out_dir)
        self.env = distributed.setup(device)
        self.device = self.env.device
        per_update = self.env.world_size * config.grad_accum
        if config.batch_size % per_update:
            raise UsageError(
                f"batch_size {config.batch_size} does not split over {self.env.world_size} rank(s)"
                f" x {config.grad_accum} accumulation step(s)",
                hint=f"use a multiple of {per_update}",
            )
        self.micro_batch = config.batch_size // per_update
        if config.fsdp and not self.env.distributed:
            raise UsageError("fsdp needs several processes",
                             hint="launch with torchrun --nproc_per_node N, or set fsdp: false")
        self.model = model.to(self.device)
        self.data = data
        self.show_progress = progress
        self.step = 0
        self._stop_requested = False
        self._last_metrics: dict[str, float] = {}

        self._wrapped = self._wrap(_LossModule(self.model, loss_fn))
        self._trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self._trainable:
            raise UsageError("the model has no trainable parameters", hint="check which parts the recipe freezes")
        self.optimizer = self._build_optimizer()
        self._ema = [p.detach().clone() for _, p in self._trainable] if config.ema is not None else None
        # Full state dicts; under FSDP gathered to rank 0's CPU only.
        self._state_options = StateDictOptions(full_state_dict=True, cpu_offload=config.fsdp)

        checkpoint = latest_checkpoint(self.out_dir)
        if checkpoint is not None and not resume:
            raise ArtifactError(
                f"{self.out_dir} already holds training checkpoints ({checkpoint.name})",
                hint="resume to continue that run, or choose another output folder",
            )
        if checkpoint is not None:
            self._load(checkpoint)
        if self.env.is_main:
            self._truncate_metrics()

    # ------------------------------------------------------------------ setup

    def _wrap(self, loss_module: _LossModule) -> nn.Module:
        if self.config.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.env.world_size,))
            # One FSDP unit per block of every ModuleList (transformer blocks), plus the root.
            for container in [m for m in self.model.modules() if isinstance(m, nn.ModuleList)]:
                for block in container:
                    if not isinstance(block, (nn.ModuleList, nn.ModuleDict)):
                        fully_shard(block, mesh=mesh)
            fully_shard(loss_module, mesh=mesh)
            return loss_module
        if self.env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(loss_module, device_ids=device_ids)
        return loss_module

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        decay = [p for _, p in self._trainable if p.ndim >= 2]
        no_decay = [p for _, p in self._trainable if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        optimizer_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return optimizer_cls(groups, lr=lr_at(0, cfg), betas=tuple(cfg.betas), eps=cfg.eps)

    # ------------------------------------------------------------------ state

    def model_state_dict(self, *, ema: bool = False) -> dict[str, torch.Tensor]:
        """The full model state dict (with the EMA weights in place of the trainable ones when
        `ema`). Collective under torchrun: call it on every rank; under FSDP only rank 0 gets it."""
        state = get_model_state_dict(self.model, options=self._state_options)
        if ema:
            if self._ema is None:
                raise UsageError("this run keeps no EMA weights", hint="set train.ema to a decay such as 0.999")
            averaged = self._ema_state()
            if state:
                state.update(averaged)
        return state

    def _ema_state(self) -> dict[str, torch.Tensor]:
        return {name: _full(t) for (name, _), t in zip(self._trainable, self._ema)}

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-XXXXXXXX.pt` for the current step (collective; rank 0 writes),
        then delete older checkpoints but those `keep_every` keeps."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": asdict(self.config),
            "world_size": self.env.world_size,
            "model": self.model_state_dict(),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=self._state_options),
            "ema": self._ema_state() if self._ema is not None else None,
        }
        path = self.out_dir / "checkpoints" / f"step-{self.step:08d}.pt"
        if self.env.is_main:
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            every = self.config.keep_every
            for old in path.parent.glob("step-*.pt"):
                match = _CHECKPOINT_NAME.match(old.name)
                if old != path and match and not (every and int(match.group(1)) % every == 0):
                    old.unlink()
        distributed.barrier()
        return path

    def _load(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a damaged file
            raise CheckpointError(f"cannot read training checkpoint {path}: {exc}",
                                  hint="delete it to restart from the previous one") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a training checkpoint of this trainer")
        saved = state["config"]
        for key in ("seed", "batch_size"):
            if saved[key] != getattr(self.config, key):
                raise UsageError(
                    f"cannot resume {path.name}: it was trained with {key}={saved[key]},"
                    f" now {key}={getattr(self.config, key)}",
                    hint=f"resume with {key}={saved[key]} (the sample stream depends on it), or start a new run",
                )
        check_state_dict(self.model, state["model"], source=str(path))
        every_rank_has_it = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=every_rank_has_it)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=every_rank_has_it)
        if self._ema is not None:
            if state["ema"] is None:
                raise UsageError(f"cannot resume {path.name} with ema: it kept no EMA weights",
                                 hint="set train.ema: null or start a new run")
            with torch.no_grad():
                for (name, _), average in zip(self._trainable, self._ema):
                    full = state["ema"][name].to(self.device)
                    if isinstance(average, DTensor):
                        full = distribute_tensor(full, average.device_mesh, average.placements)
                    average.copy_(full)
        self.step = state["step"]

    def _truncate_metrics(self) -> None:
        """Drop metrics lines past the step we (re)start from: they belong to work that is redone."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= self.step]
        write_text(path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ loop

    def request_stop(self) -> None:
        """Finish the current update, checkpoint, and return from `fit` (what SIGINT/SIGTERM do)."""
        self._stop_requested = True

    def _on_signal(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def _sync_context(self, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an update."""
        if self.config.fsdp:
            self._wrapped.set_requires_gradient_sync(sync)
        elif isinstance(self._wrapped, DistributedDataParallel) and not sync:
            return self._wrapped.no_sync()
        return nullcontext()

    def _micro_positions(self, step: int, micro: int) -> range:
        first = step * self.config.batch_size + (micro * self.env.world_size + self.env.rank) * self.micro_batch
        return range(first, first + self.micro_batch)

    def _train_step(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """One optimizer update; returns its loss, metrics (means over micro-batches) and lr."""
        cfg = self.config
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        for micro in range(cfg.grad_accum):
            positions = self._micro_positions(step, micro)
            batch = _to_device(self.data(positions), self.device)
            seed_everything(derive_seed(cfg.seed, positions.start, 0))  # dropout & co.
            generator = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, positions.start, 1))
            with self._sync_context(micro == cfg.grad_accum - 1):
                with autocast:
                    loss, metrics = self._wrapped(batch, generator)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            for name, value in metrics.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
                metric_sums[name] = metric_sums.get(name, 0) + value
        metrics = {name: value / cfg.grad_accum for name, value in metric_sums.items()}
        if cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for _, p in self._trainable], cfg.grad_clip)
            metrics["grad_norm"] = (norm.full_tensor() if isinstance(norm, DTensor) else norm).detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._ema is not None:
            with torch.no_grad():
                for average, (_, p) in zip(self._ema, self._trainable):
                    average.lerp_(p.detach(), 1 - cfg.ema)
        return loss_sum / cfg.grad_accum, metrics, lr

    def _log(self, sums: dict[str, torch.Tensor], steps: int, lr: float, seconds: float,
             elapsed: float) -> dict[str, float]:
        """Average the accumulated per-step values over steps and ranks; rank 0 appends the line."""
        names = list(sums)
        means = distributed.all_reduce_mean(torch.stack([sums[n] for n in names]) / steps).tolist()
        values = dict(zip(names, means))
        if not math.isfinite(values["loss"]):
            raise NeodragonError(
                f"training diverged: loss is {values['loss']} at step {self.step}",
                hint="lower train.lr, set train.grad_clip or use precision fp32, then resume from the last checkpoint",
            )
        line = {"step": self.step, "loss": values.pop("loss"), "lr": lr, "it_s": steps / max(seconds, 1e-9),
                "elapsed_s": elapsed, **values}
        if self.env.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        return line

    def fit(self, on_step_end: StepHook | None = None) -> TrainResult:
        """Train from `self.step` to `config.max_steps`.

        `on_step_end(trainer, step)` runs on every rank after each update (step = updates done); it
        may call `trainer.request_stop()`. SIGINT/SIGTERM request a stop too (a second one interrupts
        at once). A stop checkpoints at the end of the current update and returns `stopped=True`."""
        from neodragon_cli.console import console, progress

        cfg = self.config
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stop_requested = False
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = progress("loss", disable=not (self.show_progress and self.env.is_main and console.is_terminal))
        self.model.train()
        stopped = False
        try:
            with bar:
                task = bar.add_task("train", total=cfg.max_steps, completed=self.step, loss="-")
                sums: dict[str, torch.Tensor] = {}
                start = window_start = time.perf_counter()
                window_steps = 0
                while self.step < cfg.max_steps and not stopped:
                    loss, metrics, lr = self._train_step(self.step)
                    self.step += 1
                    window_steps += 1
                    for name, value in {**metrics, "loss": loss}.items():
                        sums[name] = sums.get(name, 0) + value
                    if on_step_end is not None:
                        on_step_end(self, self.step)
                    stopped = distributed.any_rank(self._stop_requested, self.device)
                    last = stopped or self.step == cfg.max_steps
                    if last or self.step % cfg.log_every == 0:
                        now = time.perf_counter()
                        self._last_metrics = self._log(sums, window_steps, lr, now - window_start, now - start)
                        bar.update(task, loss=f"{self._last_metrics['loss']:.4g}")
                        sums, window_steps, window_start = {}, 0, now
                    if last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                        self.save_checkpoint()
                    bar.update(task, completed=self.step)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return TrainResult(step=self.step, stopped=stopped, metrics=dict(self._last_metrics))
