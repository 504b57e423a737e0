"""The training loop's parts: device and precision choice, batching, augmentation, one epoch of
steps, evaluation, and what the epochs share (Setting) and carry on (Progress).

Data held in memory is a uint8 tensor on the training device: a batch is an index into it,
scaled, normalized and augmented with tensor operations, never one PIL image at a time.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.config import TrainConfig
from training.data import Data, Decoding, FolderImages, Split
from training.distributed import SINGLE, World
from training.errors import UserError
from training.finetune import hold_frozen_batch_norm


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here (try --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here (try --device cpu)")
    return device


def pick_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it fast (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        fast_bf16 = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        try:  # oneDNN's own check for AVX512-BF16 / AMX; a private API, so guarded
            fast_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        except (AttributeError, RuntimeError):
            fast_bf16 = False
    else:
        fast_bf16 = False
    if precision == "fp32" or (precision == "auto" and not fast_bf16):
        return None
    return torch.bfloat16


@torch.no_grad()
def pick_memory_format(model: nn.Module, example: torch.Tensor) -> tuple[torch.memory_format, str | None]:
    """channels_last where the model's forward takes it (convolutions run faster in it), else the
    contiguous layout, with the reason: a forward that calls .view on a feature map (the tutorials'
    `x.view(-1, 32 * 7 * 7)`) fails on channels_last tensors. One eval-mode pass: no statistics change."""
    model.eval().to(memory_format=torch.channels_last)
    try:
        model(example.contiguous(memory_format=torch.channels_last))
        return torch.channels_last, None
    except RuntimeError as error:
        model.to(memory_format=torch.contiguous_format)
        return torch.contiguous_format, str(error).strip().splitlines()[0].split(" (")[0][:120]
    finally:
        model.train()


def batches(split: Split, batch_size: int, device: torch.device, generator: torch.Generator | None,
            shape: tuple[int, int, int], workers: int = 2,
            world: World = SINGLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, int64 labels) batches on `device`; shuffled when a generator is given. Images at
    `shape`: a split held larger (a --resize crop training split) is cut to its centre (`centre_crop`).

    Training drops a last batch of one image: batch norm cannot train on a single sample. In a
    distributed run `batch_size` is the global batch: every process draws the same shuffled
    order (same generator seed) and takes its own equal, disjoint share of each batch, so all
    processes take the same number of steps.
    """
    n = len(split)
    if split.images is not None:
        order = (torch.randperm(n, generator=generator, device=generator.device) if generator is not None
                 else torch.arange(n, device=split.images.device))
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            share = len(index) // world.size
            if generator is not None and share < 2 and n > 1 and (world.distributed or len(index) == 1):
                return
            if world.distributed:
                index = index[world.rank * share:(world.rank + 1) * share]
            yield centre_crop(split.images[index], shape), split.labels[index]
        return
    sampler, sampler_generator = None, None
    if generator is not None:  # the DataLoader shuffles on the CPU; seed it from our generator
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()
        sampler_generator = torch.Generator().manual_seed(seed)
        if world.distributed:
            sampler = torch.utils.data.DistributedSampler(
                range(n), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        FolderImages(split.files, split.labels, split.decoding or Decoding(shape)), batch_size=batch_size // world.size,
        shuffle=generator is not None and sampler is None, sampler=sampler, generator=sampler_generator,
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=False, persistent_workers=False)
    for images, labels in loader:
        if generator is not None and len(labels) == 1 and n > 1:
            return
        yield centre_crop(images.to(device, non_blocking=True), shape), labels.to(device, non_blocking=True)


def held_shape(split: Split, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The size a split's images are held at: larger than the model's `shape` for a --resize crop training split."""
    return split.decoding.shape if split.decoding is not None else shape


def centre_crop(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (N, C, h, w) -> their centre (N, C, H, W) of `shape`, with torchvision CenterCrop's offsets."""
    height, width = shape[1:]
    if images.shape[-2:] == (height, width):
        return images
    top, left = int(round((images.shape[-2] - height) / 2.0)), int(round((images.shape[-1] - width) / 2.0))
    return images[..., top:top + height, left:left + width]


def steps_per_epoch(images: int, batch_size: int, world: World) -> int:
    """As batches() counts: a last batch too small to share (fewer than 2 images per process)
    is dropped, since batch norm cannot train on one sample."""
    last = images % batch_size
    return max(1, images // batch_size + (last // world.size >= 2 if world.distributed else last > 1))


def per_channel(values: list[float], device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-channel statistics (mean or std) as a (1, C, 1, 1) tensor that broadcasts over a batch."""
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ((x / 255) - mean) / std: the same ops as handlers.image.normalize."""
    return (images.float() / 255 - mean) / std


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to `padding` pixels in x and y, the border filled with zeros."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    shifts = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=generator.device)
    cropped = torch.empty_like(images)
    for dy in range(2 * padding + 1):  # one slice per shift: (2p+1)^2 tensor ops, not n
        for dx in range(2 * padding + 1):
            chosen = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            cropped[chosen] = padded[chosen, :, dy:dy + height, dx:dx + width]
    return cropped


def random_resized_crop(images: torch.Tensor, size: tuple[int, int], generator: torch.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop on uint8 (N, C, h, w), drawn from `generator`: each image's crop
    covers a share in `scale` of its area with an aspect ratio (log-uniform) in `ratio` (10 tries, then
    the centre at the nearest allowed ratio), resized to `size` (height, width) bilinearly with antialiasing."""
    from torchvision.transforms.v2 import functional as TF  # imported where needed: seconds at every start

    n, _, height, width = images.shape
    device = generator.device
    shares = torch.empty(n, 10, device=device).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    crop_w = (shares * height * width * aspect).sqrt().round().long()
    crop_h = (shares * height * width / aspect).sqrt().round().long()
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    offsets = torch.rand(n, 2, device=device, generator=generator)
    crops = []
    for i in range(n):
        tries = fits[i].nonzero()
        if len(tries):
            h, w = crop_h[i, tries[0, 0]].item(), crop_w[i, tries[0, 0]].item()
            top, left = int(offsets[i, 0] * (height - h + 1)), int(offsets[i, 1] * (width - w + 1))
        else:  # torchvision's fallback: the centre, at the nearest allowed aspect ratio
            h, w = height, width
            if width / height < ratio[0]:
                h = int(round(width / ratio[0]))
            elif width / height > ratio[1]:
                w = int(round(height * ratio[1]))
            top, left = (height - h) // 2, (width - w) // 2
        crops.append(TF.resized_crop(images[i], top, left, h, w, list(size), antialias=True))
    return torch.stack(crops)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def make_optimizer(config, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on batch-norm weights and biases: it only fights the normalization. Frozen
    # parameters (--freeze) are left out: weight decay and momentum would still move them.
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim > 1]
    no_decay = [p for p in trained if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def make_scheduler(config, optimizer, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total, pct_start=0.25,
            cycle_momentum=config.optimizer == "sgd" and config.momentum > 0)
    warmup = min(total - 1, math.ceil(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "linear":  # a triangle: up to the peak, then straight down to zero
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(triangle, warmup, total))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def triangle(warmup: int, total: int, step: int) -> float:
    """The learning rate's multiplier at `step`: linear from 1/warmup up to 1 over `warmup` steps,
    then down by the same amount each step, to 0 after the last (`total`). --resume rebuilds it from
    the options; the scheduler's saved state is its step count."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / (total - warmup + 1))


def make_weight_average(model: nn.Module) -> nn.Module:
    """A copy of `model` that follows an exponential moving average of its weights (see update_weight_average)."""
    average = copy.deepcopy(model)
    average.requires_grad_(False)
    return average


@torch.no_grad()
def update_weight_average(average: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """average <- decay * average + (1 - decay) * model, for parameters and batch-norm statistics.

    Early on the decay is smaller ((1 + step) / (10 + step), as TensorFlow's ExponentialMovingAverage
    does), so the average does not drag the random initialization along.
    """
    decay = min(decay, (1 + step) / (10 + step))
    averaged, current = [], []
    for mine, theirs in zip(average.state_dict().values(), model.state_dict().values()):
        if mine.is_floating_point():
            averaged.append(mine)
            current.append(theirs)
        else:  # counters such as num_batches_tracked
            mine.copy_(theirs)
    torch._foreach_lerp_(averaged, current, 1 - decay)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, mean, std, device, shape, workers: int = 2,
             batch_size: int = 1024, world: World = SINGLE,
             memory_format: torch.memory_format = torch.channels_last) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predictions) in float32 and eval mode: what export and serving compute.

    In a distributed run each process scores one contiguous part of the split and the parts are
    gathered: the figures are the whole split's on every process."""
    model.eval()
    part = shard(split, world)
    total_loss, predictions = 0.0, [torch.zeros(0, dtype=torch.int64)]
    for images, labels in batches(part, batch_size, device, None, shape, workers):
        logits = model(normalize(images, mean, std).contiguous(memory_format=memory_format)).float()
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        predictions.append(logits.argmax(1).cpu())
    parts = world.gather((total_loss, torch.cat(predictions)))
    predicted = torch.cat([part_predictions for _, part_predictions in parts])
    accuracy = (predicted == split.labels.cpu()).double().mean().item()
    return sum(loss for loss, _ in parts) / len(split), accuracy, predicted


def shard(split: Split, world: World) -> Split:
    """This process's contiguous part of a split (the whole split in one process)."""
    if not world.distributed:
        return split
    size = -(-len(split) // world.size)
    return split.subset(torch.arange(world.rank * size, min(len(split), (world.rank + 1) * size)))


@dataclass(frozen=True)
class Setting:
    """What every epoch of a run shares (fixed once the run starts)."""

    config: TrainConfig
    data: Data
    device: torch.device
    autocast_dtype: torch.dtype | None
    world: World
    statistics: tuple[list[float], list[float]]  # per-channel mean and std (--normalize), as the spec keeps them
    mean: torch.Tensor  # statistics[0] as (1, C, 1, 1) on the device
    std: torch.Tensor
    order: torch.Generator  # shuffling: the same sequence in every process
    augment: torch.Generator  # crops and flips: this process's own (the order generator in one process)
    model: nn.Module  # the bare model (what trains may wrap it: DDP, torch.compile)
    memory_format: torch.memory_format  # of the model and its inputs (pick_memory_format)
    average: nn.Module | None  # the moving average of its weights (--ema-decay), else None
    source_sha256: str | None  # of a user model's source file: a resumed run must have the same

    @property
    def shipped(self) -> nn.Module:
        """What is validated, kept and exported: the moving average where it is on, else the model."""
        return self.average if self.average is not None else self.model

    def evaluate(self, model: nn.Module, split: Split) -> tuple[float, float, torch.Tensor]:
        """evaluate() with this run's normalization, device, layout and processes."""
        return evaluate(model, split, self.mean, self.std, self.device, self.data.shape, self.config.workers,
                        world=self.world, memory_format=self.memory_format)

    @property
    def precision(self) -> str:
        return "bf16 autocast" if self.autocast_dtype else "fp32"


@dataclass
class Progress:
    """What the epoch loop carries from one epoch to the next (and last.pt to a resumed run)."""

    epoch: int = 0  # the last finished epoch
    history: list[dict] = field(default_factory=list)  # per epoch: losses, accuracies, speed, lr, time so far
    best_state: dict | None = None  # the shipped weights of the best validation accuracy so far
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    images_seen: int = 0
    train_step_seconds: float = 0.0  # in training steps
    train_loop_seconds: float = 0.0  # in whole epochs (steps and validation)


def train_epoch(trainable, optimizer, scheduler, run: Setting, epoch: int) -> tuple[float, float, int, float]:
    """One pass over the training split: (mean loss, accuracy, images, seconds), all processes'."""
    config, data, device = run.config, run.data, run.device
    trainable.train()
    hold_frozen_batch_norm(trainable, config.freeze)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, started = 0, time.perf_counter()
    bar = tqdm(total=len(data.train) // run.world.size, unit="img", unit_scale=True, leave=False,
               disable=None if run.world.main else True, desc=f"epoch {epoch}/{config.epochs}", mininterval=0.5)
    held = held_shape(data.train, data.shape)  # --resize crop: the resize scale, cropped here
    for step, (images, labels) in enumerate(batches(data.train, config.batch_size, device, run.order,
                                                    held, config.workers, run.world)):
        if held != data.shape:  # the crop family of --resize crop: random-resized, else the centre
            images = (random_resized_crop(images, data.shape[1:], run.augment) if "crop" in config.augment
                      else centre_crop(images, data.shape))
        elif "crop" in config.augment:
            images = random_crop(images, 2, run.augment)
        if "flip" in config.augment and data.flip_ok:
            images = random_flip(images, run.augment)
        inputs = normalize(images, run.mean, run.std).contiguous(memory_format=run.memory_format)
        with torch.autocast(device.type, dtype=run.autocast_dtype or torch.float32,
                            enabled=run.autocast_dtype is not None):
            logits = trainable(inputs)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if run.average is not None:
            update_weight_average(run.average, run.model, config.ema_decay, scheduler.last_epoch)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        bar.update(len(labels))
        if step % 20 == 0:  # .item() waits for the device: not every step
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    bar.close()
    seconds = time.perf_counter() - started
    totals = run.world.sum(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)]))
    loss_total, correct_total, seen_total = totals.tolist()
    return loss_total / seen_total, correct_total / seen_total, int(seen_total), seconds
