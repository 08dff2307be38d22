"""One cell of a matrix: `toolchain build` in a process of its own, watched from outside.

The build runs as a child process in a new process group, so that a segfault in a runtime, the
kernel's out-of-memory killer or the cell's time limit ends that build only: the cell is then
recorded as ``crashed`` with the reason and its log, and the matrix goes on. After a build,
each artifact's batch-1 latency is measured ``latency_repeats`` times more in one more process,
which also records how much of the machine other processes used meanwhile: the history knows
each cell's run-to-run spread, and whether its timings were taken on a quiet machine, so that a
latency alarm can ignore changes inside the noise and timings taken beside other work.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from toolchain.core.artifact import sha256_files
from toolchain.folder import remove_leftovers
from toolchain.matrix.spec import Cell

# `toolchain build` exit codes -> cell status (see toolchain/core/errors.py)
STATUS_OF_EXIT = {0: "passed", 3: "failed", 4: "not_judged", 2: "error"}
STATUSES = ("passed", "failed", "not_judged", "error", "crashed")

_RUNNING: set[subprocess.Popen] = set()  # the build processes of this process's cells
_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set by kill_builds: no new build starts


@dataclasses.dataclass(frozen=True)
class CellResult:
    """What one cell's build left: its status, the report it wrote, and where it came from."""

    key: str
    model_name: str
    target: str
    status: str  # one of STATUSES
    reason: str | None  # why it failed, erred or crashed, in one line
    started: str  # UTC, ISO 8601
    seconds: float  # wall time of the cell, re-measurement included
    folder: str | None  # the build folder (None when the build left none)
    log: str
    report: dict[str, Any] | None  # report.json of the build
    # artifact (and fp32_reference) -> batch-1 p50 of each re-measurement, ms
    latency_repeats: dict[str, list[float]]
    provenance: dict[str, Any]  # model / data / profile sha256 and library versions
    timing_busy: float | None = (
        None  # the largest share of the machine other processes used while it was re-measured
    )
    host_cpu: str | None = None  # the CPU it was built and timed on (a Ray cell's node, not the driver's)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CellResult":
        return cls(**data)


def run_cell(cell: Cell, folder: Path, log: Path, repeats: int = 3) -> CellResult:
    """Build ``cell`` into ``folder`` in a child process, its stderr in ``log``; never raises
    for anything the build does."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)  # left by this cell's build in a run that was killed, before --resume
    code, why = _child([sys.executable, "-m", "toolchain", *cell.build_args(folder)], log, cell.time_limit_s)
    report = _read_json(folder / "report.json") if code in (0, 3, 4) else None
    if report is None:
        remove_leftovers(folder)
    status = STATUS_OF_EXIT.get(code, "crashed") if why is None else "crashed"
    if status in ("passed", "failed", "not_judged") and report is None:
        status, why = "crashed", f"exited with code {code} but wrote no report.json"
    if status == "error":
        why = _last_error(log)
    elif status == "crashed" and why is None:
        why = f"exited with code {code}: {_last_error(log)}"
    elif status == "failed":
        why = _failures(report)
    latency, busy = {}, None
    if report is not None:
        left = cell.time_limit_s - (time.monotonic() - t0)
        latency, busy = _remeasure(folder, log, repeats, left)
    manifest = _read_json(folder / "manifest.json") if report is not None else None
    return CellResult(
        cell.key,
        cell.model_name,
        cell.target_name,
        status,
        why,
        started,
        round(time.monotonic() - t0, 2),
        str(folder) if report is not None else None,
        str(log),
        report,
        latency,
        provenance(cell, manifest),
        busy,
        host_cpu_model(),
    )


def _child(args: list[str], log: Path, limit_s: float) -> tuple[int | None, str | None]:
    """(exit code, None), or (None, why) when the child was killed: by a signal or at the time limit."""
    with log.open("ab") as err:
        err.write(f"$ {' '.join(args)}\n".encode())
        err.flush()
        with _LOCK:
            if _STOPPING.is_set():
                return None, "the matrix was stopped before this build started"
            proc = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            _RUNNING.add(proc)
        try:
            code = proc.wait(timeout=limit_s)
        except BaseException as e:  # the time limit, or the matrix itself is being stopped
            _kill_group(proc)
            if isinstance(e, subprocess.TimeoutExpired):
                return None, f"killed at the cell's time limit ({limit_s:g} s)"
            raise
        finally:
            with _LOCK:
                _RUNNING.discard(proc)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return None, f"killed by {name}{hint}"
    return code, None


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the thread that started it ends, so a
    matrix that is itself killed leaves no build running on (Linux; elsewhere a no-op)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_PRCTL = _prctl()  # looked up once: between fork and exec only the call itself runs


def allow_builds() -> None:
    """A new fan-out may start builds again (after kill_builds stopped an earlier one)."""
    _STOPPING.clear()


def kill_builds() -> None:
    """Kill every build this process's cells are waiting on (the matrix is being stopped)."""
    with _LOCK:
        _STOPPING.set()
        running = list(_RUNNING)
    for proc in running:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _remeasure(
    folder: Path, log: Path, repeats: int, limit_s: float
) -> tuple[dict[str, list[float]], float | None]:
    """({name: batch-1 p50 of each of ``repeats`` measurements}, the largest share of the machine
    other processes used meanwhile), from one `toolchain.matrix.remeasure` process; nothing (and a
    line in the log) when ``repeats`` is 0, the time is up or it fails."""
    if repeats < 1 or limit_s <= 1:
        return {}, None
    out = folder.parent / f".{folder.name}.latency.json"
    code, why = _child(
        [sys.executable, "-m", "toolchain.matrix.remeasure", str(folder), str(repeats), str(out)],
        log,
        limit_s,
    )
    found = _read_json(out) if code == 0 else None
    out.unlink(missing_ok=True)
    if found is None:
        with log.open("a") as f:
            f.write(f"latency not re-measured: {why or f'exit code {code}'}\n")
        return {}, None
    shares = [v for v in found["others_cpu"] if v is not None]
    return found["latency"], max(shares) if shares else None


def provenance(cell: Cell, manifest: dict | None) -> dict[str, Any]:
    """What the cell was built from, for telling what changed between two runs."""
    data = [Path(p) for p in (cell.calib, cell.val) if p]
    files = sorted(
        f for p in data for f in ([p] if p.is_file() else p.rglob("*") if p.is_dir() else []) if f.is_file()
    )
    return {
        "model_sha256": (manifest or {}).get("model", {}).get("sha256") or _sha(Path(cell.model)),
        "data_sha256": sha256_files(files) if files else None,
        "profile_sha256": (manifest or {}).get("target", {}).get("sha256") or _profile_sha(cell.target),
        "versions": (manifest or {}).get("versions") or {},
    }


def _sha(path: Path) -> str | None:
    return sha256_files([path]) if path.is_file() else None


def _profile_sha(target: str) -> str | None:
    from toolchain.core.errors import ToolchainError
    from toolchain.target import load_target

    try:
        return _sha(Path(load_target(target).source))
    except ToolchainError:
        return None


def host_cpu_model() -> str | None:
    """This machine's CPU model, as the history records it for runs and cells."""
    from toolchain.measure.cpu import host_cpu

    return host_cpu()["model"]


def crashed(cell: Cell, folder: Path, log: Path, why: str) -> CellResult:
    """A cell whose build never reported back (its Ray worker died, say)."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return CellResult(
        cell.key,
        cell.model_name,
        cell.target_name,
        "crashed",
        why,
        started,
        0.0,
        None,
        str(log),
        None,
        {},
        provenance(cell, None),
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_error(log: Path) -> str:
    """The build's one-line error (`error: ...`), else its last line."""
    lines = [
        line.strip()
        for line in log.read_text(errors="replace").splitlines()
        if line.strip() and not line.startswith("$ ")
    ]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors[-1][len("error: ") :] if errors else lines[-1] if lines else "no output")[:300]


def _failures(report: dict) -> str:
    failed = [
        f"{a['name']}: {'; '.join(a['parity']['failures'])}"
        for a in report["artifacts"]
        if a["parity"]["passed"] is False
    ]
    return (" | ".join(failed) or report.get("verdict") or "failed")[:300]
