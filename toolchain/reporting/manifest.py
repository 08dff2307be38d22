"""`manifest.json`: what was built from what, by which stages and library versions."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from toolchain.core.artifact import sha256_files
from toolchain.core.stage import StageRecord

# None: not installed
TRACKED_PACKAGES = (
    "toolchain",
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "onnxoptimizer",
    "onnxscript",
    "executorch",
    "torchao",
    "numpy",
    "openvino",
    "onnxruntime-qnn",
    "tensorrt",
    "cuda-python",
)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(
    folder: Path,
    *,
    target_file: str,
    model: dict[str, Any],
    data: dict[str, Any],
    artifacts: dict[str, dict[str, Any]],
    stages: dict[str, list[StageRecord]],
) -> None:
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "target": {"file": target_file, "sha256": sha256_files([Path(target_file)])},
        "model": model,
        "data": data,
        "artifacts": {
            name: {**info, "stages": [dataclasses.asdict(r) for r in stages[name]]}
            for name, info in artifacts.items()
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
