"""Train an image classifier: `python -m training --help` (or `make train`).

Examples:
  python -m training                                   # Fashion-MNIST, default CNN, name fashion-mnist
  python -m training --dataset mnist-5k --model simple-cnn --name digits
  python -m training --dataset folder:~/pictures/pets --model resnet18 --name pets --augment crop+flip
  python -m training --model examples/my_net.py:MyNet --model-args '{"base_width": 48}' --name mine
  python -m training --dataset mnist-5k --name digits --init-from artifacts/fashion-mnist/checkpoint.pt \
      --freeze features.0,features.2                   # fine-tune: start from weights, train the rest
  python -m training --model examples/my_net.py:MyNet --summary   # layers, shapes, parameters; no training
  torchrun --standalone --nproc_per_node=2 -m training              # data-parallel (make train NPROC=2)
  python -m training --resume artifacts/fashion-mnist/last.pt   # continue an interrupted run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from training.config import WHAT, TrainConfig, flag
from training.distributed import Stopped
from training.errors import UserError

CONVERSIONS = {"int": int, "float": float, "Path": Path}  # argparse converts these; a str stays as given


def parser() -> argparse.ArgumentParser:
    """Every TrainConfig field as --NAME, in its --help section, plus --summary."""
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}  # section title -> its argument group
    for f in dataclasses.fields(TrainConfig):
        option = f.metadata["option"]
        if option.group not in groups:
            groups[option.group] = p.add_argument_group(option.group)
        groups[option.group].add_argument(flag(f.name), **argument(f, option))
    groups[WHAT].add_argument("--summary", action="store_true",
                              help="print the model's layers, output shapes and parameter counts for this data "
                                   "set, then exit without training")
    return p


def argument(f: dataclasses.Field, option) -> dict:
    """add_argument's keywords for one field: its default, its conversion or a --no- form, its help."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kind = f.type.split("|")[0].strip()  # "int | None" -> int
    keywords = {"default": default, "help": option.help}
    if kind == "bool":
        keywords["action"] = argparse.BooleanOptionalAction
    elif kind in CONVERSIONS:
        keywords["type"] = CONVERSIONS[kind]
    if option.choices is not None:
        keywords["choices"] = option.choices
    if option.metavar is not None:
        keywords["metavar"] = option.metavar
    return keywords


def main(argv: list[str] | None = None) -> int:
    options = vars(parser().parse_args(argv))
    summary_only = options.pop("summary")
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: process 0 speaks for the run
    last = f"{options['artifacts_dir']}/{options['name']}/last.pt"
    try:
        from training.run import summarize, train  # heavy imports after --help

        config = TrainConfig.from_options(options)
        summarize(config) if summary_only else train(config)
    except UserError as error:
        if rank == 0:  # every process meets the same mistake (training.distributed.World.together)
            print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: earlier outputs are intact; the last finished epoch is in {last} "
              "(continue with --resume)", file=sys.stderr)
        return 130
    except Stopped as stop:
        print(f"error: process {rank} stopped: another process of this distributed run failed or was lost ({stop}); "
              f"the last finished epoch is in {last} (continue with --resume)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
