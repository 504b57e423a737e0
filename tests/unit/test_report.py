"""report.html: every section, pictures embedded, no link out, export results, idempotent rendering;
analysis.json's mistakes; the optional TensorBoard log. On real tiny training runs and exports."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser

import pytest
from helpers import assert_one_line_error, run_cli, tiny_config
from PIL import Image

from training.models import build
from training.report import write_report

SECTIONS = ("spec", "training", "results", "per-class", "mistakes", "export")
TRAINING_FILES = ("spec.json", "metrics.json", "train_config.json", "analysis.json", "curves.png",
                  "confusion_matrix.png", "misclassified.png")


class Page(HTMLParser):
    """Collects what matters here: element ids, every src/href, and the tags used."""

    def __init__(self, html: str):
        super().__init__()
        self.ids, self.sources, self.links, self.tags = set(), [], [], set()
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if "href" in attrs:
            self.links.append(attrs["href"])


def training_only_copy(out_dir, target):
    """The run as training left it, without export's records."""
    target.mkdir()
    for name in TRAINING_FILES:
        shutil.copy(out_dir / name, target / name)
    return target


def assert_self_contained(html: str, out_dir) -> Page:
    page = Page(html)
    assert set(SECTIONS) <= page.ids
    assert page.sources, "no pictures"
    for source in page.sources:  # every picture inside the file, as the PNG the run wrote
        assert source.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in page.sources}
    assert {(out_dir / name).read_bytes() for name in ("curves.png", "confusion_matrix.png",
                                                         "misclassified.png")} == embedded
    assert all(link.startswith("#") for link in page.links), page.links  # in-page anchors only
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert "http://" not in html and "https://" not in html and "url(" not in html
    return page


def test_report_after_training_shows_every_section_with_pictures_embedded(tiny_run, tmp_path):
    out_dir = training_only_copy(tiny_run[0], tmp_path / "tiny")
    html = write_report(out_dir).read_text()
    assert_self_contained(html, out_dir)
    spec = json.loads((out_dir / "spec.json").read_text())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    model = build(spec["arch"], **spec["arch_args"])
    assert f"{sum(p.numel() for p in model.parameters()):,}" in html  # the parameter count
    for fragment in (spec["dataset"], "1 × 28 × 28", "grey", spec["checkpoint_sha256"], "Not exported yet",
                     f"{metrics['test_accuracy'] * 100:.2f} %", "learning rate", "train_limit"):
        assert fragment in html, fragment
    for name, row in metrics["per_class"].items():  # the per-class table, every class by name
        assert f"<td>{name}</td><td class=\"num\">{row['precision'] * 100:.1f} %</td>" in html


def test_worst_mistakes_are_wrong_most_confident_first_and_all_counted(tiny_run):
    out_dir = tiny_run[0]
    analysis = json.loads((out_dir / "analysis.json").read_text())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    matrix = metrics["confusion_matrix"]
    assert analysis["misclassified"] == sum(map(sum, matrix)) - sum(matrix[i][i] for i in range(len(matrix)))
    mistakes = analysis["worst_mistakes"]
    assert 0 < len(mistakes) <= 24 and all(m["true"] != m["predicted"] for m in mistakes)
    assert [m["confidence"] for m in mistakes] == sorted((m["confidence"] for m in mistakes), reverse=True)
    assert mistakes[0]["confidence"] > 1 / 10  # a mistake wins over the true class
    html = (out_dir / "report.html").read_text()
    assert f"<td class=\"num\">{mistakes[0]['index']}</td><td>{mistakes[0]['true']}</td>" in html


def test_report_after_export_shows_parity_and_archives(exported_tiny):
    out_dir, store = exported_tiny
    html = (out_dir / "report.html").read_text()
    assert_self_contained(html, out_dir)
    parity = json.loads((out_dir / "parity.json").read_text())
    assert "Parity gate: <span class=\"pass\">passed</span>" in html and "Not exported yet" not in html
    for name, result in parity["formats"].items():
        assert f"<td>{name}</td><td class=\"num\">{result['test_accuracy'] * 100:.4f} %</td>" in html
        assert f"{result['batches']['64']['max_abs_diff']:.1e}" in html
    archives = json.loads((out_dir / "archives.json").read_text())["archives"]
    assert {(a["model"], a["backend"]) for a in archives} == {("tiny", "onnxruntime"),
                                                               ("tiny-torchscript", "torchscript")}
    for archive in archives:
        assert f"<code>{store / (archive['model'] + '.v1.mar')}</code>" in html
        assert f"/predictions/{archive['model']}" in html


def test_rendering_again_gives_the_same_bytes(exported_tiny, tmp_path):
    out_dir = tmp_path / "tiny"
    shutil.copytree(exported_tiny[0], out_dir)
    written = (out_dir / "report.html").read_bytes()
    assert write_report(out_dir).read_bytes() == written
    assert write_report(out_dir).read_bytes() == written
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp file left


def test_records_of_an_earlier_checkpoint_are_not_shown(exported_tiny, tmp_path):
    """Retraining after an export: the old parity and archives describe another model."""
    out_dir = tmp_path / "tiny"
    shutil.copytree(exported_tiny[0], out_dir)
    spec = json.loads((out_dir / "spec.json").read_text())
    (out_dir / "spec.json").write_text(json.dumps({**spec, "checkpoint_sha256": "0" * 64}))
    html = write_report(out_dir).read_text()
    assert "Not exported yet" in html and "Parity gate" not in html and "Archives" not in html
    assert "Not recorded for this checkpoint" in html  # analysis.json too


def test_report_cli_renders_and_refuses_a_folder_without_a_run(tiny_run, tmp_path):
    out_dir = training_only_copy(tiny_run[0], tmp_path / "run")
    result = run_cli("training.report", str(out_dir))
    assert result.returncode == 0 and (out_dir / "report.html").is_file(), result.stderr
    assert_one_line_error(run_cli("training.report", str(tmp_path / "nothing")), "no finished training run",
                          "make train")
    (out_dir / "metrics.json").write_text("{not json")
    assert_one_line_error(run_cli("training.report", str(out_dir)), "metrics.json is not valid JSON")


def test_tensorboard_logs_every_epoch_and_the_results(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: run make venv")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.run import train

    metrics = train(tiny_config(tmp_path, epochs=2, train_limit=256, tensorboard=True))
    log = EventAccumulator(str(tmp_path / "tiny" / "tensorboard")).Reload()
    tags = log.Tags()
    losses = log.Scalars("loss/train")
    assert [event.step for event in losses] == [1, 2]
    assert [event.value for event in losses] == pytest.approx([h["train_loss"] for h in metrics["history"]])
    assert log.Scalars("test/accuracy")[0].value == pytest.approx(metrics["test_accuracy"])
    assert {"accuracy/val", "learning_rate"} <= set(tags["scalars"])
    assert {"test/confusion_matrix", "test/worst_mistakes"} <= set(tags["images"])
