"""Load the FP32 model a build starts from, refusing what would run untrusted code."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import pickle
import re
import zipfile
from pathlib import Path

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.errors import ModelLoadError, reason
from toolchain.core.feed import InputSpec, Signature
from toolchain.core.state import SavedState
from toolchain.folder import terminal_level
from toolchain.inputs.constants import Bound, Constant, eager_constants, exported_constants, script_arguments

TORCHVISION_PREFIX = "torchvision:"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    artifact: Artifact  # the FP32 reference, in memory
    name: str  # used to name the default build folder
    source: str  # what the user passed
    weights: str  # "from file" or "random (torchvision:NAME has no weights offline)"
    input_shape: tuple[int, ...] | None  # batch-1 input shape, when the model says
    dynamic_batch: bool | None  # None when the model file does not say
    signature: Signature | None = None  # every input's name, shape and dtype, when the model file says (.pt2)
    input_names: tuple[str, ...] | None = (
        None  # the forward's tensor parameter names, when known without shapes
    )
    # forward arguments no runtime feeds (Python numbers), fixed per build
    constants: tuple[Constant, ...] = ()
    arguments: tuple[str, ...] | None = None  # every forward parameter, in order, when there are constants
    bound: tuple[Bound, ...] = ()  # the constants' values, once the build has fixed them

    @property
    def random_weights(self) -> bool:
        return self.weights.startswith("random")


def parse_shape(text: str) -> tuple[int, ...]:
    """`1x3x224x224` -> (1, 3, 224, 224)."""
    if not re.fullmatch(r"\d+(x\d+)*", text.strip()):
        raise ModelLoadError(f"--input-shape `{text}` must look like 1x3x224x224")
    shape = tuple(int(d) for d in text.strip().split("x"))
    if 0 in shape:
        raise ModelLoadError(f"--input-shape `{text}` has a zero dimension")
    return shape


def load_model(source: str, trust_pickle: bool = False) -> LoadedModel:
    if source.startswith(TORCHVISION_PREFIX):
        return _load_torchvision(source[len(TORCHVISION_PREFIX) :], source)
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"model file `{source}` does not exist")
    kind = sniff(path)
    if kind == "torch.export":
        return _load_exported(path, source)
    if kind in ("torchscript", "torch.save"):
        return _load_torch_file(path, source, trust_pickle)
    if path.suffix == ".pt2":  # a damaged archive: let the loader say what is wrong with it
        return _load_exported(path, source)
    with path.open("rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise ModelLoadError(
                f"model `{source}` is a damaged or truncated zip archive (the container torch.export, "
                f"TorchScript and torch.save all write); save the model again"
            )
    raise ModelLoadError(
        f"model `{source}`: unknown kind (recognised by content, whatever the suffix); give a torch.export "
        "archive (torch.export.save), TorchScript (torch.jit.save), a pickled module (torch.save, "
        "with --trust-pickle), or `torchvision:<name>`"
    )


def sniff(path: Path) -> str | None:
    """What a model file holds, from its content: "torch.export", "torchscript", "torch.save" or None."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = [n.split("/", 1)[-1] for n in z.namelist()]
        except zipfile.BadZipFile:
            return None
        if "archive_format" in names or "models/model.json" in names:
            return "torch.export"
        if any(n.startswith("code/") for n in names):
            return "torchscript"
        return "torch.save" if "data.pkl" in names else None
    with path.open("rb") as f:
        head = f.read(2)
    return "torch.save" if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") else None


def _load_exported(path: Path, source: str) -> LoadedModel:
    import torch

    logged: list[str] = []
    try:
        with _torch_logs_captured(logged):  # torch logs a traceback of its own, then raises a vaguer error
            ep = torch.export.load(str(path))
    except Exception as e:  # corrupt archives raise anything from RuntimeError to KeyError
        cause = logged[-1].strip().splitlines()[-1] if logged else reason(e)
        raise ModelLoadError(f"model `{source}` is not a readable torch.export archive: {cause}") from None
    _check_unliftable(ep, source)
    constants = exported_constants(ep)  # arguments torch.export fixed at their example values (an `sr: int`)
    fixed = {c.name for c in constants}
    placeholders = [
        n
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs and n.name not in fixed
    ]
    if not placeholders:
        raise ModelLoadError(f"model `{source}` takes no tensor inputs")
    specs = [_input_spec(n, source) for n in placeholders]
    batched = [(n, s) for n, s in zip(placeholders, specs) if not s.scalar]
    if not batched:
        raise ModelLoadError(
            f"model `{source}` takes only scalar inputs; the toolchain needs a batched tensor input"
        )
    dynamic = all(not isinstance(n.meta["val"].shape[0], int) for n, _ in batched)
    signature = Signature(tuple(specs))
    arguments = tuple(
        spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind.name == "USER_INPUT"
    )
    return LoadedModel(
        Artifact(Kind.EXPORTED, "fp32", model=ep),
        path.stem,
        source,
        "from file",
        signature.first_shape,
        dynamic,
        signature,
        signature.names,
        constants=constants,
        arguments=arguments if constants else None,
    )


def _check_unliftable(ep, source: str) -> None:
    """Every stage runs the program as a module (``ep.module()``): say why torch cannot make one."""
    try:
        ep.module()
    except Exception as e:
        # parameters' submodules
        owners = {spec.target.split(".")[0] for spec in ep.graph_signature.input_specs if spec.target}
        clash = sorted(owners & {"meta", "graph", "code"})
        hint = (
            (
                f"; a submodule named `{clash[0]}` collides with torch.fx.GraphModule's own attribute of "
                "that name: rename it and export again"
            )
            if clash
            else ""
        )
        raise ModelLoadError(
            f"model `{source}`: torch.export cannot turn the program back into a module: {reason(e)}{hint}"
        ) from None


def _input_spec(node, source: str) -> InputSpec:
    """A torch.export placeholder as an input: its shape (size hints for symbolic
    dimensions), dtype, dynamic axes."""
    import torch

    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ModelLoadError(
            f"model `{source}`: input `{node.name}` is a {type(val).__name__}, not a tensor; export "
            f"scalars as 0-d tensors (torch.tensor(16000)) so that they stay inputs"
        )
    dims = tuple(val.shape)
    dtype = str(val.dtype).removeprefix("torch.")
    if not dims:
        return InputSpec(node.name, (), dtype, scalar=True)
    sample = tuple(int(d) if isinstance(d, int) else int(d.node.hint or 1) for d in dims[1:])
    dynamic = tuple(i for i, d in enumerate(dims[1:]) if not isinstance(d, int))
    return InputSpec(node.name, sample, dtype, dynamic)


def _load_torch_file(path: Path, source: str, trust_pickle: bool) -> LoadedModel:
    import torch

    if sniff(path) == "torchscript":
        try:
            model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:
            raise ModelLoadError(f"model `{source}` is a damaged TorchScript archive: {reason(e)}") from None
        tensors, constants = script_arguments(model, source)
        if not tensors:
            raise ModelLoadError(
                f"model `{source}` takes no tensor argument; the toolchain needs a batched tensor input"
            )
        arguments = tuple(a.name for a in model.forward.schema.arguments[1:])  # after `self`
        return LoadedModel(
            Artifact(Kind.TORCHSCRIPT, "fp32", model=model, state=SavedState.of(model)),
            path.stem,
            source,
            "from file",
            None,
            None,
            input_names=tensors,
            constants=constants,
            arguments=arguments if constants else None,
        )
    try:
        torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ModelLoadError(
                f"model `{source}` is a pickled Python object; loading it runs code from the file. "
                f"Pass --trust-pickle if you trust its origin, or save it with torch.export.save (.pt2) "
                f"or torch.jit.save instead"
            ) from None
    except Exception as e:
        raise ModelLoadError(
            f"model `{source}` is neither TorchScript nor a readable torch.save file: {reason(e)}"
        ) from None
    else:
        raise ModelLoadError(
            f"model `{source}` holds only tensors (a state_dict?); the toolchain needs the architecture too: "
            f"save it with torch.export.save (.pt2) or torch.jit.save"
        )
    try:
        model = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"model `{source}` could not be unpickled: {reason(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"model `{source}` unpickles to {type(model).__name__}, not a torch.nn.Module")
    names = _forward_names(model)
    constants = eager_constants(model) if names else ()
    tensors = names and tuple(n for n in names if n not in {c.name for c in constants})
    return LoadedModel(
        Artifact(Kind.EAGER, "fp32", model=model.eval()),
        path.stem,
        source,
        "from file",
        None,
        None,
        input_names=tensors,
        constants=constants,
        arguments=names if constants else None,
    )


def _forward_names(model) -> tuple[str, ...] | None:
    """The positional parameters of an eager module's forward (None when it takes *args)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _load_torchvision(name: str, source: str) -> LoadedModel:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ModelLoadError(f"`{source}`: torchvision has no classification model `{name}`{hint}")
    import torch

    with torch.random.fork_rng():  # the same random weights every build, without touching the caller's RNG
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
    size = 299 if name == "inception_v3" else 224
    return LoadedModel(
        Artifact(Kind.EAGER, "fp32", model=model),
        name,
        source,
        "random, seed 0 (torchvision weights cannot be downloaded here; parity is not evidence of accuracy)",
        (1, 3, size, size),
        True,
    )


def settle_random_batchnorm(loaded: LoadedModel, x) -> LoadedModel:
    """Give a random-weight model realistic activation scales.

    Randomly initialised torchvision models keep BatchNorm's default statistics, and their
    activations collapse (MobileNetV2's logits have a standard deviation of 1e-9), far below
    the smallest INT8 scale. Re-estimating the BatchNorm statistics on the calibration
    inputs gives activations of the scale trained models have, so the build exercises
    quantization the way a real model would. Only ever applied to random weights.
    """
    if not loaded.random_weights or loaded.artifact.kind is not Kind.EAGER:
        return loaded
    model = loaded.artifact.model
    if not estimate_batchnorm(model, x):
        return loaded
    weights = loaded.weights.replace(
        "random", "random, BatchNorm statistics estimated on the calibration inputs", 1
    )
    return dataclasses.replace(loaded, artifact=Artifact(Kind.EAGER, "fp32", model=model), weights=weights)


def estimate_batchnorm(model, x, batch: int = 32) -> int:
    """Replace every BatchNorm's running statistics by their average over ``x`` (in place);
    returns how many BatchNorm layers there were. Leaves the model in eval mode."""
    import torch

    from toolchain.core.feed import torch_args

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    if norms:
        model.train()
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(*torch_args(x[i : i + batch]))
    model.eval()
    return len(norms)


@contextlib.contextmanager
def _torch_logs_captured(into: list[str]):
    """What torch logs while a model loads goes into ``into`` (formatted, tracebacks included),
    not to the terminal; with --verbose it is shown as well. torch gives several of its
    loggers their own stderr handler (``torch``, ``torch.export``, ...): each is swapped."""

    class Keep(logging.Handler):
        def emit(self, record):
            into.append(self.format(record))

    keep, verbose = Keep(), terminal_level() <= logging.DEBUG
    loggers = [
        logging.getLogger(n)
        for n in list(logging.root.manager.loggerDict)
        if n == "torch" or n.startswith("torch.")
    ]
    saved = {lg: lg.handlers[:] for lg in loggers if lg.handlers}
    for lg, handlers in saved.items():
        lg.handlers = [keep, *handlers] if verbose else [keep]
    try:
        yield
    finally:
        for lg, handlers in saved.items():
            lg.handlers = handlers
