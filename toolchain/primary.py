"""Which artifact is primary: the fastest that passes, on latency that holds between builds.

Each artifact's in-build latency was taken alone, at its own moment: two artifacts a few percent
apart swap places from one build to the next (machine noise is larger than their difference). So
the passing, eligible artifacts with the lowest in-build latency (up to ``MAX_CANDIDATES``) are
timed again *in turn* in one loop at batch 1 (turns of a few runs, a short pause before each so that
the previous runtime's threads stop spinning: measure.timing.time_in_turn): a slow moment of the
machine hits them all. The
fastest by median wins unless the next one is tied with it: its median within 2 % of the fastest's,
or within 10 % and its runs not measurably slower (a one-sided Mann-Whitney U test on the timed runs,
p >= 0.01: with 30 runs each, a steady 5 % edge is measurable, run-to-run jitter is not; the
interquartile-overlap rule this replaces tied ResNet18's OpenVINO IR with a 5 % slower TorchScript
file in every build). Tied leaders are ordered by
size (smaller first), then by how simple their runtime is to ship (:data:`SIMPLER`), then by name:
the same model built twice chooses the same primary unless the timings really differ. The report's
``primary_choice`` says what was timed, the margin, and which rule decided.

Then how many threads: where the profile lists ``runtime.race_threads``, the primary is timed again in
turn at each of those counts and at ``runtime.threads`` (:func:`choose_threads`), by the same rule,
fewer threads winning a tie (the same latency on fewer cores). A model of a fraction of a millisecond
spends much of a run waking and joining a second thread: the tests' ViT and LSTM in ONNX Runtime ran
17-34 % less time on one thread than on two here (2026-12-08), a ResNet18 1.75x as long. The primary ships
with that count: ``primary_choice.threads``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Mapping

import numpy as np

from toolchain.core.artifact import Artifact
from toolchain.measure.timing import time_in_turn
from toolchain.reporting.report import ArtifactReport, mark_primary
from toolchain.runtimes import load_runner

log = logging.getLogger("toolchain")

MAX_CANDIDATES = 4
# a jittery artifact's wide spread alone does not tie it with a faster one: its median must be close
TIE_MEDIANS = 1.10
# medians closer than this are tied whatever the test says (a 1 % edge flips with the machine's state)
SAME_MEDIANS = 1.02
# the runner-up is slower when a one-sided Mann-Whitney test on the timed runs says so at this level
SLOWER_P = 0.01
# runtimes whose thread count belongs to the loaded model (a session, a compiled model) or is set at
# each call (torch's, by the runner): a model can be timed at two counts in one process
THREADS_RACEABLE = ("onnxruntime", "openvino", "openvino_ir", "torchscript", "lite_interpreter")
# runtimes by what shipping them asks of an application: one library and a file first
SIMPLER = (
    "onnxruntime", "openvino", "openvino_ir", "torchscript", "executorch", "lite_interpreter", "qnn",
    "tensorrt",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Timed:
    name: str
    runs_ms: tuple[float, ...]
    size_bytes: int
    runtime: str
    threads: int | None = None  # the intra-op threads it ran on (None: the profile's)

    @property
    def label(self) -> str:
        return self.name if self.threads is None else f"{self.name} on {_threads(self.threads)}"

    @property
    def median(self) -> float:
        return float(np.median(self.runs_ms))

    @property
    def quartiles(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.runs_ms, [25, 75])
        return float(q1), float(q3)


def choose(timed: list[Timed]) -> dict[str, Any]:
    """The primary among ``timed`` (at least one) and why: ``primary``, ``tied`` (the leaders tied with
    the fastest, itself included), ``margin`` (the runner-up's median over the fastest's), ``rule``."""
    ranked = sorted(timed, key=lambda t: (t.median, t.name, t.threads or 0))
    fastest = ranked[0]
    tied = [t for t in ranked if t is fastest or _tied(fastest, t)]
    order = lambda t: (t.size_bytes, _simplicity(t.runtime), t.threads or 0, t.name)  # noqa: E731
    winner = min(tied, key=order) if len(tied) > 1 else fastest
    runner_up = ranked[1] if len(ranked) > 1 else None
    one_artifact = len({t.name for t in timed}) == 1  # the primary on several thread counts
    if len(tied) == 1:
        rule = f"fastest: the runner-up is {_behind(fastest, runner_up)}" if runner_up else "the only one"
    else:
        rule = (
            f"tied with {', '.join(t.label for t in tied if t is not winner)} (not measurably apart: "
            f"{'; '.join(_evidence(fastest, t) for t in tied if t is not fastest)}): "
            + ("the fewest threads" if one_artifact else "the smallest, then the simplest runtime")
        )
    return {
        "primary": winner.name,
        "threads": winner.threads,
        # tied names; tied thread counts where one artifact was timed on several
        "tied": [] if len(tied) < 2 else [t.threads if one_artifact else t.name for t in tied],
        "margin": round(runner_up.median / fastest.median, 3) if runner_up and fastest.median > 0 else None,
        "rule": rule,
        "candidates": [
            {
                "name": t.name,
                "threads": t.threads,
                "median_ms": round(t.median, 4),
                "p25_ms": round(t.quartiles[0], 4),
                "p75_ms": round(t.quartiles[1], 4),
                "runs": len(t.runs_ms),
            }
            for t in ranked
        ],
    }


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def _simplicity(runtime: str) -> int:
    return SIMPLER.index(runtime) if runtime in SIMPLER else len(SIMPLER)


def _tied(fastest: Timed, other: Timed) -> bool:
    """Not measurably slower: the medians within SAME_MEDIANS, or within TIE_MEDIANS and the runs'
    ranks not telling them apart (one-sided Mann-Whitney U, p >= SLOWER_P)."""
    ratio = other.median / fastest.median if fastest.median > 0 else 1.0
    return ratio <= SAME_MEDIANS or (ratio <= TIE_MEDIANS and _slower_p(fastest, other) >= SLOWER_P)


def _slower_p(fastest: Timed, other: Timed) -> float:
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(other.runs_ms, fastest.runs_ms, alternative="greater").pvalue)


def _behind(fastest: Timed, other: Timed) -> str:
    ratio = other.median / fastest.median if fastest.median > 0 else 1.0
    if ratio > TIE_MEDIANS:
        return f"more than {TIE_MEDIANS - 1:.0%} slower by median ({other.label} x{ratio:.3f})"
    return f"measurably slower ({_evidence(fastest, other)})"


def _evidence(fastest: Timed, other: Timed) -> str:
    ratio = other.median / fastest.median if fastest.median > 0 else 1.0
    return f"{other.label} x{ratio:.3f}, Mann-Whitney p={_slower_p(fastest, other):.2g}"


def choose_primary(
    reports: list[ArtifactReport],
    shipped: Mapping[str, Artifact],
    x,
    threads: int,
    rounds: int,
    within: float = 1.5,
    race_threads: tuple[int, ...] = (),
) -> tuple[list[ArtifactReport], dict | None]:
    """The reports with the primary marked, and the report's ``primary_choice``. Only artifacts whose
    build latency is within ``within`` times the fastest's race: one further behind cannot be tied
    with it. Then the primary's thread count among ``threads`` and ``race_threads``
    (:func:`choose_threads`; ``threads_choice`` says why not where it is not raced). None when no
    artifact was raced and the profile races no thread counts: the in-build rule, fastest that
    passes, stands."""
    marked, choice = _choose_artifact(reports, shipped, x, threads, rounds, within)
    if choice:  # the artifacts were raced on the profile's threads
        choice["candidates"] = [{**c, "threads": threads} for c in choice["candidates"]]
    primary = next((a for a in marked if a.primary), None)
    counts = sorted({threads, *race_threads}, reverse=True)
    if primary is None or len(counts) < 2 or primary.name not in shipped:
        return marked, choice and {**choice, "threads": threads}
    base = choice or {
        "primary": primary.name,
        "tied": [],
        "margin": None,
        "rule": _unraced(reports),
        "candidates": [],
    }
    why_not = _no_thread_race(primary, shipped[primary.name], threads)
    if why_not:
        return marked, {**base, "threads": threads, "threads_choice": {"rule": why_not}}
    try:
        by_threads = choose_threads(primary, shipped[primary.name], x, counts, rounds)
    except Exception as e:  # noqa: BLE001 - it passed in its runtime at `threads`: it ships on that
        log.warning(
            "primary: %s could not be timed on other thread counts (%s): it runs on %d",
            primary.name,
            e,
            threads,
        )
        note = (
            f"not timed on other thread counts ({type(e).__name__}: {e}): timed on {_threads(threads)} only"
        )
        return marked, {**base, "threads": threads, "threads_choice": {"rule": note}}
    return marked, {**base, "threads": by_threads["threads"], "threads_choice": by_threads}


def _unraced(reports: list[ArtifactReport]) -> str:
    passing = [a for a in reports if a.parity.passed is not False and a.eligible]
    if len(passing) == 1:
        return "the only passing artifact"
    return "the fastest passing artifact by the build's own timing (fewer than two could be raced at batch 1)"


def _no_thread_race(primary: ArtifactReport, artifact: Artifact, threads: int) -> str | None:
    """Why the primary's thread count is not raced (None: it is)."""
    only = f"timed on {_threads(threads)} only"
    if primary.runtime not in THREADS_RACEABLE:
        return f"{primary.runtime} sets its threads for the whole process: {only}"
    device = next((f["device"] for f in primary.stage_facts.values() if f.get("device")), "CPU")
    if device != "CPU":
        return f"the IR is for the {device}: this host's CPU threads say nothing of it; {only}"
    if not _takes_batch_1(artifact):
        return f"its batch is fixed at {artifact.fixed_batch()} and the race runs at batch 1: {only}"
    return None


def _takes_batch_1(artifact: Artifact) -> bool:
    """Both races run at batch 1: a file fixed to another batch takes no part."""
    return artifact.fixed_batch() in (None, 1)


def choose_threads(report: ArtifactReport, artifact: Artifact, x, counts: list[int], rounds: int) -> dict:
    """The primary timed in turn at each thread count in ``counts`` (most first), ``rounds`` runs each:
    :func:`choose`'s answer with ``threads``, the fewest threads winning a tie. Torch's thread count is
    the process's: it is left as it was found."""
    torch = sys.modules.get("torch")  # torch runners set it per call; not imported for other runtimes
    found = torch.get_num_threads() if torch else None
    try:
        runners = {n: load_runner(artifact, report.runtime, n) for n in counts}
        log.info(
            "choosing the primary's threads: %s on %s timed in turn, %d runs each",
            report.name,
            " and ".join(map(str, counts)),
            rounds,
        )
        runs = time_in_turn(runners, x, rounds, warmup=3)
    finally:
        if found is not None:
            torch.set_num_threads(found)
    return choose(
        [Timed(report.name, tuple(r), report.size_bytes, report.runtime, n) for n, r in runs.items()]
    )


def _choose_artifact(
    reports: list[ArtifactReport],
    shipped: Mapping[str, Artifact],
    x,
    threads: int,
    rounds: int,
    within: float,
) -> tuple[list[ArtifactReport], dict | None]:
    passing = sorted(
        (
            a
            for a in reports
            if a.parity.passed is not False
            and a.eligible
            and a.name in shipped
            and _takes_batch_1(shipped[a.name])
        ),
        key=lambda a: a.latency_ms,
    )
    if len(passing) < 2:
        return mark_primary(reports), None
    fastest = passing[0]
    leaders = [a for a in passing if a.latency_ms <= passing[0].latency_ms * within][:MAX_CANDIDATES]
    if len(leaders) < 2:
        marked = [dataclasses.replace(a, primary=a is fastest) for a in reports]
        margin = passing[1].latency_ms / fastest.latency_ms if fastest.latency_ms > 0 else None
        return marked, {
            "primary": fastest.name,
            "tied": [],
            "margin": margin and round(margin, 3),
            "rule": f"fastest in the build's own timing, the runner-up x{margin or 0:.2f} behind: not raced "
            f"(runtime.race_within = {within})",
            "candidates": [],
        }
    runners = {}
    for a in leaders:
        try:
            runners[a.name] = load_runner(shipped[a.name], a.runtime, threads)
        except Exception as e:  # noqa: BLE001 - it was checked in its runtime: leave it out of the race
            log.debug("primary: %s not timed again: %s", a.name, e)
    if len(runners) < 2:
        return mark_primary(reports), None
    log.info("choosing the primary: %s timed in turn, %d runs each", ", ".join(runners), rounds)
    runs = time_in_turn(runners, x, rounds, warmup=3)
    by_name = {a.name: a for a in leaders}
    choice = choose([Timed(n, tuple(r), by_name[n].size_bytes, by_name[n].runtime) for n, r in runs.items()])
    marked = [dataclasses.replace(a, primary=a.name == choice["primary"]) for a in reports]
    return marked, choice
