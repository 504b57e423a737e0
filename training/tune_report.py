"""A study's outputs in artifacts/STUDY/, read back from its storage (so they cover every process's trials).

  tune.json                 every trial (number, state, options, validation accuracy, seconds), the best
                            one and the `make train` command that reproduces it
  tune-history.png          validation accuracy per trial and the best so far (Optuna's own plots)
  tune-importances.png      how much each option explains (needs 2 completed trials)
  tune-slice.png            each option's values against the validation accuracy
  tune.html                 the page that shows them (training/templates/tune.html.j2)
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import warnings

from training.checkpoint import write_bytes_atomic, write_json_atomic
from training.config import TrainConfig, flag

PLOTS = ("history", "importances", "slice")
# What `make train` sets with its own variables; every other option goes into TRAIN_ARGS.
MAKE_VARIABLES = {"dataset": "DATASET", "model": "MODEL", "model_args": "MODEL_ARGS", "epochs": "EPOCHS"}
NOT_REPEATED = ("name", "resume")  # the command names its own run and starts it fresh


def trial_line(trial) -> str:
    """One finished trial, as the progress prints it."""
    seconds = seconds_of(trial)
    if trial.state.name == "COMPLETE":
        outcome = f"val {trial.value:.4f}"
    elif trial.state.name == "PRUNED" and trial.intermediate_values:
        epoch = max(trial.intermediate_values)
        outcome = f"pruned at epoch {epoch} (val {trial.intermediate_values[epoch]:.4f})"
    else:
        outcome = trial.state.name.lower()
    took = f"  {seconds:.1f}s" if seconds is not None else ""
    return f"trial {trial.number:3d}  {trial.state.name:8s}  {outcome}  {json.dumps(trial.params)}{took}"


def seconds_of(trial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 2)


def command_arguments(config: TrainConfig) -> list[str]:
    """`python -m training` arguments that give `config`: every option that differs from its default."""
    defaults, arguments = TrainConfig(), []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in NOT_REPEATED or value == getattr(defaults, f.name):
            continue
        if isinstance(value, bool):
            arguments.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        else:
            arguments += [flag(f.name), text_of(value)]
    return arguments


def text_of(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def python_command(config: TrainConfig) -> str:
    return shlex.join(["python", "-m", "training", "--name", config.name, *command_arguments(config)])


def make_command(config: TrainConfig) -> str:
    """The `make train` line that trains `config` (the Makefile's variables where it has them)."""
    words, rest, arguments = ["make", "train", f"NAME={config.name}"], [], command_arguments(config)
    i = 0
    while i < len(arguments):
        name = arguments[i][2:].replace("-", "_")
        if name in MAKE_VARIABLES:
            words.append(f"{MAKE_VARIABLES[name]}={shlex.quote(arguments[i + 1])}")
            i += 2
        else:
            rest.append(arguments[i])
            i += 1
    if rest:
        words.append("TRAIN_ARGS=" + shlex.quote(shlex.join(rest)))
    return " ".join(words)


def trial_record(trial) -> dict:
    values = trial.intermediate_values
    return {
        "number": trial.number,
        "state": trial.state.name,
        "options": trial.params,
        "val_accuracy": trial.value,  # the best epoch's; None unless COMPLETE
        "last_reported": {"epoch": max(values), "val_accuracy": values[max(values)]} if values else None,
        "epochs_reported": len(values),
        "seconds": seconds_of(trial),
        "run_dir": trial.user_attrs.get("run_dir") if trial.state.name == "COMPLETE" else None,
        "process": trial.user_attrs.get("process"),  # host:pid that ran it (its run folder is on that host)
        **({"note": "not run: the study's budget was already taken"} if trial.user_attrs.get("surplus") else {}),
    }


def study_record(search, study) -> dict:
    import optuna

    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(completed, key=lambda t: (t.value, -t.number)) if completed else None
    counts = {state: sum(t.state.name == state for t in trials) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    record = {
        "study": search.study,
        "storage": search.shown_url,
        "objective": "val_accuracy (maximized; the test split is never looked at)",
        "sampler": search.sampler,
        "pruner": "median",
        "budget": search.budget(),
        "counts": {state.lower(): count for state, count in counts.items()},
        "space": {d.key: d.to_json() for d in search.space},
        "options": search.base.to_json(),
        "trials": [trial_record(t) for t in trials],
        "best": None,
    }
    if best is not None:
        config = search.best_config(best.params)
        record["best"] = {"number": best.number, "val_accuracy": best.value, "options": best.params,
                          "run_dir": best.user_attrs.get("run_dir"), "train_command": make_command(config),
                          "python_command": python_command(config)}
    return record


def write_plots(study, out_dir) -> dict:
    """tune-*.png where there is enough to show; {plot: None or why it is missing}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    completed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    makers = {"history": plots.plot_optimization_history, "importances": plots.plot_param_importances,
              "slice": plots.plot_slice}
    notes = {}
    for name, make in makers.items():
        path = out_dir / f"tune-{name}.png"
        if completed < (2 if name == "importances" else 1):
            path.unlink(missing_ok=True)
            notes[name] = f"needs at least {2 if name == 'importances' else 1} completed trials ({completed} so far)"
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                axes = make(study)
            except (ValueError, RuntimeError) as error:  # e.g. importances where no option varied
                notes[name] = f"not drawn: {error}"
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        if name == "slice":  # one panel per option, and a colour bar
            figure.set_size_inches(max(7.0, 3.2 * len(axes.flat if hasattr(axes, "flat") else [axes]) + 1.5), 4.5)
        temporary = path.with_suffix(".tmp.png")
        figure.savefig(temporary, dpi=110, bbox_inches="tight")
        temporary.replace(path)
        plt.close(figure)
        notes[name] = None
    return notes


def write_outputs(search, study) -> dict:
    """tune.json, the plots and tune.html; returns tune.json's record."""
    out_dir = search.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    record = study_record(search, study)
    record["plots"] = write_plots(study, out_dir)
    write_json_atomic(out_dir / "tune.json", record)
    write_bytes_atomic(out_dir / "tune.html", render(out_dir, record).encode("utf-8"))
    return record


def render(out_dir, record: dict) -> str:
    from training.report import data_uri, environment

    pictures = {name: data_uri(out_dir / f"tune-{name}.png") for name in PLOTS}
    return environment().get_template("tune.html.j2").render(study=record, pictures=pictures)
