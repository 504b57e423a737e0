"""One training run, start to finish: data -> model -> epochs -> best weights -> outputs.

Writes into artifacts/<name>/: checkpoint.pt, spec.json, metrics.json, train_config.json,
curves.png, confusion_matrix.png, model_source.py (a user model's source), analysis.json,
misclassified.png, report.html (training/report.py), tensorboard/ with --tensorboard, and last.pt
(the full training state after every epoch, for --resume). Every write is atomic; an interrupted
run leaves the previous outputs intact, and a mistake found before training (a model that does
not build or run, weights that do not fit) leaves artifacts/<name>/ untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import io
import platform
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
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
from training.config import RUN_DEFINING, TrainConfig
from training.distributed import (
    Stopped,
    World,
    check_same_run,
    data_fingerprint,
    environment,
    join,
    leave,
    lost_contact,
)
from training.errors import UserError
from training.finetune import Parent, describe, freeze, hold_frozen_batch_norm, load_matching, read_parent
from training.loop import (
    batches,
    evaluate,
    make_optimizer,
    make_scheduler,
    make_weight_average,
    normalize,
    per_channel,
    pick_autocast_dtype,
    pick_device,
    random_crop,
    random_flip,
    update_weight_average,
)
from training.metrics import confusion_matrix, per_class
from training.model_origin import (
    DATA_ARGUMENTS,
    SOURCE_FILE,
    Origin,
    arguments,
    check_forward,
    construct,
    rebuild,
    resolve,
)
from training.models import DEFAULT_ARCH
from training.plots import plot_confusion, plot_curves
from training.report import report_training


def prepare_data(config: TrainConfig, device: torch.device, quiet: bool = False) -> datasets.Data:
    data = datasets.load(config.dataset, config.data_dir, config.val_fraction, config.test_fraction,
                         config.seed, config.image_size, config.max_memory_mb, config.workers, config.download)
    for note in [] if quiet else data.notes:
        print(f"note: {note}")
    if config.train_limit is not None:
        data.train = data.train.subset(torch.arange(min(config.train_limit, len(data.train))))
    for split in (data.train, data.val, data.test):  # held in memory: moved to the device once
        if split.images is not None:
            split.images = split.images.to(device)
            split.labels = split.labels.to(device)
    return data


@dataclass(frozen=True)
class PreparedModel:
    """A run's model before training, with where it came from and what it started from."""

    model: nn.Module
    origin: Origin
    arch_args: dict
    parent: Parent | None = None
    init_report: dict | None = None


def choose_origin(config: TrainConfig, parent: Parent | None) -> tuple[Origin, dict]:
    """--model, else the --init-from checkpoint's model (with its own arguments), else the default."""
    if config.model is not None:
        return resolve(config.model), config.model_args
    if parent is None:
        return resolve(DEFAULT_ARCH), config.model_args
    if parent.spec is None:
        raise UserError(f"{parent.path} is a plain state_dict: it does not say which model it fits; give --model")
    origin = rebuild(parent.spec, parent.model_source)
    inherited = {k: v for k, v in parent.spec["arch_args"].items() if k not in DATA_ARGUMENTS}
    return origin, {**inherited, **config.model_args}


def prepare_model(config: TrainConfig, data: datasets.Data) -> PreparedModel:
    """Builds the model, runs it once on real images, loads --init-from and applies --freeze:
    every mistake here is a UserError raised before anything is written."""
    parent = read_parent(config.init_from) if config.init_from is not None else None
    origin, given = choose_origin(config, parent)
    if origin.local_imports:
        print(f"note: {origin.reference} imports {', '.join(origin.local_imports)} from {origin.directory}: only the "
              "model's own file travels with the checkpoint; keep those importable for export")
    channels, height, width = data.shape
    data_arguments = {"in_channels": channels, "num_classes": len(data.class_names), "height": height, "width": width}
    arch_args = arguments(origin, data_arguments, given)
    model = construct(origin, arch_args)
    example, _ = next(batches(data.train, 2, torch.device("cpu"), None, data.shape, 0))
    check_forward(model, origin, example.cpu().float() / 255, len(data.class_names))
    init_report = load_matching(model, parent) if parent is not None else None
    freeze(model, config.freeze)
    return PreparedModel(model, origin, arch_args, parent, init_report)


def parameter_counts(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total:,} parameters, {trainable:,} trainable"


def summarize(config: TrainConfig) -> str:
    """`python -m training --summary`: layers, output shapes and parameters for the data set's input."""
    import torchinfo  # only this command needs it

    data = prepare_data(config, torch.device("cpu"), quiet=True)
    prepared = prepare_model(config, data)
    if prepared.init_report is not None:
        print(describe(prepared.init_report, config.init_from))
    table = torchinfo.summary(prepared.model, input_size=(1, *data.shape), device="cpu", verbose=0, depth=4,
                              col_names=("output_size", "num_params", "trainable"), row_settings=("var_names",))
    counts: dict[str, int] = {}
    for name, parameter in prepared.model.named_parameters():  # what --freeze prefixes can name
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + parameter.numel()
    prefixes = ", ".join(f"{prefix} ({count:,})" for prefix, count in counts.items())
    text = (f"{prepared.origin.reference} on {config.dataset} ({'x'.join(map(str, data.shape))} input, "
            f"{len(data.class_names)} classes)\n{table}\nparameter names start with (for --freeze): {prefixes}")
    print(text)
    return text


def make_spec(config: TrainConfig, data: datasets.Data, prepared: PreparedModel, mean, std) -> dict:
    channels, height, width = data.shape
    return {
        "format": "image-classifier-spec/1",
        "name": config.name,
        "arch": prepared.origin.reference,
        "arch_args": prepared.arch_args,
        "model": prepared.origin.record(),
        "num_classes": len(data.class_names),
        "class_names": data.class_names,
        "input": {"channels": channels, "height": height, "width": width, "resize": "bilinear",
                  "background": list(datasets.BACKGROUND)},
        "mean": mean,
        "std": std,
        "dataset": config.dataset,
        "init_from": prepared.parent.record() if prepared.parent else None,
        "frozen": list(config.freeze),
        "torch_version": str(torch.__version__),
        "torchvision_version": importlib.metadata.version("torchvision"),
        "python_version": platform.python_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Setting:
    """What every epoch of a run shares (fixed once the run starts)."""

    config: TrainConfig
    data: datasets.Data
    device: torch.device
    autocast_dtype: torch.dtype | None
    world: World
    mean: torch.Tensor  # (1, C, 1, 1) on the device
    std: torch.Tensor
    order: torch.Generator  # shuffling: the same sequence in every process
    augment: torch.Generator  # crops and flips: this process's own (the order generator in one process)
    model: nn.Module  # the bare model (what trains may wrap it: DDP, torch.compile)
    average: nn.Module | None  # the moving average of its weights (--ema-decay), else None


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
    for step, (images, labels) in enumerate(batches(data.train, config.batch_size, device, run.order,
                                                    data.shape, config.workers, run.world)):
        if "crop" in config.augment:
            images = random_crop(images, 2, run.augment)
        if "flip" in config.augment and data.flip_ok:
            images = random_flip(images, run.augment)
        inputs = normalize(images, run.mean, run.std).contiguous(memory_format=torch.channels_last)
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


def random_states(run: Setting) -> dict:
    """This process's generators, so a resume continues every random sequence exactly."""
    return {"cpu_rng": torch.get_rng_state(), "device_rng": device_rng_state(run.device),
            "augment": run.augment.get_state()}


def read_state(config: TrainConfig, origin: Origin, world: World) -> dict:
    """last.pt for --resume, checked against this run: same options, processes and model source."""
    what_to_do = "point --resume at a last.pt of this kit, or train without --resume"
    state = load_torch_file(config.resume, TRAINING_STATE_FORMAT, what_to_do)
    saved, defaults = state["config"], TrainConfig().to_json()
    for option in RUN_DEFINING:
        now, then = config.to_json()[option], saved.get(option, defaults[option])
        if then != now:
            raise UserError(f"{config.resume} was trained with --{option.replace('_', '-')} "
                            f"{then!r}, this run has {now!r}: resume with the same options")
    if state.get("world_size", 1) != world.size:
        raise UserError(f"{config.resume} was written by a run of {state.get('world_size', 1)} process(es), this run "
                        f"has {world.size}: resume with the same number of processes")
    if state.get("source_sha256") != origin.source_sha256:
        raise UserError(f"the source of {origin.reference} changed since {config.resume} was written: restore it, "
                        "or train without --resume")
    return state


def apply_state(state: dict, model, optimizer, scheduler, run: Setting) -> dict:
    """Loads a checked last.pt into the run's objects; returns the loop's bookkeeping."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if run.average is not None:
            run.average.load_state_dict(state["average"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"{run.config.resume} does not fit this model ({str(error).splitlines()[0]}): point --resume "
                        "at a last.pt of this run") from None
    run.order.set_state(state["generator"])
    mine = state["random_states"][run.world.rank]
    run.augment.set_state(mine["augment"])
    torch.set_rng_state(mine["cpu_rng"])
    set_device_rng_state(run.device, mine["device_rng"])
    return {key: state[key] for key in ("epoch", "history", "best_state", "best_epoch", "best_val_accuracy",
                                        "images_seen", "train_step_seconds", "train_loop_seconds")}


def steps_per_epoch(images: int, batch_size: int, world: World) -> int:
    """As batches() counts: a last batch too small to share (fewer than 2 images per process)
    is dropped, since batch norm cannot train on one sample."""
    last = images % batch_size
    return max(1, images // batch_size + (last // world.size >= 2 if world.distributed else last > 1))


def train(config: TrainConfig) -> dict:
    """Runs the whole training; returns the metrics written to metrics.json.

    Under torchrun every process runs this: process 0 prints and writes the outputs."""
    world = environment()
    device = join(world, pick_device(config.device))
    if world.distributed:  # torchrun stops the others when one process fails: say so, not a traceback
        signal.signal(signal.SIGTERM, stopped_by_torchrun)
    try:
        if config.batch_size % world.size:
            raise UserError(f"--batch-size {config.batch_size} is the global batch: it must divide evenly between "
                            f"the {world.size} processes")
        with contextlib.nullcontext() if world.main else contextlib.redirect_stdout(io.StringIO()):
            return train_in(config, world, device)
    except RuntimeError as error:
        if world.distributed and lost_contact(error):
            raise Stopped(f"lost contact: {str(error).strip().splitlines()[0][:200]}") from None
        raise
    finally:
        leave(world)


def stopped_by_torchrun(signum, frame):
    raise Stopped("torchrun stopped it")


def train_in(config: TrainConfig, world: World, device: torch.device) -> dict:
    run_started = time.perf_counter()
    autocast_dtype = pick_autocast_dtype(config.precision, device)
    torch.manual_seed(config.seed)
    with world.together():
        data = prepare_data(config, device)
        prepared = prepare_model(config, data)
        state = read_state(config, prepared.origin, world) if config.resume is not None else None
    check_same_run(world, config.to_json(), data_fingerprint(data))
    channels, height, width = data.shape
    model = prepared.model.to(device, memory_format=torch.channels_last)
    trainable = model
    if world.distributed:
        trainable = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        torch.manual_seed(config.seed + world.rank)  # dropout: every process draws its own masks
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch(len(data.train), config.batch_size, world))
    order = torch.Generator(device=device).manual_seed(config.seed)
    augment = order if not world.distributed else \
        torch.Generator(device=device).manual_seed(config.seed + 1_000_003 * (world.rank + 1))
    if state is not None:
        mean, std = state["mean"], state["std"]
    else:
        mean, std = datasets.channel_stats(
            batches(data.train, 1024, device, None, data.shape, config.workers), data.shape[0])
    # the moving average, where it is on, is what is validated, kept and shipped
    average = make_weight_average(model) if config.ema_decay else None
    shipped = average if average is not None else model
    run = Setting(config, data, device, autocast_dtype, world, per_channel(mean, device), per_channel(std, device),
                  order, augment, model, average)
    loop = {"epoch": 0, "history": [], "best_state": None, "best_epoch": 0, "best_val_accuracy": -1.0,
            "images_seen": 0, "train_step_seconds": 0.0, "train_loop_seconds": 0.0}
    print(f"model {prepared.origin.reference}: {parameter_counts(model)}")
    if prepared.init_report is not None:
        print(describe(prepared.init_report, config.init_from))
    if state is not None:
        with world.together():
            loop = apply_state(state, model, optimizer, scheduler, run)
        print(f"resuming {config.resume} after epoch {loop['epoch']}")
    if config.compile:
        trainable = torch.compile(trainable)
    precision = "bf16 autocast" if autocast_dtype else "fp32"
    processes = f" x {world.size} processes" if world.distributed else ""
    print(f"training {prepared.origin.reference} on {config.dataset} ({len(data.train)} train / {len(data.val)} val"
          f" / {len(data.test)} test images, {channels}x{height}x{width}, {len(data.class_names)} classes) "
          f"on {device}{processes} in {precision}")

    out_dir = config.out_dir
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    board = TensorBoard(out_dir / "tensorboard", config.tensorboard and world.main)
    for epoch in range(loop["epoch"] + 1, config.epochs + 1):
        started = time.perf_counter()
        train_loss, train_accuracy, seen, seconds = train_epoch(trainable, optimizer, scheduler, run, epoch)
        val_loss, val_accuracy, _ = evaluate(shipped, data.val, run.mean, run.std, device, data.shape, config.workers,
                                             world=world)
        loop["images_seen"] += seen
        loop["train_step_seconds"] += seconds
        loop["train_loop_seconds"] += time.perf_counter() - started
        loop["history"].append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                                "val_loss": val_loss, "val_accuracy": val_accuracy,
                                "images_per_second": seen / seconds, "lr": optimizer.param_groups[0]["lr"],
                                "seconds": round(loop["train_loop_seconds"], 2)})  # training time so far
        weights = bare_state_dict(shipped)
        improved = val_accuracy > loop["best_val_accuracy"]
        if improved:
            loop.update(best_state=weights, best_epoch=epoch, best_val_accuracy=val_accuracy)
        loop["epoch"] = epoch
        states = world.gather(random_states(run))
        if world.main:
            write_bytes_atomic(out_dir / "last.pt", torch_bytes({  # shared tensors are stored once
                "format": TRAINING_STATE_FORMAT, "config": config.to_json(), **loop, "mean": mean, "std": std,
                "model": bare_state_dict(model), "average": None if average is None else weights,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": order.get_state(), "random_states": states, "world_size": world.size,
                "source_sha256": prepared.origin.source_sha256}))
        print(f"epoch {epoch:3d}/{config.epochs}  train loss {train_loss:.4f} acc {train_accuracy:.4f}  "
              f"val loss {val_loss:.4f} acc {val_accuracy:.4f}{' *' if improved else ''}  "
              f"{seen / seconds:7.0f} img/s  {time.perf_counter() - started:5.1f}s", flush=True)
        board.log_epoch(loop["history"][-1])
        if config.patience and epoch - loop["best_epoch"] >= config.patience:
            print(f"early stop: no better validation accuracy for {config.patience} epochs")
            break

    model.load_state_dict(loop["best_state"])
    test_loss, test_accuracy, predictions = evaluate(model, data.test, run.mean, run.std, device, data.shape,
                                                     config.workers, world=world)
    matrix = confusion_matrix(data.test.labels, predictions, len(data.class_names))
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
        "world_size": world.size,
        "precision": precision,
        "split_sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "class_names": data.class_names,
        "per_class": per_class(matrix, data.class_names),
        "confusion_matrix": matrix.tolist(),
        "history": loop["history"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "init_from": {**prepared.parent.record(), **prepared.init_report} if prepared.parent else None,
        "frozen": list(config.freeze),
    }
    if world.main:
        write_outputs(run, prepared, model, metrics, loop, mean, std, matrix, predictions, board)
    return metrics


def write_outputs(run: Setting, prepared: PreparedModel, model: nn.Module, metrics: dict, loop: dict, mean, std,
                  matrix: torch.Tensor, predictions: torch.Tensor, board: TensorBoard) -> None:
    """checkpoint.pt, spec.json, model_source.py, metrics.json, train_config.json, plots, report: atomic."""
    config, data, out_dir = run.config, run.data, run.config.out_dir
    spec = save_checkpoint(out_dir, loop["best_state"], make_spec(config, data, prepared, mean, std),
                           prepared.origin.source)
    if prepared.origin.source is not None:  # the readable copy; the checkpoint holds the same text
        write_bytes_atomic(out_dir / SOURCE_FILE, prepared.origin.source.encode())
    else:
        (out_dir / SOURCE_FILE).unlink(missing_ok=True)  # from an earlier run of a user model
    metrics["checkpoint_sha256"] = spec["checkpoint_sha256"]
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(out_dir / "train_config.json", config.to_json())
    plot_curves(loop["history"], out_dir / "curves.png")
    plot_confusion(matrix.numpy(), data.class_names, out_dir / "confusion_matrix.png",
                   f"{config.name}: test accuracy {metrics['test_accuracy']:.2%}")
    report_training(out_dir, model, data, predictions, run.mean, run.std, run.device, config.workers, board)
    print(f"test accuracy {metrics['test_accuracy']:.4f} (best epoch {loop['best_epoch']}, "
          f"val {loop['best_val_accuracy']:.4f}); training {loop['train_loop_seconds']:.1f}s; wrote {out_dir}/")
