"""export/: TorchScript and ONNX files, the parity gate, archives, and every way export refuses."""

from __future__ import annotations

import ast
import json
import shutil
import zipfile

import onnx
import pytest
import torch
import yaml
from helpers import ROOT, assert_one_line_error, run_cli

from export import archive, convert
from export.run import ExportConfig, export
from training import data as datasets
from training.errors import UserError


def test_parity_report_covers_every_format_and_batch_size(exported_tiny):
    out_dir, _ = exported_tiny
    report = json.loads((out_dir / "parity.json").read_text())
    assert report["passed"] and set(report["formats"]) == {"torchscript", "onnxruntime"}
    assert report["tolerances"] == {"logit_abs": 1e-4, "logit_rel": 1e-3, "probability": 1e-5, "accuracy_points": 0.01}
    for result in report["formats"].values():
        assert set(result["batches"]) == {"1", "2", "7", "16", "64", "edge", "test split"}
        assert result["batches"]["test split"]["images"] == report["test_images"] == 500
        for row in result["batches"].values():
            assert row["passed"] and row["top1_agreement"] == 1.0 and row["max_probability_diff"] <= 1e-5
        assert result["accuracy_diff_points"] <= 0.01
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert report["eager_test_accuracy"] == pytest.approx(metrics["test_accuracy"])  # the same test split


def test_onnx_file_is_single_self_describing_and_valid(exported_tiny):
    out_dir, _ = exported_tiny
    assert not list(out_dir.glob("*.data")) and not list(out_dir.glob(".pending-*"))
    model = onnx.load(out_dir / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 18
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch
    metadata = {p.key: p.value for p in model.metadata_props}
    spec = json.loads((out_dir / "spec.json").read_text())
    assert json.loads(metadata["spec"]) == spec
    assert json.loads(metadata["class_names"]) == spec["class_names"]
    assert json.loads(metadata["mean"]) == spec["mean"] and json.loads(metadata["input_size"]) == [1, 28, 28]


def test_archives_hold_model_handlers_spec_and_config(exported_tiny):
    _, store = exported_tiny
    for name, model_file, backend in (("tiny", "model.onnx", "onnxruntime"),
                                      ("tiny-torchscript", "model.torchscript.pt", "torchscript")):
        with zipfile.ZipFile(store / f"{name}.v1.mar") as mar:
            names = set(mar.namelist())
            assert {model_file, "spec.json", "torchserve_handler.py", "model-config.yaml", "MAR-INF/MANIFEST.json",
                    "handlers/__init__.py", "handlers/image.py", "handlers/oip.py", "handlers/pipeline.py"} <= names
            assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            config = yaml.safe_load(mar.read("model-config.yaml"))
        assert manifest["model"]["serializedFile"] == model_file and manifest["model"]["modelName"] == name
        assert config["handler"]["backend"] == backend
        assert {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"} <= set(config)


@pytest.fixture
def copied(tiny_run, tmp_path):
    """A private copy of the tiny run's artifacts, free to be broken."""
    out_dir, _ = tiny_run
    shutil.copytree(out_dir, tmp_path / "artifacts" / "tiny", ignore=shutil.ignore_patterns("model.*", "parity.json"))
    return tmp_path / "artifacts", tmp_path / "model_store"


def test_a_broken_export_fails_the_gate_and_leaves_the_old_archive(copied, monkeypatch):
    artifacts, store = copied
    export(ExportConfig("tiny", artifacts, store))
    good_archive = (store / "tiny-torchscript.v1.mar").read_bytes()
    original = convert.to_torchscript

    def perturbed(model, spec, path, examples):  # a TorchScript file that differs from eager
        broken = type(model)(**spec.arch_args)
        broken.load_state_dict({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                                for k, v in model.state_dict().items()})
        original(broken.eval(), spec, path, examples)

    monkeypatch.setattr(convert, "to_torchscript", perturbed)
    (store / "tiny-torchscript.v1.mar").write_bytes(good_archive)
    stamp = (store / "tiny.v1.mar").stat().st_mtime_ns
    with pytest.raises(UserError, match="parity gate failed"):
        export(ExportConfig("tiny", artifacts, store))
    report = json.loads((artifacts / "tiny" / "parity.json").read_text())
    assert not report["passed"] and not report["formats"]["torchscript"]["passed"]
    assert report["formats"]["onnxruntime"]["passed"]
    assert (store / "tiny-torchscript.v1.mar").read_bytes() == good_archive
    assert (store / "tiny.v1.mar").stat().st_mtime_ns == stamp
    assert not list((artifacts / "tiny").glob(".pending-*")) and not list(store.glob(".build-*"))


def edit_spec(artifacts, change):
    path = artifacts / "tiny" / "spec.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


@pytest.mark.parametrize("breakage, message", [
    ("no checkpoint", "run `make train` first"),
    ("tampered checkpoint", "does not match"),
    ("unknown architecture", "unknown model 'vgg99'"),
    ("shape mismatch", "do not fit the spec's simple-cnn"),
    ("model store is a file", "cannot write archives"),
    ("archiver fails", "torch-model-archiver failed"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(copied, monkeypatch, breakage, message):
    artifacts, store = copied
    checkpoint = artifacts / "tiny" / "checkpoint.pt"
    if breakage == "no checkpoint":
        checkpoint.unlink()
    elif breakage == "tampered checkpoint":
        checkpoint.write_bytes(checkpoint.read_bytes()[:-10] + b"0123456789")
    elif breakage == "unknown architecture":
        edit_spec(artifacts, lambda spec: spec.update(arch="vgg99"))
    elif breakage == "shape mismatch":
        edit_spec(artifacts, lambda spec: spec["arch_args"].update(hidden=64))
    elif breakage == "model store is a file":
        store.write_text("not a folder")
    elif breakage == "archiver fails":
        failing = artifacts / "fake-archiver"
        failing.write_text("#!/bin/sh\necho 'disk quota exceeded' >&2\nexit 3\n")
        failing.chmod(0o755)
        monkeypatch.setattr(archive, "ARCHIVER", str(failing))
    with pytest.raises(UserError, match=message):
        export(ExportConfig("tiny", artifacts, store))
    if breakage == "model store is a file":
        assert store.read_text() == "not a folder"
    else:
        assert not store.exists() or not list(store.glob("*.mar"))
    if breakage != "archiver fails":  # the gate passed there: the checked model files may stay
        assert not list((artifacts / "tiny").glob("model.*"))
    assert not list((artifacts / "tiny").glob(".pending-*"))


def test_cli_without_a_trained_model_says_to_train(tmp_path):
    result = run_cli("export", "--name", "nothing", "--artifacts-dir", str(tmp_path), "--model-store",
                     str(tmp_path / "store"))
    assert_one_line_error(result, "run `make train` first")


def test_export_loads_the_run_data_once(copied, monkeypatch):
    """The parity gate's test split and the INT8 calibration's training images come from one load."""
    artifacts, store = copied
    loads = []
    original = datasets.load

    def counted(*args, **kwargs):
        loads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets, "load", counted)
    report = export(ExportConfig("tiny", artifacts, store))
    assert report["passed"] and "int8" in report
    assert loads == ["mnist-5k"]


def test_export_modules_import_each_other_in_one_direction():
    """No circle among export/'s modules, counting imports inside functions too."""
    modules = {path.stem: path for path in (ROOT / "export").glob("*.py") if path.stem != "__init__"}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "export":
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("export."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("export."))
        imports[name] = found & set(modules)

    def reaches(start, target, seen=()):
        return any(other == target or (other not in seen and reaches(other, target, (*seen, other)))
                   for other in imports[start])

    assert imports["run"] >= {"data", "quantize"} and "run" not in imports["quantize"]
    assert not [name for name in modules if reaches(name, name)]
