"""One training run, start to finish: data -> model -> epochs -> best weights -> outputs.

Writes into artifacts/<name>/: checkpoint.pt, spec.json, metrics.json, train_config.json,
curves.png, confusion_matrix.png, analysis.json, misclassified.png, report.html (training/report.py),
tensorboard/ with --tensorboard, and last.pt (the full training state after every epoch,
for --resume). Every write is atomic; an interrupted run leaves the previous outputs intact.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import data as datasets
from training.board import TensorBoard
from training.checkpoint import (
    TRAINING_STATE_FORMAT,
    bare_state_dict,
    load_torch_file,
    save_checkpoint,
    torch_bytes,
    write_bytes_atomic,
    write_json_atomic,
)
from training.config import TrainConfig
from training.errors import UserError
from training.loop import (
    batches,
    evaluate,
    make_optimizer,
    make_scheduler,
    normalize,
    per_channel,
    pick_autocast_dtype,
    pick_device,
    random_crop,
    random_flip,
)
from training.metrics import confusion_matrix, per_class
from training.models import build, full_arguments
from training.plots import plot_confusion, plot_curves
from training.report import report_training

# Options that define what is trained: a resumed run must use the same ones as the saved state.
RUN_DEFINING = ("dataset", "model", "epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov",
                "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "augment",
                "val_fraction", "test_fraction", "image_size", "train_limit", "seed")


def prepare_data(config: TrainConfig, device: torch.device) -> datasets.Data:
    data = datasets.load(config.dataset, config.data_dir, config.val_fraction, config.test_fraction,
                         config.seed, config.image_size, config.max_memory_mb, config.workers, config.download)
    for note in data.notes:
        print(f"note: {note}")
    if config.train_limit is not None:
        data.train = data.train.subset(torch.arange(min(config.train_limit, len(data.train))))
    for split in (data.train, data.val, data.test):  # held in memory: moved to the device once
        if split.images is not None:
            split.images = split.images.to(device)
            split.labels = split.labels.to(device)
    return data


def make_spec(config: TrainConfig, data: datasets.Data, arch_args: dict, mean, std) -> dict:
    channels, height, width = data.shape
    return {
        "format": "image-classifier-spec/1",
        "name": config.name,
        "arch": config.model,
        "arch_args": arch_args,
        "num_classes": len(data.class_names),
        "class_names": data.class_names,
        "input": {"channels": channels, "height": height, "width": width, "resize": "bilinear",
                  "background": list(datasets.BACKGROUND)},
        "mean": mean,
        "std": std,
        "dataset": config.dataset,
        "torch_version": str(torch.__version__),
        "torchvision_version": importlib.metadata.version("torchvision"),
        "python_version": platform.python_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def train_epoch(trainable, optimizer, scheduler, data, config, mean, std, generator, device,
                autocast_dtype, epoch: int) -> tuple[float, float, int, float]:
    """One pass over the training split: (mean loss, accuracy, images, seconds)."""
    trainable.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, started = 0, time.perf_counter()
    bar = tqdm(total=len(data.train), unit="img", unit_scale=True, leave=False, disable=None,
               desc=f"epoch {epoch}/{config.epochs}", mininterval=0.5)
    for step, (images, labels) in enumerate(batches(data.train, config.batch_size, device, generator,
                                                    data.shape, config.workers)):
        if "crop" in config.augment:
            images = random_crop(images, 2, generator)
        if "flip" in config.augment and data.flip_ok:
            images = random_flip(images, generator)
        inputs = normalize(images, mean, std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = trainable(inputs)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        bar.update(len(labels))
        if step % 20 == 0:  # .item() waits for the device: not every step
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    bar.close()
    return loss_sum.item() / seen, correct.item() / seen, seen, time.perf_counter() - started


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


def restore(config: TrainConfig, model, optimizer, scheduler, generator) -> dict:
    """Loads last.pt into the run's objects; returns the loop's bookkeeping (epoch, history, best)."""
    what_to_do = "point --resume at a last.pt of this kit, or train without --resume"
    state = load_torch_file(config.resume, TRAINING_STATE_FORMAT, what_to_do)
    saved = state["config"]
    for option in RUN_DEFINING:
        now = config.to_json()[option]
        if saved.get(option) != now:
            raise UserError(f"{config.resume} was trained with --{option.replace('_', '-')} "
                            f"{saved.get(option)!r}, this run has {now!r}: resume with the same options")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"{config.resume} does not fit this model ({str(error).splitlines()[0]}): "
                        f"{what_to_do}") from None
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu_rng"])
    set_device_rng_state(generator.device, state.get("device_rng"))
    return {key: state[key] for key in ("epoch", "history", "best_state", "best_epoch", "best_val_accuracy",
                                        "mean", "std", "images_seen", "train_step_seconds",
                                        "train_loop_seconds")}


def train(config: TrainConfig) -> dict:
    """Runs the whole training; returns the metrics it wrote to metrics.json."""
    run_started = time.perf_counter()
    device = pick_device(config.device)
    autocast_dtype = pick_autocast_dtype(config.precision, device)
    torch.manual_seed(config.seed)
    data = prepare_data(config, device)
    channels, height, width = data.shape
    arch_args = full_arguments(config.model, in_channels=channels, height=height, width=width,
                               num_classes=len(data.class_names))
    model = build(config.model, **arch_args).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    # batches() drops a last batch of one image (batch norm cannot train on it): count as it does
    steps_per_epoch = max(1, len(data.train) // config.batch_size + (len(data.train) % config.batch_size > 1))
    scheduler = make_scheduler(config, optimizer, steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    loop = {"epoch": 0, "history": [], "best_state": None, "best_epoch": 0, "best_val_accuracy": -1.0,
            "images_seen": 0, "train_step_seconds": 0.0, "train_loop_seconds": 0.0}
    if config.resume is not None:
        loop = restore(config, model, optimizer, scheduler, generator)
        mean, std = loop["mean"], loop["std"]
        print(f"resuming {config.resume} after epoch {loop['epoch']}")
    else:
        mean, std = datasets.channel_stats(
            batches(data.train, 1024, device, None, data.shape, config.workers), data.shape[0])
    mean_t, std_t = per_channel(mean, device), per_channel(std, device)
    trainable = torch.compile(model) if config.compile else model
    precision = "bf16 autocast" if autocast_dtype else "fp32"
    print(f"training {config.model} on {config.dataset} ({len(data.train)} train / {len(data.val)} val / "
          f"{len(data.test)} test images, {channels}x{height}x{width}, {len(data.class_names)} classes) "
          f"on {device} in {precision}")

    out_dir = config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    board = TensorBoard(out_dir / "tensorboard", config.tensorboard)
    for epoch in range(loop["epoch"] + 1, config.epochs + 1):
        started = time.perf_counter()
        train_loss, train_accuracy, seen, seconds = train_epoch(
            trainable, optimizer, scheduler, data, config, mean_t, std_t, generator, device, autocast_dtype, epoch)
        val_loss, val_accuracy, _ = evaluate(model, data.val, mean_t, std_t, device, data.shape, config.workers)
        loop["images_seen"] += seen
        loop["train_step_seconds"] += seconds
        loop["train_loop_seconds"] += time.perf_counter() - started
        loop["history"].append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                                "val_loss": val_loss, "val_accuracy": val_accuracy,
                                "images_per_second": seen / seconds, "lr": optimizer.param_groups[0]["lr"]})
        weights = bare_state_dict(model)
        improved = val_accuracy > loop["best_val_accuracy"]
        if improved:
            loop.update(best_state=weights, best_epoch=epoch, best_val_accuracy=val_accuracy)
        loop["epoch"] = epoch
        write_bytes_atomic(out_dir / "last.pt", torch_bytes({  # shared tensors are stored once
            "format": TRAINING_STATE_FORMAT, "config": config.to_json(), **loop, "mean": mean, "std": std,
            "model": weights, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
            "cpu_rng": torch.get_rng_state(), "device_rng": device_rng_state(device)}))
        print(f"epoch {epoch:3d}/{config.epochs}  train loss {train_loss:.4f} acc {train_accuracy:.4f}  "
              f"val loss {val_loss:.4f} acc {val_accuracy:.4f}{' *' if improved else ''}  "
              f"{seen / seconds:7.0f} img/s  {time.perf_counter() - started:5.1f}s", flush=True)
        board.log_epoch(loop["history"][-1])
        if config.patience and epoch - loop["best_epoch"] >= config.patience:
            print(f"early stop: no better validation accuracy for {config.patience} epochs")
            break

    model.load_state_dict(loop["best_state"])
    test_loss, test_accuracy, predictions = evaluate(model, data.test, mean_t, std_t, device, data.shape,
                                                     config.workers)
    matrix = confusion_matrix(data.test.labels, predictions, len(data.class_names))
    spec = save_checkpoint(out_dir, loop["best_state"], make_spec(config, data, arch_args, mean, std))
    metrics = {
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "val_accuracy": loop["best_val_accuracy"],
        "best_epoch": loop["best_epoch"],
        "epochs": loop["epoch"],
        "train_seconds": round(loop["train_loop_seconds"], 2),
        "total_seconds": round(time.perf_counter() - run_started, 2),
        "images_per_second": round(loop["images_seen"] / max(loop["train_step_seconds"], 1e-9), 1),
        "device": str(device),
        "precision": precision,
        "split_sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "class_names": data.class_names,
        "per_class": per_class(matrix, data.class_names),
        "confusion_matrix": matrix.tolist(),
        "history": loop["history"],
        "checkpoint_sha256": spec["checkpoint_sha256"],
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(out_dir / "train_config.json", config.to_json())
    plot_curves(loop["history"], out_dir / "curves.png")
    plot_confusion(matrix.numpy(), data.class_names, out_dir / "confusion_matrix.png",
                   f"{config.name}: test accuracy {test_accuracy:.2%}")
    report_training(out_dir, model, data, predictions, mean_t, std_t, device, config.workers, board)
    print(f"test accuracy {test_accuracy:.4f} (best epoch {loop['best_epoch']}, val {loop['best_val_accuracy']:.4f}); "
          f"training {loop['train_loop_seconds']:.1f}s; wrote {out_dir}/")
    return metrics
