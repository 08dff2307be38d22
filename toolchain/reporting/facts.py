"""The model and data facts a report states."""

from __future__ import annotations

from toolchain.core.dataset import Dataset
from toolchain.inputs.load import LoadedModel
from toolchain.inputs.prepare import Inputs
from toolchain.verdict.parity import OutputRole


def model_facts(loaded: LoadedModel, inputs: Inputs, roles: tuple[OutputRole, ...]) -> dict:
    return {
        "source": loaded.source,
        "name": loaded.name,
        "kind": str(loaded.artifact.kind),
        "weights": loaded.weights,
        "input_shape": list(inputs.shape),
        "inputs": inputs.signature.to_json(),
        "constants": [b.to_json() for b in loaded.bound],
        "dynamic_batch": loaded.dynamic_batch,
        "sha256": loaded.artifact.sha256,
        "outputs": [
            {
                "index": r.index,
                "name": r.name,
                "role": r.role,
                "inferred": r.inferred,
                "evidence": r.evidence,
                "per_frame": r.per_frame,
                "role_inferred": r.inferred,  # the key before `inferred`, kept for scripts that read it
            }
            for r in roles
        ],
    }


def data_facts(inputs: Inputs) -> dict:
    def one(d: Dataset) -> dict:
        return {
            "origin": d.origin,
            "samples": len(d.x),
            "synthetic": d.synthetic,
            "labels": d.y is not None,
            "held_out": d.held_out,
            "label_arrays": sorted(d.labels),
        }

    same = inputs.validation is inputs.calibration
    return {
        "calibration": one(inputs.calibration),
        "validation": one(inputs.validation),
        "overlap_samples": len(inputs.validation.x) if same else inputs.overlap,
    }
