"""The run's report: one self-contained HTML file, artifacts/<name>/report.html.

Rendered with Jinja2 (training/templates/report.html.j2) from the run's own files only:
spec.json, metrics.json, train_config.json, analysis.json and the plots (written by training),
parity.json and archives.json (written by export). Pictures are embedded as data: URIs and the
file links to nothing outside itself, so it opens anywhere, offline, and can be mailed as is.
Rendering the same files again gives the same bytes; the write is atomic.

Training calls `report_training` at its end, export calls `write_report` (through
export/report.py) after it packed the archives. To render it again by hand:
  python -m training.report artifacts/fashion-mnist       (or: make report NAME=fashion-mnist)
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import jinja2

from handlers.spec import Spec
from training.checkpoint import write_bytes_atomic
from training.errors import UserError

TEMPLATES = Path(__file__).resolve().parent / "templates"
PICTURES = ("curves.png", "confusion_matrix.png", "misclassified.png")


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}): run the step that writes it again") from None


def of_this_checkpoint(record: dict | None, sha256: str) -> dict | None:
    """A record written for another checkpoint (an export before retraining) is not shown."""
    return record if record is not None and record.get("checkpoint_sha256") == sha256 else None


def data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def context(out_dir: Path) -> dict:
    """Everything the template shows, read from the run's files."""
    spec, metrics = read_json(out_dir / "spec.json"), read_json(out_dir / "metrics.json")
    if spec is None or metrics is None:
        raise UserError(f"no finished training run in {out_dir} (spec.json and metrics.json): run `make train` "
                        "first")
    sha256 = Spec.from_dict(spec, str(out_dir / "spec.json")).checkpoint_sha256
    return {
        "spec": spec,
        "metrics": metrics,
        "config": read_json(out_dir / "train_config.json"),
        "analysis": of_this_checkpoint(read_json(out_dir / "analysis.json"), sha256),
        "parity": of_this_checkpoint(read_json(out_dir / "parity.json"), sha256),
        "archives": of_this_checkpoint(read_json(out_dir / "archives.json"), sha256),
        "pictures": {name.removesuffix(".png"): data_uri(out_dir / name) for name in PICTURES},
    }


def percent(value: float, digits: int = 2) -> str:
    return f"{value * 100:.{digits}f} %"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["percent"] = percent
    env.filters["thousands"] = lambda value: f"{value:,}"
    env.filters["scientific"] = lambda value: f"{value:.1e}"
    env.filters["megabytes"] = lambda value: f"{value / 1e6:.1f} MB"
    env.filters["tojson_compact"] = lambda value: json.dumps(value, separators=(", ", ": "))
    return env


def render(out_dir: Path) -> str:
    return environment().get_template("report.html.j2").render(context(out_dir))


def write_report(out_dir: Path) -> Path:
    """Renders artifacts/<name>/report.html from the run's files; returns its path."""
    path = out_dir / "report.html"
    write_bytes_atomic(path, render(out_dir).encode("utf-8"))
    return path


def report_training(out_dir: Path, model, data, predictions, mean, std, device, workers: int, board) -> Path:
    """The end of a training run: the worst mistakes among the test pass's `predictions` and the
    model's size (analysis.json, misclassified.png), the TensorBoard log's last entries, the report."""
    from training.analysis import write_analysis

    spec = Spec.read(out_dir / "spec.json")
    write_analysis(out_dir, model, data, predictions, mean, std, device, workers, spec.checkpoint_sha256)
    board.finish(out_dir)
    path = write_report(out_dir)
    print(f"report: {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run's folder, e.g. artifacts/fashion-mnist")
    args = p.parse_args(argv)
    try:
        print(f"wrote {write_report(args.run)}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
