"""The shipped example of a user's own model, copied to a folder that is deleted before serving:
trained, exported and answered by a real TorchServe, equal to the eager model."""

from __future__ import annotations

import shutil

import harness
import pytest
import torch
from helpers import ROOT, tiny_config
from served import assert_matches_eager, png

from export.checkpoint import load_trained
from export.run import ExportConfig, export, load_run_data
from training.loop import normalize, per_channel
from training.run import train

pytestmark = pytest.mark.integration


def test_a_user_model_is_served_by_torchserve_without_its_source(tmp_path):
    user_code = tmp_path / "user_code"
    user_code.mkdir()
    shutil.copy(ROOT / "examples" / "my_net.py", user_code / "my_net.py")
    artifacts, store = tmp_path / "artifacts", tmp_path / "model_store"
    train(tiny_config(artifacts, name="mine", model=f"{user_code / 'my_net.py'}:tiny_my_net", epochs=2))
    shutil.rmtree(user_code)
    export(ExportConfig("mine", artifacts, store))

    model, spec = load_trained(artifacts / "mine")
    images = load_run_data(artifacts / "mine")[0].test.images[:8]
    with torch.no_grad():
        logits = model(normalize(images, per_channel(spec.mean), per_channel(spec.std)))
    expected = torch.softmax(logits.double(), 1).numpy()
    server = harness.start(store, tmp_path / "torchserve", ["mine", "mine-torchscript"])
    try:
        for name in ("mine", "mine-torchscript"):
            for image, probabilities in zip(images, expected):
                status, body, _ = server.predict(name, png(image[0].numpy()), "image/png")
                assert status == 200, body
                assert_matches_eager(body, probabilities, list(spec.class_names))
    finally:
        server.stop()
