"""Regression alarms: each cell against its last passing run.

A cell and its baseline are the same shape (a `cells` row with ``artifacts``: name -> row, as
`History.cells_of` returns them). One artifact raises at most one alarm per kind:

- ``crashed``: the cell erred or crashed, where it passed;
- ``missing``: an artifact the baseline shipped was not built (skipped, or the cell failed);
- ``parity``: an artifact that passed fails now (its drops are in the message);
- ``accuracy`` / ``sqnr``: a drop beyond the threshold while parity still passes;
- ``size``: the file grew by more than the threshold;
- ``latency``: the median batch-1 p50 grew by more than the threshold *and* by more than the two
  runs' measured spreads together (max - min of the repeated measurements of each run), and only
  between runs on the same CPU model with the same number of workers, each re-measured on a quiet
  machine (other processes used at most ``QUIET`` of its CPU meanwhile): a change inside the
  noise, between machines, or while something else ran (torch's kernels slow down 10-100x beside
  another process on 2 cores) is not a regression.

Every alarm names what changed between the two runs: library versions, the model, data and
profile hashes, the toolchain's version and commit, the host CPU.
"""

from __future__ import annotations

import statistics
from typing import Any

from toolchain.matrix.spec import AlarmOptions

KINDS = ("crashed", "missing", "parity", "accuracy", "sqnr", "size", "latency")
QUIET = 0.10  # the largest share of the machine's CPU others may use while a cell's latency is measured


def compare(
    cell: dict[str, Any],
    run: Any,
    baseline: dict[str, Any] | None,
    options: AlarmOptions,
    timing_baseline: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The alarms of ``cell`` (built in ``run``) against ``baseline`` (its last passing run, with
    ``run``), as rows for the history: artifact, kind, message, baseline_run_id, changes. Latency
    is compared with ``timing_baseline``: its last passing run whose timings were quiet."""
    if baseline is None:
        return []
    base_run = baseline["run"]
    changed = changes(cell, run, baseline, base_run)
    since = f"since run {base_run.id}"
    alarm = lambda artifact, kind, message, base=baseline, what=changed: {
        "artifact": artifact,
        "kind": kind,
        "message": message,
        "baseline_run_id": base["run"].id,
        "changes": what,
    }
    if cell["status"] in ("error", "crashed"):
        return [
            alarm(
                None,
                "crashed",
                f"{cell['key']} {cell['status']} ({cell['reason']}); it passed in run {base_run.id}",
            )
        ]
    if cell["status"] == "not_judged":
        return [
            alarm(
                None,
                "parity",
                f"{cell['key']} was not judged ({cell['reason'] or 'random weights?'}); "
                f"it passed in run {base_run.id}",
            )
        ]
    found = []
    for name, old in baseline["artifacts"].items():
        new = cell["artifacts"].get(name)
        if new is None:
            found.append(
                alarm(name, "missing", f"{name} of {cell['key']} was not built; it was in run {base_run.id}")
            )
            continue
        found += [
            alarm(name, kind, message) for kind, message in _artifact_alarms(name, new, old, options, since)
        ]
    if timing_baseline is not None and comparable_timings(cell, run, timing_baseline):
        what = changes(cell, run, timing_baseline, timing_baseline["run"])
        for name, old in timing_baseline["artifacts"].items():
            new = cell["artifacts"].get(name)
            slower = (
                new is not None
                and new["passed"] is not False
                and latency_regression(new, old, options.latency_growth)
            )
            if slower:
                found.append(
                    alarm(
                        name,
                        "latency",
                        f"{name} {slower} since run {timing_baseline['run'].id}",
                        timing_baseline,
                        what,
                    )
                )
    return found


def comparable_timings(cell: dict, run: Any, base: dict) -> bool:
    """Both timed on the same CPU model, with as many workers, each on a quiet machine."""
    return (
        cell.get("host_cpu") == base.get("host_cpu")
        and run.workers == base["run"].workers
        and quiet(cell)
        and quiet(base)
    )


def _artifact_alarms(name: str, new: dict, old: dict, o: AlarmOptions, since: str) -> list[tuple[str, str]]:
    drops = _drops(new, old)
    if old["passed"] and new["passed"] is False:
        detail = "; ".join(new["failures"]) or "parity failed"
        return [
            (
                "parity",
                f"{name} fails parity {since}, where it passed: {detail}"
                + (f" ({', '.join(drops.values())})" if drops else ""),
            )
        ]
    found = []
    quality = _quality(new, old)
    if quality and quality[1] - quality[2] > o.accuracy_drop:
        found.append(
            (
                "accuracy",
                f"{name} {quality[0]} fell {quality[1]:.2%} -> {quality[2]:.2%} {since} "
                f"(threshold {o.accuracy_drop:.2%})",
            )
        )
    if _finite(new["sqnr_db"], old["sqnr_db"]) and old["sqnr_db"] - new["sqnr_db"] > o.sqnr_drop_db:
        found.append(
            (
                "sqnr",
                f"{name} SQNR fell {old['sqnr_db']:.1f} -> {new['sqnr_db']:.1f} dB {since} "
                f"(threshold {o.sqnr_drop_db:g} dB)",
            )
        )
    if (
        new["size_bytes"]
        and old["size_bytes"]
        and new["size_bytes"] > old["size_bytes"] * (1 + o.size_growth)
    ):
        found.append(
            (
                "size",
                f"{name} grew {old['size_bytes'] / 2**20:.3f} -> {new['size_bytes'] / 2**20:.3f} MB {since} "
                f"(+{new['size_bytes'] / old['size_bytes'] - 1:.0%}, threshold {o.size_growth:.0%})",
            )
        )
    return found


def latency_regression(new: dict, old: dict, growth: float) -> str | None:
    """How the median p50 grew, when it grew beyond both the threshold and the measured noise."""
    (n, n_spread), (o, o_spread) = spread(new), spread(old)
    if n is None or o is None or o <= 0:
        return None
    if n > o * (1 + growth) and n - o > n_spread + o_spread:
        return (
            f"batch-1 p50 rose {o:.3f} -> {n:.3f} ms (+{n / o - 1:.0%}; measured spread {o_spread:.3f} and "
            f"{n_spread:.3f} ms, threshold {growth:.0%})"
        )
    return None


def quiet(cell: dict) -> bool:
    """Its latency was re-measured while other processes used at most QUIET of the machine."""
    return cell.get("timing_busy") is not None and cell["timing_busy"] <= QUIET


def spread(row: dict) -> tuple[float | None, float]:
    """(median p50, spread) of an artifact's repeated measurements; with one measurement, the
    build's own p95 - p50 stands for the spread (and its p50 for the value, with none)."""
    values = [v for v in row.get("latency_repeats") or [] if v is not None]
    if len(values) > 1:
        return statistics.median(values), max(values) - min(values)
    p50, p95 = row.get("latency_p50_ms"), row.get("latency_p95_ms")
    within = (p95 - p50) if p50 is not None and p95 is not None else 0.0
    return (values[0] if values else p50), within


def changes(cell: dict, run: Any, baseline: dict, base_run: Any) -> list[str]:
    """What differs between the two runs' builds, in words; an empty list when nothing recorded did."""
    found = []
    old_v, new_v = baseline.get("versions") or {}, cell.get("versions") or {}
    for lib in sorted(set(old_v) | set(new_v)):
        if old_v.get(lib) != new_v.get(lib):
            found.append(f"{lib} {old_v.get(lib) or 'absent'} -> {new_v.get(lib) or 'absent'}")
    for key, what in (
        ("model_sha256", "model"),
        ("data_sha256", "data"),
        ("profile_sha256", "target profile"),
    ):
        if baseline.get(key) != cell.get(key):
            found.append(f"{what} sha256 {_short(baseline.get(key))} -> {_short(cell.get(key))}")
    for attr, what in (("toolchain_commit", "toolchain commit"), ("workers", "workers")):
        if getattr(base_run, attr) != getattr(run, attr):
            found.append(f"{what} {getattr(base_run, attr)} -> {getattr(run, attr)}")
    if baseline.get("host_cpu") != cell.get("host_cpu"):
        found.append(f"host CPU {baseline.get('host_cpu')} -> {cell.get('host_cpu')}")
    return found


def _drops(new: dict, old: dict) -> dict[str, str]:
    drops = {}
    quality = _quality(new, old)
    if quality and quality[2] < quality[1]:
        drops["quality"] = f"{quality[0]} {quality[1]:.2%} -> {quality[2]:.2%}"
    if _finite(new["sqnr_db"], old["sqnr_db"]) and new["sqnr_db"] < old["sqnr_db"]:
        drops["sqnr"] = f"SQNR {old['sqnr_db']:.1f} -> {new['sqnr_db']:.1f} dB"
    return drops


def _quality(new: dict, old: dict) -> tuple[str, float, float] | None:
    """(what, old, new): accuracy where both runs had labels, else top-1 agreement."""
    for key, what in (("accuracy", "accuracy"), ("top1_agreement", "top-1 agreement")):
        if new.get(key) is not None and old.get(key) is not None:
            return what, old[key], new[key]
    return None


def _finite(*values: float | None) -> bool:
    return all(v is not None and abs(v) != float("inf") for v in values)


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none"
