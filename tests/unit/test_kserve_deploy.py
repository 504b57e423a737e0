"""deploy/kserve/: the InferenceService manifests checked, without a cluster, against KServe's own
Python models of its API (kserve.models, with the Kubernetes ones they embed): every field known,
of the right type, the required ones present; the custom predictor's arguments are what the kit's
KServe server takes; `make kserve-store` writes the layout KServe's TorchServe runtime expects."""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run_cli

DEPLOY = ROOT / "deploy" / "kserve"
MANIFESTS = ("kit-modelserver.yaml", "torchserve.yaml")


def api_models():
    argv, sys.argv = sys.argv, sys.argv[:1]  # `import kserve` parses sys.argv
    try:
        import kserve.models
    finally:
        sys.argv = argv
    import kubernetes.client.models

    return kserve.models, kubernetes.client.models


PRIMITIVES = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,),
              "datetime": (str, datetime.datetime), "date": (str, datetime.date)}


def problems(data, type_name: str, path: str = "") -> list[str]:
    """What in `data` (a manifest as YAML loads it) KServe's API models do not accept."""
    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        if not isinstance(data, list):
            return [f"{path}: a list expected"]
        return [p for i, item in enumerate(data) for p in problems(item, match.group(1), f"{path}[{i}]")]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        if not isinstance(data, dict):
            return [f"{path}: a mapping expected"]
        inner = match.group(1) or match.group(2)
        return [p for key, value in data.items() for p in problems(value, inner, f"{path}.{key}")]
    if type_name in PRIMITIVES:
        bad = not isinstance(data, PRIMITIVES[type_name]) or (type_name == "int" and isinstance(data, bool))
        return [f"{path}: {type_name} expected, not {data!r}"] if bad else []
    if type_name == "ResourceQuantity":
        return [] if isinstance(data, (str, int, float)) else [f"{path}: a quantity expected, not {data!r}"]
    kserve_models, kubernetes_models = api_models()
    klass = getattr(kserve_models, type_name, None) or getattr(kubernetes_models, type_name)
    if not isinstance(data, dict):
        return [f"{path}: a {type_name} object expected"]
    attributes = {json_name: attribute for attribute, json_name in klass.attribute_map.items()}
    found = [f"{path}.{key}: unknown field of {type_name}" for key in data if key not in attributes]
    for key, value in data.items():
        if key in attributes:
            found += problems(value, klass.openapi_types[attributes[key]], f"{path}.{key}")
    try:  # KServe's generated setters and Kubernetes' pydantic models refuse a missing required field
        klass(**{attributes[key]: value for key, value in data.items() if key in attributes})
    except (ValueError, TypeError) as error:  # pydantic's ValidationError is a ValueError
        found.append(f"{path}: {type_name}: {error}")
    return found


def problems_in_a_fresh_process(data) -> list[str]:
    """What KServe's API models do not accept in an InferenceService, found in a fresh interpreter:
    kserve and tritonclient both register protobuf's package `inference`, so whichever is imported
    second fails in a process (the test suite's) that has the other."""
    code = ("import json, sys; from test_kserve_deploy import problems; "
            "print(json.dumps(problems(json.load(sys.stdin), 'V1beta1InferenceService')))")
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps(data), capture_output=True, text=True,
                            cwd=Path(__file__).parent, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [str(Path(__file__).parents[1]), str(ROOT)])})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_are_inference_services_kserve_accepts(name):
    data = manifest(name)
    assert data["apiVersion"] == "serving.kserve.io/v1beta1" and data["kind"] == "InferenceService"
    assert problems_in_a_fresh_process(data) == []
    predictor = data["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]


def test_the_validation_finds_mistakes():
    data = manifest("kit-modelserver.yaml")
    data["spec"]["predictor"]["minReplica"] = 2  # a typo
    data["spec"]["predictor"]["maxReplicas"] = "four"
    del data["spec"]["predictor"]["containers"][0]["name"]
    data["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    found = problems_in_a_fresh_process(data)
    assert any(".spec.predictor.minReplica: unknown field" in p for p in found), found
    assert any(".spec.predictor.maxReplicas: int expected" in p for p in found), found
    assert any(p.startswith(".spec.predictor.containers[0]: V1Container") and "name" in p and "required" in p
               for p in found), found
    assert any("httpGet.paht: unknown field of V1HTTPGetAction" in p for p in found), found


def test_a_canary_rollout_is_a_valid_edit_of_either_manifest():
    """docs/deploy.md: a new storageUri with canaryTrafficPercent, applied over the running service, then
    promoted (100) or rolled back (0) by kubectl patch."""
    custom = copy.deepcopy(manifest("kit-modelserver.yaml"))
    custom["spec"]["predictor"]["canaryTrafficPercent"] = 10
    custom["spec"]["predictor"]["containers"][0]["env"][0]["value"] = "s3://BUCKET/image-classifier/model-store-v2"
    runtime = copy.deepcopy(manifest("torchserve.yaml"))
    runtime["spec"]["predictor"] |= {"canaryTrafficPercent": 10}
    runtime["spec"]["predictor"]["model"]["storageUri"] = "s3://BUCKET/image-classifier/kserve-store-v2"
    for data in (custom, runtime):
        assert problems_in_a_fresh_process(data) == []
    for percent in (100, 0):  # the promote and rollback patches of docs/deploy.md
        custom["spec"]["predictor"] |= {"canaryTrafficPercent": percent}
        assert problems_in_a_fresh_process(custom) == []


def parsed_server_arguments(args: list[str]) -> argparse.Namespace:
    """The kit's KServe server's options for `args`, parsed in a fresh interpreter (it imports kserve)."""
    code = ("import json, sys; from handlers.kserve_server import parser; "
            "print(json.dumps(vars(parser().parse_args(sys.argv[1:])), default=str))")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return argparse.Namespace(**json.loads(result.stdout))


def test_the_custom_predictor_runs_the_kit_server_as_kserve_expects():
    predictor = manifest("kit-modelserver.yaml")["spec"]["predictor"]
    container = predictor["containers"][0]
    assert container["name"] == "kserve-container"  # the name KServe gives the model server
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["PROTOCOL"] == "v2" and "://" in env["STORAGE_URI"]
    args = parsed_server_arguments(container["args"])
    assert str(args.model_store) == "/mnt/models" and args.host == "0.0.0.0"  # where storageUri lands
    cpus = predictor["containers"][0]["resources"]["limits"]["cpu"]
    assert args.threads * args.workers == int(cpus)  # not the node's cores: os.cpu_count() in a pod
    port = container["ports"][0]["containerPort"]
    assert args.http_port == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    assert (ROOT / "docker" / container["command"][0]).is_file()  # the launcher the image installs


def test_the_torchserve_runtime_gets_the_protocol_and_layout_it_expects():
    model = manifest("torchserve.yaml")["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v2"
    assert model["storageUri"].endswith("/kserve-store")


def test_kserve_store_holds_config_and_archives(exported_tiny, tmp_path):
    _, store = exported_tiny
    out = tmp_path / "kserve-store"
    result = run_cli("export.kserve_store", "--model-store", str(store), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "config", "config/config.properties", "model-store", "model-store/tiny-torchscript.v1.mar"]
    config = dict(line.split("=", 1) for line in (out / "config" / "config.properties").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert config["inference_address"] == "http://0.0.0.0:8085"  # where KServe's wrapper forwards
    assert config["model_store"] == "/mnt/models/model-store" and config["enable_envvars_config"] == "false"
    snapshot = json.loads(config["model_snapshot"])
    with zipfile.ZipFile(store / "tiny-torchscript.v1.mar") as mar:
        settings = yaml.safe_load(mar.read("model-config.yaml"))
    assert snapshot["models"] == {"tiny-torchscript": {"1": {  # the archive's version
        "defaultVersion": True, "marName": "tiny-torchscript.v1.mar", "minWorkers": settings["minWorkers"],
        "maxWorkers": settings["maxWorkers"], "batchSize": settings["batchSize"],
        "maxBatchDelay": settings["maxBatchDelay"], "responseTimeout": settings["responseTimeout"]}}}
    result = run_cli("export.kserve_store", "--model-store", str(store), "--out", str(out),
                     "--backends", "onnxruntime,torchscript")
    assert result.returncode == 0 and sorted(p.name for p in (out / "model-store").iterdir()) == [
        "tiny-torchscript.v1.mar", "tiny.v1.mar"]
    assert [p.name for p in tmp_path.iterdir()] == ["kserve-store"]  # no scratch folder left behind


@pytest.mark.parametrize("args, message", [
    (("--backends", "tensorrt"), "--backends takes onnxruntime and/or torchscript"),
    (("--model-store", "/nonexistent"), "no archive in /nonexistent/ uses torchscript"),
])
def test_kserve_store_mistakes_get_one_line(args, message, tmp_path):
    from helpers import assert_one_line_error

    result = run_cli("export.kserve_store", "--out", str(tmp_path / "out"), *args)
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_kserve_store_refuses_foreign_archives(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "other.mar").write_bytes(b"PK not really")
    result = run_cli("export.kserve_store", "--model-store", str(tmp_path / "store"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "other.mar: not an archive of the kit" in result.stderr


def test_deploy_folder_holds_only_the_documented_manifests():
    assert sorted(p.name for p in DEPLOY.iterdir()) == sorted(MANIFESTS)
    assert all(isinstance(yaml.safe_load(Path(DEPLOY / name).read_text()), dict) for name in MANIFESTS)
