"""The model store's layout (handlers/store.py) and version minting (export/versions.py)."""

from __future__ import annotations

import json

from export.archive import ServingConfig
from export.versions import next_version
from handlers.archive import read_archive
from handlers.spec import Spec
from handlers.store import archive_path, read_live, served, versions, write_live


def test_served_is_the_live_version_else_the_newest(tmp_path, monkeypatch):
    monkeypatch.delenv("KIT_LIVE_FILE", raising=False)
    for name in ("a.v1.mar", "a.v2.mar", "a.v10.mar", "b-torchscript.v1.mar", "c.mar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert {name: list(by_version) for name, by_version in versions(tmp_path).items()} == {
        "a": [1, 2, 10], "b-torchscript": [1]}
    assert {name: path.name for name, path in served(tmp_path).items()} == {
        "a": "a.v10.mar", "b-torchscript": "b-torchscript.v1.mar", "c": "c.mar"}  # c: unversioned, as it is
    write_live(tmp_path, "a", 2, 10)
    assert served(tmp_path)["a"].name == "a.v2.mar" and read_live(tmp_path)["a"] == {"live": 2, "previous": 10}
    write_live(tmp_path, "a", 7, 2)  # a live version whose archive is gone: the newest serves
    assert served(tmp_path)["a"].name == "a.v10.mar"
    (tmp_path / "live.json").write_text("{broken")
    assert read_live(tmp_path) == {} and served(tmp_path)["a"].name == "a.v10.mar"


def test_the_live_record_can_live_outside_a_read_only_store(tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_LIVE_FILE", str(tmp_path / "state" / "live.json"))
    store = tmp_path / "store"
    store.mkdir()
    write_live(store, "a", 1, None)
    assert json.loads((tmp_path / "state" / "live.json").read_text()) == {"a": {"live": 1, "previous": None}}
    assert not (store / "live.json").exists()


def test_an_unchanged_export_keeps_its_version_a_changed_one_mints_the_next(exported_tiny):
    out_dir, store = exported_tiny
    spec = Spec.read(out_dir / "spec.json")
    assert archive_path(store, "tiny", 1).is_file() and read_archive(archive_path(store, "tiny", 1)).spec.version == 1
    assert next_version(store, "tiny", spec, ServingConfig()) == 1  # same checkpoint, same settings
    assert next_version(store, "tiny", spec, ServingConfig(batch_size=4)) == 2
    assert next_version(store, "tiny", spec.with_checkpoint("0" * 64), ServingConfig()) == 2
    assert next_version(store, "other", spec, ServingConfig()) == 1
