"""The TensorRT engine on the NVIDIA device (`toolchain engine build` / `check`): build it there from
the build folder's plan, run it on the kept parity inputs, and record the outcome in the folder's
report. The build writes those inputs (:func:`save_parity_inputs`)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from toolchain import runtimes
from toolchain.core.artifact import Artifact, Kind
from toolchain.core.errors import ToolchainError
from toolchain.reporting.html import write_html
from toolchain.target import ParityThresholds
from toolchain.verdict.parity import OutputRole, compare, resolve_roles

PARITY_INPUTS = "parity_inputs.npz"


def save_parity_inputs(
    folder: Path, x, reference: list[np.ndarray], roles, y: np.ndarray | None, count: int
) -> None:
    """Keep a few validation inputs with every FP32 output and its role, so the device can check
    the engine without torch. `reference` stays the first output (older readers); a model with
    several inputs keeps them as `input_0`, `input_1`, ... with their names in `input_names`."""
    from toolchain.core.feed import Feed

    kept = x[:count]
    arrays = {
        "reference": reference[0][:count],
        "output_names": np.array([r.name for r in roles]),
        "output_roles": np.array([r.role for r in roles]),
    }
    if isinstance(kept, Feed):
        arrays.update({f"input_{i}": a for i, a in enumerate(kept.arrays)}, input_names=np.array(kept.names))
    else:
        arrays["x"] = kept
    arrays.update({f"reference_{i}": out[:count] for i, out in enumerate(reference)})
    if y is not None:
        arrays["y"] = y[:count]
    np.savez_compressed(folder / PARITY_INPUTS, **arrays)


def kept_inputs(data):
    """The kept validation inputs: an ndarray, or a Feed for a model with several."""
    from toolchain.core.feed import Feed

    if "input_names" not in data:
        return data["x"]
    names = tuple(str(n) for n in data["input_names"])
    return Feed(tuple(data[f"input_{i}"] for i in range(len(names))), names)


def kept_outputs(data) -> tuple[list[np.ndarray], tuple[OutputRole, ...]]:
    """The kept FP32 outputs and their roles (a folder from before roles were kept:
    the first output, inferred)."""
    if "output_names" not in data:
        labels = data["y"] if "y" in data else None  # the evidence the build had for its role
        return [data["reference"]], resolve_roles([data["reference"]], ["0"], {}, labels)
    names, roles = [str(n) for n in data["output_names"]], [str(r) for r in data["output_roles"]]
    return (
        [data[f"reference_{i}"] for i in range(len(names))],
        tuple(
            OutputRole(i, n, r, inferred=False, per_frame=data[f"reference_{i}"].ndim == 3)
            for i, (n, r) in enumerate(zip(names, roles))
        ),
    )


def engine_build(folder: Path, use_trtexec: bool = False) -> dict:
    """Build the engine here; run it on the kept inputs and compare every output with FP32, the way
    the build compares every artifact. A failure is the build's verdict too: report.json's
    `passed` / `verdict`, report.md and report.html all say FAILED, and the CLI exits 3."""
    from toolchain.tensorrt import engine as trt_engine

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
        reference, roles = kept_outputs(data)
        engine = Artifact(Kind.ENGINE, "int8", path=folder / record["engine"])
        # in chunks the plan's profile accepts
        outputs = runtimes.get("tensorrt").load(engine, 1)(kept_inputs(data))
        thresholds = (
            ParityThresholds(**report["parity_thresholds"]).for_precision("int8")
            if report.get("parity_thresholds")
            else None
        )
        labels = data["y"] if "y" in data else None
        # FP32 accuracy is taken on the same kept samples (the report's is over the whole validation set).
        parity = compare(reference, outputs, labels, thresholds, roles)
        record["parity"] = dataclasses.asdict(parity)
        record["verified"] = True
    (folder / "engine.json").write_text(json.dumps(record, indent=2, default=list) + "\n")
    report["engine"] = {**(report.get("engine") or {}), **record, "status": "built"}
    if record["parity"] and record["parity"]["passed"] is False:
        report["passed"], report["verdict"] = False, "FAILED parity"
        report["engine"]["summary"] = "engine: FAILED parity: " + "; ".join(record["parity"]["failures"])
    report_path.write_text(json.dumps(report, indent=2, default=list) + "\n")
    _update_markdown(folder / "report.md", report)
    write_html(folder, json.loads(report_path.read_text()))  # the page shows what report.json now says
    return record


def _update_markdown(path: Path, report: dict) -> None:
    """report.md's title carries the verdict and one line the engine: both follow report.json."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines[0] = re.sub(r": [^:]*$", f": {report['verdict']}", lines[0])
    engine = report["engine"]
    parity = engine.get("parity")
    state = (
        "not checked (trtexec build)"
        if not parity
        else ("parity passed" if parity["passed"] else engine["summary"])
    )
    line = (
        f"- TensorRT engine: built with TensorRT {engine.get('tensorrt_version')} on "
        f"{engine.get('gpu', 'this device')}; {state}"
    )
    at = next((i for i, text in enumerate(lines) if text.startswith("- TensorRT engine:")), None)
    if at is None:
        lines.append(line)
    else:
        lines[at] = line
    path.write_text("\n".join(lines) + "\n")
