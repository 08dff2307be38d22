"""`toolchain matrix run`: every cell of a matrix built, compared with its history, recorded.

Cells fan out over a local pool of worker threads, each waiting on one build process, or over
Ray (`--ray`), each cell a Ray task asking for its CPUs. Results come back to this process, which
alone writes the history: one transaction per finished cell.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from toolchain.core.errors import ToolchainError, reason
from toolchain.matrix import alarms
from toolchain.matrix.cell import CellResult, allow_builds, crashed, host_cpu_model, kill_builds, run_cell
from toolchain.matrix.history import History, Run, artifact_rows, cell_row
from toolchain.matrix.spec import Cell, Matrix
from toolchain.reporting.manifest import library_versions

log = logging.getLogger("toolchain")


@dataclasses.dataclass(frozen=True)
class MatrixRun:
    """What one `matrix run` did: its run in the history, the cells built now, and every alarm."""

    run: Run
    results: tuple[CellResult, ...]  # built by this invocation (a resumed run's earlier cells are not here)
    skipped: tuple[str, ...]  # cells already finished in the run being resumed
    alarms: tuple[dict, ...]  # of the whole run, resumed cells included
    folder: Path


# done, total, the result, seconds left (estimate)
Progress = Callable[[int, int, CellResult, float | None], None]


def run_matrix(
    matrix: Matrix,
    history: History,
    *,
    workers: int | None = None,
    ray: str | None = None,
    resume: bool = False,
    targets: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> MatrixRun:
    """Build every cell of ``matrix`` (only those of ``targets``, a shard, when given; with
    ``resume``, those its interrupted run did not finish), record each in ``history`` with its
    alarms, and return the run."""
    cells = shard_cells(matrix, targets)
    check_targets(cells)
    workers = workers or matrix.options.workers or default_workers(cells)
    executor = f"ray {ray}" if ray else f"local, {workers} worker{'s' * (workers > 1)}"
    shard = ",".join(sorted(set(targets))) or None
    run, done = _open_run(matrix, history, resume, executor, None if ray else workers, shard, len(cells))
    todo = [c for c in cells if c.key not in done]
    folder = matrix.out / f"run-{run.id}"
    folder.mkdir(parents=True, exist_ok=True)
    log.info(
        "matrix %s, run %d: %d cells (%s)%s",
        matrix.name,
        run.id,
        len(todo),
        executor,
        f"; {len(done)} finished before" if done else "",
    )
    fan_out = _ray_cells(ray) if ray else _local_cells(workers)
    results, started = [], time.monotonic()
    for result in fan_out(todo, folder, matrix.options.latency_repeats):
        history.record_cell(run, result, _alarms(matrix, history, run, result))
        results.append(result)
        elapsed = time.monotonic() - started
        progress and progress(
            len(results), len(todo), result, elapsed / len(results) * (len(todo) - len(results))
        )
    history.finish_run(run.id)
    prune_runs(matrix.out, matrix.options.keep_runs)
    return MatrixRun(
        history.run(run.id), tuple(results), tuple(sorted(done)), tuple(history.alarms_of(run.id)), folder
    )


def shard_cells(matrix: Matrix, targets: tuple[str, ...]) -> list[Cell]:
    """The cells of these targets (by name, as `toolchain targets` or the profile's file stem gives it)."""
    names = list(dict.fromkeys(c.target_name for c in matrix.cells))
    for t in targets:
        if t not in names:
            raise ToolchainError(
                f"--target `{t}` is not a target of {matrix.source}; valid: {', '.join(names)}"
            )
    return [c for c in matrix.cells if not targets or c.target_name in targets]


def _open_run(
    matrix: Matrix,
    history: History,
    resume: bool,
    executor: str,
    workers: int | None,
    shard: str | None,
    total: int,
) -> tuple[Run, set[str]]:
    if not resume:
        return history.start_run(
            matrix.name,
            matrix.sha256,
            total,
            executor,
            workers,
            host_cpu_model(),
            library_versions()["toolchain"],
            toolchain_commit(),
            shard,
        ), set()
    run = history.resumable_run(matrix.name, shard)
    if run is None:
        within = f" (targets {shard})" if shard else ""
        raise ToolchainError(
            f"--resume: matrix `{matrix.name}`{within} has no unfinished run in {history.shown}"
        )
    if run.matrix_sha256 != matrix.sha256:
        raise ToolchainError(
            f"--resume: {matrix.source} changed since run {run.id} started; run it without --resume"
        )
    return history.reopen_run(run, executor, workers), history.done_keys(run.id)


def _alarms(matrix: Matrix, history: History, run: Run, result: CellResult) -> list[dict]:
    baseline = history.last_passing(matrix.name, result.key, run.id)
    timing = (
        history.last_passing(matrix.name, result.key, run.id, quiet_below=alarms.QUIET) if baseline else None
    )
    cell = {**cell_row(result), "artifacts": {r["name"]: r for r in artifact_rows(result)}}
    return alarms.compare(cell, run, baseline, matrix.alarms, timing)


def _local_cells(workers: int):
    def fan_out(cells: list[Cell], folder: Path, repeats: int) -> Iterator[CellResult]:
        allow_builds()
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cell") as pool:
            futures = [
                pool.submit(run_cell, c, folder / c.folder_name, folder / f"{c.folder_name}.log", repeats)
                for c in cells
            ]
            try:
                for f in concurrent.futures.as_completed(futures):
                    yield f.result()
            except BaseException:  # Ctrl-C, or a failure recording a cell: no build runs on without us
                for f in futures:
                    f.cancel()
                kill_builds()
                raise

    return fan_out


def _ray_cells(address: str):
    """Each cell a Ray task with the CPUs its profile's runtime threads need (or the matrix's
    `cpus_per_cell`). ``local`` starts a Ray instance for this run; ``auto`` or an address joins
    a running cluster. Workers must see the same paths (a shared file system) for the build folders."""
    try:
        import ray
    except ImportError:
        raise ToolchainError("--ray needs Ray: pip install 'toolchain[ray]'") from None

    def fan_out(cells: list[Cell], folder: Path, repeats: int) -> Iterator[CellResult]:
        try:
            ray.init(
                address=None if address == "local" else address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ToolchainError(f"--ray {address}: cannot reach a Ray cluster: {e}") from None
        try:
            available = ray.cluster_resources().get("CPU", 0)
            wanted = {c.key: cpus_of(c) for c in cells}
            too_big = [k for k, n in wanted.items() if n > available]
            if too_big:
                raise ToolchainError(
                    f"--ray {address}: the cluster has {available:g} CPUs; {too_big[0]} asks for "
                    f"{wanted[too_big[0]]} (set `cpus` / `matrix.cpus_per_cell`)"
                )
            task = ray.remote(_ray_task)
            pending = {
                task.options(num_cpus=wanted[c.key], max_retries=0).remote(c, str(folder), repeats): c
                for c in cells
            }
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(ready[0])
                try:
                    yield CellResult.from_json(ray.get(ready[0]))
                except ray.exceptions.RayError as e:
                    # its worker or node died: the cell crashed, the matrix goes on
                    yield crashed(
                        cell,
                        folder / cell.folder_name,
                        folder / f"{cell.folder_name}.log",
                        f"Ray: {reason(e, last=True)}",
                    )
        finally:
            ray.shutdown()

    return fan_out


def _ray_task(cell: Cell, folder: str, repeats: int) -> dict:
    out = Path(folder)
    return run_cell(cell, out / cell.folder_name, out / f"{cell.folder_name}.log", repeats).to_json()


def cpus_of(cell: Cell) -> int:
    from toolchain.target import load_target

    return cell.cpus or load_target(cell.target).runtime.threads


def check_targets(cells: Iterable[Cell]) -> None:
    """Every target loads, before any cell runs: a typo costs no waiting."""
    from toolchain.target import load_target

    for target in dict.fromkeys(c.target for c in cells):
        load_target(target)


def default_workers(cells: list[Cell]) -> int:
    """As many cells at once as this machine's cores hold without oversubscribing: each build
    runs its profile's `runtime.threads` threads (timing under contention is noise)."""
    return max(1, (os.cpu_count() or 1) // max(map(cpus_of, cells), default=1))


def toolchain_commit() -> str | None:
    """The git commit of the toolchain's own checkout (None when installed from a wheel)."""
    checkout = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    # not a venv inside someone's repo
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != checkout:
        return None
    return lines[1]


def prune_runs(out: Path, keep: int) -> None:
    """Only the newest ``keep`` run folders stay on disk; the history keeps every run."""
    folders = sorted(
        (p for p in out.glob("run-*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:])
    )
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
