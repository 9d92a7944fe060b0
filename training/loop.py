"""The training loop shared by the stages: deterministic batches, atomic checkpoints that
resume after a kill to the same result, JSON-lines logs, a progress bar, and a stop with a
clear message on a NaN or infinite loss or gradient.

Resuming is exact because nothing random lives outside the checkpoint: batch ``s`` is drawn
from the dataset's own seeded generator at (epoch, index), and any per-step randomness of
the step function (such as sandwich configs) is seeded from the step number. The checkpoint
records the options the training depends on, and a resume with other options is refused.

Several processes (``torchrun``; ``torch.distributed`` initialised by the caller): each rank
takes its slice of every batch, gradients and losses are averaged over the ranks before the
optimizer step, and rank 0 alone writes the log and the checkpoints. The result is that of
one process on the whole batch when the loss is a mean over the images; a step function
whose loss is not (stage 3's complexity loss squares a batch mean) all-reduces what it
needs itself (:func:`~dds_fast.training.gate_stage.gate_step`). One exception: a
BatchNorm layer in train mode (the gate's, in stage 3) normalises with the statistics of
its rank's share of the batch, as under DDP, so there several processes come close to one
process but do not equal it; each rank keeps its own running statistics, and rank 0's are
saved.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from dds_fast.checkpoint import atomic_save_file, atomic_write, read_tensors, remove_leftovers

try:
    import fcntl
except ImportError:  # (Windows: no advisory locks, so no guard against a second process)
    fcntl = None

from .data import to_device


class TrainingDiverged(RuntimeError):
    """A loss or a gradient became NaN or infinite (the last good checkpoint is kept), or a
    trained network's validation output did."""


@dataclass
class LoopSettings:
    steps: int
    batch_size: int = 16
    checkpoint_every: int = 100
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


LEAD_WAIT = datetime.timedelta(days=7)
_lead_wait_groups: dict[object, object] = {}  # the default process group -> its Gloo group for lead_done


def lead_done() -> None:
    """Every rank waits here for rank 0, which worked alone before it (stage 2's slimming, a
    result's write): through a Gloo group of timeout ``LEAD_WAIT``, since NCCL's watchdog
    (10 minutes by default) would stop the waiting ranks of a long slimming. A no-op in one
    process. Every rank must call it at the same points (the group is made collectively)."""
    if rank_and_world()[1] == 1:
        return
    world_group = dist.group.WORLD
    group = _lead_wait_groups.get(world_group)
    if group is None:
        group = _lead_wait_groups[world_group] = dist.new_group(backend="gloo", timeout=LEAD_WAIT)
    dist.barrier(group=group)


def cosine_factor(steps: int, final: float = 0.01) -> Callable[[int], float]:
    """Cosine decay of the learning rate over ``steps``, from 1 to ``final`` of its initial value."""
    def factor(step: int) -> float:
        progress = min(step / max(steps - 1, 1), 1.0)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


STEP_SEED_STRIDE = 1_000_003  # more steps than a run takes: two seeds' runs never share a step's stream


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's own randomness, so a resumed run draws the same."""
    return torch.Generator().manual_seed(seed * STEP_SEED_STRIDE + step)


@contextmanager
def sole_writer(run_dir: Path, stage: str):
    """Refuses (a ValueError) a second process training ``stage`` in ``run_dir`` while this
    one does: two ran side by side, each resuming the other's checkpoints, and the folder
    ended with one's weights beside the other's log. An advisory lock on a hidden file, which
    the system drops when the process ends, however it ends (none where the platform or the
    file system has no such locks)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f".{stage}.lock"
    with open(path, "a") as held:
        try:
            if fcntl is not None:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another process is training {stage} in {run_dir} (it holds {path}): wait for it to "
                             f"end, or train in another run directory") from None
        except OSError:  # a file system without locks (ENOLCK): trained unguarded, as before
            pass
        yield


class TrainLoop:
    """Runs ``step_fn(step, noisy, clean) -> {name: loss}`` (it calls backward; the loop steps
    the optimizer; a loss is a float, or a 0-d device tensor that the loop reads after it has
    drawn the next batch, so that a step queued on a GPU overlaps the host's work on the next
    one) for ``settings.steps`` steps, checkpointing ``model``, ``optimizer`` and
    ``scheduler`` (stepped once per epoch) to ``run_dir/<stage>.state.safetensors``.
    ``lr_factor(step)``, if given, scales the optimizer's initial learning rates at each step
    (a pure function of the step, so a resumed run follows the same schedule); a ``scheduler``
    or an ``lr_factor``, not both (the factor would overwrite the scheduler's rates).

    ``options`` (JSON values) are what else the training depends on; the checkpoint records
    them with the batch size and the items per epoch, and :meth:`resume` refuses a checkpoint
    recorded with others. A finished stage may be asked for more steps and goes on from its
    checkpoint, unless ``options`` hold ``steps`` (as they should when the learning-rate
    schedule spans the steps asked for). ``start_weights`` in ``options`` (a fingerprint of
    the weights a stage starts from) gets a refusal that says so."""

    def __init__(self, run_dir, stage: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 dataset, step_fn: Callable[[int, torch.Tensor, torch.Tensor], dict[str, float]],
                 settings: LoopSettings, scheduler=None, device: str | torch.device = "cpu",
                 lr_factor: Callable[[int], float] | None = None, options: dict | None = None):
        if len(dataset) < settings.batch_size:
            raise ValueError(f"dataset has {len(dataset)} items, fewer than a batch of {settings.batch_size}")
        self.rank, self.world = rank_and_world()
        if settings.batch_size % self.world:
            raise ValueError(f"batch size {settings.batch_size} does not split over {self.world} processes")
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        if scheduler is not None and lr_factor is not None:
            raise ValueError(f"{stage}: a scheduler and an lr_factor: each step's factor of the initial rates would "
                             f"overwrite the scheduler's; give one")
        _check_storable(stage, optimizer, scheduler)
        self.lr_factor = lr_factor
        self.initial_lrs = [group["lr"] for group in optimizer.param_groups]
        self.dataset, self.step_fn, self.settings = dataset, step_fn, settings
        self.device = torch.device(device)
        self.steps_per_epoch = len(dataset) // settings.batch_size
        # through JSON, as the checkpoint stores them (a tuple reads back as a list)
        self.options = json.loads(json.dumps({"batch_size": settings.batch_size, "items_per_epoch": len(dataset),
                                              **(options or {})}))
        self.state_path = self.run_dir / f"{stage}.state.safetensors"
        self.log_path = self.run_dir / f"{stage}.log.jsonl"
        self._steps_taken = 0  # optimizer steps this object took (the model holds them)

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
        noisy = to_device(torch.stack([noisy for noisy, _ in items]), self.device)
        clean = to_device(torch.stack([clean for _, clean in items]), self.device)
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
            "options": json.dumps(self.options),
        }
        atomic_save_file(tensors, self.state_path, metadata)

    def resume(self) -> int:
        """Load the stage's checkpoint if there is one; returns the step to continue from. A
        ValueError naming the file when it cannot be read, was recorded with other options or
        for another model, or has run more steps than asked for."""
        if self.rank == 0:  # what atomic_write leaves of a checkpoint or the log when a kill stops it mid-write
            remove_leftovers(self.state_path)
            remove_leftovers(self.log_path)
        if not self.state_path.exists():
            return 0
        try:
            meta, tensors = read_tensors(self.state_path)
            step = int(meta["step"])
            scalars, param_groups, scheduler_state = (json.loads(meta[key]) for key in
                                                      ("optim_scalars", "param_groups", "scheduler"))
            options = json.loads(meta["options"]) if "options" in meta else None
        except Exception as error:  # any reader's error: a truncated or corrupt file
            raise ValueError(f"cannot read the training state {self.state_path} ({error}); "
                             f"delete it to train the stage from the start") from error
        if meta.get("stage") != self.stage:
            raise ValueError(f"{self.state_path} holds stage {meta.get('stage')!r}, not {self.stage!r}")
        if options is not None:  # state files of earlier versions recorded none
            self._check_options(options)
        if step > self.settings.steps:
            raise ValueError(f"{self.state_path} has run {step} steps, more than the {self.settings.steps} asked "
                             f"for: ask for {step} or more, or train in another run directory")
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                # as saved (on the CPU): load_state_dict moves each value to its parameter's device,
                # except Adam's step counters, which stay on the CPU unless fused or capturable
                # (on the GPU, each would cost a host sync per step)
                state.setdefault(int(index), {})[name] = value
        for key, value in scalars.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        try:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict({"state": state, "param_groups": param_groups})
            if self.scheduler is not None and scheduler_state is not None:
                self.scheduler.load_state_dict(scheduler_state)
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(f"{self.state_path} does not fit this {self.stage} model (another architecture?): "
                             f"{error}") from None
        return step

    def _check_options(self, recorded: dict) -> None:
        changed = {name: (recorded.get(name), self.options.get(name)) for name in sorted(recorded.keys() | self.options)
                   if recorded.get(name) != self.options.get(name)}
        for fingerprint in ("start_weights", "data"):  # state files of earlier versions recorded none
            if fingerprint not in recorded:
                changed.pop(fingerprint, None)
        if not changed:
            return
        listed = "; ".join(f"{name} {old!r} then, {new!r} now" for name, (old, new) in changed.items())
        steps = (" (the learning-rate schedule spans the steps asked for, so another count changes it: with "
                 "lr_schedule constant a finished stage can be asked for more)" if "steps" in changed else "")
        data = " (a digest of the images: they changed)" if "data" in changed else ""
        labels = (f" (an earlier version labelled stage 3's images by the body without its attention scale; delete "
                  f"{self.state_path} to train the gate again)" if "labels_behind_attention" in changed else "")
        middle = (f" (an earlier version could draw a random sub-network equal to the largest or the smallest; "
                  f"delete {self.state_path} to train the stage again)" if "middle_draws" in changed else "")
        weights = (f" (the weights the stage starts from changed: an earlier stage trained on; delete "
                   f"{self.state_path}, and those of the stages after it, to train them again from the new weights)"
                   if "start_weights" in changed else "")
        raise ValueError(f"{self.state_path} was trained with other options: {listed}{steps}{data}{labels}{middle}"
                         f"{weights}. Resume with the options it was trained with, or train in another run directory")

    def _truncate_log(self, step: int) -> None:
        # lines written after the checkpoint (or before the first one) by a killed run are
        # replayed, so drop them
        if not self.log_path.exists():
            return
        lines = self.log_path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a record cut short by the kill: replayed too
                    break
                raise ValueError(f"{self.log_path}, line {number}: not a JSON record: {line[:80]!r}") from None
            if record.get("step", 0) < step:
                kept.append(line)
        # a kill now leaves the old log or the new one, not half of one
        atomic_write(self.log_path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        """Train to ``settings.steps`` (resuming if a checkpoint exists); returns the steps run now."""
        with sole_writer(self.run_dir, self.stage) if self.rank == 0 else nullcontext():
            return self._run()

    def _run(self) -> int:
        lead = self.rank == 0
        if lead:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        lead_done()
        start = self.resume()
        if start == 0 and self._steps_taken:
            # no checkpoint to reload, and the weights are no longer those the run began with
            raise RuntimeError(f"{self.stage}: this loop already took {self._steps_taken} optimizer steps in this "
                               f"process and saved no checkpoint to go on from; start again with a fresh model and "
                               f"optimizer (or set checkpoint_every below the steps a run gets through)")
        if lead:
            self._truncate_log(start)
        total = self.settings.steps
        self.model.train()
        with tqdm(total=total, initial=start, desc=self.stage, disable=not (self.settings.progress and lead),
                  dynamic_ncols=True) as bar, (self.log_path.open("a") if lead else nullcontext()) as log:
            following = self.batch(start) if start < total else None
            for step in range(start, total):
                began = time.perf_counter()
                noisy, clean = following
                self.optimizer.zero_grad(set_to_none=True)
                if self.lr_factor is not None:
                    for group, initial in zip(self.optimizer.param_groups, self.initial_lrs):
                        group["lr"] = initial * self.lr_factor(step)
                losses = self.step_fn(step, noisy, clean)
                # drawn while the step's queued work runs (the batches do not depend on the weights)
                following = self.batch(step + 1) if step + 1 < total else None
                losses, largest_gradient = self._reduce(as_floats(losses))
                bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
                if not math.isfinite(largest_gradient):
                    bad["largest |gradient|"] = largest_gradient
                if bad:  # before the optimizer step, so that no checkpoint holds its result
                    kept = (f"The last good checkpoint (step {int(self._saved_step())}) is kept at {self.state_path}"
                            if self.state_path.exists() else "No checkpoint was saved before it")
                    raise TrainingDiverged(f"{self.stage}: {bad} at step {step}, not finite; stopped. {kept}")
                lr = self.optimizer.param_groups[0]["lr"]  # this step's, before an epoch's end decays it
                self.optimizer.step()
                self._steps_taken += 1
                if self.scheduler is not None and (step + 1) % self.steps_per_epoch == 0:
                    self.scheduler.step()
                if not lead:
                    continue
                record = {"step": step, "time": round(time.perf_counter() - began, 4),
                          "lr": lr, **losses}
                log.write(json.dumps(record) + "\n")
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
                bar.update(1)
                if (step + 1) % self.settings.checkpoint_every == 0 or step + 1 == total:
                    log.flush()
                    os.fsync(log.fileno())  # on the disk before the checkpoint (fsynced) says the steps ran
                    self.save_state(step + 1)
        lead_done()  # the last checkpoint is written before any rank moves on
        return total - start

    def _reduce(self, losses: dict[str, float]) -> tuple[dict[str, float], float]:
        """Average the gradients (before the optimizer step) and the losses over the ranks, and
        take the largest |gradient|, NaN or infinite where a gradient is. One transfer to the
        host: on one process it waits for that reduction alone, the step function's own
        transfer of its losses having waited for the backward."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for grad in grads if self.world > 1 else ():
            dist.all_reduce(grad)
            grad.div_(self.world)
        # the max norm of each gradient in one fused kernel: a NaN propagates, and no sum of
        # squares can overflow
        largest = (torch.stack(torch._foreach_norm(grads, math.inf)).max().double() if grads
                   else torch.zeros((), dtype=torch.float64))
        if self.world == 1:
            return losses, largest.item()
        values = torch.cat([torch.tensor(list(losses.values()), dtype=torch.float64, device=largest.device),
                            largest.view(1)])
        dist.all_reduce(values)  # every rank's largest is the same after the average above
        *averaged, largest_gradient = (values / self.world).tolist()
        return dict(zip(losses, averaged)), largest_gradient

    def _saved_step(self) -> int:
        with safe_open(str(self.state_path), framework="pt") as f:
            return int(f.metadata()["step"])


def _check_storable(stage: str, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """The optimizer's settings and the scheduler's state go into a checkpoint's metadata as
    JSON: one it cannot hold (a tensor learning rate) is refused before a step is lost to it."""
    parts = [(f"the optimizer's param group {index}'s {key}", value) for index, group in
             enumerate(optimizer.state_dict()["param_groups"]) for key, value in group.items()]
    if scheduler is not None:
        parts.append(("the scheduler's state", scheduler.state_dict()))
    for name, value in parts:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(f"{stage}: {name} is {value!r}, which a checkpoint cannot store (it "
                             f"keeps such settings as JSON numbers, strings and lists); give plain numbers") from None


def as_floats(losses: dict) -> dict[str, float]:
    """A step's losses as floats: its tensors read in one transfer (one host sync)."""
    tensors = [name for name, value in losses.items() if torch.is_tensor(value)]
    if not tensors:
        return losses
    values = dict(zip(tensors, torch.stack([losses[name].detach().double().reshape(()) for name in tensors]).tolist()))
    return {name: values.get(name, value) for name, value in losses.items()}
