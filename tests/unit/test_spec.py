"""handlers/spec.py and handlers/archive.py: the spec every stage reads, and the one archive reader."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from export.archive import handler_modules
from handlers.archive import BrokenArchive, read_archive
from handlers.errors import UserError
from handlers.spec import FORMAT, Spec


def test_the_spec_reads_what_training_wrote_and_writes_it_back_unchanged(tiny_run):
    out_dir, _ = tiny_run
    record = json.loads((out_dir / "spec.json").read_text())
    spec = Spec.read(out_dir / "spec.json")
    assert spec.to_dict() == record and list(spec.to_dict()) == list(record)  # same keys, same order
    assert spec.class_names == tuple(record["class_names"]) and spec.num_classes == record["num_classes"]
    assert spec.input.size == (record["input"]["channels"], record["input"]["height"], record["input"]["width"])
    assert Spec.from_json(spec.to_json()) == spec
    assert (spec.input.fit, spec.input.crop_fraction) == ("stretch", None)  # a built-in data set is stretched


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(format="image-classifier-spec/2"), "spec format 'image-classifier-spec/2', but this kit reads"),
    (lambda r: r.update(format="something-else/1"), "not a model spec (format 'something-else/1'"),
    (lambda r: r.pop("format"), "not a model spec (format None"),
    (lambda r: r.pop("class_names"), "a broken model spec (missing 'class_names')"),
    (lambda r: r.update(colour="blue"), "unknown spec field(s) ['colour']"),
    (lambda r: r.update(num_classes=3), "num_classes 3 but 10 class names"),
    (lambda r: r.update(mean=[0.1, 0.2]), "one value per input channel (1)"),
    (lambda r: r["input"].update(fit="zoom"), "input fit 'zoom' with crop_fraction None"),
    (lambda r: r["input"].update(fit="crop"), "input fit 'crop' with crop_fraction None"),
    (lambda r: r["input"].update(fit="crop", crop_fraction=0), "crop_fraction in (0, 1]"),
])
def test_a_spec_of_another_format_or_broken_is_one_line_naming_the_file(tiny_run, tmp_path, change, message):
    out_dir, _ = tiny_run
    record = json.loads((out_dir / "spec.json").read_text())
    change(record)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(record))
    with pytest.raises(UserError) as caught:
        Spec.read(path)
    assert str(path) in str(caught.value) and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_not_json_and_missing_files_are_one_line_too(tmp_path):
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Spec.read(tmp_path / "spec.json")
    with pytest.raises(UserError, match="cannot read the model spec"):
        Spec.read(tmp_path / "missing.json")
    assert FORMAT == "image-classifier-spec/1"


def test_the_archive_reader_gives_manifest_settings_and_spec(exported_tiny):
    out_dir, store = exported_tiny
    archive = read_archive(store / "tiny.v1.mar")
    assert (archive.name, archive.version, archive.settings.backend) == ("tiny", "1", "onnxruntime")
    assert archive.spec == Spec.read(out_dir / "spec.json").with_version(1)  # the archive's version in its spec
    assert archive.release["version"] == 1 and archive.release["gates_passed"]
    assert archive.model_bytes == (out_dir / "model.onnx").stat().st_size
    assert archive.workers == archive.model_config["minWorkers"]
    assert read_archive(store / "tiny-torchscript.v1.mar").settings.model_file == "model.torchscript.pt"


@pytest.mark.parametrize("breakage", ["not a zip", "no spec", "no manifest", "bad config"])
def test_a_broken_archive_is_one_message(exported_tiny, tmp_path, breakage):
    _, store = exported_tiny
    broken = tmp_path / "broken.mar"
    if breakage == "not a zip":
        broken.write_bytes(b"PK-not-really")
    else:
        skip = {"no spec": "spec.json", "no manifest": "MAR-INF/MANIFEST.json"}.get(breakage)
        with zipfile.ZipFile(store / "tiny.v1.mar") as good, zipfile.ZipFile(broken, "w") as bad:
            for item in good.infolist():
                if item.filename != skip:
                    data = good.read(item)
                    bad.writestr(item, b"handler: {backend: tensorrt}\n" if breakage == "bad config"
                                 and item.filename == "model-config.yaml" else data)
    with pytest.raises(BrokenArchive) as caught:
        read_archive(broken)
    assert str(caught.value).startswith(f"{broken}: not an archive of the kit (")
    assert str(caught.value).endswith("): make export writes them") and caught.value.reason


def test_an_archive_holds_every_handler_module_its_handler_imports(exported_tiny, tmp_path):
    """What goes into a .mar follows the handler's imports: importing the handler from the unpacked archive
    alone (no project folder on the path) works, as it must inside a TorchServe worker."""
    _, store = exported_tiny
    with zipfile.ZipFile(store / "tiny.v1.mar") as mar:
        packed = {name.removeprefix("handlers/") for name in mar.namelist() if name.startswith("handlers/")}
        mar.extractall(tmp_path)
    assert packed == set(handler_modules()) and "kserve_model.py" not in packed
    check = "import sys; sys.path.insert(0, '.'); import handlers.torchserve_handler"  # -I: nothing else on the path
    result = subprocess.run([sys.executable, "-I", "-c", check], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
