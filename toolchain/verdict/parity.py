"""Compare an artifact's outputs with the FP32 model's, every output, with explicit metrics.

Each output has a role that decides which metrics judge it:

| role           | judged on                                             | also reported          |
|----------------|-------------------------------------------------------|------------------------|
| classification | SQNR, cosine, top-1 agreement, accuracy (with labels) | max / mean abs error   |
| probabilities  | SQNR, cosine, max abs error (probability units),      | top-1 agreement        |
|                | accuracy (with labels)                                |                        |
| regression     | SQNR, cosine                                          | relative max error,    |
|                |                                                       | top-1 agreement        |
| embedding      | cosine                                                | SQNR                   |

A role is declared (`[parity.outputs.<index or name>] role = ...` or `--outputs`) or
inferred from evidence in FP32's own outputs and the labels, and the evidence is reported:

| evidence (every row of FP32's output on the validation inputs), in this order | role           |
|--------------------------------------------------------------------------------|----------------|
| a probability simplex, and `--val` labels fit it (a softmax classifier)        | classification |
| non-negative and summing to 1 (within 1e-3): a probability simplex             | probabilities  |
| of unit L2 norm (within 1e-3), labels or not                                   | embedding      |
| `--val` labels are integers within the output's class range                    | classification |
| none of these                                                                  | regression     |

A 3-D (N, T, C) output is judged per frame: the same rules on its last axis, each of the N x T
frames a row (labels then (N, T)). Whatever the role or thresholds, an output with a NaN or an
infinity, a missing output or a changed shape fails: those are never noise.

When top-1 agreement misses its bar, the output says why in numbers (:class:`NearTies`): how close
FP32's own top two scores are, against the artifact's error between them. A tie-prone output (bins
of a pitch or an age, many near-equal classes) can miss the bar at an SQNR that would hold it on a
confident classifier, and layers kept in float close only part of the distance; the numbers say how far.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping, Sequence

import numpy as np

from toolchain.core.errors import DataError
from toolchain.target import ParityThresholds

log = logging.getLogger("toolchain")

ROLES = ("classification", "probabilities", "regression", "embedding")


@dataclasses.dataclass(frozen=True)
class OutputRole:
    """Which output (index, and name when the model gives one) plays which role."""

    index: int
    name: str
    role: str
    inferred: bool
    evidence: str = "declared"  # why this role: what was seen in FP32's outputs or the labels
    per_frame: bool = False  # a (N, T, C) output, judged frame by frame on its last axis


@dataclasses.dataclass(frozen=True)
class OutputParity:
    index: int
    name: str
    shape: tuple[int, ...]  # per sample (batch dimension excluded)
    role: str
    role_inferred: bool
    sqnr_db: float
    cosine: float
    max_abs: float
    mean_abs: float
    rel_max_error: float  # max |error| / max |FP32 output|
    top1_agreement: float | None
    accuracy: float | None
    nonfinite: int  # NaN or infinite values in the artifact's output
    passed: bool | None
    failures: tuple[str, ...] = ()
    near_ties: NearTies | None = (
        None  # why top-1 agreement missed its bar; None when it did not (or was not judged)
    )


@dataclasses.dataclass(frozen=True)
class NearTies:
    """Top-1 agreement against the closeness of FP32's own top two scores.

    An artifact's arg-max leaves FP32's on a sample when its error between FP32's top two classes
    exceeds their gap. With that error difference of RMS ``noise`` over the samples, a sample with
    gap g swaps with probability ~ Phi(-g / noise); the mean over the samples is the agreement the
    noise ``predicts`` (on the pitch tracker trained in the tests: 96.4 % predicted, 96.5 % measured).
    ``noise_cut_db`` is how much lower that error must be for the bar: infinite when FP32 itself
    ties exactly on too many samples (no artifact can hold the bar)."""

    share: float  # 1 - the bar: the share of samples the bar lets disagree
    gap: float  # FP32's top-two gap that ``share`` of the samples fall below
    noise: float  # RMS over the samples of the artifact's error difference between FP32's top two classes
    predicted: float  # the top-1 agreement that noise predicts
    noise_cut_db: (
        float  # how much lower the noise must be for the bar (0: that noise does not explain the miss)
    )


def near_ties(reference: np.ndarray, output: np.ndarray, bar: float) -> NearTies | None:
    """:class:`NearTies` of one (samples, classes) output against its FP32 reference; None where
    the numbers cannot be had (non-finite error). A diagnosis: it never costs the artifact."""
    from scipy.special import ndtr

    # FP32's top two, as column indices
    pair = np.sort(np.argpartition(reference, -2, axis=1)[:, -2:], axis=1)
    rows = np.arange(len(reference))[:, None]
    ref2 = reference[rows, pair]
    order = np.argsort(ref2, axis=1)  # second, top
    ref2, out2 = np.take_along_axis(ref2, order, 1), np.take_along_axis(output[rows, pair], order, 1)
    gaps = ref2[:, 1] - ref2[:, 0]
    with np.errstate(over="ignore", invalid="ignore"):
        noise = float(np.sqrt(np.mean(((out2[:, 1] - ref2[:, 1]) - (out2[:, 0] - ref2[:, 0])) ** 2)))
    if not np.isfinite(noise):
        return None
    share = max(1.0 - bar, 0.5 / len(reference))  # a bar of 100 %: the last half sample

    def swaps(level: float) -> float:  # the expected share of samples a noise of this RMS swaps
        return float(np.mean(ndtr(-gaps / level))) if level > 0 else 0.5 * float(np.mean(gaps <= 0))

    if swaps(noise) <= share:
        cut = 0.0  # the noise between the top two does not explain the miss (see words.near_ties_line)
    elif swaps(0.0) > share:  # exact FP32 ties: half of them swap at any noise
        cut = float("inf")
    else:
        lo, hi = noise, noise  # swaps(lo) <= share < swaps(hi)
        for _ in range(40):  # down to 1e-120 of the noise; below that, call it out of reach
            lo *= 1e-3
            if swaps(lo) <= share:
                break
        else:
            lo = 0.0
        for _ in range(60 if lo > 0 else 0):
            mid = float(np.sqrt(lo * hi))
            lo, hi = (mid, hi) if swaps(mid) <= share else (lo, mid)
        cut = 20 * float(np.log10(noise / lo)) if lo > 0 else float("inf")
    return NearTies(
        round(share, 6),
        _round(float(np.quantile(gaps, share)), 6),
        _round(noise, 6),
        round(1.0 - swaps(noise), 4),
        _round(cut, 2),
    )


@dataclasses.dataclass(frozen=True)
class Parity:
    """The aggregate over every output (worst case) plus each output's own metrics."""

    sqnr_db: float  # the lowest SQNR of any output
    cosine: float  # the lowest mean per-sample cosine similarity of any output
    max_abs: float
    mean_abs: float
    top1_agreement: float | None  # the lowest of the classification outputs; None without one
    accuracy: float | None  # of the labelled classification output; None without labels
    passed: bool | None  # None: measured but not judged (random weights)
    failures: tuple[str, ...] = ()  # what failed, in words (prefixed by the output when there are several)
    samples: int = 0
    outputs: tuple[OutputParity, ...] = ()
    # the user's metric: value, drop, tolerance, passed (see toolchain.verdict.metric)
    metric: dict | None = None

    @classmethod
    def failed(cls, why: str, samples: int = 0) -> "Parity":
        """Nothing comparable was measured (no output, or nothing built): a failure saying why."""
        nan = float("nan")
        return cls(nan, nan, nan, nan, None, None, False, (why,), samples, ())


Outputs = list  # one numpy array per model output, batch first


def run_batched(runner, x: np.ndarray, batch_size: int) -> Outputs:
    """Run in batches and join each output; an artifact fixed to batch 1 is run one sample at a time."""
    try:
        parts = [runner(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    except Exception:
        if batch_size == 1:
            raise
        parts = [runner(x[i : i + 1]) for i in range(len(x))]
    return [np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in range(len(parts[0]))]


def resolve_roles(
    reference: Outputs, names: Sequence[str], declared: Mapping[str, str], labels: np.ndarray | None = None
) -> tuple[OutputRole, ...]:
    """Each output's role: declared by index or name, else inferred from evidence (see the
    module's table); ``labels``: the validation labels, evidence for one classification output."""
    keys = {str(i) for i in range(len(reference))} | set(names)
    unknown = sorted(set(declared) - keys)
    if unknown:
        valid = ", ".join(f"{i} ({n})" if n != str(i) else str(i) for i, n in enumerate(names))
        raise DataError(
            f"parity output `{unknown[0]}` is not an output of the model; its outputs are: {valid}"
        )
    given = []
    for i, name in enumerate(names):
        role = declared.get(name) or declared.get(str(i))
        if role is not None and role not in ROLES:
            raise DataError(f"parity output `{name}`: role `{role}` is not one of {', '.join(ROLES)}")
        given.append(role)
    labelled = _label_evidence(reference, given, labels)
    roles = []
    for i, (out, name, role) in enumerate(zip(reference, names, given)):
        per_frame = out.ndim == 3
        if role is not None:
            roles.append(OutputRole(i, name, role, False, "declared", per_frame))
            continue
        role, evidence = infer_role(out, labelled.get(i))
        roles.append(OutputRole(i, name, role, True, evidence, per_frame))
    return tuple(roles)


def _label_evidence(reference: Outputs, given: list, labels) -> dict[int, str]:
    """{index: what the labels say of it} for the one undeclared output the labels are evidence for:
    they fit its classes, and FP32's arg-max scores them well above always guessing the commonest
    class (a quarter of the way from that rate to 100 %, or twice it and 5 points more, whichever is
    lower: 25 % for ten even classes, 10 % for forty tie-prone bins, 62.5 % for two); of several, the
    best scored. None when a
    declared classification or probabilities output takes the labels."""
    if labels is None:
        return {}
    labels = np.asarray(labels)
    if any(
        role in ("classification", "probabilities") and _class_labels(labels, out)
        for out, role in zip(reference, given)
    ):
        return {}
    scored = []
    for i, (out, role) in enumerate(zip(reference, given)):
        if role is not None or out.ndim not in (2, 3) or not _class_labels(labels, out):
            continue
        rows = out.reshape(-1, out.shape[-1])
        if not np.isfinite(rows).all():
            continue
        flat = labels.reshape(-1).astype(np.int64)
        accuracy = float(np.mean(rows.argmax(1) == flat))
        commonest = float(np.bincount(flat).max() / len(flat))
        if accuracy >= min(commonest + 0.25 * (1 - commonest), 2 * commonest + 0.05):
            scored.append((accuracy, i, commonest))
    if not scored:
        return {}
    accuracy, i, _ = max(scored)
    frame = "per frame: " if reference[i].ndim == 3 else ""
    return {
        i: f"{frame}labels {int(labels.min())}..{int(labels.max())} in --val, "
        f"FP32's arg-max right on {accuracy:.1%} of them"
    }


def labelled_output(roles: Sequence[OutputRole], outputs: Outputs, labels: np.ndarray | None) -> int | None:
    """The output the labels score: the first classification or probabilities output whose rows the
    labels fit (one integer class per sample, or per frame, within its classes); None if none."""
    if labels is None:
        return None
    for r in roles:
        if r.role in ("classification", "probabilities") and _class_labels(
            np.asarray(labels), outputs[r.index]
        ):
            return r.index
    return None


def infer_role(out: np.ndarray, labelled: str | None = None) -> tuple[str, str]:
    """(role, evidence) of one output from FP32's values on the validation inputs; ``labelled``:
    what the labels say of this output, when they are evidence for it (see _label_evidence)."""
    if out.ndim not in (2, 3) or out.shape[-1] < 2:
        return (
            "regression",
            f"no evidence: regression (a {out.ndim - 1}-D output per sample, not rows of scores)",
        )
    frame = "per frame: " if out.ndim == 3 else ""
    rows = out.reshape(-1, out.shape[-1]).astype(np.float64)
    if not np.isfinite(rows).all():
        return "regression", "no evidence: regression (non-finite values)"
    sums, norms = rows.sum(1), np.linalg.norm(rows, axis=1)
    simplex = bool((rows >= -1e-6).all() and np.all(np.abs(sums - 1) <= 1e-3))
    if simplex and labelled:  # a classifier whose head ends in a softmax
        return "classification", f"{labelled}; rows are probability distributions"
    if simplex:
        return "probabilities", f"{frame}rows are probability distributions (non-negative, summing to 1)"
    if np.all(np.abs(norms - 1) <= 1e-3):  # before labels: a speaker embedder's labels are no classes of it
        return "embedding", f"{frame}unit-norm rows"
    if labelled:
        return "classification", labelled
    return "regression", "no evidence: regression"


def _class_labels(labels: np.ndarray, out: np.ndarray) -> bool:
    """Labels of one class per row of ``out`` (per sample, or per frame of a 3-D output), integers
    within its class range."""
    if labels.shape != out.shape[:-1] or labels.size == 0:
        return False
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(labels == np.round(labels)):
            return False
    return bool(labels.min() >= 0 and labels.max() < out.shape[-1])


def check_reference(reference: Outputs, roles: Sequence[OutputRole]) -> None:
    """A non-finite FP32 output leaves nothing to compare with: the user's to fix."""
    for r, out in zip(roles, reference):
        bad = ~np.isfinite(out.astype(np.float64, copy=False))
        if bad.any():
            first = int(np.argmax(bad.reshape(len(out), -1).any(axis=1)))
            raise DataError(
                f"the FP32 model's output {_label(r)} has {int(bad.sum())} NaN or infinite values on the "
                f"validation inputs (first in sample {first}); parity cannot be measured against it"
            )


def compare(
    reference: Outputs | np.ndarray,
    output: Outputs | np.ndarray,
    labels: np.ndarray | None,
    thresholds: ParityThresholds | None,
    roles: Sequence[OutputRole] | None = None,
    metric=None,
    all_labels: Mapping[str, np.ndarray] | None = None,
) -> Parity:
    """Metrics of every output against FP32's; judged against ``thresholds`` unless None.

    Labels go with the first classification output; FP32's accuracy is taken on the same samples.
    With the user's ``metric`` (a :class:`toolchain.verdict.metric.Metric`), it decides the verdict instead
    of the thresholds, together with the sanity checks (finite values, outputs and shapes), which
    always apply; the other metrics are still reported.
    """
    reference, output = _as_list(reference), _as_list(output)
    roles = (
        tuple(roles)
        if roles is not None
        else resolve_roles(reference, [str(i) for i in range(len(reference))], {}, labels)
    )
    labelled = labelled_output(roles, reference, labels)
    if len(output) != len(reference):
        return Parity.failed(
            f"the artifact gives {len(output)} outputs, FP32 gives {len(reference)}", len(reference[0])
        )
    judge = None if metric is not None else thresholds
    per_output = tuple(
        _compare_one(r, reference[r.index], output[r.index], labels if r.index == labelled else None, judge)
        for r in roles
    )
    parity = _aggregate(per_output, labelled, len(reference[0]))
    if metric is None:
        return parity
    return _with_metric(
        parity, metric, output, [r.name for r in roles], all_labels or {}, thresholds is not None
    )


def _with_metric(parity: Parity, metric, output: Outputs, names: list[str], labels, judged: bool) -> Parity:
    from toolchain.verdict.metric import score

    # non-finite or misshapen: the sanity checks failed, the score would mean nothing
    if parity.passed is False:
        return dataclasses.replace(
            parity, metric={**metric.to_json(), "value": None, "drop": None, "passed": False}
        )
    value, _ = score(metric.fn, metric.name, output, names, labels)
    ok, failure = metric.judge(value)
    record = {
        **metric.to_json(),
        "value": value,
        "drop": metric.drop(value),
        "passed": ok if judged else None,
    }
    if not judged:
        return dataclasses.replace(parity, metric=record)
    return dataclasses.replace(parity, metric=record, passed=ok, failures=(failure,) if failure else ())


def accuracy_of(
    outputs: Outputs | np.ndarray, labels: np.ndarray | None, roles: Sequence[OutputRole] | None = None
) -> float | None:
    """FP32's accuracy on its labelled output (see :func:`labelled_output`); None without one."""
    outputs = _as_list(outputs)
    if roles is None:
        roles = resolve_roles(outputs, [str(i) for i in range(len(outputs))], {}, labels)
    index = labelled_output(roles, outputs, labels)
    if index is None:
        return None
    role, out = roles[index], outputs[index]
    scores = out.reshape(-1, out.shape[-1]) if role.per_frame else out.reshape(len(labels), -1)
    return float(np.mean(scores.argmax(1) == np.asarray(labels).reshape(-1)))


def _compare_one(
    role: OutputRole, reference: np.ndarray, output: np.ndarray, labels, t: ParityThresholds | None
) -> OutputParity:
    shape = tuple(reference.shape[1:])
    if output.shape != reference.shape:
        failure = f"shape {_fmt(output.shape)} differs from FP32's {_fmt(reference.shape)}"
        nan = float("nan")
        return OutputParity(
            role.index,
            role.name,
            shape,
            role.role,
            role.inferred,
            nan,
            nan,
            nan,
            nan,
            nan,
            None,
            None,
            0,
            False,
            (failure,),
        )
    # SQNR, cosine and errors per sample; top-1 and accuracy per frame of a (N, T, C) output
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    out = output.reshape(len(output), -1).astype(np.float64)
    finite = np.isfinite(out)
    nonfinite = int((~finite).sum())
    err = ref - out
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        noise = float(np.sum(err**2))
        signal = float(np.sum(ref**2))
        sqnr = (
            float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
        )
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
        cosines = np.sum(ref * out, axis=1) / np.maximum(norms, 1e-30)
        # two all-zero rows (silence, padding after a ReLU) agree exactly
        cosines[(np.abs(ref).max(axis=1) == 0) & (np.abs(out).max(axis=1) == 0)] = 1.0
        cosine = float(np.mean(cosines))
        max_abs = float(np.abs(err).max())
        peak = float(np.abs(ref).max())
        rel = max_abs / peak if peak > 0 else (0.0 if max_abs == 0 else float("inf"))
    top1 = accuracy = ref_accuracy = None
    # judged for classification only; rows of scores: a 2-D output, or the frames of a 3-D one
    scores_ref, scores_out = (
        (reference.reshape(-1, reference.shape[-1]), output.reshape(-1, output.shape[-1]))
        if role.per_frame
        else (ref, out)
    )
    if reference.ndim in (2, 3) and reference.shape[-1] > 1 and role.role != "embedding":
        top1 = float(np.mean(scores_ref.argmax(1) == scores_out.argmax(1)))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            accuracy = float(np.mean(scores_out.argmax(1) == labels))
            ref_accuracy = float(np.mean(scores_ref.argmax(1) == labels))
    failures = []
    if nonfinite:
        first = int(np.argmax((~finite).any(axis=1)))
        failures.append(f"{nonfinite} NaN or infinite values (first in sample {first})")
    elif t is not None:
        failures = _failures(role.role, sqnr, cosine, max_abs, top1, accuracy, ref_accuracy, t)
    passed = False if failures else (None if t is None else True)
    ties = None
    if (
        role.role == "classification"
        and t is not None
        and not nonfinite
        and top1 is not None
        and top1 < t.min_top1_agreement
    ):
        try:
            ties = near_ties(
                scores_ref.astype(np.float64), scores_out.astype(np.float64), t.min_top1_agreement
            )
        except Exception as e:  # noqa: BLE001 - an explanation of a failure must never fail the artifact itself
            log.debug("near ties not measured: %s", e)
    return OutputParity(
        role.index,
        role.name,
        shape,
        role.role,
        role.inferred,
        _round(sqnr),
        _round(cosine, 6),
        _round(max_abs),
        _round(float(np.abs(err).mean()), 6),
        _round(rel, 6),
        top1,
        accuracy,
        nonfinite,
        passed,
        tuple(failures),
        ties,
    )


def _failures(role, sqnr, cosine, max_abs, top1, accuracy, ref_accuracy, t: ParityThresholds) -> list[str]:
    out = []
    if role != "embedding" and not sqnr >= t.min_sqnr_db:  # `not >=`: a NaN fails too
        out.append(f"SQNR {sqnr:.1f} dB < {t.min_sqnr_db} dB")
    if not cosine >= t.min_cosine:
        out.append(f"cosine {cosine:.4f} < {t.min_cosine}")
    if role == "probabilities" and not max_abs <= t.max_probability_error:
        out.append(f"max probability error {max_abs:.4f} > {t.max_probability_error}")
    if role == "classification" and top1 is not None and not top1 >= t.min_top1_agreement:
        out.append(f"top-1 agreement {top1:.2%} < {t.min_top1_agreement:.2%}")
    if role in ("classification", "probabilities"):  # accuracy: only where labels scored this output
        if accuracy is not None and not ref_accuracy - accuracy <= t.max_accuracy_drop:
            out.append(
                f"accuracy {accuracy:.2%} is {ref_accuracy - accuracy:.2%} below FP32's {ref_accuracy:.2%}"
            )
    return out


def _aggregate(outputs: tuple[OutputParity, ...], labelled: int | None, samples: int) -> Parity:
    several = len(outputs) > 1
    failures = tuple(f"output {_label(o)}: {f}" if several else f for o in outputs for f in o.failures)
    verdicts = {o.passed for o in outputs}
    passed = False if False in verdicts else (None if None in verdicts else True)
    top1s = [o.top1_agreement for o in outputs if o.role == "classification" and o.top1_agreement is not None]
    accuracy = outputs[labelled].accuracy if labelled is not None else None
    return Parity(
        sqnr_db=_worst([o.sqnr_db for o in outputs], min),
        cosine=_worst([o.cosine for o in outputs], min),
        max_abs=_worst([o.max_abs for o in outputs], max),
        mean_abs=_worst([o.mean_abs for o in outputs], max),
        top1_agreement=min(top1s) if top1s else None,
        accuracy=accuracy,
        passed=passed,
        failures=failures,
        samples=samples,
        outputs=outputs,
    )


def _worst(values: list[float], pick) -> float:
    """The worst value; a NaN (no comparable number) wins, so it is never hidden."""
    nans = [v for v in values if v != v]
    return nans[0] if nans else pick(values)


def _label(r) -> str:
    return str(r.index) if r.name == str(r.index) else f"{r.index} ({r.name})"


def _as_list(x) -> Outputs:
    return [x] if isinstance(x, np.ndarray) else list(x)


def _fmt(shape) -> str:
    return "x".join(map(str, shape))


def _round(v: float, digits: int = 4) -> float:
    return v if not np.isfinite(v) else round(v, digits)
