"""Where a study lives and how its trials are drawn: the storage URL, Optuna's study, sampler and pruner.

SQLite in artifacts/STUDY/study.db by default; `--storage postgresql://USER@HOST:PORT/DB` (PostgreSQL's
own URL form) is opened through the psycopg 3 driver. The storage keeps a heartbeat per running trial:
a trial of a process that died is marked FAIL once it has been silent for GRACE_SECONDS, and the
next process that starts a trial notices it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy.engine
import sqlalchemy.exc

from training.errors import UserError

HEARTBEAT_SECONDS = 5  # a running trial's sign of life in the storage
GRACE_SECONDS = 20  # a RUNNING trial silent this long belongs to a lost process: it is marked FAIL
PRUNER_STARTUP_TRIALS = 3  # median pruning starts once this many trials completed


def storage_url(text: str | None, study_dir: Path) -> tuple[str, str]:
    """(the URL SQLAlchemy opens, the same without a password for messages)."""
    if text is None:
        study_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{study_dir / 'study.db'}"
        return url, url
    try:
        parsed = sqlalchemy.engine.make_url(text)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise UserError(f"--storage {text!r} is not a database URL: write postgresql://USER@HOST:PORT/DB "
                        "or sqlite:///PATH") from None
    if parsed.drivername in ("postgresql", "postgres"):  # PostgreSQL's plain form: the psycopg 3 driver
        parsed = parsed.set(drivername="postgresql+psycopg")
    if not parsed.drivername.startswith(("postgresql", "sqlite", "mysql")):
        raise UserError(f"--storage {text!r}: use postgresql://USER@HOST:PORT/DB or sqlite:///PATH")
    return parsed.render_as_string(hide_password=False), parsed.render_as_string(hide_password=True)


def open_storage(url: str, shown: str) -> optuna.storages.RDBStorage:
    # Waits rather than fails while another process writes (SQLite) or the server is slow to answer.
    connect = {"timeout": 60} if url.startswith("sqlite") else {"connect_timeout": 10}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect},
                                              heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # Processes that start together on an empty database race to create Optuna's tables: the
            # losers fail with a duplicate name, and find the tables made when they try again.
            if attempt == 4:
                raise UserError(f"cannot open the study storage {shown}: {first_line(error)}") from None
            time.sleep(0.5 + attempt)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
            raise UserError(f"cannot open the study storage {shown}: {first_line(error)}") from None


def first_line(error: Exception) -> str:
    cause = str(getattr(error, "orig", None) or error).strip().splitlines()
    return cause[0] if cause else type(error).__name__


def open_study(search):
    """The study, created or continued; a continued study must have the same space and trial options."""
    from training.tune import fixed_options

    storage = open_storage(search.storage_url, search.shown_url)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)
    study = optuna.create_study(storage=storage, study_name=search.study, direction="maximize",
                                load_if_exists=True, sampler=sampler(search), pruner=pruner)
    settings = {"space": {d.key: d.to_json() for d in search.space}, "options": fixed_options(search.base),
                "sampler": search.sampler}
    for key, value in settings.items():
        saved = study.user_attrs.get(key)
        if saved is None:
            study.set_user_attr(key, value)
        elif json.dumps(saved, sort_keys=True) != json.dumps(value, sort_keys=True):
            raise UserError(f"study {search.study} in {search.shown_url} was started with another {key} "
                            f"({json.dumps(saved, sort_keys=True)[:300]}): give the same one, or a new --name")
    return study


def sampler(search) -> optuna.samplers.BaseSampler:
    """The sampler, seeded from --seed (tpe and random: per trial, with the trial's number): one process
    replays the same study, and processes sharing a study draw different points."""
    seed = search.base.seed
    if search.sampler == "grid":  # the seed shuffles the grid; trial k takes point k (the same in every process)
        return optuna.samplers.GridSampler({d.key: d.grid() for d in search.space}, seed=seed)
    if search.sampler == "random":
        return PerTrialSeed(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    return PerTrialSeed(lambda s: optuna.samplers.TPESampler(seed=s, constant_liar=True), seed)


class PerTrialSeed(optuna.samplers.BaseSampler):
    """A sampler made afresh for each trial with the seed (--seed, trial number). Optuna's samplers read
    the study's history from the storage on every call, so a fresh one per trial loses nothing; one
    seeded sampler would draw the same points in every process that shares the study."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self.make, self.seed, self.current = make, seed, {}  # trial number -> its sampler (--jobs: threads)

    def of(self, trial) -> optuna.samplers.BaseSampler:
        if trial.number not in self.current:
            self.current[trial.number] = self.make((self.seed * 1_000_003 + trial.number) % 2**32)
        return self.current[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self.of(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.of(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.of(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.of(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.of(trial).after_trial(study, trial, state, values)
        self.current.pop(trial.number, None)

    def reseed_rng(self) -> None:  # the seeds come from the trial numbers
        pass
