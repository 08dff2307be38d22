"""Every stage registers itself on import; importing this package registers them all."""

from . import export_onnx, fuse, onnx_passes, quantize_onnx, quantize_torch, save_torchscript  # noqa: F401
