"""The disk filling up while export writes archives: one clear error, nothing half-written in the model
store, the archives that were there before still whole. The store is a small tmpfs (needs root, as
CI has; skipped elsewhere)."""

from __future__ import annotations

import shutil
import subprocess
import zipfile

import pytest

from export.run import ExportConfig, export
from training.errors import UserError


@pytest.fixture
def small_disk(tmp_path):
    def mount(kilobytes: int):
        mounted = tmp_path / f"disk-{kilobytes}k"
        mounted.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(mounted)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}): needs root")
        mounts.append(mounted)
        return mounted

    mounts = []
    yield mount
    for mounted in mounts:
        subprocess.run(["umount", "-l", str(mounted)], check=False)


def whole_archives(store) -> dict[str, list[str]]:
    """Every .mar in the store opened as a zip (a half-written one would not open), and anything else."""
    found = {}
    for path in store.iterdir():
        if path.suffix == ".mar":
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None, path
                found[path.name] = sorted(archive.namelist())
        else:
            found[path.name] = ["(not an archive)"]
    return found


@pytest.mark.parametrize("kilobytes", [200, 600, 900])  # full at the first, second or INT8 archive
def test_a_full_disk_leaves_nothing_half_written(tiny_run, tmp_path, small_disk, kilobytes):
    out_dir, _ = tiny_run
    artifacts = tmp_path / "artifacts"
    shutil.copytree(out_dir, artifacts / "tiny", ignore=shutil.ignore_patterns("model.*", "parity.json"))
    store = small_disk(kilobytes)
    with pytest.raises(UserError, match="No space left on device") as caught:
        export(ExportConfig("tiny", artifacts, store))
    assert "\n" not in str(caught.value)
    found = whole_archives(store)
    assert all(contents != ["(not an archive)"] for contents in found.values()), found  # no scratch folders
    assert all("model-config.yaml" in contents for contents in found.values())


def test_a_full_disk_keeps_the_archives_of_the_previous_export(tiny_run, tmp_path, small_disk):
    out_dir, _ = tiny_run
    artifacts = tmp_path / "artifacts"
    shutil.copytree(out_dir, artifacts / "tiny", ignore=shutil.ignore_patterns("model.*", "parity.json"))
    store = small_disk(3000)
    export(ExportConfig("tiny", artifacts, store))
    before = {path.name: path.read_bytes() for path in store.glob("*.mar")}
    (store / "filler").write_bytes(b"\0" * (3000 * 1024 - sum(map(len, before.values())) - 150 * 1024))
    with pytest.raises(UserError, match="No space left on device"):
        export(ExportConfig("tiny", artifacts, store))
    after = {path.name: path.read_bytes() for path in store.glob("*.mar")}
    assert set(after) == set(before)
    for name, data in after.items():  # each archive is the old one or a whole new one
        assert data == before[name] or zipfile.ZipFile(store / name).testzip() is None
    assert sorted(p.name for p in store.iterdir()) == sorted([*before, "filler"])
