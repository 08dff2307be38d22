"""toolchain: export, quantize and validate PyTorch models for deployment targets."""

from toolchain.build import build
from toolchain.core.errors import ToolchainError
from toolchain.target import load_target

__all__ = ["build", "load_target", "ToolchainError"]
__version__ = "0.1.0"
