"""One training run, start to finish: data -> model -> epochs -> best weights -> outputs.

Writes into artifacts/<name>/: checkpoint.pt, spec.json, metrics.json, train_config.json,
curves.png, confusion_matrix.png, model_source.py (a user model's source), analysis.json,
misclassified.png, report.html (training/report.py), tensorboard/ with --tensorboard, and last.pt
(the full training state after every epoch, for --resume: training/resume.py). Every write is
atomic; an interrupted run leaves the previous outputs intact, and a mistake found before training
(a model that does not build or run, weights that do not fit) leaves artifacts/<name>/ untouched.

--epochs 0 packages finished weights (--init-from) instead: no step, no moving average, eval mode
only; the weights are scored on the validation and test splits and written as any run's outputs
(no last.pt: there is no training to continue).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import io
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from handlers.spec import InputShape, Spec
from training import data as datasets
from training.analysis import parameter_counts
from training.board import TensorBoard
from training.checkpoint import bare_state_dict, save_checkpoint, write_bytes_atomic, write_json_atomic
from training.config import BATCH_RULE, TrainConfig, batch_for
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
from training.finetune import Parent, check_complete_fit, describe, freeze, load_matching, read_parent
from training.loop import (
    Progress,
    Setting,
    batches,
    make_optimizer,
    make_scheduler,
    make_weight_average,
    per_channel,
    pick_autocast_dtype,
    pick_device,
    pick_memory_format,
    steps_per_epoch,
    train_epoch,
)
from training.metrics import confusion_matrix, per_class
from training.model_origin import (
    SOURCE_FILE,
    Origin,
    arguments,
    check_forward,
    construct,
    data_argument_names,
    rebuild,
    resolve,
)
from training.models import DEFAULT_ARCH
from training.normalization import kind as normalization_kind
from training.normalization import resolve as resolve_normalization
from training.plots import plot_confusion, plot_curves
from training.report import report_training
from training.resume import TrainingState, read_state, restore, save_state


def prepare_data(config: TrainConfig, device: torch.device, quiet: bool = False) -> datasets.Data:
    data = datasets.load(config.dataset, config.data_dir, config.val_fraction, config.test_fraction,
                         config.seed, config.image_size, config.max_memory_mb, config.workers, config.download,
                         config.resize, config.crop_fraction)
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
    memory_format: torch.memory_format = torch.channels_last  # of the model and its inputs
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
    from_data = data_argument_names(origin)
    inherited = {k: v for k, v in parent.spec.arch_args.items() if k not in from_data}
    return origin, {**inherited, **config.model_args}


def prepare_model(config: TrainConfig, data: datasets.Data) -> PreparedModel:
    """Builds the model, runs it once on real images, loads --init-from and applies --freeze:
    every mistake here is a UserError raised before anything is written."""
    parent = read_parent(config.init_from) if config.init_from is not None else None
    origin, given = choose_origin(config, parent)
    if origin.local_imports:
        print(f"note: {origin.reference} imports {', '.join(origin.local_imports)} from {origin.directory}: only the "
              "model's own file travels with the checkpoint; keep those importable for export")
    arch_args = arguments(origin, data.shape, len(data.class_names), given)
    model = construct(origin, arch_args)
    example, _ = next(batches(data.train, 2, torch.device("cpu"), None, data.shape, 0))
    check_forward(model, origin, example.cpu().float() / 255, len(data.class_names))
    memory_format, reason = pick_memory_format(model, example.cpu().float() / 255)
    if reason is not None:
        print(f"note: {origin.reference} does not run on channels_last tensors ({reason}): it runs in the "
              "contiguous layout")
    if config.epochs == 0:  # packaged as they are: nothing may stay freshly initialized
        check_complete_fit(model, parent, origin.reference)
    init_report = load_matching(model, parent) if parent is not None else None
    freeze(model, config.freeze)
    return PreparedModel(model, origin, arch_args, memory_format, parent, init_report)


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


def make_spec(config: TrainConfig, data: datasets.Data, prepared: PreparedModel, mean, std) -> Spec:
    channels, height, width = data.shape
    return Spec(
        name=config.name,
        arch=prepared.origin.reference,
        arch_args=prepared.arch_args,
        model=prepared.origin.record(),
        class_names=tuple(data.class_names),
        input=InputShape(channels, height, width, "bilinear", tuple(datasets.BACKGROUND), data.fit, data.crop_fraction),
        mean=tuple(mean),
        std=tuple(std),
        dataset=config.dataset,
        normalization=normalization_kind(config.normalize),
        init_from=prepared.parent.record() if prepared.parent else None,
        frozen=tuple(config.freeze),
        torch_version=str(torch.__version__),
        torchvision_version=importlib.metadata.version("torchvision"),
        python_version=platform.python_version(),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def train(config: TrainConfig, on_epoch: Callable[[int, float], None] | None = None) -> dict:
    """Runs the whole training; returns the metrics written to metrics.json.

    Under torchrun every process runs this: process 0 prints and writes the outputs. `on_epoch(epoch,
    validation accuracy)` is called after every epoch (training.tune's pruner: it may raise to stop the run)."""
    world = environment()
    device = join(world, pick_device(config.device))
    if world.distributed:  # torchrun stops the others when one process fails: say so, not a traceback
        signal.signal(signal.SIGTERM, stopped_by_torchrun)
    try:
        if config.batch_size is not None and config.batch_size % world.size:
            raise UserError(f"--batch-size {config.batch_size} is the global batch: it must divide evenly between "
                            f"the {world.size} processes")
        with contextlib.nullcontext() if world.main else contextlib.redirect_stdout(io.StringIO()):
            metrics = train_in(config, world, device, on_epoch)
        # The others wait while process 0 writes the outputs: a process that tears down its process group and
        # exits while another still works can abort in gloo ("terminate called without an active exception").
        world.wait_for_all()
        return metrics
    except RuntimeError as error:
        if world.distributed and lost_contact(error):
            raise Stopped(f"lost contact: {str(error).strip().splitlines()[0][:200]}") from None
        raise
    finally:
        leave(world)


def stopped_by_torchrun(signum, frame):
    raise Stopped("torchrun stopped it")


def train_in(config: TrainConfig, world: World, device: torch.device, on_epoch=None) -> dict:
    """This process's part of the run: set up, resume where asked, train, test, write (process 0)."""
    run_started = time.perf_counter()
    torch.manual_seed(config.seed)
    with world.together():
        data = prepare_data(config, device)
        config = with_batch_size(config, len(data.train), world)
        prepared = prepare_model(config, data)
        saved = read_state(config, prepared.origin, world) if config.resume is not None else None
    check_same_run(world, config.to_json(), data_fingerprint(data))
    model = prepared.model.to(device, memory_format=prepared.memory_format)
    trainable = model
    if world.distributed:
        trainable = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        torch.manual_seed(config.seed + world.rank)  # dropout: every process draws its own masks
    run = make_setting(config, data, device, world, model, prepared, saved)
    counts = parameter_counts(model)
    print(f"model {prepared.origin.reference}: {counts['total']:,} parameters, {counts['trainable']:,} trainable")
    if prepared.init_report is not None:
        print(describe(prepared.init_report, config.init_from))
    if config.epochs == 0:
        return package(run, prepared, run_started)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch(len(data.train), config.batch_size, world))
    progress = Progress()
    if saved is not None:
        with world.together():
            progress = restore(saved, run, optimizer, scheduler)
        print(f"resuming {config.resume} after epoch {progress.epoch}")
    if config.compile:
        trainable = torch.compile(trainable)
    channels, height, width = data.shape
    processes = f" x {world.size} processes" if world.distributed else ""
    print(f"training {prepared.origin.reference} on {config.dataset} ({len(data.train)} train / {len(data.val)} val"
          f" / {len(data.test)} test images, {channels}x{height}x{width}, {len(data.class_names)} classes) "
          f"on {device}{processes} in {run.precision}")

    if world.main:
        config.out_dir.mkdir(parents=True, exist_ok=True)
    board = TensorBoard(config.out_dir / "tensorboard", config.tensorboard and world.main)
    train_epochs(run, trainable, optimizer, scheduler, progress, board, on_epoch)
    metrics, matrix, predictions = test_best(run, prepared, progress, run_started)
    if world.main:
        write_outputs(run, prepared, metrics, progress, matrix, predictions, board)
    return metrics


def with_batch_size(config: TrainConfig, images: int, world: World) -> TrainConfig:
    """The config with its batch: --batch-size as given, else the default for `images` training images
    (training.config.batch_for), said in one line; train_config.json records it."""
    if config.batch_size is not None or config.epochs == 0:  # --epochs 0 takes no step
        return config
    batch = max(world.size, batch_for(images) // world.size * world.size)  # it divides between the processes
    print(f"note: --batch-size {batch}: the default for {images:,} training images ({BATCH_RULE}); give "
          "--batch-size to choose")
    return dataclasses.replace(config, batch_size=batch)


def package(run: Setting, prepared: PreparedModel, run_started: float) -> dict:
    """--epochs 0: the loaded weights, unchanged, scored on the validation and test splits and written
    as a run (process 0); returns the metrics."""
    config, data = run.config, run.data
    channels, height, width = data.shape
    print(f"packaging {config.init_from} as {prepared.origin.reference} on {config.dataset} ({len(data.val)} val / "
          f"{len(data.test)} test images, {channels}x{height}x{width}, {len(data.class_names)} classes, "
          f"--normalize {config.normalize}) on {run.device}: no training step")
    _, val_accuracy, _ = run.evaluate(run.model, data.val)
    progress = Progress(best_state=bare_state_dict(run.model), best_val_accuracy=val_accuracy)
    metrics, matrix, predictions = test_best(run, prepared, progress, run_started)
    if run.world.main:
        config.out_dir.mkdir(parents=True, exist_ok=True)
        (config.out_dir / "last.pt").unlink(missing_ok=True)  # an earlier run's training state, of other weights
        board = TensorBoard(config.out_dir / "tensorboard", config.tensorboard)
        write_outputs(run, prepared, metrics, progress, matrix, predictions, board)
    return metrics


def make_setting(config: TrainConfig, data: datasets.Data, device: torch.device, world: World, model: nn.Module,
                 prepared: PreparedModel, saved: TrainingState | None) -> Setting:
    """The run's generators, normalization (a resumed run's own) and moving average, around `model`."""
    order = torch.Generator(device=device).manual_seed(config.seed)
    augment = order if not world.distributed else \
        torch.Generator(device=device).manual_seed(config.seed + 1_000_003 * (world.rank + 1))
    if saved is not None:
        mean, std = saved.mean, saved.std
    else:
        mean, std = resolve_normalization(config.normalize, data.shape[0], lambda: datasets.channel_stats(
            batches(data.train, 1024, device, None, data.shape, config.workers), data.shape[0]), config.dataset)
    # the moving average, where it is on, is what is validated, kept and shipped (nothing trains at --epochs 0)
    average = make_weight_average(model) if config.ema_decay and config.epochs else None
    return Setting(config=config, data=data, device=device, world=world,
                   autocast_dtype=pick_autocast_dtype(config.precision, device), statistics=(mean, std),
                   mean=per_channel(mean, device), std=per_channel(std, device), order=order, augment=augment,
                   model=model, memory_format=prepared.memory_format, average=average,
                   source_sha256=prepared.origin.source_sha256)


def train_epochs(run: Setting, trainable, optimizer, scheduler, progress: Progress, board: TensorBoard,
                 on_epoch=None) -> None:
    """The epochs after progress.epoch, up to --epochs or an early stop; last.pt after each one."""
    config, data = run.config, run.data
    for epoch in range(progress.epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        train_loss, train_accuracy, seen, seconds = train_epoch(trainable, optimizer, scheduler, run, epoch)
        val_loss, val_accuracy, _ = run.evaluate(run.shipped, data.val)
        progress.images_seen += seen
        progress.train_step_seconds += seconds
        progress.train_loop_seconds += time.perf_counter() - started
        progress.history.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                                 "val_loss": val_loss, "val_accuracy": val_accuracy,
                                 "images_per_second": seen / seconds, "lr": optimizer.param_groups[0]["lr"],
                                 "seconds": round(progress.train_loop_seconds, 2)})  # training time so far
        weights = bare_state_dict(run.shipped)
        improved = val_accuracy > progress.best_val_accuracy
        if improved:
            progress.best_state, progress.best_epoch, progress.best_val_accuracy = weights, epoch, val_accuracy
        progress.epoch = epoch
        save_state(config.out_dir / "last.pt", run, optimizer, scheduler, progress, weights)
        print(f"epoch {epoch:3d}/{config.epochs}  train loss {train_loss:.4f} acc {train_accuracy:.4f}  "
              f"val loss {val_loss:.4f} acc {val_accuracy:.4f}{' *' if improved else ''}  "
              f"{seen / seconds:7.0f} img/s  {time.perf_counter() - started:5.1f}s", flush=True)
        board.log_epoch(progress.history[-1])
        if on_epoch is not None:
            on_epoch(epoch, val_accuracy)
        if config.patience and epoch - progress.best_epoch >= config.patience:
            print(f"early stop: no better validation accuracy for {config.patience} epochs")
            break


def test_best(run: Setting, prepared: PreparedModel, progress: Progress,
              run_started: float) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Loads the best weights into the model and tests them: (metrics, confusion matrix, predictions)."""
    config, data, model = run.config, run.data, run.model
    model.load_state_dict(progress.best_state)
    test_loss, test_accuracy, predictions = run.evaluate(model, data.test)
    matrix = confusion_matrix(data.test.labels, predictions, len(data.class_names))
    counts = parameter_counts(model)
    metrics = {
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "val_accuracy": progress.best_val_accuracy,
        "best_epoch": progress.best_epoch,
        "epochs": progress.epoch,
        "train_seconds": round(progress.train_loop_seconds, 2),
        "total_seconds": round(time.perf_counter() - run_started, 2),
        "images_per_second": round(progress.images_seen / max(progress.train_step_seconds, 1e-9), 1),
        "device": str(run.device),
        "world_size": run.world.size,
        "precision": run.precision,
        "split_sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "class_names": data.class_names,
        "per_class": per_class(matrix, data.class_names),
        "confusion_matrix": matrix.tolist(),
        "history": progress.history,
        "parameters": counts["total"],
        "trainable_parameters": counts["trainable"],
        "init_from": {**prepared.parent.record(), **prepared.init_report} if prepared.parent else None,
        "frozen": list(config.freeze),
    }
    return metrics, matrix, predictions


def write_outputs(run: Setting, prepared: PreparedModel, metrics: dict, progress: Progress, matrix: torch.Tensor,
                  predictions: torch.Tensor, board: TensorBoard) -> None:
    """checkpoint.pt, spec.json, model_source.py, metrics.json, train_config.json, plots, report: atomic."""
    config, data, out_dir, model = run.config, run.data, run.config.out_dir, run.model
    mean, std = run.statistics
    spec = save_checkpoint(out_dir, progress.best_state, make_spec(config, data, prepared, mean, std),
                           prepared.origin.source)
    if prepared.origin.source is not None:  # the readable copy; the checkpoint holds the same text
        write_bytes_atomic(out_dir / SOURCE_FILE, prepared.origin.source.encode())
    else:
        (out_dir / SOURCE_FILE).unlink(missing_ok=True)  # from an earlier run of a user model
    metrics["checkpoint_sha256"] = spec.checkpoint_sha256
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(out_dir / "train_config.json", config.to_json())
    plot_curves(progress.history, out_dir / "curves.png")
    plot_confusion(matrix.numpy(), data.class_names, out_dir / "confusion_matrix.png",
                   f"{config.name}: test accuracy {metrics['test_accuracy']:.2%}")
    report_training(out_dir, model, data, predictions, run.mean, run.std, run.device, config.workers, board)
    if config.epochs == 0:
        print(f"test accuracy {metrics['test_accuracy']:.4f} (val {progress.best_val_accuracy:.4f}) of "
              f"{config.init_from}, unchanged; wrote {out_dir}/")
        return
    print(f"test accuracy {metrics['test_accuracy']:.4f} (best epoch {progress.best_epoch}, "
          f"val {progress.best_val_accuracy:.4f}); training {progress.train_loop_seconds:.1f}s; wrote {out_dir}/")
