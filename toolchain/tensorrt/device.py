"""`toolchain engine build`: build the engine on the device, run it on the kept parity inputs,
and record the outcome in the build folder's report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..errors import ToolchainError
from ..html import write_html
from ..parity import compare, resolve_roles
from ..target import ParityThresholds

PARITY_INPUTS = "parity_inputs.npz"


def save_parity_inputs(folder: Path, x: np.ndarray, reference: np.ndarray, y: np.ndarray | None, count: int) -> None:
    """Keep a few validation inputs with the FP32 outputs, so the device can check the engine without torch."""
    arrays = {"x": x[:count], "reference": reference[:count]}
    if y is not None:
        arrays["y"] = y[:count]
    np.savez_compressed(folder / PARITY_INPUTS, **arrays)


def engine_build(folder: Path, use_trtexec: bool = False) -> dict:
    from . import engine as trt_engine

    folder = Path(folder)
    report_path = folder / "report.json"
    if not (folder / "engine_plan.json").is_file() or not report_path.is_file():
        raise ToolchainError(f"`{folder}` is not a build folder of an NVIDIA target (no engine_plan.json)")
    report = json.loads(report_path.read_text())
    if use_trtexec:
        record = trt_engine.build_with_trtexec(folder)
        record["parity"] = None
        record["verified"] = False
    else:
        record = trt_engine.build_engine(folder)
        data = np.load(folder / PARITY_INPUTS)
        outputs = trt_engine.run_engine(folder / record["engine"], data["x"])
        thresholds = ParityThresholds(**report["parity_thresholds"]) if report.get("parity_thresholds") else None
        labels = data["y"] if "y" in data else None
        # FP32 accuracy is taken on the same kept samples (the report's is over the whole validation set).
        # The kept reference is the model's first output, which is what the engine runner returns.
        declared = {k: v for k, v in ((thresholds and thresholds.outputs) or {}).items() if k == "0"}
        roles = resolve_roles([data["reference"]], ["0"], declared)
        parity = compare([data["reference"]], [outputs], labels, thresholds, roles)
        record["parity"] = dataclasses.asdict(parity)
        record["verified"] = True
    (folder / "engine.json").write_text(json.dumps(record, indent=2, default=list) + "\n")
    report["engine"] = {**(report.get("engine") or {}), **record, "status": "built"}
    report_path.write_text(json.dumps(report, indent=2, default=list) + "\n")
    write_html(folder, json.loads(report_path.read_text()))  # the page shows what report.json now says
    return record
