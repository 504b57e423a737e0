"""`make kserve-store`'s config.properties on a real TorchServe: the models of its model_snapshot load
from its model-store/, and an Open Inference Protocol request sent as KServe's TorchServe-runtime
wrapper sends it (JSON, to /v2/models/<name>/infer on the inference port) gets the kit's answer."""

from __future__ import annotations

import base64
import json

import harness
import pytest
from helpers import run_cli
from served import assert_matches_eager

pytestmark = pytest.mark.integration


def test_torchserve_serves_the_kserve_store(exported, served_images, tmp_path):
    _, model_store = exported
    out = tmp_path / "kserve-store"
    result = run_cli("export.kserve_store", "--model-store", str(model_store), "--out", str(out))
    assert result.returncode == 0, result.stderr
    server = harness.start(out / "model-store", tmp_path / "torchserve", ["fmnist-torchscript"],
                           config_file=out / "config" / "config.properties")
    try:
        status, body, _ = harness.http("GET", f"{server.management}/models")  # loaded from the snapshot alone
        assert status == 200 and [m["modelName"] for m in json.loads(body)["models"]] == ["fmnist-torchscript"]
        pngs, probabilities, class_names = served_images
        request = {"id": "k-1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                            "data": [base64.b64encode(p).decode() for p in pngs[:3]]}]}
        status, body, _ = harness.http("POST", f"{server.inference}/v2/models/fmnist-torchscript/infer",
                                       json.dumps(request).encode(), {"Content-Type": "application/json"})
        assert status == 200, body
        answer = json.loads(body)
        assert answer["id"] == "k-1" and answer["model_name"] == "fmnist-torchscript"
        outputs = {o["name"]: o for o in answer["outputs"]}
        for row, (label, expected) in enumerate(zip(outputs["label"]["data"], probabilities[:3])):
            served = outputs["probabilities"]["data"][row * len(class_names):(row + 1) * len(class_names)]
            assert_matches_eager({"label": label, "index": class_names.index(label),
                                  "probabilities": dict(zip(class_names, served))}, expected, class_names)
    finally:
        server.stop()
