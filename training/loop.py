"""The training loop shared by the stages: deterministic batches, atomic checkpoints that
resume after a kill to the same result, JSON-lines logs, a progress bar, and a stop with a
clear message on a NaN or infinite loss.

Resuming is exact because nothing random lives outside the checkpoint: batch ``s`` is drawn
from the dataset's own seeded generator at (epoch, index), and any per-step randomness of
the step function (such as sandwich configs) is seeded from the step number.

Several processes (``torchrun``; ``torch.distributed`` initialised by the caller): each rank
takes its slice of every batch, gradients and losses are averaged over the ranks before the
optimizer step, and rank 0 alone writes the log and the checkpoints. The result is that of
one process on the whole batch when the loss is a mean over the images; a step function
whose loss is not (stage 3's complexity loss squares a batch mean) all-reduces what it
needs itself (:func:`~dds_fast.training.gate_stage.gate_step`). One exception: a
BatchNorm layer in train mode (the gate's, in stage 3) normalises with the statistics of
its rank's share of the batch, as under DDP, so there several processes come close to one
process but do not equal it.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from dds_fast.checkpoint import atomic_save_file


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class LoopSettings:
    steps: int
    batch_size: int = 16
    checkpoint_every: int = 100
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cosine_factor(steps: int, final: float = 0.01) -> Callable[[int], float]:
    """Cosine decay of the learning rate over ``steps``, from 1 to ``final`` of its initial value."""
    def factor(step: int) -> float:
        progress = min(step / max(steps - 1, 1), 1.0)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's own randomness, so a resumed run draws the same."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class TrainLoop:
    """Runs ``step_fn(step, noisy, clean) -> {name: loss}`` (it calls backward; the loop steps
    the optimizer) for ``settings.steps`` steps, checkpointing ``model``, ``optimizer`` and
    ``scheduler`` (stepped once per epoch) to ``run_dir/<stage>.state.safetensors``.
    ``lr_factor(step)``, if given, scales the optimizer's initial learning rates at each step
    (a pure function of the step, so a resumed run follows the same schedule)."""

    def __init__(self, run_dir, stage: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 dataset, step_fn: Callable[[int, torch.Tensor, torch.Tensor], dict[str, float]],
                 settings: LoopSettings, scheduler=None, device: str | torch.device = "cpu",
                 lr_factor: Callable[[int], float] | None = None):
        if len(dataset) < settings.batch_size:
            raise ValueError(f"dataset has {len(dataset)} items, fewer than a batch of {settings.batch_size}")
        self.rank, self.world = rank_and_world()
        if settings.batch_size % self.world:
            raise ValueError(f"batch size {settings.batch_size} does not split over {self.world} processes")
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.lr_factor = lr_factor
        self.initial_lrs = [group["lr"] for group in optimizer.param_groups]
        self.dataset, self.step_fn, self.settings = dataset, step_fn, settings
        self.device = torch.device(device)
        self.steps_per_epoch = len(dataset) // settings.batch_size
        self.state_path = self.run_dir / f"{stage}.state.safetensors"
        self.log_path = self.run_dir / f"{stage}.log.jsonl"

    # -- data ---------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        share = self.settings.batch_size // self.world
        if hasattr(self.dataset, "batch"):
            # noise drawn for the whole batch on the device; each rank keeps its slice, so
            # several processes see what one would
            noisy, clean = self.dataset.batch(offset * self.settings.batch_size, self.settings.batch_size, self.device)
            rows = slice(self.rank * share, (self.rank + 1) * share)
            return noisy[rows], clean[rows]
        start = offset * self.settings.batch_size + self.rank * share
        items = [self.dataset[i] for i in range(start, start + share)]
        noisy = torch.stack([noisy for noisy, _ in items]).to(self.device, non_blocking=True)
        clean = torch.stack([clean for _, clean in items]).to(self.device, non_blocking=True)
        return noisy, clean

    # -- checkpoints --------------------------------------------------------------------
    def save_state(self, step: int) -> None:
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        optim = self.optimizer.state_dict()
        scalars = {}
        for index, state in optim["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars[f"{index}.{key}"] = value
        metadata = {
            "stage": self.stage,
            "step": str(step),
            "param_groups": json.dumps(optim["param_groups"]),
            "optim_scalars": json.dumps(scalars),
            "scheduler": json.dumps(self.scheduler.state_dict() if self.scheduler else None),
        }
        atomic_save_file(tensors, self.state_path, metadata)

    def resume(self) -> int:
        """Load the stage's checkpoint if there is one; returns the step to continue from."""
        if not self.state_path.exists():
            return 0
        with safe_open(str(self.state_path), framework="pt") as f:
            meta = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if meta.get("stage") != self.stage:
            raise ValueError(f"{self.state_path} holds stage {meta.get('stage')!r}, not {self.stage!r}")
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.device)
        for key, value in json.loads(meta["optim_scalars"]).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        scheduler_state = json.loads(meta["scheduler"])
        if self.scheduler is not None and scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)
        return int(meta["step"])

    def _truncate_log(self, step: int) -> None:
        # lines written after the checkpoint (or before the first one) by a killed run are
        # replayed, so drop them
        if not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) < step]
        self.log_path.write_text("".join(line + "\n" for line in kept))

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        """Train to ``settings.steps`` (resuming if a checkpoint exists); returns the steps run now."""
        lead = self.rank == 0
        if lead:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.world > 1:
            dist.barrier()
        start = self.resume()
        if lead:
            self._truncate_log(start)
        total = self.settings.steps
        self.model.train()
        with tqdm(total=total, initial=start, desc=self.stage, disable=not (self.settings.progress and lead),
                  dynamic_ncols=True) as bar, (self.log_path.open("a") if lead else nullcontext()) as log:
            for step in range(start, total):
                began = time.perf_counter()
                noisy, clean = self.batch(step)
                self.optimizer.zero_grad(set_to_none=True)
                if self.lr_factor is not None:
                    for group, initial in zip(self.optimizer.param_groups, self.initial_lrs):
                        group["lr"] = initial * self.lr_factor(step)
                losses = self.step_fn(step, noisy, clean)
                if self.world > 1:
                    losses = self._average(losses)
                bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
                if bad:
                    saved = f"step {int(self._saved_step())}" if self.state_path.exists() else "none yet"
                    raise TrainingDiverged(f"{self.stage}: loss {bad} at step {step}; stopped. The last good "
                                           f"checkpoint ({saved}) is kept at {self.state_path}")
                self.optimizer.step()
                if self.scheduler is not None and (step + 1) % self.steps_per_epoch == 0:
                    self.scheduler.step()
                if not lead:
                    continue
                record = {"step": step, "time": round(time.perf_counter() - began, 4),
                          "lr": self.optimizer.param_groups[0]["lr"], **losses}
                log.write(json.dumps(record) + "\n")
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
                bar.update(1)
                if (step + 1) % self.settings.checkpoint_every == 0 or step + 1 == total:
                    log.flush()
                    self.save_state(step + 1)
        if self.world > 1:
            dist.barrier()  # the last checkpoint is written before any rank moves on
        return total - start

    def _average(self, losses: dict[str, float]) -> dict[str, float]:
        """Average the gradients (before the optimizer step) and the losses over the ranks."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for grad in grads:
            dist.all_reduce(grad)
            grad.div_(self.world)
        values = torch.tensor(list(losses.values()), dtype=torch.float64, device=grads[0].device if grads else "cpu")
        dist.all_reduce(values)
        return dict(zip(losses, (values / self.world).tolist()))

    def _saved_step(self) -> int:
        with safe_open(str(self.state_path), framework="pt") as f:
            return int(f.metadata()["step"])
