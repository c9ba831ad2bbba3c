"""The one training loop every training command uses: one model, or several models trained in phases.

    trainer = Trainer(model, loss_fn, data, TrainerConfig(max_steps=1000, lr=1e-4), out_dir)
    result = trainer.fit()

    trainer = MultiModelTrainer(
        {"generator": generator, "critic": critic, "teacher": teacher},  # teacher: no optimizer, frozen
        {"generator": OptimizerConfig(lr=1e-5), "critic": OptimizerConfig(lr=2e-5, grad_clip=None)},
        [Phase("critic", critic_loss, ("critic",), repeats=2), Phase("generator", generator_loss, ("generator",))],
        data, LoopConfig(max_steps=1000, batch_size=8), out_dir)

Contracts
- A phase's `loss_fn(models, batch, generator) -> (loss, metrics)`: `models` maps every model's name
  to the plain module (any of its methods may be called), `loss` is a scalar tensor (the mean over
  the micro-batch), `metrics` a dict of scalars (floats or 0-d tensors) that is logged averaged.
  `generator` is a `torch.Generator` on the training device for every random draw of the loss.
  The single-model `Trainer` takes `loss_fn(model, batch, generator)` instead.
- `data(positions: range) -> batch`: the samples at `positions` of an endless, seeded sample stream,
  collated (tensors, or dicts/lists/tuples of tensors; they are moved to the device). `IndexedBatches`
  makes such a source from a `sample(index)` function.

A training step runs the phases in order; a phase makes `repeats` optimizer updates of the models it
names, each on a global batch of its own: the step's updates ("draws") take consecutive global batches
of the stream, so draw d of the run is positions `[d*B, (d+1)*B)` and each micro-batch is a contiguous
slice of it. While a phase runs, the other trained models have `requires_grad` off (they get no
gradient and keep their optimizer state); frozen models (no optimizer) are in eval mode throughout.

Exact resume, by construction rather than by saving RNG streams: a step depends only on the weights,
the optimizer states, the step number and the seed. Before each micro-batch the trainer reseeds
python/numpy/torch and builds `generator` from (seed, first position of the micro-batch), positions
that are unique to (step, phase, repeat, micro-batch, rank); the data are a pure function of the
positions; each learning rate is a pure function of the step. So the checkpoint (trained weights,
optimizer states, EMAs, step) is all the state there is, and a run stopped at step k and resumed ends
bit-identical to an uninterrupted one. Because the seeds follow sample positions, splitting a global
batch over 2 ranks or over 2 accumulation steps draws the same random numbers.

Distributed: under `torchrun` each phase runs through a DDP wrapper of the models it updates (so
the others neither synchronise nor need a gradient; a parameter of these that a phase leaves unused
is allowed unless the phase says `unused_parameters=False`), or
all trained models are sharded with FSDP2 (`fsdp: true`); rank r takes its slice of each global batch;
only rank 0 writes checkpoints, metrics and the progress bar. Run the command inside
`distributed.process_group()` so that the process group is torn down however it ends.

Files in `out_dir`: `checkpoints/step-XXXXXXXX.pt` (the latest, plus every `keep_every`-th when set;
written to a temporary name then renamed) and `metrics.jsonl` (one JSON object per logged step: step,
each phase's loss and loss_fn metrics and the grad_norm of the models it clips, each model's lr,
it_s, elapsed_s; names carry a `PHASE/` prefix when there are several phases and lr a `/MODEL`
suffix when several models train).
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
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
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

# 2: several models, optimizers and EMAs per checkpoint, keyed by model name.
CHECKPOINT_FORMAT = 2
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})\.pt$")
_ONLY_MODEL = "model"  # the name of the single-model Trainer's model

LossFn = Callable[[nn.Module, Any, torch.Generator], "tuple[torch.Tensor, dict[str, Any]]"]
PhaseLossFn = Callable[[Mapping[str, nn.Module], Any, torch.Generator], "tuple[torch.Tensor, dict[str, Any]]"]
StepHook = Callable[["MultiModelTrainer", int], None]


@dataclass
class OptimizerConfig:
    """How one model is optimised: optimizer, learning-rate schedule, gradient clip, EMA."""

    lr: float = setting(1e-4, "peak learning rate")
    optimizer: Literal["adamw", "adam"] = setting("adamw", "adamw (decoupled weight decay) or adam (L2 penalty)")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam moment decay rates")
    eps: float = setting(1e-8, "Adam denominator epsilon")
    weight_decay: float = setting(0.0, "on parameters with 2+ dims only (not biases, norms)")
    schedule: Literal["constant", "cosine", "linear"] = setting("constant", "learning-rate shape after warmup")
    warmup_steps: int = setting(0, "linear warmup: update s < warmup_steps uses lr*(s+1)/warmup_steps")
    min_lr: float = setting(0.0, "floor that cosine and linear decay towards")
    grad_clip: float | None = setting(1.0, "max global gradient norm; null disables clipping")
    ema: float | None = setting(None, "EMA decay of the trainable weights (e.g. 0.999); null: none")

    def validate(self, max_steps: int | None = None) -> list[str]:
        """Cross-field problems; with `max_steps`, also whether the warmup fits in the run."""
        problems = []
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must not be negative, got {self.warmup_steps}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            problems.append(f"min_lr must lie in [0, lr], got {self.min_lr}")
        if max_steps is not None and self.warmup_steps >= max_steps > 0:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({max_steps})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must not be negative, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append(f"grad_clip must be positive or null, got {self.grad_clip}")
        if self.ema is not None and not 0 < self.ema < 1:
            problems.append(f"ema must be a decay in (0, 1) or null, got {self.ema}")
        return problems


@dataclass
class LoopConfig:
    """The run's settings shared by all its models: seed, length, batch, precision, checkpointing."""

    seed: int = setting(0, "seed of the sample stream, the noise and dropout")
    max_steps: int = setting(1000, "training steps in the whole run (with one model: optimizer updates)")
    batch_size: int = setting(8, "global batch: samples per optimizer update, over all ranks and accumulation steps")
    grad_accum: int = setting(1, "micro-batches accumulated per update on each rank")
    precision: Literal["fp32", "bf16", "auto"] = setting(
        "fp32", "bf16: forward and loss under bf16 autocast, fp32 weights; auto: bf16 where the device computes it natively"
    )
    checkpoint_every: int = setting(500, "checkpoint every N steps (0: only at the end or when stopped)")
    keep_every: int = setting(0, "also keep the checkpoints whose step is a multiple of N, to compare them later (0: only the latest)")
    log_every: int = setting(10, "append a metrics.jsonl line every N steps")
    fsdp: bool = setting(False, "shard weights, grads and optimizer state with FSDP2 (torchrun)")

    def validate(self) -> list[str]:
        """Cross-field problems (the recipe loader reports them with the file and line)."""
        problems = []
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.batch_size >= 1 and self.grad_accum >= 1 and self.batch_size % self.grad_accum:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        return problems


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively: a CUDA device that supports bf16, or a CPU with
    AMX or AVX-512 BF16. Elsewhere (e.g. AVX2-only CPUs) bf16 is emulated and several times slower
    than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to tell, so do not guess
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: `auto` becomes bf16 on devices with native bf16, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


@dataclass
class TrainerConfig(OptimizerConfig, LoopConfig):
    """The `train:` section of a single-model recipe: the run's settings and its model's optimizer."""

    def validate(self) -> list[str]:
        return LoopConfig.validate(self) + OptimizerConfig.validate(self, self.max_steps)


def lr_at(step: int, config: OptimizerConfig, max_steps: int | None = None) -> float:
    """Learning rate at step `step` (0-based) of a run of `max_steps` (default: `config.max_steps`):
    linear warmup to `lr`, then the schedule's shape from `lr` towards `min_lr` over the remaining
    steps (never reaching it: the last step learns)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    total = config.max_steps if max_steps is None else max_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
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
    """How `fit` ended: the last completed step, whether a stop request ended it early, and the
    last logged metrics line."""

    step: int
    stopped: bool
    metrics: dict[str, float]


@dataclass(frozen=True)
class Phase:
    """One part of a training step: `repeats` optimizer updates of the models named in `updates`,
    each on its own global batch, with the gradients of `loss_fn`. `unused_parameters=False`
    promises that every trainable parameter of those models gets a gradient in every update, which
    spares DDP its search of the autograd graph for the others (and its warning when none are)."""

    name: str
    loss_fn: PhaseLossFn
    updates: tuple[str, ...]
    repeats: int = 1
    unused_parameters: bool = True


@dataclass
class _TrainedModel:
    """A model with an optimizer: its trainable parameters (by name), optimizer and EMA copies."""

    module: nn.Module
    config: OptimizerConfig
    names: list[str]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: list[torch.Tensor] | None


class _PhaseForward(nn.Module):
    """A loss evaluation as the forward of a module: DDP and FSDP hook into forward, so wrapping
    this (not the models) keeps them correct whichever of the models' methods a loss calls. Only
    `trained` are submodules (synchronised or sharded); `models` is what the loss sees: every model."""

    def __init__(self, trained: dict[str, nn.Module], models: dict[str, nn.Module]):
        super().__init__()
        self.trained = nn.ModuleDict(trained)
        self.__dict__["models"] = models  # not registered: frozen models and loss networks keep their mode

    def forward(self, loss_fn: PhaseLossFn, batch, generator):
        return loss_fn(self.models, batch, generator)


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


def _layout(phases: Sequence[Phase]) -> list[list]:
    """What a checkpoint records of the phases: the stream and the updates depend on it."""
    return [[phase.name, list(phase.updates), phase.repeats] for phase in phases]


class MultiModelTrainer:
    """Seeded, resumable, distributed training of several named models in phases.

    `models` maps names to modules (moved to the trainer's device, see `distributed.setup`);
    `optimizers` gives the models to train their `OptimizerConfig` (each gets its own optimizer
    over its parameters that require grad, lr schedule, clip and EMA); the other models are frozen:
    eval mode, no gradients, no optimizer, not saved in checkpoints. `phases` run in order each step.
    `resume=True` continues from the latest checkpoint in `out_dir` (or starts fresh when there is
    none); without it an `out_dir` that holds checkpoints is refused. `progress=False` hides the
    progress bar (it also hides itself off a terminal and off rank 0)."""

    def __init__(self, models: Mapping[str, nn.Module], optimizers: Mapping[str, OptimizerConfig],
                 phases: Sequence[Phase], data: Callable[[range], Any], config: LoopConfig, out_dir: str | Path,
                 *, resume: bool = False, progress: bool = True, device: str | torch.device | None = None,
                 samples: str = "samples"):
        problems = LoopConfig.validate(config) + self._plan_problems(models, optimizers, phases)
        for name, settings in optimizers.items():
            problems += [f"{name}: {p}" for p in OptimizerConfig.validate(settings, config.max_steps)]
        if problems:
            raise UsageError(f"invalid trainer settings: {'; '.join(problems)}",
                             hint="fix the train: section of the recipe")
        self.config = config
        self.phases = list(phases)
        self.out_dir = Path(out_dir)
        self.env = distributed.setup(device)
        self.device = self.env.device
        self.precision = resolve_precision(config.precision, self.device)
        per_update = self.env.world_size * config.grad_accum
        if config.batch_size % per_update:
            raise UsageError(
                f"batch_size {config.batch_size} does not split over {self.env.world_size} rank(s)"
                f" x {config.grad_accum} accumulation step(s)",
                hint=f"use a multiple of {per_update}",
            )
        self.micro_batch = config.batch_size // per_update
        self._draws_per_step = sum(phase.repeats for phase in self.phases)
        if config.fsdp and not self.env.distributed:
            raise UsageError("fsdp needs several processes",
                             hint="launch with torchrun --nproc_per_node N, or set fsdp: false")
        self.models = {name: module.to(self.device) for name, module in models.items()}
        for name, module in self.models.items():
            if name not in optimizers:
                module.eval().requires_grad_(False)
        self.data = data
        self.show_progress = progress
        self.samples = samples  # what one item of the batch is, for the progress bar's throughput
        self.step = 0
        self._stop_requested = False
        self._last_metrics: dict[str, float] = {}

        for name in optimizers:
            if not any(p.requires_grad for p in self.models[name].parameters()):
                raise UsageError(f"model '{name}' has no trainable parameters",
                                 hint="check which parts the recipe freezes")
        self._forwards = self._wrap({name: self.models[name] for name in optimizers})
        self._trained = {name: self._trained_model(name, settings) for name, settings in optimizers.items()}
        self.optimizers = {name: trained.optimizer for name, trained in self._trained.items()}
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

    @staticmethod
    def _plan_problems(models: Mapping[str, nn.Module], optimizers: Mapping[str, OptimizerConfig],
                       phases: Sequence[Phase]) -> list[str]:
        """Names that do not fit together: unknown models, untrained updates, idle optimizers."""
        problems = [f"optimizer for unknown model '{name}' (models: {', '.join(models)})"
                    for name in optimizers if name not in models]
        if not phases:
            problems.append("no training phases")
        names = [phase.name for phase in phases]
        if len(set(names)) != len(names):
            problems.append(f"phase names must be unique, got {names}")
        for phase in phases:
            if phase.repeats < 1:
                problems.append(f"phase '{phase.name}': repeats must be at least 1, got {phase.repeats}")
            if not phase.updates:
                problems.append(f"phase '{phase.name}' updates no model")
            for name in phase.updates:
                if name not in optimizers:
                    problems.append(f"phase '{phase.name}' updates '{name}', which has no optimizer"
                                    f" (trained: {', '.join(optimizers) or 'none'})")
        updated = {name for phase in phases for name in phase.updates}
        problems += [f"model '{name}' has an optimizer but no phase updates it" for name in optimizers
                     if name not in updated]
        return problems

    def _wrap(self, trained: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The module each phase calls: one FSDP2 root over every trained model, one DDP per phase
        over the models it updates, or (one process) a plain module."""
        if self.config.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.env.world_size,))
            for model in trained.values():  # one FSDP unit per transformer block, plus the root
                distributed.shard_blocks(model, mesh)
            root = distributed.fully_shard(_PhaseForward(trained, self.models), mesh)
            return {phase.name: root for phase in self.phases}
        if self.env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return {
                phase.name: DistributedDataParallel(
                    _PhaseForward({name: trained[name] for name in phase.updates}, self.models),
                    device_ids=device_ids, find_unused_parameters=phase.unused_parameters)
                for phase in self.phases
            }
        root = _PhaseForward(trained, self.models)
        return {phase.name: root for phase in self.phases}

    def _trained_model(self, name: str, settings: OptimizerConfig) -> _TrainedModel:
        # A zero-element parameter (a Linear from a 0-wide input) has nothing to train; FSDP leaves it
        # unsharded, and a clip over sharded and unsharded tensors together fails.
        named = [(n, p) for n, p in self.models[name].named_parameters() if p.requires_grad and p.numel() > 0]
        params = [p for _, p in named]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer_cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_cls([g for g in groups if g["params"]], lr=self._lr(settings, 0),
                                  betas=tuple(settings.betas), eps=settings.eps)
        ema = [p.detach().clone() for p in params] if settings.ema is not None else None
        return _TrainedModel(self.models[name], settings, [n for n, _ in named], params, optimizer, ema)

    def _lr(self, settings: OptimizerConfig, step: int) -> float:
        return lr_at(step, settings, self.config.max_steps)

    # ------------------------------------------------------------------ state

    def model_state_dict(self, name: str | None = None, *, ema: bool = False) -> dict[str, torch.Tensor]:
        """The full state dict of model `name` (default: the only trained model), with the EMA
        weights in place of the trainable ones when `ema`. Collective under torchrun: call it on
        every rank; under FSDP only rank 0 gets it."""
        if name is None:
            if len(self._trained) != 1:
                raise UsageError(f"several models train ({', '.join(self._trained)}): name the one to save")
            name = next(iter(self._trained))
        state = get_model_state_dict(self.models[name], options=self._state_options)
        if ema:
            trained = self._trained.get(name)
            if trained is None or trained.ema is None:
                raise UsageError(f"this run keeps no EMA weights of '{name}'",
                                 hint="set its ema to a decay such as 0.999")
            averaged = self._ema_state(trained)
            if state:
                state.update(averaged)
        return state

    @staticmethod
    def _ema_state(trained: _TrainedModel) -> dict[str, torch.Tensor]:
        return {name: _full(t) for name, t in zip(trained.names, trained.ema)}

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-XXXXXXXX.pt` for the current step (collective; rank 0 writes),
        then delete older checkpoints but those `keep_every` keeps."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": asdict(self.config),
            "precision": self.precision,  # what `auto` became: a resume elsewhere keeps it
            "world_size": self.env.world_size,
            "phases": _layout(self.phases),
            "models": {name: self.model_state_dict(name) for name in self._trained},
            "optimizers": {
                name: get_optimizer_state_dict(t.module, t.optimizer, options=self._state_options)
                for name, t in self._trained.items()
            },
            "ema": {name: self._ema_state(t) for name, t in self._trained.items() if t.ema is not None},
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
        if not isinstance(state, dict) or "format" not in state:
            raise CheckpointError(f"{path} is not a training checkpoint of this trainer")
        if state["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path} was written by another version of the trainer"
                f" (checkpoint format {state['format']}, this one reads {CHECKPOINT_FORMAT})",
                hint="finish that run with the version that started it, or start a new run in another folder",
            )
        saved = state["config"]
        for key in ("seed", "batch_size"):
            if saved[key] != getattr(self.config, key):
                raise UsageError(
                    f"cannot resume {path.name}: it was trained with {key}={saved[key]},"
                    f" now {key}={getattr(self.config, key)}",
                    hint=f"resume with {key}={saved[key]} (the sample stream depends on it), or start a new run",
                )
        if self.config.precision == "auto":
            self.precision = state.get("precision", self.precision)
        if state["phases"] != _layout(self.phases) or set(state["models"]) != set(self._trained):
            raise UsageError(
                f"cannot resume {path.name}: it trained {', '.join(state['models'])} in phases {state['phases']},"
                f" now {', '.join(self._trained)} in {_layout(self.phases)}",
                hint="resume with the same models and phases (the sample stream depends on them), or start a new run",
            )
        every_rank_has_it = StateDictOptions(full_state_dict=True)
        # A parameter that never had a gradient (read only where its model is idle) has no optimizer state.
        stateless_allowed = StateDictOptions(full_state_dict=True, strict=False)
        for name, trained in self._trained.items():
            check_state_dict(trained.module, state["models"][name], source=f"{path} ({name})")
            set_model_state_dict(trained.module, state["models"][name], options=every_rank_has_it)
            saved_optimizer = state["optimizers"][name]
            set_optimizer_state_dict(trained.module, trained.optimizer, saved_optimizer, options=stateless_allowed)
            for param_name, param in zip(trained.names, trained.params):
                if param_name not in saved_optimizer["state"]:  # torch initialised every state: undo
                    trained.optimizer.state.pop(param, None)
            if trained.ema is None:
                continue
            if name not in state["ema"]:
                raise UsageError(f"cannot resume {path.name} with an EMA of '{name}': it kept none",
                                 hint="set its ema: null or start a new run")
            with torch.no_grad():
                for param_name, average in zip(trained.names, trained.ema):
                    full = state["ema"][name][param_name].to(self.device)
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
        """Finish the current step, checkpoint, and return from `fit` (what SIGINT/SIGTERM do)."""
        self._stop_requested = True

    def _on_signal(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def _sync_context(self, forward: nn.Module, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an update."""
        if self.config.fsdp:
            forward.set_requires_gradient_sync(sync)
        elif isinstance(forward, DistributedDataParallel) and not sync:
            return forward.no_sync()
        return nullcontext()

    @contextmanager
    def _updating(self, phase: Phase):
        """Trained models that `phase` does not update get no gradient while it runs."""
        idle = [p for name, t in self._trained.items() if name not in phase.updates for p in t.params]
        for p in idle:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in idle:
                p.requires_grad_(True)

    def _key(self, phase: Phase, name: str) -> str:
        """A phase's metric name in the log (prefixed by the phase when there are several)."""
        return name if len(self.phases) == 1 else f"{phase.name}/{name}"

    def _lr_key(self, model: str) -> str:
        return "lr" if len(self._trained) == 1 else f"lr/{model}"

    def _update(self, phase: Phase, step: int, draw: int) -> dict[str, torch.Tensor]:
        """One optimizer update of `phase`'s models on the global batch `draw` of the stream;
        returns its loss and metrics (means over micro-batches) and the clipped gradient norms."""
        cfg = self.config
        forward = self._forwards[phase.name]
        updated = [self._trained[name] for name in phase.updates]
        for trained in updated:
            for group in trained.optimizer.param_groups:
                group["lr"] = self._lr(trained.config, step)
        sums: dict[str, torch.Tensor] = {}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        for micro in range(cfg.grad_accum):
            first = draw * cfg.batch_size + (micro * self.env.world_size + self.env.rank) * self.micro_batch
            positions = range(first, first + self.micro_batch)
            batch = _to_device(self.data(positions), self.device)
            seed_everything(derive_seed(cfg.seed, positions.start, 0))  # dropout & co.
            generator = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, positions.start, 1))
            with self._sync_context(forward, micro == cfg.grad_accum - 1):
                with autocast:
                    loss, metrics = forward(phase.loss_fn, batch, generator)
                (loss / cfg.grad_accum).backward()
            for name, value in {"loss": loss, **metrics}.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
                sums[name] = sums.get(name, 0) + value
        values = {name: value / cfg.grad_accum for name, value in sums.items()}
        for name, trained in zip(phase.updates, updated):
            if trained.config.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(trained.params, trained.config.grad_clip)
                key = "grad_norm" if len(updated) == 1 else f"grad_norm.{name}"
                values[key] = (norm.full_tensor() if isinstance(norm, DTensor) else norm).detach()
            trained.optimizer.step()
            trained.optimizer.zero_grad(set_to_none=True)
            if trained.ema is not None:
                with torch.no_grad():
                    for average, p in zip(trained.ema, trained.params):
                        average.lerp_(p.detach(), 1 - trained.config.ema)
        return values

    def _train_step(self, step: int) -> dict[str, torch.Tensor]:
        """Every phase's updates of one step; returns each phase's values, averaged over its repeats."""
        values: dict[str, torch.Tensor] = {}
        draw = step * self._draws_per_step
        for phase in self.phases:
            with self._updating(phase):
                for _ in range(phase.repeats):
                    for name, value in self._update(phase, step, draw).items():
                        key = self._key(phase, name)
                        values[key] = values.get(key, 0) + value / phase.repeats
                    draw += 1
        return values

    def _log(self, sums: dict[str, torch.Tensor], steps: int, seconds: float, elapsed: float) -> dict[str, float]:
        """Average the accumulated per-step values over steps and ranks; rank 0 appends the line."""
        names = list(sums)
        means = distributed.all_reduce_mean(torch.stack([sums[n] for n in names]) / steps).tolist()
        values = dict(zip(names, means))
        losses = {key: values.pop(key) for key in (self._key(phase, "loss") for phase in self.phases)}
        for key, loss in losses.items():
            if not math.isfinite(loss):
                raise NeodragonError(
                    f"training diverged: {key} is {loss} at step {self.step}",
                    hint="lower the lr, set grad_clip or use precision fp32, then resume from the last checkpoint",
                )
        lrs = {self._lr_key(name): self._lr(t.config, self.step - 1) for name, t in self._trained.items()}
        line = {"step": self.step, **losses, **lrs, "it_s": steps / max(seconds, 1e-9), "elapsed_s": elapsed,
                **values}
        if self.env.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        return line

    def _loss_text(self, line: dict[str, float]) -> str:
        """The progress bar's loss field: each phase's loss."""
        if len(self.phases) == 1:
            return f"{line['loss']:.4g}"
        return " ".join(f"{phase.name} {line[self._key(phase, 'loss')]:.4g}" for phase in self.phases)

    def fit(self, on_step_end: StepHook | None = None) -> TrainResult:
        """Train from `self.step` to `config.max_steps`.

        `on_step_end(trainer, step)` runs on every rank after each step (step = steps done); it
        may call `trainer.request_stop()`. SIGINT/SIGTERM request a stop too (a second one interrupts
        at once). A stop checkpoints at the end of the current step and returns `stopped=True`."""
        from neodragon_cli.console import console, progress

        cfg = self.config
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stop_requested = False
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = progress("loss", "throughput", disable=not (self.show_progress and self.env.is_main and console.is_terminal))
        for trained in self._trained.values():
            trained.module.train()
        stopped = False
        try:
            with bar:
                task = bar.add_task("train", total=cfg.max_steps, completed=self.step, loss="-", throughput="-")
                sums: dict[str, torch.Tensor] = {}
                start = window_start = time.perf_counter()
                window_steps = 0
                while self.step < cfg.max_steps and not stopped:
                    for name, value in self._train_step(self.step).items():
                        sums[name] = sums.get(name, 0) + value
                    self.step += 1
                    window_steps += 1
                    if on_step_end is not None:
                        on_step_end(self, self.step)
                    stopped = distributed.any_rank(self._stop_requested, self.device)
                    last = stopped or self.step == cfg.max_steps
                    if last or self.step % cfg.log_every == 0:
                        now = time.perf_counter()
                        self._last_metrics = self._log(sums, window_steps, now - window_start, now - start)
                        rate = window_steps * cfg.batch_size / max(now - window_start, 1e-9)
                        bar.update(task, loss=self._loss_text(self._last_metrics), throughput=f"{rate:.1f} {self.samples}/s")
                        sums, window_steps, window_start = {}, 0, now
                    if last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                        self.save_checkpoint()
                    bar.update(task, completed=self.step)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return TrainResult(step=self.step, stopped=stopped, metrics=dict(self._last_metrics))


class Trainer(MultiModelTrainer):
    """Seeded, resumable, distributed training of one `model` on `loss_fn(model, batch, generator)`:
    the one-model, one-phase case of `MultiModelTrainer`, with `config` holding the model's
    optimizer settings too.

    It optimizes the model's parameters that require grad. `fit` puts it in train mode: keep frozen
    networks that must stay in eval mode (a teacher) outside it, in `loss_fn`'s closure."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Callable[[range], Any], config: TrainerConfig,
                 out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                 device: str | torch.device | None = None, samples: str = "samples"):
        problems = config.validate()
        if problems:
            raise UsageError(f"invalid trainer settings: {'; '.join(problems)}",
                             hint="fix the train: section of the recipe")

        def model_loss(models: Mapping[str, nn.Module], batch: Any, generator: torch.Generator):
            return loss_fn(models[_ONLY_MODEL], batch, generator)

        phase = Phase("train", model_loss, (_ONLY_MODEL,), unused_parameters=False)
        super().__init__({_ONLY_MODEL: model}, {_ONLY_MODEL: config}, [phase], data, config, out_dir,
                         resume=resume, progress=progress, device=device, samples=samples)

    @property
    def model(self) -> nn.Module:
        return self.models[_ONLY_MODEL]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers[_ONLY_MODEL]
