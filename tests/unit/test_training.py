"""Training runs end to end on real digits: outputs, checkpoints, resume, reproducibility, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, assert_one_line_error, run_cli, tiny_config

from training.checkpoint import CHECKPOINT_FORMAT, sha256_of
from training.config import TrainConfig, batch_for
from training.errors import UserError
from training.loop import (
    make_optimizer,
    make_scheduler,
    make_weight_average,
    normalize,
    random_crop,
    random_flip,
    update_weight_average,
)
from training.models import build
from training.run import train


def test_tiny_run_writes_every_output_and_beats_chance(tiny_run):
    out_dir, metrics = tiny_run
    for name in ("checkpoint.pt", "spec.json", "metrics.json", "train_config.json", "curves.png",
                 "confusion_matrix.png", "last.pt"):
        assert (out_dir / name).stat().st_size > 0, name
    assert metrics["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    written = json.loads((out_dir / "metrics.json").read_text())
    for key in ("test_accuracy", "val_accuracy", "per_class", "confusion_matrix", "epochs", "train_seconds",
                "images_per_second"):
        assert key in written
    assert sum(map(sum, written["confusion_matrix"])) == written["split_sizes"]["test"]
    assert set(written["per_class"]["3"]) == {"precision", "recall", "f1", "support"}
    assert (out_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_spec_describes_the_checkpoint(tiny_run):
    out_dir, _ = tiny_run
    spec = json.loads((out_dir / "spec.json").read_text())
    assert spec["checkpoint_sha256"] == sha256_of(out_dir / "checkpoint.pt")
    assert spec["class_names"] == [str(d) for d in range(10)] and spec["num_classes"] == 10
    assert spec["input"] == {"channels": 1, "height": 28, "width": 28, "resize": "bilinear",
                             "background": [0, 0, 0]}
    assert 0.05 < spec["mean"][0] < 0.3 and 0.2 < spec["std"][0] < 0.45  # MNIST: mostly black pixels
    for key in ("name", "arch", "arch_args", "dataset", "torch_version", "created"):
        assert key in spec


def test_checkpoint_loads_with_weights_only_and_rebuilds_from_its_spec(tiny_run):
    out_dir, metrics = tiny_run
    record = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert record["format"] == CHECKPOINT_FORMAT
    spec = record["spec"]
    model = build(spec["arch"], **spec["arch_args"])
    model.load_state_dict(record["state_dict"])  # strict: the bare model's keys, no wrapper prefix
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in record["state_dict"])


def test_same_seed_gives_the_same_weights(tmp_path):
    first = train(tiny_config(tmp_path / "a", epochs=2, train_limit=256))
    second = train(tiny_config(tmp_path / "b", epochs=2, train_limit=256))
    state_a = torch.load(tmp_path / "a" / "tiny" / "checkpoint.pt", weights_only=True)["state_dict"]
    state_b = torch.load(tmp_path / "b" / "tiny" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert first["test_accuracy"] == second["test_accuracy"]


def test_resume_from_epoch_one_matches_a_straight_run(tmp_path):
    straight = tiny_config(tmp_path / "straight", epochs=2, train_limit=256)
    train(straight)
    first = tiny_config(tmp_path / "resumed", epochs=2, train_limit=256)
    interrupted_after_one_epoch(first)
    resumed = train(tiny_config(tmp_path / "resumed", epochs=2, train_limit=256,
                                resume=tmp_path / "resumed" / "tiny" / "last.pt"))
    assert resumed["epochs"] == 2 and len(resumed["history"]) == 2
    a = torch.load(tmp_path / "straight" / "tiny" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "tiny" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def interrupted_after_one_epoch(config: TrainConfig) -> None:
    """Runs `config` but raises KeyboardInterrupt after epoch 1's last.pt is written."""
    import training.resume as resume  # where last.pt is written

    original = resume.write_bytes_atomic

    def write_then_stop(path, payload):
        original(path, payload)
        if path.name == "last.pt":
            raise KeyboardInterrupt

    resume.write_bytes_atomic = write_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config)
    finally:
        resume.write_bytes_atomic = original
    assert not (config.out_dir / "checkpoint.pt").exists()


def test_last_pt_holds_one_training_state(tiny_run):
    from training.resume import TrainingState

    out_dir, metrics = tiny_run
    record = torch.load(out_dir / "last.pt", weights_only=True)
    state = TrainingState.from_record(record, out_dir / "last.pt")
    assert state.progress.epoch == metrics["epochs"] and state.progress.history == metrics["history"]
    assert state.progress.best_val_accuracy == metrics["val_accuracy"] and state.world_size == 1
    assert list(state.record()) == list(record)
    del record["history"]
    with pytest.raises(UserError, match="incomplete training state"):
        TrainingState.from_record(record, out_dir / "last.pt")


def test_ctrl_c_keeps_the_last_good_checkpoint(tmp_path):
    args = ["--dataset", "mnist-5k", "--model", "simple-cnn", "--name", "ctrlc", "--artifacts-dir", str(tmp_path),
            "--workers", "0", "--batch-size", "32"]
    first = run_cli("training", *args, "--epochs", "1", "--train-limit", "300")
    assert first.returncode == 0, first.stderr
    checkpoint = tmp_path / "ctrlc" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    process = subprocess.Popen([sys.executable, "-m", "training", *args, "--epochs", "50"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in process.stdout:  # wait until an epoch is done, then press Ctrl-C
        if line.startswith("epoch") or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert checkpoint.read_bytes() == before
    assert torch.load(tmp_path / "ctrlc" / "last.pt", weights_only=True)["epoch"] >= 1
    assert not list((tmp_path / "ctrlc").glob(".*.tmp"))


def test_augmentation_keeps_shape_and_only_shifts_or_flips():
    generator = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6)
    cropped = random_crop(images, 2, generator)
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    flipped = random_flip(images, generator)
    for original, out in zip(images, flipped):
        assert torch.equal(out, original) or torch.equal(out, original.flip(2))
    mean, std = torch.tensor([0.5]).view(1, 1, 1, 1), torch.tensor([0.25]).view(1, 1, 1, 1)
    assert torch.allclose(normalize(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8), mean, std),
                          torch.full((1, 1, 2, 2), 2.0))


def test_weight_average_moves_a_decay_step_toward_the_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    average = make_weight_average(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    model[1].num_batches_tracked.fill_(7)
    before = average[0].weight.clone()
    update_weight_average(average, model, decay=0.9, step=1000)
    assert torch.allclose(average[0].weight, before + 0.1)  # 10 % of the way
    assert torch.allclose(average[1].running_mean, torch.full((2,), 0.2))  # batch-norm statistics too
    assert average[1].num_batches_tracked.item() == 7  # counters are copied
    update_weight_average(average, model, decay=0.9, step=0)  # early steps: decay (1 + 0) / (10 + 0)
    assert torch.allclose(average[0].weight, before + 0.1 + 0.9 * 0.9, atol=1e-6)
    assert not any(p.requires_grad for p in average.parameters())


def test_linear_schedule_rises_to_the_peak_then_falls_to_zero():
    config = TrainConfig(schedule="linear", lr=0.2, epochs=2, warmup_epochs=0.5)
    optimizer = make_optimizer(config, torch.nn.Linear(2, 2))
    scheduler = make_scheduler(config, optimizer, steps_per_epoch=10)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.2 / 5) and rates[4] == pytest.approx(0.2) == max(rates)
    assert all(a > b for a, b in zip(rates[4:], rates[5:]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_the_checkpoint_holds_the_weight_average_not_the_last_step(tmp_path):
    train(tiny_config(tmp_path, ema_decay=0.9, train_limit=256))
    shipped = torch.load(tmp_path / "tiny" / "checkpoint.pt", weights_only=True)["state_dict"]
    state = torch.load(tmp_path / "tiny" / "last.pt", weights_only=True)
    assert all(torch.equal(shipped[k], state["average"][k]) for k in shipped)
    assert not all(torch.equal(shipped[k], state["model"][k]) for k in shipped)


@pytest.mark.parametrize("options, message", [
    ({"model": "vgg99"}, "unknown model 'vgg99'"),
    ({"dataset": "imagenet"}, "unknown data set 'imagenet'"),
    ({"epochs": 0}, "--epochs must be positive"),
    ({"epochs": "3"}, "should be int"),
    ({"name": "../escape"}, "--name"),
    ({"val_fraction": 0.7}, "--val-fraction"),
    ({"ema_decay": 1.0}, "--ema-decay"),
    ({"schedule": "step"}, "--schedule 'step'"),
    ({"no_such_option": 1}, "unknown training option"),
])
def test_config_rejects_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        TrainConfig.from_options(options)


@pytest.mark.parametrize("args, fragments", [
    (["--model", "vgg99"], ["unknown model 'vgg99'"]),
    (["--dataset", "imagenet"], ["unknown data set 'imagenet'"]),
    (["--dataset", "mnist", "--no-download"], ["mnist not found", "IDX files"]),
    (["--dataset", "folder:/nonexistent/pics"], ["does not exist"]),
    (["--resume", "/nonexistent/last.pt"], ["does not exist"]),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, args, fragments):
    result = run_cli("training", "--artifacts-dir", str(tmp_path), "--data-dir", str(tmp_path), *args)
    assert_one_line_error(result, *fragments)
    assert not any(tmp_path.rglob("checkpoint.pt"))


def test_resume_rejects_corrupt_and_mismatched_checkpoints(tmp_path, tiny_run):
    out_dir, _ = tiny_run
    corrupt = tmp_path / "last.pt"
    corrupt.write_bytes((out_dir / "last.pt").read_bytes()[:5000])
    common = ["--dataset", "mnist-5k", "--artifacts-dir", str(tmp_path), "--workers", "0"]
    result = run_cli("training", *common, "--model", "simple-cnn", "--resume", str(corrupt))
    assert_one_line_error(result, "corrupt or not a checkpoint")
    result = run_cli("training", *common, "--model", "mlp", "--resume", str(out_dir / "last.pt"))
    assert_one_line_error(result, "--model 'simple-cnn'", "resume with the same options")
    result = run_cli("training", *common, "--model", "simple-cnn", "--resume", str(out_dir / "checkpoint.pt"))
    assert_one_line_error(result, "is not a training-state/1 file")


def test_help_documents_every_option():
    result = run_cli("training", "--help")
    assert result.returncode == 0
    for field in TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in result.stdout, field


def test_the_parser_is_built_from_the_config():
    """Defaults, conversions and the run-defining set all come from TrainConfig's fields."""
    from training.__main__ import parser
    from training.config import RUN_DEFINING

    options = vars(parser().parse_args([]))
    assert options.pop("summary") is False
    assert TrainConfig.from_options(options) == TrainConfig()
    options = vars(parser().parse_args(["--model-args", '{"base_width": 8}', "--freeze", "features.0,,fc",
                                        "--no-nesterov", "--epochs", "3", "--init-from", "w.pt"]))
    options.pop("summary")
    config = TrainConfig.from_options(options)
    assert config.model_args == {"base_width": 8} and config.freeze == ("features.0", "fc")
    assert not config.nesterov and config.epochs == 3 and config.init_from == Path("w.pt")
    assert {"dataset", "model", "lr", "seed", "train_limit"} <= set(RUN_DEFINING)
    assert not {"name", "device", "workers", "resume", "patience", "artifacts_dir"} & set(RUN_DEFINING)


def test_compiled_training_saves_the_bare_model(tmp_path):
    """--compile trains through torch.compile's wrapper; the checkpoint holds the bare model's keys."""
    metrics = train(tiny_config(tmp_path, model="mlp", compile=True, train_limit=256))
    record = torch.load(tmp_path / "tiny" / "checkpoint.pt", weights_only=True)
    assert set(record["state_dict"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert metrics["test_accuracy"] > 0.2


def test_samples_are_test_images_named_by_class(tmp_path):
    from PIL import Image

    from training.samples import write_samples

    paths = write_samples("mnist-5k", 3, tmp_path / "samples", tmp_path)
    assert len(paths) == 3 and all(p.suffix == ".png" for p in paths)
    assert Image.open(paths[0]).size == (28, 28) and paths[0].stem.split("-", 1)[1] in [str(d) for d in range(10)]


def test_the_default_batch_follows_the_training_splits_size():
    assert batch_for(54_000) == 256  # Fashion-MNIST's training split: the default recipe's batch
    assert batch_for(25_600) == 256 and batch_for(25_599) == 128  # 100 steps per epoch at least
    assert batch_for(4_050) == 32 and batch_for(100) == 32  # mnist-5k's split; never below 32


def test_on_a_small_data_set_the_default_batch_takes_enough_steps_to_learn(tmp_path, capsys):
    """mnist-5k's 4,050 training images: the default batch is 32 (126 steps per epoch), said in one
    line; one epoch of the default model reaches about 96 % test accuracy against about 41 % at the
    batch of 256 that a large data set gets (16 steps). An explicit --batch-size wins."""
    common = dict(dataset="mnist-5k", epochs=1, artifacts_dir=tmp_path, workers=0, download=False)
    chosen = train(TrainConfig(name="chosen", **common))
    note = [line for line in capsys.readouterr().out.splitlines() if "--batch-size" in line]
    assert note == ["note: --batch-size 32: the default for 4,050 training images (256, halved while an epoch "
                    "would take fewer than 100 steps, down to 32); give --batch-size to choose"]
    assert json.loads((tmp_path / "chosen" / "train_config.json").read_text())["batch_size"] == 32
    given = train(TrainConfig(name="given", batch_size=256, **common))
    assert "--batch-size" not in capsys.readouterr().out
    assert json.loads((tmp_path / "given" / "train_config.json").read_text())["batch_size"] == 256
    assert chosen["test_accuracy"] > 0.9 and chosen["test_accuracy"] > given["test_accuracy"] + 0.3
