"""Data-parallel training across processes with torch.distributed, started by torchrun.

    torchrun --standalone --nproc_per_node=N -m training ...       (make train NPROC=N)
    torchrun --nnodes=2 --node_rank=R --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
             --nproc_per_node=N -m training ...                       (several machines)

One process per GPU (NCCL; LOCAL_RANK picks the device) or N CPU processes (gloo, the cores
shared between them). `--batch-size` is the global batch: each process trains on an equal,
disjoint share of it, so the learning rate and schedule mean what they mean in one process.
Without torchrun's environment everything here is the single-process case.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.errors import UserError

# A collective that waits longer than this for a lost process fails instead of hanging.
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("KIT_DISTRIBUTED_TIMEOUT_S", "300")))


class SharedError(UserError):
    """A mistake every process of the run raises together: printed once, by process 0."""


class Stopped(Exception):
    """This process stopped because another one of the run failed: torchrun stopped it, or a
    collective lost contact (a closed connection, or TIMEOUT)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def gather(self, value) -> list:
        """`value` from every process, in rank order (any picklable object)."""
        if not self.distributed:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def wait_for_all(self) -> None:
        """Returns once every process has arrived here."""
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    @contextlib.contextmanager
    def together(self):
        """Mistakes inside (bad data on one machine, a missing model file...) stop every process
        with the same one line, instead of leaving the others waiting."""
        failure = None
        try:
            yield
        except UserError as error:
            failure = str(error)
            if not self.distributed:
                raise
        failures = self.gather(failure)
        for rank, message in enumerate(failures):
            if message is not None:
                where = "" if rank == 0 or failures.count(message) == self.size else f"process {rank}: "
                raise SharedError(where + message)


SINGLE = World()


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process died or timed out."""
    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and any(
        text in str(error) for text in ("Connection closed by peer", "Connection reset", "imed out", "Broken pipe"))


def environment() -> World:
    """The run's place in torchrun's world (WORLD_SIZE, RANK, LOCAL_WORLD_SIZE), or SINGLE."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_WORLD_SIZE", size)))


def join(world: World, device: torch.device) -> torch.device:
    """Starts the process group: NCCL with one GPU per process, gloo on CPU cores. Returns the
    device this process trains on."""
    if not world.distributed:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if world.local_size > torch.cuda.device_count():
            raise UserError(f"{world.local_size} processes per machine but {torch.cuda.device_count()} GPU(s): "
                            "start one process per GPU (--nproc_per_node / NPROC)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        cores = len(os.sched_getaffinity(0))
        if world.local_size > cores:
            raise UserError(f"{world.local_size} processes per machine but {cores} CPU core(s) here: start at most "
                            "one process per core (--nproc_per_node / NPROC)")
        torch.set_num_threads(max(1, cores // world.local_size))  # the cores are shared, not oversubscribed
        backend = "gloo"
    else:
        raise UserError(f"distributed training runs on CUDA (NCCL) or on CPUs (gloo), not on {device.type}")
    dist.init_process_group(backend, timeout=TIMEOUT)
    return device


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_same_run(world: World, options: dict, fingerprint: str) -> None:
    """Every process must train with the same options on the same data. Call it where every
    process arrives (it is a collective); all of them raise the same error."""
    runs = world.gather((options, fingerprint))
    reference_options, reference_data = runs[0]
    for rank, (other_options, other_data) in enumerate(runs):
        differing = [key for key in reference_options if other_options.get(key) != reference_options[key]]
        if differing:
            key = differing[0]
            raise SharedError(f"process {rank} was started with --{key.replace('_', '-')} {other_options.get(key)!r}, "
                              f"process 0 with {reference_options[key]!r}: start every process with the same options")
        if other_data != reference_data:
            raise SharedError(f"process {rank} loaded other data than process 0 (another copy of the data set?): "
                              "every machine needs the same data")


def data_fingerprint(data) -> str:
    """The splits' labels, images (or file names) and class names, hashed."""
    digest = hashlib.sha256(repr((data.class_names, data.shape)).encode())
    for split in (data.train, data.val, data.test):
        digest.update(split.labels.cpu().numpy().tobytes())
        if split.images is not None:
            digest.update(split.images.cpu().numpy().tobytes())
        else:
            digest.update("\n".join(path.name for path in split.files).encode())
    return digest.hexdigest()
