"""Hyperparameter search over ordinary training runs, on Optuna: `python -m training.tune --help` (or `make tune`).

  python -m training.tune --name STUDY --trials N [--timeout SECONDS] [--space FILE]
                          [--sampler tpe|random|grid] [--storage URL] [--jobs K] [--train-best]
                          [any `python -m training` option: every trial inherits it]

Each trial is one real training run (training.run.train, in this process) with the options the
sampler draws from the search space (training/search_space.py; default training/tune_space.yaml),
seeded by --seed; its objective is the best validation accuracy (never the test split), reported
after every epoch to a median pruner that stops bad trials early. Trials write their runs into
artifacts/STUDY/trials/NUMBER/ (a pruned, failed or interrupted trial's folder is removed).

The study lives in SQLite at artifacts/STUDY/study.db, or in the database --storage names
(postgresql://USER@HOST:PORT/DB): processes on several machines that run the same command share
it and together finish N trials (complete or pruned). Running the command again continues the
study; --jobs K starts K-1 more processes of the same command. Outputs in artifacts/STUDY/:
tune.json, tune-*.png, tune.html (training/tune_report.py); --train-best then trains the best
trial's options as artifacts/STUDY-best/, ready for make export.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from training.config import RUN_DEFINING, TrainConfig, check_name
from training.errors import UserError
from training.search_space import DEFAULT_SPACE, Dimension, apply, read_space

SAMPLERS = ("tpe", "random", "grid")
STATES_COUNTED = ("COMPLETE", "PRUNED")  # what --trials counts; failed trials are not part of the budget


def parser() -> argparse.ArgumentParser:
    """`python -m training`'s parser (every training option, defined once in TrainConfig) plus the search's own."""
    from training.__main__ import parser as training_parser

    p = training_parser()
    p.prog, p.description = "python -m training.tune", __doc__
    for action in p._actions:  # --name names the study here; argparse has no public way to re-describe it
        if action.dest == "name":
            action.default, action.required = None, True
            action.help = "the study: artifacts/NAME/ (its outputs and SQLite storage), artifacts/NAME-best/"
    tune = p.add_argument_group("the search")
    tune.add_argument("--trials", type=int, required=True,
                      help="finished trials (complete or pruned) the study reaches, over all its processes")
    tune.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    tune.add_argument("--space", type=Path, default=DEFAULT_SPACE,
                      help="the search space, YAML (default: training/tune_space.yaml)")
    tune.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                      help="tpe (Bayesian), random or grid (%(default)s)")
    tune.add_argument("--storage", help="database URL shared by several processes or machines, e.g. "
                                        "postgresql://USER@HOST:PORT/DB (default: sqlite in artifacts/NAME/)")
    tune.add_argument("--jobs", type=int, default=1,
                      help="trials run at once: this process and JOBS-1 more, sharing the study (%(default)s)")
    tune.add_argument("--train-best", action="store_true",
                      help="then train the best trial's options as artifacts/NAME-best/")
    return p


@dataclasses.dataclass(frozen=True)
class Search:
    """One invocation's study settings: what every trial shares and what it varies."""

    study: str
    base: TrainConfig  # the options every trial inherits
    space: tuple[Dimension, ...]
    trials: int
    sampler: str
    storage_url: str  # what SQLAlchemy opens
    shown_url: str  # the same without a password, for messages and tune.json
    timeout: float | None = None
    jobs: int = 1
    argv: tuple[str, ...] = ()  # the command line, for the processes of --jobs

    @property
    def out_dir(self) -> Path:
        return self.base.artifacts_dir / self.study

    def trial_config(self, number: int, params: dict) -> TrainConfig:
        """Trial `number`'s training options: artifacts/STUDY/trials/NUMBER/."""
        placed = dataclasses.replace(self.base, name=str(number), artifacts_dir=self.out_dir / "trials")
        return apply(placed, params)

    def best_config(self, params: dict) -> TrainConfig:
        return apply(dataclasses.replace(self.base, name=f"{self.study}-best"), params)

    def budget(self) -> int:
        """--trials, or the grid's size where that is smaller."""
        if self.sampler != "grid":
            return self.trials
        size = 1
        for dimension in self.space:
            size *= len(dimension.grid())
        return min(self.trials, size)


def search_from(options: dict) -> Search:
    """Checks every option, the space file and the storage URL's form: mistakes are found before any trial."""
    study = options.pop("name")
    check_name(study)
    check_name(f"{study}-best")
    trials, timeout, space, sampler = (options.pop(k) for k in ("trials", "timeout", "space", "sampler"))
    storage, jobs = options.pop("storage"), options.pop("jobs")
    options.pop("train_best")
    if options.pop("summary"):
        raise UserError("--summary is not a search option: run python -m training --summary")
    if options.get("resume") is not None:
        raise UserError("--resume continues one training run; a study continues by running the same command again")
    if trials < 1 or jobs < 1:
        raise UserError("--trials and --jobs must be at least 1")
    if timeout is not None and timeout <= 0:
        raise UserError("--timeout must be positive")
    base = TrainConfig.from_options({**options, "name": study})
    dimensions = read_space(space, base)
    if sampler == "grid":
        for dimension in dimensions:
            dimension.grid()  # a continuous range is an error here
    from training.tune_storage import storage_url

    url, shown = storage_url(storage, base.artifacts_dir / study)
    return Search(study, base, dimensions, trials, sampler, url, shown, timeout, jobs)


class TrialOutput(io.TextIOBase):
    """sys.stdout while trials run: what a trial's training prints (in the thread that runs it) goes to its
    own log, everything else to the terminal."""

    def __init__(self, terminal):
        self.terminal, self.logs = terminal, {}  # thread id -> that trial's log

    def write(self, text: str) -> int:
        return self.logs.get(threading.get_ident(), self.terminal).write(text)

    def flush(self) -> None:
        self.terminal.flush()


def run(search: Search) -> dict:
    """Runs the study to its budget; returns tune.json's record."""
    import optuna
    from tqdm import tqdm

    from training.tune_report import trial_line, write_outputs
    from training.tune_storage import open_study

    study = open_study(search)
    budget, counted = search.budget(), tuple(getattr(optuna.trial.TrialState, s) for s in STATES_COUNTED)
    optuna.storages.fail_stale_trials(study)  # trials of processes that died: FAIL, once silent long enough
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        shutil.rmtree(search.out_dir / "trials" / str(trial.number), ignore_errors=True)  # a killed trial's run
    done = len(study.get_trials(deepcopy=False, states=counted))
    print(f"study {search.study} in {search.shown_url}: {done} of {budget} trials finished; "
          f"{search.sampler} sampler over {', '.join(d.key for d in search.space)}")
    bar = tqdm(total=budget, initial=min(done, budget), unit="trial", desc=search.study, dynamic_ncols=True)
    output = TrialOutput(sys.stdout)
    shown = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}

    def show_finished() -> None:
        """A line for each trial finished since the last call, whichever process ran it."""
        for trial in study.get_trials(deepcopy=False):
            if trial.state.is_finished() and trial.number not in shown and not trial.user_attrs.get("surplus"):
                bar.write(trial_line(trial))
            if trial.state.is_finished():
                shown.add(trial.number)

    def objective(trial: optuna.Trial) -> float:
        ahead = [t for t in study.get_trials(deepcopy=False, states=counted + (optuna.trial.TrialState.RUNNING,))
                 if t.number < trial.number]
        if len(ahead) >= budget:  # another process took the last trial at the same moment
            trial.set_user_attr("surplus", True)
            study.stop()
            raise Surplus(f"trial {trial.number}: the budget of {budget} trials is taken")
        config = search.trial_config(trial.number, {d.key: d.suggest(trial) for d in search.space})
        trial.set_user_attr("run_dir", str(config.out_dir))
        trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")  # where its run folder is
        return train_trial(trial, config, output)

    def finished(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("surplus"):
            return
        show_finished()
        taken = study.get_trials(deepcopy=False, states=counted + (optuna.trial.TrialState.RUNNING,))
        bar.n = min(budget, sum(t.state in counted for t in taken))
        bar.refresh()
        if len(taken) >= budget:  # the rest is finished or running elsewhere
            study.stop()

    jobs = start_jobs(search) if done < budget else []
    try:
        if done < budget:
            with contextlib.redirect_stdout(output):
                study.optimize(objective, timeout=search.timeout, catch=(Surplus,), callbacks=[finished])
    except BaseException:
        for job, _ in jobs:
            job.send_signal(signal.SIGINT)  # they stop as this one does: their running trials are marked failed
        raise
    finally:
        failed = [str(log) for job, log in jobs if job.wait() != 0]
        show_finished()
        bar.n = min(budget, len(study.get_trials(deepcopy=False, states=counted)))
        bar.close()
        record = write_outputs(search, study)
    if failed:
        raise UserError(f"{len(failed)} of the --jobs processes failed: see {', '.join(failed)}")
    return record


def start_jobs(search: Search) -> list[tuple[subprocess.Popen, Path]]:
    """--jobs K: K-1 more processes of the same command on the same study (each its own torch and random
    state, so every trial stays reproducible); their output goes to artifacts/STUDY/jobs/N.log."""
    jobs = []
    for number in range(1, search.jobs):
        log = search.out_dir / "jobs" / f"{number}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [word for word in search.argv if word != "--train-best"]
        with open(log, "w") as out:
            jobs.append((subprocess.Popen([sys.executable, "-m", "training.tune", *argv, "--jobs", "1"],
                                          stdout=out, stderr=subprocess.STDOUT), log))
    return jobs


class Surplus(Exception):
    """A trial asked for after the study's budget was taken by other processes: recorded as failed, never run."""


def train_trial(trial, config: TrainConfig, output: TrialOutput) -> float:
    """One trial's training run; its log goes to trials/NUMBER/train.log, and a run that does not finish
    (pruned, failed, interrupted) leaves no folder behind."""
    import optuna

    from training.checkpoint import write_bytes_atomic
    from training.run import train

    def report(epoch: int, val_accuracy: float) -> None:
        trial.report(val_accuracy, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: validation accuracy {val_accuracy:.4f} below the median")

    log = io.StringIO()
    output.logs[threading.get_ident()] = log
    started = time.perf_counter()
    try:
        metrics = train(config, on_epoch=report)
    except BaseException:
        shutil.rmtree(config.out_dir, ignore_errors=True)
        raise
    finally:
        del output.logs[threading.get_ident()]
    write_bytes_atomic(config.out_dir / "train.log", log.getvalue().encode())
    trial.set_user_attr("train_seconds", metrics["train_seconds"])
    trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
    trial.set_user_attr("best_epoch", metrics["best_epoch"])
    return metrics["val_accuracy"]


def fixed_options(config: TrainConfig) -> dict:
    """What a study's trials share and a continued study must keep: the run-defining options."""
    record = config.to_json()
    return {name: record[name] for name in RUN_DEFINING}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    options = vars(parser().parse_args(argv))
    train_best = options["train_best"]
    try:
        search = dataclasses.replace(search_from(options), argv=tuple(argv))
        with warnings.catch_warnings():
            import optuna

            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours
            record = run(search)
        best = record["best"]
        if best is None:
            print("no trial completed: nothing to call best")
        else:
            print(f"best: trial {best['number']}, validation accuracy {best['val_accuracy']:.4f}, "
                  f"{json.dumps(best['options'])}\nreproduce: {best['train_command']}")
        print(f"wrote {search.out_dir}/tune.json, tune.html")
        if train_best and best is not None:
            from training.run import train

            train(search.best_config(best["options"]))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept in the study; run the same command again to continue",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
