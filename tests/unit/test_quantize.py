"""export/quantize.py: the INT8 model, its gate, its archive, and the export going on when it fails."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import onnx
import pytest
import torch
import yaml

from export import quantize
from export import run as export_run
from export.archive import ServingConfig
from export.checkpoint import load_trained
from export.data import load_run_data
from export.run import ExportConfig, export
from handlers.archive import HandlerSettings
from handlers.pipeline import load_classifier
from handlers.spec import Spec
from training.loop import normalize, per_channel

QUICK = dict(rounds=1, round_seconds=0.05)  # the gate's timing, short: these tests assert behaviour, not speed
PASS = dict(accuracy_points=100, min_speedup=0)  # a gate any INT8 model passes (the tiny model is too small to judge)


@pytest.fixture
def exported_copy(tiny_run, tmp_path):
    """A private export of the tiny run (artifacts, model store), free to be changed."""
    out_dir, _ = tiny_run
    artifacts = tmp_path / "artifacts"
    shutil.copytree(out_dir, artifacts / "tiny", ignore=shutil.ignore_patterns("model.*", "parity.json"))
    export(ExportConfig("tiny", artifacts, tmp_path / "model_store"))
    return artifacts / "tiny", tmp_path / "model_store"


def run_int8(out_dir, store, **gate):
    spec = Spec.read(out_dir / "spec.json")
    run_data = load_run_data(out_dir)
    *_, test_batches = export_run.test_images(run_data, spec)
    report = json.loads((out_dir / "parity.json").read_text())
    archive = quantize.export_int8("tiny", out_dir, spec, run_data, test_batches, report, store, ServingConfig(),
                                   quantize.Int8Gate(**{**QUICK, **gate}))
    return archive, json.loads((out_dir / "parity.json").read_text())["int8"]


def test_export_reports_the_int8_gate_and_archives_only_on_a_pass(exported_tiny):
    out_dir, store = exported_tiny
    result = json.loads((out_dir / "parity.json").read_text())["int8"]
    assert result["gate"]["accuracy_points"] == 0.5 and result["gate"]["min_speedup"] == 1.5
    assert result["batch_size"] == ServingConfig().batch_size
    assert result["passed"] == (result["accuracy_diff_points"] <= 0.5 and result["speedup"] >= 1.5)
    assert (store / "tiny-int8.v1.mar").is_file() == result["passed"] == (out_dir / "model.int8.onnx").is_file()
    assert bool(result["why_not"]) != result["passed"]


def test_int8_archive_serves_the_quantized_model_within_the_gate(exported_copy, tmp_path, capsys):
    out_dir, store = exported_copy
    archive, result = run_int8(out_dir, store, **PASS)
    assert result["passed"] and archive == store / "tiny-int8.v1.mar"
    assert "int8 gate" in capsys.readouterr().out
    model = onnx.load(out_dir / "model.int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in model.graph.node}
    spec = json.loads((out_dir / "spec.json").read_text())
    assert json.loads({p.key: p.value for p in model.metadata_props}["spec"]) == spec  # still self-describing
    with zipfile.ZipFile(archive) as mar:
        assert json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"] == "model.int8.onnx"
        config = yaml.safe_load(mar.read("model-config.yaml"))
        mar.extractall(tmp_path / "unpacked")
    assert config["handler"]["backend"] == "onnxruntime"
    # What a worker does with the archive: the quantized model, scoring what the gate measured.
    classifier = load_classifier(tmp_path / "unpacked", HandlerSettings.from_model_config(config, "model.int8.onnx"), 2,
                                 None)
    test = load_run_data(out_dir)[0].test
    inputs = normalize(test.images, per_channel(spec["mean"]), per_channel(spec["std"])).numpy()
    int8_accuracy = float((classifier.infer(inputs).argmax(1) == test.labels.numpy()).mean())
    assert int8_accuracy == pytest.approx(result["test_accuracy"])
    assert result["accuracy_diff_points"] == pytest.approx(abs(int8_accuracy - result["fp32_test_accuracy"]) * 100)
    model_fp32, _ = load_trained(out_dir)
    with torch.no_grad():
        eager = model_fp32(torch.from_numpy(inputs[:200])).argmax(1).numpy()
    assert (classifier.infer(inputs[:200]).argmax(1) == eager).mean() >= 0.9  # the same model, quantized


def test_a_failed_gate_keeps_the_other_archives_and_removes_an_older_int8_one(exported_copy, capsys):
    out_dir, store = exported_copy
    run_int8(out_dir, store, **PASS)
    assert (store / "tiny-int8.v1.mar").is_file()
    fp32_archives = {path.name: path.read_bytes() for path in store.glob("*.mar") if "int8" not in path.name}
    capsys.readouterr()
    archive, result = run_int8(out_dir, store, accuracy_points=100, min_speedup=1000)
    assert archive is None and not result["passed"] and "at least 1000" in result["why_not"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("int8: no archive")]
    assert len(lines) == 1 and "removed the earlier one" in lines[0] and "1000" in lines[0]
    assert not (store / "tiny-int8.v1.mar").exists() and not (out_dir / "model.int8.onnx").exists()
    assert {path.name: path.read_bytes() for path in store.glob("*.mar")} == fp32_archives
    assert not list(out_dir.glob(".pending-*")) and not list(out_dir.glob(".quantize-*"))


def test_a_model_the_quantizer_cannot_take_still_exports(exported_copy, monkeypatch, capsys):
    out_dir, store = exported_copy

    def refuses(*_):
        raise NotImplementedError("operator Foo is not supported\nmore detail")

    monkeypatch.setattr(quantize, "quantize", refuses)
    archive, result = run_int8(out_dir, store)
    assert archive is None and result["why_not"] == "quantization failed (NotImplementedError: operator Foo is " \
                                                    "not supported"
    assert "int8: no archive: quantization failed" in capsys.readouterr().out
    assert {path.name for path in store.glob("*.mar")} == {"tiny.v1.mar", "tiny-torchscript.v1.mar"}


def test_calibration_uses_training_images_never_test_images(tiny_run):
    out_dir, _ = tiny_run
    spec = Spec.read(out_dir / "spec.json")
    run_data = load_run_data(out_dir)
    data = run_data.data
    calibration = np.concatenate(quantize.calibration_batches(run_data, spec, 100))
    assert len(calibration) == min(100, len(data.train))

    def rows(images):
        normalized = normalize(images, per_channel(spec.mean), per_channel(spec.std)).numpy()
        return {row.tobytes() for row in normalized}

    train, test = rows(data.train.images), rows(data.test.images)
    assert all(row.tobytes() in train for row in calibration)
    assert not any(row.tobytes() in test for row in calibration)
