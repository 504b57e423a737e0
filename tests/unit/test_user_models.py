"""Users' own models end to end (--model file.py:Name and package.module:Name, --model-args),
fine-tuning (--init-from, --freeze), --summary, and every user mistake on the way: real training
runs on the real MNIST subset, exported behind the parity gate and served in-process."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import yaml
from helpers import assert_one_line_error, run_cli, tiny_config
from PIL import Image
from served import png

from export.checkpoint import load_trained
from export.data import load_run_data
from export.run import ExportConfig, export
from handlers.archive import HandlerSettings
from handlers.contract import predictions_json
from handlers.pipeline import load_classifier
from training import data as datasets
from training.__main__ import main as training_main
from training.errors import UserError
from training.finetune import freeze
from training.loop import normalize, per_channel
from training.run import train

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels, num_classes, hidden=32, scale=(1.0, 2.0)):
        super().__init__()
        if hidden < 1:
            raise ValueError("hidden must be positive")
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.head(torch.relu(self.fc(x.flatten(1))))
"""


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def net_file(tmp_path, extra: str = ""):
    return write(tmp_path / "user_code" / "custom_net.py", NET + textwrap.dedent(extra))


def eager_probabilities(out_dir, images: torch.Tensor) -> np.ndarray:
    model, spec = load_trained(out_dir)
    with torch.no_grad():
        logits = model(normalize(images, per_channel(spec.mean), per_channel(spec.std)))
    return torch.softmax(logits.double(), 1).numpy()


def serve_in_process(archive, tmp_path):
    """The archive unpacked and loaded as a TorchServe worker would: no user code, only the .mar."""
    unpacked = tmp_path / archive.stem
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(unpacked)
        names = mar.namelist()
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    config = yaml.safe_load((unpacked / "model-config.yaml").read_text())
    settings = HandlerSettings.from_model_config(config, manifest["model"]["serializedFile"])
    return load_classifier(unpacked, settings, workers=1, gpu_id=None), names


def test_a_model_from_the_users_file_trains_exports_and_serves_after_the_file_is_gone(tmp_path):
    source = net_file(tmp_path)
    artifacts, store = tmp_path / "artifacts", tmp_path / "model_store"
    train(tiny_config(artifacts, model=f"{source}:Net", model_args={"hidden": 24}))
    out_dir = artifacts / "tiny"
    spec = json.loads((out_dir / "spec.json").read_text())
    assert spec["arch"] == f"{source}:Net"
    assert spec["arch_args"] == {"in_channels": 1, "num_classes": 10, "hidden": 24, "scale": [1.0, 2.0]}
    text = source.read_text()
    assert spec["model"] == {"origin": "file", "reference": f"{source}:Net", "name": "Net",
                             "source_sha256": hashlib.sha256(text.encode()).hexdigest(),
                             "source_file": "model_source.py"}
    assert (out_dir / "model_source.py").read_text() == text
    assert torch.load(out_dir / "checkpoint.pt", weights_only=True)["model_source"] == text

    shutil.rmtree(source.parent)  # moved or deleted: the checkpoint still means the same network
    export(ExportConfig("tiny", artifacts, store))
    images = load_run_data(out_dir)[0].test.images[:8]
    expected = eager_probabilities(out_dir, images)
    for archive in (store / "tiny.v1.mar", store / "tiny-torchscript.v1.mar"):
        classifier, names = serve_in_process(archive, tmp_path)
        assert not any("custom_net" in n or "model_source" in n for n in names)  # serving needs no user code
        answers = predictions_json([{"body": png(image[0].numpy())} for image in images], classifier)
        served = np.array([list(json.loads(answer)["probabilities"].values()) for answer in answers])
        assert np.abs(served - expected).max() <= 1e-5


def test_a_function_from_a_package_module_and_its_changed_source_refused_at_export(tmp_path, monkeypatch):
    package = tmp_path / "site" / "usernets"
    write(package / "__init__.py", "")
    write(package / "blocks.py", "from torch import nn\n\n\ndef block(c_in, c_out):\n"
                                 "    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())\n")
    nets = write(package / "nets.py", """
        from torch import nn

        from .blocks import block


        def small_net(in_channels, num_classes, height, width, channels=6):
            return nn.Sequential(block(in_channels, channels), nn.Flatten(),
                                 nn.Linear(channels * height * width, num_classes))
        """)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    artifacts, store = tmp_path / "artifacts", tmp_path / "model_store"
    train(tiny_config(artifacts, model="usernets.nets:small_net"))
    spec = json.loads((artifacts / "tiny" / "spec.json").read_text())
    assert spec["model"]["origin"] == "module" and spec["model"]["module"] == "usernets.nets"
    assert spec["arch_args"] == {"in_channels": 1, "num_classes": 10, "height": 28, "width": 28, "channels": 6}
    export(ExportConfig("tiny", artifacts, store))
    archives = {p.name: p.read_bytes() for p in store.glob("*.mar")}

    nets.write_text(nets.read_text().replace("channels=6", "channels=6  # edited later"))
    with pytest.raises(UserError, match="usernets.nets's source changed since training"):
        export(ExportConfig("tiny", artifacts, store))
    assert {p.name: p.read_bytes() for p in store.glob("*.mar")} == archives


def bad_model(tmp_path, body: str):
    return write(tmp_path / "user_code" / "bad_net.py", "import torch\nfrom torch import nn\n" + body)


def state_dict_file(tmp_path, state_dict):
    path = tmp_path / "weights.pth"
    torch.save(state_dict, path)
    return path


def bad(body: str, name: str = "Net"):
    """Arguments naming a model file with this body, written into the test's temp folder."""
    return lambda t: ["--model", f"{bad_model(t, body)}:{name}"]


MISTAKES = {  # name -> (arguments given a temp folder, what the one line must say)
    "unknown file": (lambda t: ["--model", f"{t}/nowhere/net.py:Net"], "not found"),
    "missing class": (lambda t: ["--model", f"{net_file(t)}:Nope"], "has no 'Nope' (it defines Net)"),
    "syntax error": (bad("class Net(:\n    pass\n"), ":3: syntax error"),
    "failing import": (bad("import no_such_module_anywhere\n"), "failed to load (ModuleNotFoundError"),
    "unknown module": (lambda t: ["--model", "no_such_package.nets:Net"], "cannot import no_such_package.nets"),
    "not a module class": (bad("class Net:\n    pass\n"), "not an nn.Module"),
    "function returning no module": (bad("def net(num_classes):\n    return 42\n", "net"),
                                     "returned a int, not an nn.Module"),
    "argument it does not take": (lambda t: ["--model", f"{net_file(t)}:Net", "--model-args", '{"depth": 3}'],
                                  "does not take these arguments"),
    "constructor rejects a value": (lambda t: ["--model", f"{net_file(t)}:Net", "--model-args", '{"hidden": 0}'],
                                    "ValueError: hidden must be positive"),
    "conflict with the data": (lambda t: ["--model", f"{net_file(t)}:Net", "--model-args", '{"num_classes": 5}'],
                               "conflicts with the data set (num_classes is 10)"),
    "invalid JSON": (lambda t: ["--model", f"{net_file(t)}:Net", "--model-args", "{hidden: 3}"], "not valid JSON"),
    "JSON that is no object": (lambda t: ["--model-args", "[3]"], "must be a JSON object"),
    "forward fails on the data's shape": (bad("def net(num_classes):\n    return nn.Linear(3 * 32 * 32, num_classes)\n",
                                              "net"), "failed on a batch of shape (2, 1, 28, 28)"),
    "wrong number of outputs": (bad("def net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))\n", "net"),
                                "must return logits of shape (N, 10)"),
    "no matching weights": (lambda t: ["--model", "simple-cnn", "--init-from",
                                       str(state_dict_file(t, {"encoder.weight": torch.zeros(3)}))], "no tensor of"),
    "plain state_dict without --model": (
        lambda t: ["--init-from", str(state_dict_file(t, {"fc.weight": torch.zeros(3)}))],
        "does not say which model it fits"),
    "weights that are no state_dict": (lambda t: ["--model", "mlp", "--init-from", str(state_dict_file(t, [1, 2]))],
                                       "holds no tensors by name"),
    "missing weights file": (lambda t: ["--model", "mlp", "--init-from", f"{t}/nothing.pth"], "does not exist"),
    "freeze prefix matching nothing": (lambda t: ["--model", "simple-cnn", "--freeze", "encoder."],
                                       "matches no parameter (names start with conv1, conv2, fc1, fc2)"),
    "freeze everything": (lambda t: ["--model", "mlp", "--freeze", "fc1,fc2"], "nothing is left to train"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_every_user_mistake_is_one_line_before_anything_is_written(tmp_path, capsys, mistake):
    arguments, message = MISTAKES[mistake]
    artifacts = tmp_path / "artifacts"
    code = training_main(["--dataset", "mnist-5k", "--name", "mine", "--artifacts-dir", str(artifacts),
                          "--workers", "0", "--epochs", "1", "--train-limit", "64", *arguments(tmp_path)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not artifacts.exists()


def test_the_cli_prints_no_traceback_for_a_broken_model_file(tmp_path):
    model = bad_model(tmp_path, "class Net(nn.Module):\n    def __init__(self:\n        pass\n")
    result = run_cli("training", "--dataset", "mnist-5k", "--model", f"{model}:Net", "--artifacts-dir",
                     str(tmp_path / "artifacts"), "--workers", "0")
    assert_one_line_error(result, "bad_net.py:4: syntax error")
    assert not (tmp_path / "artifacts").exists()


DIVERGING = {  # forward passes whose traced or exported form is not the eager model
    "branch on the input's values": ("""
        if x.mean() > 0:
            return logits
        return -logits
        """, "`if x.mean() > 0:`: Converting a tensor to a Python boolean might cause the trace to be incorrect"),
    "branch on the batch size": ("""
        if x.shape[0] == 1:
            return 2 * logits
        return logits
        """, "traced graph differs between batches of 2, 1, 7 images"),
    "difference hidden from tracing, only on bright images": ("""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            logits = logits + 5.0 * (x.mean((1, 2, 3)) > 1.5).float()[:, None] * torch.arange(logits.shape[1])
        return logits
        """, "parity gate failed"),
    "operator without an ONNX mapping": ("""
        values = logits.detach().float()  # zeta has neither a derivative nor a bf16 kernel: kept out of training
        return logits + torch.special.zeta(values.abs() + 2.0, torch.full_like(values, 2.0))
        """, "no ONNX mapping"),
}


@pytest.mark.parametrize("case", sorted(DIVERGING))
def test_a_model_whose_exports_would_diverge_fails_export_and_leaves_archives_untouched(tmp_path, case):
    body, message = DIVERGING[case]
    source = write(tmp_path / "user_code" / "sneaky.py", """
        import torch
        from torch import nn


        class Sneaky(nn.Module):
            def __init__(self, in_channels, num_classes, height, width):
                super().__init__()
                self.fc = nn.Linear(in_channels * height * width, num_classes)

            def forward(self, x):
                logits = self.fc(x.flatten(1))
        """ + textwrap.indent(textwrap.dedent(body), " " * 16))
    artifacts, store = tmp_path / "artifacts", tmp_path / "model_store"
    train(tiny_config(artifacts, model=f"{source}:Sneaky"))
    store.mkdir()
    earlier = {"tiny.v1.mar": b"an archive that serves today", "tiny-torchscript.v1.mar": b"and its TorchScript twin"}
    for name, content in earlier.items():
        (store / name).write_bytes(content)
    with pytest.raises(UserError, match=re.escape(message)) as failure:
        export(ExportConfig("tiny", artifacts, store))
    assert "\n" not in str(failure.value) and ("Sneaky" in str(failure.value) or "parity" in str(failure.value))
    assert {p.name: p.read_bytes() for p in store.iterdir()} == earlier
    assert not list((artifacts / "tiny").glob("model.*")) and not list((artifacts / "tiny").glob(".pending-*"))
    if "hidden" in case:  # the first 64 test images agree; the white edge image shows the difference
        report = json.loads((artifacts / "tiny" / "parity.json").read_text())
        for result in report["formats"].values():
            assert result["batches"]["64"]["passed"] and not result["batches"]["edge"]["passed"]


def digit_folder(root, classes=(0, 1, 2, 3), per_class=40):
    """Real MNIST digits of a few classes as PNG files: a data set with another class count."""
    mnist = datasets.load("mnist-5k", None, 0.1, 0.1, 0)
    for digit in classes:
        chosen = mnist.train.images[mnist.train.labels == digit][:per_class]
        (root / str(digit)).mkdir(parents=True)
        for i, image in enumerate(chosen):
            Image.fromarray(image[0].numpy()).save(root / str(digit) / f"{i}.png")
    return f"folder:{root}"


def test_init_from_a_kit_checkpoint_takes_its_model_and_freeze_keeps_layers_bit_identical(tmp_path, capsys):
    artifacts = tmp_path / "artifacts"
    train(tiny_config(artifacts, name="parent", model="cnn", model_args={"widths": [8, 16, 32]}))
    parent_path = artifacts / "parent" / "checkpoint.pt"
    parent = torch.load(parent_path, weights_only=True)["state_dict"]
    capsys.readouterr()

    frozen = ("features.0", "features.1")  # the first convolution and its batch norm
    metrics = train(tiny_config(artifacts, name="child", dataset=digit_folder(tmp_path / "digits"), model=None,
                                init_from=parent_path, freeze=frozen, epochs=2))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("init from"))
    assert "loaded 18/20 tensors" in line
    assert "skipped 2: classifier.2.weight (shape [10, 288], the model's [4, 288]), classifier.2.bias" in line

    spec = json.loads((artifacts / "child" / "spec.json").read_text())
    assert spec["arch"] == "cnn" and spec["arch_args"]["widths"] == [8, 16, 32] and spec["num_classes"] == 4
    sha = hashlib.sha256(parent_path.read_bytes()).hexdigest()
    assert spec["init_from"] == {"path": str(parent_path), "sha256": sha, "kind": "kit checkpoint"}
    assert spec["frozen"] == list(frozen) == metrics["frozen"]
    assert metrics["init_from"]["sha256"] == sha and metrics["init_from"]["loaded"] == 18
    assert metrics["trainable_parameters"] == metrics["parameters"] - 8 * 9 - 2 * 8

    child = torch.load(artifacts / "child" / "checkpoint.pt", weights_only=True)["state_dict"]
    for key in ("features.0.weight", "features.1.weight", "features.1.bias", "features.1.running_mean",
                "features.1.running_var", "features.1.num_batches_tracked"):
        assert torch.equal(child[key], parent[key]), key  # frozen: weights and batch-norm statistics
    for key in ("features.4.weight", "features.5.running_mean"):
        assert not torch.equal(child[key], parent[key]), key  # loaded, then trained


def test_init_from_a_plain_state_dict_as_published_with_a_changed_head(tmp_path, capsys):
    torch.manual_seed(1)
    from training.models import build

    published = build("simple-cnn", in_channels=1, height=28, width=28, num_classes=10).state_dict()
    path = state_dict_file(tmp_path, {"state_dict": {f"module.{k}": v for k, v in published.items()}})
    artifacts = tmp_path / "artifacts"
    train(tiny_config(artifacts, dataset=digit_folder(tmp_path / "digits", classes=(5, 6, 7)), model="simple-cnn",
                      init_from=path, freeze=("conv1",)))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("init from"))
    assert "loaded 6/8 tensors" in line and "fc2.weight (shape [10, 128], the model's [3, 128])" in line
    trained = torch.load(artifacts / "tiny" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert torch.equal(trained["conv1.weight"], published["conv1.weight"])
    assert not torch.equal(trained["conv2.weight"], published["conv2.weight"])
    assert json.loads((artifacts / "tiny" / "spec.json").read_text())["init_from"]["kind"] == "state_dict"


def test_summary_shows_layers_shapes_and_counts_and_writes_nothing(tmp_path, capsys):
    artifacts = tmp_path / "artifacts"
    code = training_main(["--dataset", "mnist-5k", "--model", f"{net_file(tmp_path)}:Net", "--freeze", "conv,bn",
                          "--summary", "--artifacts-dir", str(artifacts)])
    out = capsys.readouterr().out
    assert code == 0 and not artifacts.exists()
    assert "Conv2d (conv)" in out and "[1, 8, 28, 28]" in out and "[1, 10]" in out
    total = 8 * 9 + 8 + 2 * 8 + 128 * 32 + 32 + 32 * 10 + 10
    assert f"Total params: {total:,}" in out and f"Trainable params: {total - 8 * 9 - 8 - 2 * 8:,}" in out
    assert "parameter names start with (for --freeze): conv (80), bn (16), fc (4,128), head (330)" in out


def test_resume_refuses_a_model_file_edited_since_the_interrupted_run(tmp_path):
    source = net_file(tmp_path)
    artifacts = tmp_path / "artifacts"
    train(tiny_config(artifacts, model=f"{source}:Net"))
    source.write_text(source.read_text().replace("hidden=32", "hidden=33"))
    with pytest.raises(UserError, match="changed since"):
        train(tiny_config(artifacts, model=f"{source}:Net", resume=artifacts / "tiny" / "last.pt"))


def test_init_from_a_user_models_checkpoint_rebuilds_it_from_the_source_the_checkpoint_carries(tmp_path):
    source = net_file(tmp_path)
    artifacts = tmp_path / "artifacts"
    train(tiny_config(artifacts, name="parent", model=f"{source}:Net", model_args={"hidden": 20}))
    source.unlink()  # the child needs only the parent's checkpoint
    train(tiny_config(artifacts, name="child", model=None, init_from=artifacts / "parent" / "checkpoint.pt"))
    parent, child = (json.loads((artifacts / name / "spec.json").read_text()) for name in ("parent", "child"))
    assert child["arch"] == parent["arch"] and child["model"] == parent["model"]
    assert child["arch_args"]["hidden"] == 20
    copies = [(artifacts / name / "model_source.py").read_text() for name in ("parent", "child")]
    assert copies[0] == copies[1]


def test_a_freeze_prefix_ends_at_a_dot():
    """features.1 is the second layer, not also the eleventh (features.10): prefixes match at dots."""
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(12)])
    assert freeze(model, ("1",)) == ["1.weight", "1.bias"]
    assert model[10].weight.requires_grad and model[11].bias.requires_grad
    assert freeze(model, ("1.weight",)) == ["1.weight"]
    with pytest.raises(UserError, match="matches no parameter"):
        freeze(model, ("1.w",))
