"""The training run's data for export, loaded once per export: the data set exactly as the run split
it (train_config.json). The parity gate scores its test split (export/run.py); the INT8 model is
calibrated on a sample of its training split (export/quantize.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from training import data as datasets
from training.errors import UserError


class RunData(NamedTuple):
    """What load_run_data returns (unpacks as `data, config = ...`)."""

    data: datasets.Data  # the run's splits
    config: dict  # its train_config.json


def load_run_data(out_dir: Path) -> RunData:
    """The data set exactly as the training run split it (train_config.json), and that config."""
    config_path = out_dir / "train_config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing: the parity gate needs the run's test split; train again")
    run = json.loads(config_path.read_text())
    try:
        data = datasets.load(run["dataset"], Path(run["data_dir"]), run["val_fraction"], run["test_fraction"],
                             run["seed"], run["image_size"], run["max_memory_mb"], run["workers"], download=False,
                             resize=run.get("resize", "stretch"), crop_fraction=run.get("crop_fraction"))
    except UserError as error:
        raise UserError(f"the parity gate needs the test images of {run['dataset']}: {error}") from None
    return RunData(data, run)
