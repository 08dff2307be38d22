"""Everything a build knows about its inputs before any stage runs: the calibration and validation
data (disjoint, checked against the model's signature), the model's input names, shapes and dtypes,
and its non-tensor arguments fixed and bound."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from toolchain.core.artifact import Kind
from toolchain.core.context import BuildContext
from toolchain.core.dataset import Dataset
from toolchain.core.errors import DataError, reason
from toolchain.core.export import as_module
from toolchain.core.feed import Batch, InputSpec, Signature, torch_args
from toolchain.core.qat import QatState
from toolchain.core.runner import output_names
from toolchain.core.state import SavedState
from toolchain.inputs.constants import bind, fed_from_data, parse_constants
from toolchain.inputs.constants import resolve as resolve_constants
from toolchain.inputs.data import DataOptions, check_signature, load_dataset, synthetic_dataset
from toolchain.inputs.load import LoadedModel, load_model, parse_shape, settle_random_batchnorm
from toolchain.measure.cpu import isa_facts

log = logging.getLogger("toolchain")


@dataclasses.dataclass(frozen=True)
class Inputs:
    shape: tuple[int, ...]  # batch 1
    calibration: Dataset
    validation: Dataset
    warnings: tuple[str, ...]
    overlap: int = 0  # validation samples that are also calibration samples
    signature: Signature | None = None  # every input's name, shape, dtype (shape: the first one's, batch 1)


def check_data_paths(calib, val) -> None:
    for role, path in (("calibration", calib), ("validation", val)):
        if path is not None and not Path(path).exists():
            raise DataError(f"{role} data `{path}` does not exist")


def prepare_inputs(
    loaded: LoadedModel, options: DataOptions, isa: str | None, calib, val, input_shape, hold_out: bool = True
) -> Inputs:
    """Calibration and validation data, disjoint unless the user's files overlap (then counted and said);
    ``options`` are the target profile's `[data]`, ``isa`` its deployment CPU's instruction set. Without
    ``val``, a quarter of ``calib`` is held out for parity unless ``hold_out`` is false (what only
    calibrates, `toolchain qat`, keeps every sample; its validation is the calibration data)."""
    warnings = []
    n_cal, n_val = options.calibration_samples, options.validation_samples
    pre = options.preprocess
    # names of several (or non-float) inputs: data as one array per name
    several = _feed_names(loaded, input_shape)
    fixed = tuple(c.name for c in loaded.constants)  # the data's 0-d arrays of constants are not labels
    calibration = (
        load_dataset(Path(calib), "calibration", pre, n_cal, inputs=several, constants=fixed)
        if calib
        else None
    )
    validation = (
        load_dataset(Path(val), "validation", pre, n_val, inputs=several, constants=fixed) if val else None
    )
    signature = _resolve_signature(loaded, input_shape, calibration or validation, several)
    integers = options.integer_range

    def synthetic(seed: int) -> Dataset:
        if signature.plain:
            return synthetic_dataset(signature.inputs[0].shape, options.synthetic_samples, seed=seed)
        return Dataset(signature.synthetic(options.synthetic_samples, seed, integers), None, "synthetic")

    if calibration is None:
        ints = (
            f"; integer inputs uniform in [{integers[0]}, {integers[1]})"
            if any(s.integer for s in signature.inputs)
            else ""
        )
        warnings.append(
            f"no --calib data: calibrating on {options.synthetic_samples} synthetic (random normal{ints}) "
            f"inputs; INT8 ranges will not match real data"
        )
        calibration = synthetic(0)
    calibration = check_signature(calibration, signature, "calibration")
    if validation is None and not hold_out:
        validation = calibration
    if validation is None:
        if calibration.synthetic:
            warnings.append(
                "no --val data: parity is measured on synthetic inputs and says little about accuracy"
            )
            validation = synthetic(1)
        elif len(calibration.x) > 1:
            calibration, validation = calibration.hold_out(
                max(1, min(n_val, len(calibration.x) // 4)), seed=0
            )
            warnings.append(
                f"no --val data: parity runs on {len(validation.x)} samples held out from --calib, which "
                f"calibrates on the other {len(calibration.x)}; give --val for a held-out set of your own"
            )
        else:
            warnings.append(
                "no --val data and one calibration sample: parity runs on the calibration input itself"
            )
            validation = calibration
    validation = check_signature(validation, signature, "validation")
    overlap = 0 if validation is calibration else calibration.overlap(validation)
    if overlap:
        warnings.append(
            f"{overlap} of the {len(validation.x)} validation samples are also calibration samples: "
            f"parity on them flatters INT8; use disjoint --calib and --val"
        )
    cpu = isa_facts(isa)
    # device targets say so in their own reports; an x86 mismatch is a surprise
    if cpu["proxy"] and cpu["target_isa"] and hold_out:  # what only calibrates measures no parity
        warnings.append(f"parity measured here is a proxy: {cpu['proxy_reason']}")
    if loaded.artifact.state is not None:
        warnings.append(
            f"{loaded.source} keeps state between calls ({', '.join(loaded.artifact.state.names)}): the "
            "reference and every artifact are run one call at a time from the state it was saved with; "
            "TorchScript artifacts keep the state machinery, ONNX artifacts hold the saved state as "
            "constants (no state carried between calls)"
        )
    if loaded.random_weights:
        warnings.append(
            f"{loaded.source} has random weights: parity is measured but not judged "
            "(says nothing about accuracy)"
        )
    for w in warnings:
        log.warning(w)
    return Inputs(signature.first_shape, calibration, validation, tuple(warnings), overlap, signature)


def fix_constants(loaded: LoadedModel, constants, calib, val, inputs: tuple[str, ...] = ()) -> LoadedModel:
    """The values of the model's non-tensor arguments for this build (constants.py): ``constants``
    ({name: value}, "NAME=VALUE,..." or a sequence of those), else the data's, else the defaults.
    An optional tensor argument the data gives (or ``inputs`` names: a build's recorded inputs)
    becomes an input."""
    given = dict(constants) if isinstance(constants, Mapping) else parse_constants(constants)
    if not loaded.constants:
        if given:
            raise DataError(
                f"--constant {', '.join(given)}: `{loaded.source}` has no non-tensor forward argument to fix"
            )
        return loaded
    files = [Path(p) for p in (calib, val) if p]
    fed = set(fed_from_data(loaded.constants, files)) | {
        c.name for c in loaded.constants if c.type == "Tensor?" and c.name in inputs
    }
    if fed:
        tensors = set(loaded.input_names or ()) | set(fed)
        loaded = dataclasses.replace(
            loaded,
            input_names=tuple(n for n in loaded.arguments if n in tensors),
            constants=tuple(c for c in loaded.constants if c.name not in fed),
        )
    return dataclasses.replace(loaded, bound=resolve_constants(loaded.constants, given, files))


def bind_constants(loaded: LoadedModel, example: Batch) -> LoadedModel:
    """The model with its constants fixed: every stage then sees its tensor inputs alone (a
    TorchScript model stays TorchScript; an eager or exported one becomes a torch.export program)."""
    # no argument to fix (an optional tensor the data gives is wrapped too: it folds its branch)
    if loaded.arguments is None:
        return loaded
    for b in loaded.bound:
        log.info(
            "%s = %s in every artifact (%s)",
            b.name,
            b.value,
            {"default": "its default", "export": "as exported"}.get(b.source, f"from {b.source}"),
        )
    model = bind(
        as_module(loaded.artifact),
        loaded.arguments,
        loaded.input_names or (),
        loaded.bound,
        torch_args(example[:2]),
        loaded.dynamic_batch is not False,
    )
    kind = Kind.TORCHSCRIPT if loaded.artifact.kind is Kind.TORCHSCRIPT else Kind.EXPORTED
    state = loaded.artifact.state
    if kind is Kind.TORCHSCRIPT:
        model.eval()  # the wrapper is a new module; exporters put back the mode they found
        if state is not None:  # the trace ran the model once: back to the state it was saved with
            state.restore(loaded.artifact.model)
            state = SavedState.of(model)
    return dataclasses.replace(
        loaded, artifact=dataclasses.replace(loaded.artifact, kind=kind, model=model, state=state)
    )


def _feed_names(loaded: LoadedModel, given) -> tuple[str, ...] | None:
    """The model's input names when its data comes as one array per input (several
    inputs, or a non-float one)."""
    if loaded.signature is not None:
        return None if loaded.signature.plain else loaded.signature.names
    if isinstance(given, str) and "=" in given:
        return tuple(name for name, _, _ in parse_input_shapes(given))
    names = loaded.input_names
    return names if names and len(names) > 1 else None


def parse_input_shapes(text: str) -> list[tuple[str, tuple[int, ...], str | None]]:
    """`ids=1x16:int64,mask=1x16:int64` -> [(name, batch-1 shape, dtype or None)]; `len=:int64`: a scalar."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, rest = item.partition("=")
        shape, _, dtype = rest.partition(":")
        if not sep or not name.strip():
            raise DataError(f"--input-shape `{item}` must be NAME=SHAPE[:DTYPE] (e.g. ids=1x16:int64)")
        if dtype:
            try:
                dtype = str(np.dtype(dtype.strip()))
            except TypeError:
                raise DataError(
                    f"--input-shape `{item}`: `{dtype}` is not a dtype (float32, int64, int32, bool, ...)"
                ) from None
        out.append((name.strip(), parse_shape(shape) if shape.strip() else (), dtype or None))
    return out


def _resolve_signature(loaded: LoadedModel, given, data: Dataset | None, several) -> Signature:
    """Every input's name, shape and dtype: from the model file (.pt2), else --input-shape, else the data."""
    if several is None:  # one float input, as before
        shape = _resolve_shape(loaded, given, data)
        name = (loaded.signature or Signature((InputSpec("input", ()),))).inputs[0].name
        dynamic = loaded.signature.inputs[0].dynamic if loaded.signature else ()
        return Signature((InputSpec(name, tuple(shape[1:]), dynamic=dynamic),))
    if given and not (isinstance(given, str) and "=" in given) and not isinstance(given, tuple):
        known = loaded.signature.inputs if loaded.signature is not None else ()
        example = ",".join(f"{s.name}={'x'.join(map(str, s.batch1()))}:{s.dtype}" for s in known) or ",".join(
            f"{n}=SHAPE:DTYPE" for n in several
        )
        raise DataError(
            f"--input-shape {given}: the model takes several inputs ({', '.join(several)}); "
            f"give each by name, e.g. --input-shape {example}"
        )
    if loaded.signature is not None and not (isinstance(given, str) and "=" in given):
        return loaded.signature
    if isinstance(given, str) and "=" in given:
        told = {name: (shape, dtype) for name, shape, dtype in parse_input_shapes(given)}
        known = dict(zip(several, data.x.arrays)) if data is not None else {}
        unknown = sorted(set(told) - set(several))
        if unknown:
            raise DataError(
                f"--input-shape names {', '.join(unknown)}, but the model's inputs are {', '.join(several)}"
            )
        specs = []
        for name in several:
            if name not in told and name not in known:
                raise DataError(
                    f"--input-shape does not give input `{name}` (the model takes {', '.join(several)})"
                )
            shape, dtype = told.get(name, (None, None))
            a = known.get(name)
            dtype = dtype or (str(a.dtype) if a is not None else "float32")
            scalar = shape == () if shape is not None else a.ndim == 0
            sample = (
                (shape[1:] if not scalar else ())
                if shape is not None
                else (a.shape if scalar else a.shape[1:])
            )
            specs.append(InputSpec(name, tuple(sample), dtype, scalar=scalar))
        return Signature(tuple(specs))
    if data is None:
        raise DataError(
            f"cannot tell the shapes of `{loaded.source}`'s inputs ({', '.join(several)}); pass --calib data "
            f"(an .npz with one array per input) or --input-shape NAME=SHAPE[:DTYPE],..."
        )
    return Signature(
        tuple(
            InputSpec(n, () if a.ndim == 0 else tuple(a.shape[1:]), str(a.dtype), scalar=a.ndim == 0)
            for n, a in zip(several, data.x.arrays)
        )
    )


def _resolve_shape(loaded: LoadedModel, given, data: Dataset | None) -> tuple[int, ...]:
    if given:
        shape = parse_shape(given) if isinstance(given, str) else tuple(given)
        known = loaded.input_shape or (None if data is None else (1, *data.x.shape[1:]))
        if known and len(shape) != len(known):
            raise DataError(
                f"--input-shape {'x'.join(map(str, shape))} has {len(shape)} dimensions, but the "
                f"{'model' if loaded.input_shape else 'data'} has {len(known)} "
                f"({'x'.join(map(str, known))}): give the batch dimension first, "
                f"e.g. 1x{'x'.join(map(str, known[1:]))}"
            )
        return (1, *shape[1:])
    if loaded.input_shape:
        return loaded.input_shape
    if data is not None:
        return (1, *data.x.shape[1:])
    raise DataError(
        f"cannot tell the input shape of `{loaded.source}`; pass --input-shape "
        "(e.g. 1x3x224x224) or --calib data"
    )


def check_model_accepts(loaded: LoadedModel, signature: Signature) -> list[str]:
    """Run the FP32 model once on zeros of every input before anything else does; returns its output names."""
    import torch

    try:
        with torch.inference_mode():
            if signature.plain:
                out = as_module(loaded.artifact)(torch.zeros(signature.first_shape))
            else:
                out = as_module(loaded.artifact)(*torch_args(signature.synthetic(1, integer_range=(0, 1))))
    except Exception as e:
        what = ", ".join(
            f"{s.name} {'x'.join(map(str, s.batch1())) or 'scalar'} {s.dtype}" for s in signature.inputs
        )
        shown = "x".join(map(str, signature.first_shape)) if signature.plain else what
        raise DataError(
            f"the model rejects {'an input of shape' if signature.plain else 'inputs'} {shown}: {reason(e)}"
        ) from None
    finally:
        if loaded.artifact.state is not None:
            loaded.artifact.state.restore(as_module(loaded.artifact))
    return output_names(out)


def prepare_model(
    loaded: LoadedModel, options: DataOptions, isa: str | None, calib, val, input_shape, hold_out: bool = True
) -> tuple[LoadedModel, Inputs, list[str]]:
    """The one preparation path of a build and of `toolchain sensitivity`: data read and
    checked (:func:`prepare_inputs`), constants bound, the model run once on zeros, random
    BatchNorm statistics settled. ``loaded`` has its constants fixed (:func:`fix_constants`).
    Returns the model as every stage sees it, the inputs, and the model's output names."""
    log.info("reading calibration and validation data" if hold_out else "reading calibration data")
    inputs = prepare_inputs(loaded, options, isa, calib, val, input_shape, hold_out)
    loaded = bind_constants(loaded, inputs.calibration.x)
    names = check_model_accepts(loaded, inputs.signature)
    return settle_random_batchnorm(loaded, inputs.calibration.x), inputs, names


def build_context(
    workdir: Path,
    loaded: LoadedModel,
    inputs: Inputs,
    threads: int,
    isa: str | None,
    progress=None,
    qat: QatState | None = None,
) -> BuildContext:
    """What every stage reads about this build; ``workdir`` (the stages' files) is created."""
    workdir.mkdir(exist_ok=True)
    return BuildContext(
        workdir,
        inputs.calibration,
        inputs.shape,
        loaded.dynamic_batch is not False,
        threads,
        progress or (lambda *a: None),
        isa,
        signature=inputs.signature,
        qat=qat,
    )


def recorded_model(model: dict, calib, val) -> LoadedModel:
    """The model a build folder's report.json names (``model``: its `model` table), loaded again
    with the constants the build fixed and the inputs it fed; not yet bound."""
    loaded = load_model(model["source"], trust_pickle=False)
    names = tuple(i["name"] for i in model.get("inputs", []))
    return fix_constants(loaded, recorded_constants(model), calib, val, names)


def recorded_constants(model: dict) -> dict[str, object]:
    """The values a build fixed the model's non-tensor arguments at (report.json `model.constants`)."""
    return {c["name"]: c["value"] for c in model.get("constants", [])}


def recorded_signature(model: dict):
    """The inputs a report.json records (older reports: one float input of `input_shape`)."""
    if not model.get("inputs"):
        return tuple(model["input_shape"][1:])
    return Signature(
        tuple(
            InputSpec(
                i["name"],
                tuple(i["shape"] if i["scalar"] else i["shape"][1:]),
                i["dtype"],
                tuple(a - (0 if i["scalar"] else 1) for a in i["dynamic_axes"]),
                i["scalar"],
            )
            for i in model["inputs"]
        )
    )
