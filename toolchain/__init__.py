"""toolchain: export, quantize and validate PyTorch models for deployment targets."""

from .build import build
from .errors import ToolchainError
from .target import load_target

__all__ = ["build", "load_target", "ToolchainError"]
__version__ = "0.1.0"
