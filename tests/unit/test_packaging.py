"""--epochs 0 (finished weights packaged as a run) and --normalize: the weights stay bit-identical,
the normalization reaches the spec, and every user mistake is one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli, spec_for_tests, tiny_config

from handlers.spec import Spec
from training.errors import UserError
from training.models import build
from training.normalization import IMAGENET_MEAN, IMAGENET_STD, parse, resolve
from training.run import train


def published(arch: str = "cnn", seed: int = 1) -> dict:
    """A state_dict as a script saves it, with trained-looking batch-norm statistics."""
    torch.manual_seed(seed)
    model = build(arch, in_channels=1, height=28, width=28, num_classes=10)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_()
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 2)
    return model.state_dict()


def test_epochs_0_packages_the_weights_bit_identical_and_scores_them(tmp_path):
    weights = published()
    path = tmp_path / "model.pth"
    torch.save(weights, path)
    artifacts = tmp_path / "artifacts"
    metrics = train(tiny_config(artifacts, model="cnn", epochs=0, init_from=path, normalize="0.5/0.5"))

    out_dir = artifacts / "tiny"
    saved = torch.load(out_dir / "checkpoint.pt", weights_only=True)["state_dict"]
    assert saved.keys() == weights.keys()
    assert all(torch.equal(saved[k], weights[k]) for k in weights)  # no step, no average, no statistics update
    assert metrics["epochs"] == 0 and metrics["history"] == [] and 0 <= metrics["test_accuracy"] <= 1
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["init_from"]["loaded"] == len(weights)
    spec = Spec.read(out_dir / "spec.json")
    assert spec.mean == (0.5,) and spec.std == (0.5,) and spec.normalization == "explicit"
    assert spec.init_from["kind"] == "state_dict"
    for name in ("metrics.json", "train_config.json", "curves.png", "confusion_matrix.png", "report.html"):
        assert (out_dir / name).is_file(), name
    assert not (out_dir / "last.pt").exists()  # nothing to resume
    assert json.loads((out_dir / "train_config.json").read_text())["epochs"] == 0


def test_a_missing_batch_norm_counter_is_let_through(tmp_path):
    weights = {k: v for k, v in published().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(weights, path)
    train(tiny_config(tmp_path / "artifacts", model="cnn", epochs=0, init_from=path, normalize="none"))
    saved = torch.load(tmp_path / "artifacts" / "tiny" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], weights[k]) for k in weights)


def test_normalize_none_trains_on_pixels_over_255_and_the_spec_says_so(tmp_path):
    train(tiny_config(tmp_path / "artifacts", normalize="none"))
    spec = Spec.read(tmp_path / "artifacts" / "tiny" / "spec.json")
    assert spec.mean == (0.0,) and spec.std == (1.0,) and spec.normalization == "none"


def test_the_default_is_the_training_splits_statistics():
    assert tiny_config(Path("unused")).normalize == "data"
    assert resolve("data", 1, lambda: ([0.13], [0.31]), "mnist-5k") == ([0.13], [0.31])


@pytest.mark.parametrize("text, channels, expected", [
    ("none", 3, ([0.0] * 3, [1.0] * 3)),
    ("imagenet", 3, (list(IMAGENET_MEAN), list(IMAGENET_STD))),
    ("0.5/0.5", 1, ([0.5], [0.5])),
    ("0.485,0.456,0.406/0.229,0.224,0.225", 3, (list(IMAGENET_MEAN), list(IMAGENET_STD))),
])
def test_every_form_of_normalize_gives_per_channel_values(text, channels, expected):
    assert resolve(text, channels, lambda: pytest.fail("no statistics needed"), "test") == expected


def test_a_spec_written_before_the_normalization_field_reads_as_data():
    record = spec_for_tests(["a", "b"]).to_dict()
    del record["normalization"]
    assert Spec.from_dict(record).normalization == "data"


@pytest.mark.parametrize("text, message", [
    ("bright", "--normalize 'bright': give data, none, imagenet or MEAN/STD"),
    ("0.5/0", "every std must be positive"),
    ("0.5/-0.2", "every std must be positive"),
    ("0.5,0.4/0.2", "2 mean value(s) but 1 std value(s)"),
    ("a/b", "must be numbers separated by commas"),
    ("nan/0.5", "finite"),
])
def test_unreadable_normalize_text_is_refused_when_the_config_is_built(text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text)


def state_dict_file(tmp_path, change) -> str:
    weights = published("simple-cnn")
    change(weights)
    path = tmp_path / "weights.pth"
    torch.save(weights, path)
    return str(path)


MISTAKES = {  # name -> (arguments given a temp folder, fragments of the one line)
    "--epochs 0 without --init-from": (lambda t: ["--epochs", "0", "--normalize", "none"],
                                       ["--epochs 0 packages finished weights", "--init-from"]),
    "--epochs 0 without --normalize": (lambda t: ["--epochs", "0", "--init-from", state_dict_file(t, lambda w: None)],
                                       ["--epochs 0 needs --normalize", "data, none, imagenet or MEAN/STD"]),
    "negative --epochs": (lambda t: ["--epochs", "-1"], ["--epochs must be positive, or 0"]),
    "--epochs 0 with --freeze": (lambda t: ["--epochs", "0", "--normalize", "none", "--freeze", "conv1",
                                            "--init-from", state_dict_file(t, lambda w: None)], ["trains nothing"]),
    "a missing tensor": (lambda t: ["--epochs", "0", "--normalize", "none",
                                    "--init-from", state_dict_file(t, lambda w: w.pop("fc2.bias"))],
                         ["does not fit simple-cnn completely", "missing 1: fc2.bias"]),
    "a mis-shaped tensor": (lambda t: ["--epochs", "0", "--normalize", "none", "--init-from",
                                       state_dict_file(t, lambda w: w.update({"fc2.weight": torch.zeros(5, 128)}))],
                            ["mis-shaped 1: fc2.weight (file [5, 128], model [10, 128])"]),
    "a tensor the model lacks": (lambda t: ["--epochs", "0", "--normalize", "none", "--init-from",
                                            state_dict_file(t, lambda w: w.update({"fc3.weight": torch.zeros(3)}))],
                                 ["not in the model 1: fc3.weight"]),
    "--normalize with the wrong number of channels": (
        lambda t: ["--normalize", "0.5,0.5,0.5/0.2,0.2,0.2"], ["3 value(s) per half, but mnist-5k has 1 channel(s)"]),
    "--normalize imagenet on grey images": (lambda t: ["--normalize", "imagenet"],
                                            ["imagenet is the mean/std of RGB images; mnist-5k has 1 channel(s)"]),
    "--normalize with a zero std": (lambda t: ["--normalize", "0.5/0"], ["every std must be positive"]),
    "--normalize garbage": (lambda t: ["--normalize", "ToTensor()"], ["--normalize 'ToTensor()': give data, none"]),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_every_packaging_mistake_is_one_line_and_writes_nothing(tmp_path, mistake):
    arguments, fragments = MISTAKES[mistake]
    artifacts = tmp_path / "artifacts"
    result = run_cli("training", "--dataset", "mnist-5k", "--model", "simple-cnn", "--artifacts-dir", str(artifacts),
                     "--workers", "0", "--train-limit", "64", *arguments(tmp_path))
    assert_one_line_error(result, *fragments)
    assert not artifacts.exists()
