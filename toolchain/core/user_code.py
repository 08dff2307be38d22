"""Functions the user names on the command line as `FILE.py:function` (a metric, a training loop),
loaded from their file, and their errors reported as one line pointing into that file."""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path
from typing import Callable

from toolchain.core.errors import ToolchainError


def load_function(spec: str, what: str, error: type[ToolchainError], base: Path | None = None) -> Callable:
    """`path/to/file.py:function` (a relative path is taken from ``base``, then the working folder);
    ``what`` names it in ``error``'s messages ("metric")."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text.endswith(".py") or not name.isidentifier():
        raise error(f"{what} `{spec}` must look like FILE.py:function")
    path = Path(path_text)
    if not path.is_absolute() and base is not None and (base / path).is_file():
        path = base / path
    if not path.is_file():
        raise error(f"{what} file `{path_text}` does not exist")
    module_spec = importlib.util.spec_from_file_location(f"toolchain_user_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise error(f"{what} file `{path}` fails to load: {where(e, path)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise error(f"{what} file `{path}` has no function `{name}`")
    return fn


def where(e: BaseException, path: Path | None) -> str:
    """`ValueError: message (file.py:12)`: the deepest frame in the user's file, else the deepest."""
    frames = traceback.extract_tb(e.__traceback__)
    package = Path(__file__).resolve().parent.parent
    ours_or_library = lambda f: (
        "site-packages" in f.filename or Path(f.filename).resolve().is_relative_to(package)
    )
    user = [f for f in frames if (Path(f.filename) == path if path else not ours_or_library(f))] or frames
    frame = user[-1] if user else None
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    at = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {message}{at}"
