"""Load the FP32 model a build starts from, refusing what would run untrusted code."""

from __future__ import annotations

import dataclasses
import difflib
import pickle
import re
import zipfile
from pathlib import Path

from .artifact import Artifact, Kind
from .errors import ModelLoadError, reason

TORCHVISION_PREFIX = "torchvision:"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    artifact: Artifact  # the FP32 reference, in memory
    name: str  # used to name the default build folder
    source: str  # what the user passed
    weights: str  # "from file" or "random (torchvision:NAME has no weights offline)"
    input_shape: tuple[int, ...] | None  # batch-1 input shape, when the model says
    dynamic_batch: bool | None  # None when the model file does not say

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
        return _load_torchvision(source[len(TORCHVISION_PREFIX):], source)
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"model file `{source}` does not exist")
    if path.suffix == ".pt2":
        return _load_exported(path, source)
    if path.suffix in (".pt", ".pth", ".ptl"):
        return _load_torch_file(path, source, trust_pickle)
    raise ModelLoadError(
        f"model `{source}`: unknown kind; give a torch.export `.pt2`, a TorchScript `.pt`, "
        f"a pickled module `.pt` with --trust-pickle, or `torchvision:<name>`"
    )


def _load_exported(path: Path, source: str) -> LoadedModel:
    import torch

    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # corrupt archives raise anything from RuntimeError to KeyError
        raise ModelLoadError(f"model `{source}` is not a readable torch.export archive: {reason(e)}") from None
    placeholders = [
        n for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
    ]
    if len(placeholders) != 1:
        raise ModelLoadError(f"model `{source}` takes {len(placeholders)} inputs; the toolchain builds single-input models")
    shape = placeholders[0].meta["val"].shape
    dynamic = not isinstance(shape[0], int)
    sample = tuple(int(d) if isinstance(d, int) else int(d.node.hint or 1) for d in shape[1:])
    return LoadedModel(
        Artifact(Kind.EXPORTED, "fp32", model=ep), path.stem, source, "from file", (1, *sample), dynamic
    )


def _load_torch_file(path: Path, source: str, trust_pickle: bool) -> LoadedModel:
    import torch

    if _is_torchscript(path):
        try:
            model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:
            raise ModelLoadError(f"model `{source}` is a damaged TorchScript archive: {reason(e)}") from None
        return LoadedModel(Artifact(Kind.TORCHSCRIPT, "fp32", model=model), path.stem, source, "from file", None, None)
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
        raise ModelLoadError(f"model `{source}` is neither TorchScript nor a readable torch.save file: {reason(e)}") from None
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
    return LoadedModel(Artifact(Kind.EAGER, "fp32", model=model.eval()), path.stem, source, "from file", None, None)


def _load_torchvision(name: str, source: str) -> LoadedModel:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ModelLoadError(f"`{source}`: torchvision has no classification model `{name}`{hint}")
    model = torchvision.models.get_model(name, weights=None).eval()
    size = 299 if name == "inception_v3" else 224
    return LoadedModel(
        Artifact(Kind.EAGER, "fp32", model=model),
        name,
        source,
        "random (torchvision weights cannot be downloaded here; parity is not evidence of accuracy)",
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
    weights = loaded.weights.replace("random", "random, BatchNorm statistics estimated on the calibration inputs", 1)
    return dataclasses.replace(loaded, artifact=Artifact(Kind.EAGER, "fp32", model=model), weights=weights)


def estimate_batchnorm(model, x, batch: int = 32) -> int:
    """Replace every BatchNorm's running statistics by their average over ``x`` (in place);
    returns how many BatchNorm layers there were. Leaves the model in eval mode."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    if norms:
        model.train()
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(torch.from_numpy(x[i : i + batch]))
    model.eval()
    return len(norms)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except zipfile.BadZipFile:
        return False

