"""Compare an artifact's outputs with the FP32 model's, with explicit metrics."""

from __future__ import annotations

import dataclasses

import numpy as np

from .target import ParityThresholds


@dataclasses.dataclass(frozen=True)
class Parity:
    sqnr_db: float  # 10*log10(signal power / error power) over all outputs
    cosine: float  # mean per-sample cosine similarity
    max_abs: float
    mean_abs: float
    top1_agreement: float | None  # None when outputs are not (N, classes)
    accuracy: float | None  # None without labels
    passed: bool | None  # None: measured but not judged (random weights)
    failures: tuple[str, ...] = ()  # which thresholds were missed, in words
    samples: int = 0


def run_batched(runner, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Run in batches; an artifact fixed to batch 1 is run one sample at a time."""
    try:
        return np.concatenate([runner(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    except Exception:
        if batch_size == 1:
            raise
        return np.concatenate([runner(x[i : i + 1]) for i in range(len(x))])


def compare(reference: np.ndarray, output: np.ndarray, labels: np.ndarray | None,
            thresholds: ParityThresholds | None, reference_accuracy: float | None) -> Parity:
    """Metrics of ``output`` against ``reference``; judged against ``thresholds`` unless None."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    out = output.reshape(len(output), -1).astype(np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shape {output.shape} differs from FP32's {reference.shape}")
    err = ref - out
    noise = float(np.sum(err**2))
    sqnr = float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref**2)) / noise)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = float(np.mean(np.sum(ref * out, axis=1) / np.maximum(norms, 1e-30)))
    top1 = accuracy = None
    if is_classifier_output(reference):
        top1 = float(np.mean(ref.argmax(1) == out.argmax(1)))
        if labels is not None:
            accuracy = float(np.mean(out.argmax(1) == labels))
    failures = _failures(sqnr, cosine, top1, accuracy, reference_accuracy, thresholds) if thresholds else []
    return Parity(
        sqnr_db=_round(sqnr), cosine=_round(cosine, 6), max_abs=_round(float(np.abs(err).max())),
        mean_abs=_round(float(np.abs(err).mean()), 6), top1_agreement=top1, accuracy=accuracy,
        passed=None if thresholds is None else not failures, failures=tuple(failures), samples=len(ref),
    )


def is_classifier_output(reference: np.ndarray) -> bool:
    return reference.ndim == 2 and reference.shape[1] > 1


def accuracy_of(outputs: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None or not is_classifier_output(outputs):
        return None
    return float(np.mean(outputs.argmax(1) == labels))


def _failures(sqnr, cosine, top1, accuracy, reference_accuracy, t: ParityThresholds) -> list[str]:
    out = []
    if sqnr < t.min_sqnr_db:
        out.append(f"SQNR {sqnr:.1f} dB < {t.min_sqnr_db} dB")
    if cosine < t.min_cosine:
        out.append(f"cosine {cosine:.4f} < {t.min_cosine}")
    if top1 is not None and top1 < t.min_top1_agreement:
        out.append(f"top-1 agreement {top1:.2%} < {t.min_top1_agreement:.2%}")
    if accuracy is not None and reference_accuracy is not None and reference_accuracy - accuracy > t.max_accuracy_drop:
        out.append(f"accuracy {accuracy:.2%} is {reference_accuracy - accuracy:.2%} below FP32's {reference_accuracy:.2%}")
    return out


def _round(v: float, digits: int = 4) -> float:
    return v if not np.isfinite(v) else round(v, digits)
