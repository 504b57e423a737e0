"""python -m training.tune: real studies of real training runs on mnist-5k, with small budgets.

One grid study (its record against the storage, a pruned trial, the best trial reproduced by its printed
`make train` command), two processes sharing a study through a private PostgreSQL server, a study
continued after its process was killed, and every bad search space and storage as one line.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from training.tune import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# Every trial: 400 digits, 2 epochs of batch 32 (a few seconds each); QUICK: one epoch.
TRAINING = ["--dataset", "mnist-5k", "--model", "simple-cnn", "--train-limit", "400", "--epochs", "2",
            "--batch-size", "32", "--workers", "0", "--no-download"]
QUICK = [*TRAINING, "--epochs", "1"]
# The seed shuffles the grid to 0.02, 0.05, 0.1, 0.2, 1e-5: a learning rate that cannot learn comes after
# the median pruner's 3 start-up trials, and its first epoch falls below theirs.
GRID = "lr: {choices: [0.05, 0.1, 0.02, 0.2, 1.0e-5]}\n"
HOPELESS_LR = 1e-5


def load(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def grid_study(tmp_path_factory):
    """A five-trial grid study on SQLite, then --train-best: (artifacts dir, tune.json's record, the output,
    the -best run's metrics)."""
    root = tmp_path_factory.mktemp("tune")
    (root / "space.yaml").write_text(GRID)
    argv = ["--name", "grid", "--trials", "5", "--sampler", "grid", "--train-best", "--space", str(root / "space.yaml"),
            "--artifacts-dir", str(root / "artifacts"), *TRAINING]
    result = subprocess.run([sys.executable, "-m", "training.tune", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((root / "artifacts" / "grid" / "tune.json").read_text())
    best_run = json.loads((root / "artifacts" / "grid-best" / "metrics.json").read_text())
    return root / "artifacts", record, result.stdout, best_run


def test_tune_json_matches_the_storage(grid_study):
    import optuna

    artifacts, record, output, _ = grid_study
    study = load(f"sqlite:///{artifacts / 'grid' / 'study.db'}", "grid")
    stored = {t.number: t for t in study.trials}
    assert [t["number"] for t in record["trials"]] == sorted(stored) == [0, 1, 2, 3, 4]
    for trial in record["trials"]:
        saved = stored[trial["number"]]
        assert trial["state"] == saved.state.name
        assert trial["options"] == saved.params
        assert trial["val_accuracy"] == saved.value
        assert trial["epochs_reported"] == len(saved.intermediate_values)
        assert trial["seconds"] > 0
        line = next(line for line in output.splitlines() if line.startswith(f"trial {trial['number']:3d}"))
        assert trial["state"] in line and json.dumps(trial["options"]) in line  # one line per finished trial
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(completed, key=lambda t: t.value)
    assert record["best"]["number"] == best.number and record["best"]["val_accuracy"] == best.value
    assert record["counts"]["complete"] + record["counts"]["pruned"] == record["budget"] == 5
    assert {t["options"]["lr"] for t in record["trials"]} == {0.05, 0.1, 0.02, 0.2, HOPELESS_LR}  # a grid
    for name in ("history", "importances", "slice"):
        assert (artifacts / "grid" / f"tune-{name}.png").stat().st_size > 1000, record["plots"]
    page = (artifacts / "grid" / "tune.html").read_text()
    assert "Study grid" in page and record["best"]["train_command"].split("'")[0] in page


def test_a_hopeless_trial_is_pruned_and_leaves_no_run(grid_study):
    artifacts, record, *_ = grid_study
    hopeless = next(t for t in record["trials"] if t["options"]["lr"] == HOPELESS_LR)
    assert hopeless["state"] == "PRUNED", record["trials"]
    assert hopeless["epochs_reported"] == 1  # stopped after its first epoch
    assert not (artifacts / "grid" / "trials" / str(hopeless["number"])).exists()
    for trial in record["trials"]:
        if trial["state"] == "COMPLETE":
            run = Path(trial["run_dir"])
            assert (run / "checkpoint.pt").is_file() and (run / "train.log").is_file()
            assert json.loads((run / "metrics.json").read_text())["val_accuracy"] == trial["val_accuracy"]


def test_train_best_trains_the_best_trial_as_a_normal_run(grid_study):
    artifacts, record, output, best_run = grid_study
    assert abs(best_run["val_accuracy"] - record["best"]["val_accuracy"]) <= 0.005
    assert "test_accuracy" in best_run and f"reproduce: {record['best']['train_command']}" in output


def test_the_best_trial_is_reproduced_by_its_make_train_command(grid_study):
    artifacts, record, *_ = grid_study
    command = shlex.split(record["best"]["train_command"])
    assert command[:2] == ["make", "train"]
    # The Makefile's venv rule is taken as done (this test runs inside it) and its python is this one.
    result = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", f"PY={sys.executable}",
                             *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((artifacts / "grid-best" / "metrics.json").read_text())
    assert abs(metrics["val_accuracy"] - record["best"]["val_accuracy"]) <= 0.005


BAD_SPACES = {
    "unknown option": ("learning-rate: {low: 0.01, high: 0.1}\n", "not a training option a search can vary; known: "),
    "float range for an int option": ("batch-size: {low: 16.5, high: 64}\n", "is a whole number"),
    "range for a bool option": ("nesterov: {low: 0, high: 1}\n", "takes bool values, not a range"),
    "range outside what the option takes": ("lr: {low: 0, high: 0.1}\n", "--lr must be positive"),
    "choice the option does not have": ("augment: {choices: [flip, rotate]}\n", "choose one of none, flip"),
    "choice of the wrong type": ("epochs: {choices: [2, two]}\n", "should be int"),
    "empty file": ("# nothing yet\n", "is empty"),
    "malformed YAML": ("lr: {low: 0.01, high: [0.1\n", "is not valid YAML"),
    "neither a range nor choices": ("lr: 0.1\n", "give {low: A, high: B}"),
    "log range from zero": ("weight-decay: {low: 0.0, high: 0.01, log: true}\n", "a log range needs low > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_a_bad_search_space_is_one_line_before_any_trial(case, tmp_path, capsys):
    text, message = BAD_SPACES[case]
    (tmp_path / "space.yaml").write_text(text)
    code = main(["--name", "bad", "--trials", "2", "--space", str(tmp_path / "space.yaml"),
                 "--artifacts-dir", str(tmp_path / "artifacts"), *TRAINING])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and message in error, error
    assert error.startswith("error: ") and "space.yaml" in error
    assert not (tmp_path / "artifacts").exists()  # nothing ran, nothing was written


def test_the_grid_sampler_refuses_a_continuous_range(tmp_path, capsys):
    (tmp_path / "space.yaml").write_text("lr: {low: 0.01, high: 0.1, log: true}\n")
    code = main(["--name", "bad", "--trials", "2", "--sampler", "grid", "--space", str(tmp_path / "space.yaml"),
                 "--artifacts-dir", str(tmp_path / "artifacts"), *TRAINING])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "lr is a continuous range; give it step:" in error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_STORAGES = {
    "not a URL": ("this is not a url", "is not a database URL"),
    "a port that is not a number": ("postgresql://kit@127.0.0.1:port/postgres", "is not a database URL"),
    "a database the kit does not use": ("redis://127.0.0.1:6379/0", "use postgresql://USER@HOST:PORT/DB"),
    "nobody listening": (f"postgresql://kit@127.0.0.1:{free_port()}/postgres", "cannot open the study storage"),
}


@pytest.mark.parametrize("case", sorted(BAD_STORAGES))
def test_a_bad_storage_is_one_line(case, tmp_path, capsys):
    url, message = BAD_STORAGES[case]
    code = main(["--name", "bad", "--trials", "2", "--storage", url, "--artifacts-dir", str(tmp_path / "a"),
                 *TRAINING])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and message in error, error


def postgres_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL cluster on 127.0.0.1 (stopped after): its plain URL."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql where it runs as root)")
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("starting a private PostgreSQL cluster here needs root (initdb runs as user postgres)")
    home = Path(tempfile.mkdtemp(prefix="kit-pg-"))
    shutil.chown(home, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, binaries / "initdb", "-D", home / "data", "-A", "trust", "-U", "kit"],
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    subprocess.run([*as_postgres, binaries / "pg_ctl", "-D", home / "data", "-o",
                    f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "-l", home / "log", "-w", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://kit@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, binaries / "pg_ctl", "-D", home / "data", "-m", "fast", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def tune(*argv: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.tune", *argv, *QUICK], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finished_lines(output: str) -> dict[int, str]:
    return {int(line.split()[1]): line.split()[2] for line in output.splitlines() if line.startswith("trial ")}


def test_two_processes_share_one_study_through_postgresql(postgres, tmp_path):
    import optuna

    (tmp_path / "space.yaml").write_text("lr: {low: 0.02, high: 0.1, log: true}\n"
                                         "label-smoothing: {low: 0.0, high: 0.2}\n")
    argv = ("--name", "shared", "--trials", "3", "--sampler", "random", "--space", str(tmp_path / "space.yaml"),
            "--storage", postgres)
    processes = [tune(*argv, "--artifacts-dir", str(tmp_path / f"machine-{i}")) for i in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    storage = postgres.replace("postgresql://", "postgresql+psycopg://")
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["shared"]  # one study
    study = load(storage, "shared")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3  # the study's budget, split between the two
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 3  # no point drawn twice
    for trial in finished:  # each trial ran in exactly one of them, which keeps its run
        runs = [tmp_path / f"machine-{i}" / "shared" / "trials" / str(trial.number) for i in range(2)]
        assert sum(run.is_dir() for run in runs) == (trial.state.name == "COMPLETE"), trial.number
        if trial.state.name == "COMPLETE":
            assert str(next(run for run in runs if run.is_dir())) == trial.user_attrs["run_dir"]
    assert len({t.user_attrs["process"] for t in finished}) <= 2
    for out, _ in outputs:  # each process's tune.json and lines cover the whole study
        assert set(finished_lines(out)) <= {t.number for t in finished}


def test_a_killed_study_continues_where_it_stopped(tmp_path):
    import optuna

    from training.tune_storage import GRACE_SECONDS

    (tmp_path / "space.yaml").write_text("lr: {low: 0.02, high: 0.1, log: true}\n")
    argv = ("--name", "resumed", "--trials", "2", "--sampler", "random", "--space", str(tmp_path / "space.yaml"),
            "--artifacts-dir", str(tmp_path / "artifacts"))
    storage = f"sqlite:///{tmp_path / 'artifacts' / 'resumed' / 'study.db'}"
    process = tune(*argv, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until one trial is complete and the next one is training
            time.sleep(0.5)
            if process.poll() is not None or not (tmp_path / "artifacts" / "resumed" / "study.db").exists():
                continue
            try:
                states = [t.state.name for t in load(storage, "resumed").trials]
            except (KeyError, optuna.exceptions.OptunaError, Exception):
                continue
            if states.count("COMPLETE") == 1 and states[-1] == "RUNNING" and len(states) == 2:
                break
        assert process.poll() is None, process.communicate()[1][-3000:]
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the machine is lost: no clean-up of any kind
        process.communicate()
    before = {t.number: t for t in load(storage, "resumed").trials}
    assert before[1].state.name == "RUNNING"
    time.sleep(GRACE_SECONDS + 1)  # the killed trial's heartbeat goes stale
    again = tune(*argv)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    after = {t.number: t for t in load(storage, "resumed").trials}
    assert after[0].value == before[0].value and after[0].datetime_complete == before[0].datetime_complete
    assert after[1].state.name == "FAIL"  # only the running trial is lost
    assert not (tmp_path / "artifacts" / "resumed" / "trials" / "1").exists()
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in after.values()) == 2
    assert set(finished_lines(out)) == {2}  # the new process ran only the trial still missing
    assert "1 of 2 trials finished" in out
