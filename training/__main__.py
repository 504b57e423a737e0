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
import json
import os
import sys
from pathlib import Path

from training.config import AUGMENTATIONS, TrainConfig
from training.data import BUILTIN
from training.distributed import Stopped
from training.errors import UserError
from training.models import ARCHITECTURES

D = TrainConfig()  # the defaults, shown in --help


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to train")
    what.add_argument("--name", default=D.name, help="model name: artifacts/NAME/, model_store/NAME.mar (%(default)s)")
    what.add_argument("--dataset", default=D.dataset,
                      help=f"{', '.join(BUILTIN)} or folder:PATH (one subfolder per class) (%(default)s)")
    what.add_argument("--model", default=None,
                      help=f"{', '.join(ARCHITECTURES)}, or your own: path/to/file.py:ClassName or "
                           "package.module:ClassName (a class or a function returning an nn.Module). Default: "
                           "the --init-from checkpoint's model, else fast-cnn")
    what.add_argument("--model-args", default="{}", metavar="JSON",
                      help="keyword arguments for the model, a JSON object; in_channels, num_classes, height "
                           "and width come from the data set where the model takes them")
    what.add_argument("--init-from", type=Path, default=None, metavar="PATH",
                      help="start from these weights: a kit checkpoint.pt or a plain state_dict (.pt/.pth); "
                           "tensors are matched by name and shape, the rest stays freshly initialized")
    what.add_argument("--freeze", type=lambda text: tuple(p for p in text.split(",") if p), default=(),
                      metavar="PREFIX[,PREFIX...]",
                      help="do not train parameters whose names start with a prefix (their batch-norm "
                           "statistics stay fixed too); --summary lists the names")
    what.add_argument("--summary", action="store_true",
                      help="print the model's layers, output shapes and parameter counts for this data set, "
                           "then exit without training")
    what.add_argument("--image-size", type=int, default=D.image_size,
                      help="folder: only: train at SIZExSIZE (default: the images' own size when all "
                           "share one, else 64)")
    how = p.add_argument_group("how to train")
    how.add_argument("--epochs", type=int, default=D.epochs, help="(%(default)s)")
    how.add_argument("--batch-size", type=int, default=D.batch_size,
                     help="the global batch: under torchrun each of N processes takes batch/N of it, so the "
                          "learning rate and schedule keep their meaning (%(default)s)")
    how.add_argument("--optimizer", default=D.optimizer, choices=["sgd", "adamw"], help="(%(default)s)")
    how.add_argument("--lr", type=float, default=D.lr, help="peak learning rate (%(default)s; try 3e-3 for adamw)")
    how.add_argument("--momentum", type=float, default=D.momentum, help="SGD momentum (%(default)s)")
    how.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=D.nesterov,
                     help="Nesterov momentum for SGD (on)")
    how.add_argument("--weight-decay", type=float, default=D.weight_decay,
                     help="on weights, not on biases or batch norm (%(default)s)")
    how.add_argument("--schedule", default=D.schedule, choices=["onecycle", "linear", "cosine"],
                     help="one-cycle, or linear warmup then linear or cosine decay to zero (%(default)s)")
    how.add_argument("--warmup-epochs", type=float, default=D.warmup_epochs,
                     help="linear and cosine schedules (%(default)s)")
    how.add_argument("--label-smoothing", type=float, default=D.label_smoothing, help="(%(default)s)")
    how.add_argument("--ema-decay", type=float, default=D.ema_decay,
                     help="evaluate, keep and export a moving average of the weights, updated every step "
                          "with this decay; 0 = off (%(default)s)")
    how.add_argument("--augment", default=D.augment, choices=AUGMENTATIONS,
                     help="random horizontal flip (only where the data allows it: not for digits) and/or "
                          "random crop with 2-pixel padding (%(default)s)")
    how.add_argument("--patience", type=int, default=D.patience,
                     help="early stop after N epochs without a better validation accuracy; 0 = never (%(default)s)")
    how.add_argument("--seed", type=int, default=D.seed, help="seeds splits, initialization, shuffling (%(default)s)")
    how.add_argument("--resume", type=Path, default=None, help="continue from a last.pt written by an earlier run")
    split = p.add_argument_group("data")
    split.add_argument("--val-fraction", type=float, default=D.val_fraction,
                       help="validation share carved from the training split (%(default)s)")
    split.add_argument("--test-fraction", type=float, default=D.test_fraction,
                       help="test share for data sets without an official test split (%(default)s)")
    split.add_argument("--train-limit", type=int, default=None, help="use only N training images (quick runs)")
    split.add_argument("--data-dir", type=Path, default=D.data_dir, help="downloaded data sets (%(default)s)")
    split.add_argument("--download", action=argparse.BooleanOptionalAction, default=D.download,
                       help="let torchvision download missing data where the internet is reachable (on)")
    split.add_argument("--workers", type=int, default=D.workers, help="image decoding processes (%(default)s)")
    split.add_argument("--max-memory-mb", type=int, default=D.max_memory_mb,
                       help="folder: data larger than this streams from disk (%(default)s)")
    hw = p.add_argument_group("hardware and outputs")
    hw.add_argument("--device", default=D.device, help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps (%(default)s)")
    hw.add_argument("--precision", default=D.precision, choices=["auto", "bf16", "fp32"],
                    help="auto: bf16 autocast where the device runs bf16 fast (%(default)s)")
    hw.add_argument("--compile", action=argparse.BooleanOptionalAction, default=D.compile,
                    help="torch.compile the model (off)")
    hw.add_argument("--artifacts-dir", type=Path, default=D.artifacts_dir, help="(%(default)s)")
    hw.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=D.tensorboard,
                    help="also log to ARTIFACTS_DIR/NAME/tensorboard/ for TensorBoard (off; report.html is "
                         "always written)")
    return p


def model_arguments(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"--model-args is not valid JSON ({error.msg} at character {error.pos}): "
                        """write a JSON object, e.g. '{"base_width": 32}'""") from None
    if not isinstance(value, dict):
        raise UserError(f"--model-args must be a JSON object of keyword arguments, not {type(value).__name__}")
    return value


def main(argv: list[str] | None = None) -> int:
    options = vars(parser().parse_args(argv))
    summary_only = options.pop("summary")
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: process 0 speaks for the run
    last = f"{options['artifacts_dir']}/{options['name']}/last.pt"
    try:
        from training.run import summarize, train  # heavy imports after --help

        options["model_args"] = model_arguments(options["model_args"])
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
