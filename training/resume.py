"""last.pt and --resume: the whole training state after every epoch, so a run continues exactly.

The epoch loop writes last.pt with `save_state` after every epoch. A run started with --resume
loads it (`read_state`: it must be a training state of this run: the same run-defining options,
the same number of processes, the same model source) and puts every object and random generator
back where it stopped (`restore`); the loop then continues after the saved epoch. last.pt is
plain tensors and data (torch.load(weights_only=True)): the progress, the state_dicts of the
model, its moving average, the optimizer and the scheduler, and every process's generators.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from training.checkpoint import (
    TRAINING_STATE_FORMAT,
    bare_state_dict,
    load_torch_file,
    torch_bytes,
    write_bytes_atomic,
)
from training.config import RUN_DEFINING, TrainConfig, flag
from training.distributed import World
from training.errors import UserError
from training.loop import Progress, Setting
from training.model_origin import Origin

WHAT_TO_DO = "point --resume at a last.pt of this kit, or train without --resume"


@dataclass(frozen=True)
class TrainingState:
    """What last.pt holds: everything a resumed run needs to continue where this one stopped."""

    config: dict  # the run's options (TrainConfig.to_json())
    progress: Progress
    mean: list[float]  # the normalization (--normalize), resolved once by the first run
    std: list[float]
    model: dict  # state_dicts: the bare model, its moving average (None without one), optimizer, scheduler
    average: dict | None
    optimizer: dict
    scheduler: dict
    generator: torch.Tensor  # the shuffling order's generator (the same in every process)
    random_states: list[dict]  # by rank: each process's CPU, device and augmentation generators
    world_size: int
    source_sha256: str | None  # a user model's source file, else None

    def record(self) -> dict:
        """last.pt's contents; the progress is kept flat, beside the rest."""
        progress = {f.name: getattr(self.progress, f.name) for f in dataclasses.fields(Progress)}
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("config", "progress")}
        return {"format": TRAINING_STATE_FORMAT, "config": self.config, **progress, **rest}

    @classmethod
    def from_record(cls, record: dict, path: Path) -> TrainingState:
        record = {"world_size": 1, "source_sha256": None, **record}  # absent from the earliest files
        try:
            progress = Progress(**{f.name: record[f.name] for f in dataclasses.fields(Progress)})
            return cls(progress=progress, **{f.name: record[f.name] for f in dataclasses.fields(cls)
                                             if f.name != "progress"})
        except KeyError as missing:
            raise UserError(f"{path} is an incomplete training state (no {missing}): {WHAT_TO_DO}") from None


def save_state(path: Path, run: Setting, optimizer, scheduler, progress: Progress, shipped_weights: dict) -> None:
    """Writes last.pt (atomically, from process 0). Every process calls it: their generators are gathered.

    `shipped_weights` is the epoch's bare_state_dict(run.shipped): with a moving average, it is the
    average's state and possibly progress.best_state too, stored once."""
    states = run.world.gather(random_states(run))
    if not run.world.main:
        return
    mean, std = run.statistics
    state = TrainingState(
        config=run.config.to_json(), progress=progress, mean=mean, std=std, model=bare_state_dict(run.model),
        average=None if run.average is None else shipped_weights, optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), generator=run.order.get_state(), random_states=states,
        world_size=run.world.size, source_sha256=run.source_sha256)
    write_bytes_atomic(path, torch_bytes(state.record()))  # tensors shared between entries are stored once


def read_state(config: TrainConfig, origin: Origin, world: World) -> TrainingState:
    """last.pt for --resume, checked against this run: same options, processes and model source."""
    state = TrainingState.from_record(load_torch_file(config.resume, TRAINING_STATE_FORMAT, WHAT_TO_DO),
                                      config.resume)
    check_matches(state, config, origin, world)
    return state


def check_matches(state: TrainingState, config: TrainConfig, origin: Origin, world: World) -> None:
    """A resumed run trains what the saved one trained: its run-defining options, its number of
    processes, its model source."""
    defaults, options = TrainConfig().to_json(), config.to_json()
    for option in RUN_DEFINING:
        now, then = options[option], state.config.get(option, defaults[option])  # older files lack newer options
        if then != now:
            raise UserError(f"{config.resume} was trained with {flag(option)} "
                            f"{then!r}, this run has {now!r}: resume with the same options")
    if state.world_size != world.size:
        raise UserError(f"{config.resume} was written by a run of {state.world_size} process(es), this run "
                        f"has {world.size}: resume with the same number of processes")
    if state.source_sha256 != origin.source_sha256:
        raise UserError(f"the source of {origin.reference} changed since {config.resume} was written: restore it, "
                        "or train without --resume")


def restore(state: TrainingState, run: Setting, optimizer, scheduler) -> Progress:
    """Loads a checked training state into the run's objects and generators; returns its progress."""
    try:
        run.model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if run.average is not None:
            run.average.load_state_dict(state.average)
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"{run.config.resume} does not fit this model ({str(error).splitlines()[0]}): point --resume "
                        "at a last.pt of this run") from None
    run.order.set_state(state.generator)
    mine = state.random_states[run.world.rank]
    run.augment.set_state(mine["augment"])
    torch.set_rng_state(mine["cpu_rng"])
    set_device_rng_state(run.device, mine["device_rng"])
    return state.progress


def random_states(run: Setting) -> dict:
    """This process's generators, so a resume continues every random sequence exactly."""
    return {"cpu_rng": torch.get_rng_state(), "device_rng": device_rng_state(run.device),
            "augment": run.augment.get_state()}


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """An accelerator's own generator (dropout draws from it there): saved so a resume is exact."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_device_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    if state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif state is not None and device.type == "mps":
        torch.mps.set_rng_state(state)
