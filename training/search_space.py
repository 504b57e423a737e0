"""The search space of `python -m training.tune`: a YAML file of training options and their ranges.

Each key is a training option as the command line spells it, without the dashes (`lr`,
`weight-decay`, `batch-size`, ...), or `model-args.<argument>` for one model argument; each value
is a range `{low: A, high: B}` (optionally `log: true` or `step: S`, as Optuna's suggest_int /
suggest_float take them; int or float by the option's type) or a list `{choices: [...]}`:

    lr: {low: 0.02, high: 0.4, log: true}
    batch-size: {choices: [64, 128, 256]}
    model-args.base_width: {low: 16, high: 64, step: 16}

Every bound and every choice is checked by building a TrainConfig with it (the options' own
validation), so a mistake is one line before any trial runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from training.config import RUN_DEFINING, TrainConfig, flag
from training.errors import UserError

DEFAULT_SPACE = Path(__file__).resolve().parent / "tune_space.yaml"
MODEL_ARGS = "model-args."
# What a trial may vary: the options that define what is trained, except the data itself (a different
# validation split or training subset would make the trials' accuracies incomparable) and what a search
# cannot meaningfully draw (starting weights, frozen prefixes, the whole model-args object); every trial
# shares --seed, so what differs between trials is their options, not their luck.
NOT_TUNABLE = ("dataset", "val_fraction", "test_fraction", "train_limit", "init_from", "freeze", "model_args",
               "seed")
TUNABLE = tuple(name for name in RUN_DEFINING if name not in NOT_TUNABLE) + ("patience",)
FIELD_TYPES = {f.name: f.type.split("|")[0].strip() for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class Dimension:
    """One searched option: a range (low, high, log, step) of kind int or float, or a list of choices."""

    key: str  # as the space file spells it: "weight-decay", "model-args.base_width"
    kind: str  # "int", "float" or "choices"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    @property
    def field(self) -> str | None:
        """The TrainConfig field it sets; None for one model argument."""
        return None if self.key.startswith(MODEL_ARGS) else self.key.replace("-", "_")

    def suggest(self, trial):
        """This dimension's value for an Optuna trial."""
        if self.kind == "choices":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list:
        """Every value the grid sampler tries; a continuous float range has none."""
        if self.kind == "choices":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise UserError(f"the grid sampler needs a finite grid: {self.key} is a continuous range; give it "
                            "step: or choices:, or use --sampler tpe or random")
        count = int((self.high - self.low) / self.step + 1e-9) + 1  # as Optuna's stepped float range
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def to_json(self) -> dict:
        if self.kind == "choices":
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, **({"log": True} if self.log else {}),
                **({"step": self.step} if self.step is not None else {})}


def apply(base: TrainConfig, params: dict) -> TrainConfig:
    """`base` with a trial's values (keyed as in the space file); TrainConfig validates the result."""
    changes = {key.replace("-", "_"): value for key, value in params.items() if not key.startswith(MODEL_ARGS)}
    model_args = {key.removeprefix(MODEL_ARGS): value for key, value in params.items() if key.startswith(MODEL_ARGS)}
    if model_args:
        changes["model_args"] = {**base.model_args, **model_args}
    return dataclasses.replace(base, **changes)


def read_space(path: Path, base: TrainConfig) -> tuple[Dimension, ...]:
    """The space file's dimensions, each bound and choice checked against `base`'s options."""
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"cannot read the search space {path}: {error.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    if document is None:
        raise UserError(f"{path} is empty: map training options to ranges, e.g. "
                        "lr: {low: 0.01, high: 0.3, log: true}")
    if not isinstance(document, dict):
        raise UserError(f"{path} must map training options to ranges, not hold a {type(document).__name__}")
    return tuple(dimension(path, str(key), spec, base) for key, spec in document.items())


def dimension(path: Path, key: str, spec, base: TrainConfig) -> Dimension:
    where = f"{path}: {key}"
    if key.startswith(MODEL_ARGS):
        if not key.removeprefix(MODEL_ARGS):
            raise UserError(f"{where}: name the model argument, e.g. model-args.base_width")
        kind = None  # a model argument's type is the type of its bounds
    else:
        name = key.replace("-", "_")
        if name not in TUNABLE:
            known = ", ".join(flag(n)[2:] for n in TUNABLE)
            raise UserError(f"{where}: not a training option a search can vary; known: {known}, or model-args.NAME")
        kind = FIELD_TYPES[name]
    if not isinstance(spec, dict) or not (set(spec) == {"choices"} or {"low", "high"} <= set(spec)):
        raise UserError(f"{where}: give {{low: A, high: B}} (with log: true or step: S) or {{choices: [...]}}")
    if "choices" in spec:
        return choices_dimension(where, key, spec["choices"], base)
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}: a range takes low, high, "
                        "log and step")
    low, high, step = (number(where, word, spec.get(word)) for word in ("low", "high", "step"))
    log = spec.get("log", False)
    if kind is None:
        kind = "int" if all(isinstance(v, int) for v in (low, high, step) if v is not None) else "float"
    if kind not in ("int", "float"):
        raise UserError(f"{where}: --{key} takes {kind} values, not a range: give {{choices: [...]}}")
    if kind == "int" and not all(isinstance(v, int) for v in (low, high, step) if v is not None):
        raise UserError(f"{where}: --{key} is a whole number: give low, high (and step) as integers")
    if not isinstance(log, bool):
        raise UserError(f"{where}: log is true or false, not {log!r}")
    if low >= high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    if step is not None and step <= 0:
        raise UserError(f"{where}: step must be positive")
    if log and (step not in (None, 1) or low <= 0):
        raise UserError(f"{where}: a log range needs low > 0 and no step")
    for value in (low, high):
        check_value(where, key, value, base)
    return Dimension(key, kind, low if kind == "int" else float(low), high if kind == "int" else float(high), log,
                     step if step is None or kind == "int" else float(step))


def choices_dimension(where: str, key: str, values, base: TrainConfig) -> Dimension:
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: choices must be a non-empty list")
    if len(set(map(repr, values))) != len(values):
        raise UserError(f"{where}: choices repeat a value")
    values = [number_text(value) for value in values]
    for value in values:
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise UserError(f"{where}: choice {value!r} is not a number, a string, true/false or null")
        check_value(where, key, value, base)
    return Dimension(key, "choices", choices=tuple(values))


def number(where: str, word: str, value):
    """A bound as a number; PyYAML reads 1e-5 (no dot) as text, so such text is read as the number it writes."""
    value = number_text(value)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise UserError(f"{where}: {word} must be a number, not {value!r}")


def number_text(value):
    if isinstance(value, str):
        try:
            return int(value) if value.lstrip("+-").isdigit() else float(value)
        except ValueError:
            return value
    return value


def check_value(where: str, key: str, value, base: TrainConfig) -> None:
    """The option's own validation (type, range, choices), through building a TrainConfig with `value`."""
    if FIELD_TYPES.get(key.replace("-", "_")) == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        apply(base, {key: value})
    except UserError as error:
        raise UserError(f"{where}: {value!r} does not fit: {error}") from None
