"""Calibration observers for PyTorch INT8, chosen by the profile's `calibration` name."""

from __future__ import annotations

import torch
from torch.ao.quantization.observer import HistogramObserver

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class PercentileObserver(HistogramObserver):
    """Clip activations at a percentile of the observed histogram instead of min/max.

    ``torch.ao`` has no percentile observer; this reuses HistogramObserver's running
    histogram and only changes how the range is chosen. A range that never goes below zero
    (after ReLU) keeps its lower bound at zero.
    """

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(**kwargs)
        self.percentile = percentile

    @torch.jit.export
    def calculate_qparams(self):
        if self.histogram.sum() == 0 or self.min_val == self.max_val:
            return super().calculate_qparams()
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        edges = torch.linspace(self.min_val.item(), self.max_val.item(), self.histogram.numel() + 1)
        tail = (100.0 - self.percentile) / 100.0
        hi = edges[1:][torch.searchsorted(cdf, torch.tensor(1.0 - tail)).clamp(max=cdf.numel() - 1)]
        lo = self.min_val if self.min_val >= 0 else edges[torch.searchsorted(cdf, torch.tensor(tail))]
        return self._calculate_qparams(torch.as_tensor(lo).reshape(1), torch.as_tensor(hi).reshape(1))


def make_qconfig(calibration: str, percentile: float, per_channel: bool, reduce_range: bool, engine: str):
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    act_kwargs = dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range)
    activation = {
        "minmax": MinMaxObserver.with_args(**act_kwargs),
        "entropy": HistogramObserver.with_args(**act_kwargs),
        "percentile": PercentileObserver.with_args(percentile=percentile, **act_kwargs),
    }[calibration]
    if per_channel:  # fbgemm/x86 and qnnpack both have per-channel INT8 kernels
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=activation, weight=weight)


def make_qat_qconfig(calibration: str, percentile: float, per_channel: bool, reduce_range: bool, engine: str):
    """The fake-quantization twin of :func:`make_qconfig`: each FakeQuantize wraps the observer that
    post-training quantization would use, with the same dtype, scheme and range, so a model
    fine-tuned with it converts to exactly the INT8 modules and kernels the stage builds."""
    from torch.ao.quantization import FakeQuantize, QConfig

    ptq = make_qconfig(calibration, percentile, per_channel, reduce_range, engine)
    # the observer halves 0..255 itself under reduce_range, as its post-training twin does
    activation = FakeQuantize.with_args(observer=ptq.activation, quant_min=0, quant_max=255)
    weight = FakeQuantize.with_args(observer=current_weights(ptq.weight), quant_min=-128, quant_max=127)
    return QConfig(activation=activation, weight=weight)


def current_weights(observer):
    """The moving-average twin of a min/max weight observer (torch.ao's or torchao's), with averaging
    constant 1: each step's range is the current weights' (a running min/max would keep every range the
    weights ever had), and what conversion observes last, the final weights, is what post-training
    quantization would see. Other observers are returned as they are."""
    import sys

    cls = observer.p.func
    twin = getattr(sys.modules[cls.__module__], f"MovingAverage{cls.__name__}", None)
    if cls.__name__ not in ("MinMaxObserver", "PerChannelMinMaxObserver") or twin is None:
        return observer
    return twin.with_args(averaging_constant=1.0, **observer.p.keywords)


def start_ranges(model, calibrate, weights: set[str] | None = None):
    """A QAT model (FX's or pt2e's) given its starting ranges: ``calibrate(model)`` runs the calibration
    inputs through it once with fake-quantization off, so each observer sees FP32 values as after a
    post-training prepare; then activation ranges stay fixed and weight scales follow the weights
    (:func:`freeze_activation_ranges`, ``weights`` as there). Returned in training mode."""
    fakes = [m for m in model.modules() if is_fake_quantize(m)]
    for m in fakes:
        m.disable_fake_quant()
    model.eval()
    calibrate(model)
    for m in fakes:
        m.enable_fake_quant()
    freeze_activation_ranges(model, weights)
    model.train()  # an exported (pt2e) model's train() returns None: the model is returned here
    return model


def freeze_activation_ranges(model, weights: set[str] | None = None) -> int:
    """Stop every activation FakeQuantize's observer (its range stays the calibrated one) and leave
    the weights' observing: their scales follow the weights as they train, as post-training
    quantization would compute them from the final weights. ``weights``: the names of the weights'
    fake-quantizers (default: FX's, the modules named `*weight_fake_quant`). Returns how many were
    frozen."""
    frozen = 0
    for name, module in model.named_modules():
        is_weight = name in weights if weights is not None else name.endswith("weight_fake_quant")
        if is_fake_quantize(module) and not is_weight:
            module.disable_observer()
            frozen += 1
    return frozen


def is_fake_quantize(module) -> bool:
    """torch.ao's FakeQuantize (FX) or torchao's (pt2e): two class trees with the same interface."""
    return any(c.__name__ == "FakeQuantizeBase" for c in type(module).__mro__)
