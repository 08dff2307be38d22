"""`MATRIX.toml`: the models and targets a nightly parity run builds, mapped onto typed options.

```toml
[matrix]
name = "nightly"
targets = ["x86_fbgemm", "qualcomm_snapdragon"]

[models.digits_cnn]
model = "models/digits_cnn.pt2"
calib = "data/calib.npz"
val = "data/val.npz"
```

Paths are relative to the matrix file. Every key is type-checked and unknown keys are errors
that name the file and the key path, as in target profiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any

from toolchain.core.errors import ConfigError
from toolchain.core.options import option, parse_options


@dataclasses.dataclass(frozen=True)
class MatrixOptions:
    name: str = option(
        "", "the matrix's name: runs of the same name share a history [default: the file's stem]"
    )
    targets: tuple[str, ...] = option(
        (), "target names (`toolchain targets`) or .toml profiles every model is built for"
    )
    out: str = option(
        "build/matrix", "folder for each run's build folders and logs (relative to the matrix file)"
    )
    db: str = option(
        "matrix.sqlite", "history: an SQLite file (relative to the matrix file) or an SQLAlchemy URL"
    )
    workers: int | None = option(
        None,
        "cells built at once on this machine [default: its cores / the cells' runtime threads, at least 1]",
    )
    time_limit_s: float = option(
        1800.0, "a cell still building after this long is killed and recorded as crashed"
    )
    cpus_per_cell: int | None = option(
        None, "CPUs a cell asks Ray for [default: the target profile's runtime.threads]"
    )
    latency_repeats: int = option(
        3,
        "times each artifact's batch-1 latency is re-measured per cell (the spread is the noise; "
        "0: none, and no latency alarm)",
    )
    keep_runs: int = option(10, "run folders kept on disk (the database keeps every run)")


@dataclasses.dataclass(frozen=True)
class AlarmOptions:
    accuracy_drop: float = option(
        0.005, "accuracy (or top-1 agreement without labels) lost since the last passing run, absolute"
    )
    sqnr_drop_db: float = option(3.0, "SQNR lost since the last passing run, in dB")
    size_growth: float = option(
        0.10, "growth of an artifact's size since the last passing run, as a fraction"
    )
    latency_growth: float = option(
        0.10, "smallest p50 growth that counts, as a fraction, and only beyond the measured spread"
    )


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    model: str = dataclasses.field(
        metadata={"help": "model file (relative to the matrix file) or torchvision:<name>"}
    )
    calib: str | None = option(None, "calibration data (see `toolchain build --calib`)")
    val: str | None = option(None, "validation data, with labels for accuracy (see `toolchain build --val`)")
    targets: tuple[str, ...] | None = option(None, "only these of the matrix's targets [default: all]")
    input_shape: str | None = option(None, "`--input-shape` of the build")
    outputs: str | None = option(None, "`--outputs` of the build (KEY=ROLE,...)")
    metric: str | None = option(
        None, "`--metric FILE.py:function` of the build (relative to the matrix file)"
    )
    max_metric_drop: float | None = option(None, "`--max-metric-drop` of the build")
    trust_pickle: bool = option(False, "`--trust-pickle`: the file is a pickled module you trust")
    time_limit_s: float | None = option(None, "this model's cell time limit [default: matrix.time_limit_s]")
    cpus: int | None = option(None, "CPUs this model's cells ask Ray for [default: matrix.cpus_per_cell]")


@dataclasses.dataclass(frozen=True)
class _MatrixFile:
    matrix: MatrixOptions = option(MatrixOptions(), "the run's settings")
    alarms: AlarmOptions = option(AlarmOptions(), "regression alarm thresholds")
    models: dict[str, Any] = option(None, "model name -> its model file, data and overrides")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One `toolchain build`: a model for a target, with everything the build command needs."""

    model_name: str
    target: str  # as the matrix gives it: a name or a profile path
    model: str
    calib: str | None = None
    val: str | None = None
    input_shape: str | None = None
    outputs: str | None = None
    metric: str | None = None
    max_metric_drop: float | None = None
    trust_pickle: bool = False
    time_limit_s: float = 1800.0
    cpus: int | None = None

    @property
    def target_name(self) -> str:
        return Path(self.target).stem if self.target.endswith(".toml") else self.target

    @property
    def key(self) -> str:
        """`model/target`: the cell's name in the history, the dashboard and JUnit."""
        return f"{self.model_name}/{self.target_name}"

    @property
    def folder_name(self) -> str:
        return f"{self.model_name}-{self.target_name}"

    def build_args(self, out: Path) -> list[str]:
        """The `toolchain build` arguments of this cell, its build folder ``out``."""
        args = ["build", self.model, "--target", self.target, "--out", str(out), "--json"]
        for flag, value in (
            ("--calib", self.calib),
            ("--val", self.val),
            ("--input-shape", self.input_shape),
            ("--outputs", self.outputs),
            ("--metric", self.metric),
        ):
            if value is not None:
                args += [flag, value]
        if self.max_metric_drop is not None:
            args += ["--max-metric-drop", str(self.max_metric_drop)]
        return args + (["--trust-pickle"] if self.trust_pickle else [])


@dataclasses.dataclass(frozen=True)
class Matrix:
    name: str
    source: Path
    sha256: str  # of the file's bytes: a run is resumed only with the file it started with
    options: MatrixOptions
    alarms: AlarmOptions
    cells: tuple[Cell, ...]

    @property
    def out(self) -> Path:
        return _relative(self.source, self.options.out)

    @property
    def db_url(self) -> str:
        return database_url(self.options.db, self.source.parent)


def database_url(db: str, base: Path = Path(".")) -> str:
    """An SQLAlchemy URL as it is, a file path as an SQLite URL (relative to ``base``)."""
    if re.match(r"^[a-z][a-z0-9+]*://", db):
        return db
    return f"sqlite:///{(base / db).resolve()}"


def load_matrix(path: str | Path) -> Matrix:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"matrix file `{path}` does not exist")
    source = str(path)
    data = path.read_bytes()
    try:
        table = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    raw = parse_options(_MatrixFile, table, "", source)
    opts = raw.matrix
    if not opts.targets:
        raise ConfigError(f"{source}: `matrix.targets` must name at least one target")
    if not raw.models:
        raise ConfigError(f"{source}: `models` must name at least one model (a `[models.<name>]` table)")
    _check_positive(opts, source)
    cells = tuple(c for name, t in raw.models.items() for c in _cells(name, t, opts, path))
    keys = [c.key for c in cells]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError(
                f"{source}: cell `{key}` appears twice (two targets of one name: "
                "a profile file named like a built-in target?)"
            )
    return Matrix(
        opts.name or path.stem, path.resolve(), hashlib.sha256(data).hexdigest(), opts, raw.alarms, cells
    )


def _cells(name: str, table: Any, opts: MatrixOptions, path: Path) -> list[Cell]:
    source = str(path)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(
            f"{source}: model name `models.{name}` may only use letters, digits, '.', '_' and '-'"
        )
    m = parse_options(ModelOptions, table, f"models.{name}", source)
    for key, value in (
        ("time_limit_s", m.time_limit_s),
        ("cpus", m.cpus),
        ("max_metric_drop", m.max_metric_drop),
    ):
        if value is not None and value <= 0 and not (key == "max_metric_drop" and value == 0):
            raise ConfigError(f"{source}: `models.{name}.{key}` must be positive (got {value})")
    chosen = m.targets if m.targets is not None else opts.targets
    for i, t in enumerate(chosen):
        if t not in opts.targets:
            raise ConfigError(
                f"{source}: `models.{name}.targets[{i}]` = {t!r} is not a target of the matrix; "
                f"valid: {', '.join(opts.targets)}"
            )
    model = m.model if m.model.startswith("torchvision:") else str(_relative(path, m.model))
    resolved = dict(
        calib=m.calib and str(_relative(path, m.calib)),
        val=m.val and str(_relative(path, m.val)),
        metric=m.metric and _metric_path(path, m.metric),
    )
    return [
        Cell(
            name,
            _target(path, t),
            model,
            input_shape=m.input_shape,
            outputs=m.outputs,
            max_metric_drop=m.max_metric_drop,
            trust_pickle=m.trust_pickle,
            time_limit_s=opts.time_limit_s if m.time_limit_s is None else m.time_limit_s,
            cpus=opts.cpus_per_cell if m.cpus is None else m.cpus,
            **resolved,
        )
        for t in chosen
    ]


def _target(path: Path, target: str) -> str:
    return str(_relative(path, target)) if target.endswith(".toml") else target


def _metric_path(path: Path, metric: str) -> str:
    file, sep, function = metric.rpartition(":")
    return f"{_relative(path, file)}:{function}" if sep else metric


def _relative(matrix_file: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (matrix_file.parent / p).resolve()


def _check_positive(opts: MatrixOptions, source: str) -> None:
    if opts.latency_repeats < 0:
        raise ConfigError(
            f"{source}: `matrix.latency_repeats` must be 0 or more (got {opts.latency_repeats})"
        )
    checks = {
        "matrix.time_limit_s": opts.time_limit_s,
        "matrix.keep_runs": opts.keep_runs,
        "matrix.workers": opts.workers or 1,
        "matrix.cpus_per_cell": opts.cpus_per_cell or 1,
    }
    for key, value in checks.items():
        if value <= 0:
            raise ConfigError(f"{source}: `{key}` must be positive (got {value})")
