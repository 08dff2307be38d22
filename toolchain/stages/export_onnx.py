"""Export to ONNX, check it, and keep the batch dimension dynamic where the model allows."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import warnings

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.export import quiet_logger
from toolchain.core.native import native_stderr
from toolchain.core.options import option
from toolchain.core.stage import Stage, StageResult, register_stage
from toolchain.passes.opset import ConversionError, convert_opset
from toolchain.passes.symbolics import integer_symbolics

INPUT_NAME, OUTPUT_NAME = "input", "output"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExportOnnxOptions:
    opset: int = option(
        18,
        "ONNX opset written: the exporter is asked for it, so it picks operator forms that exist there "
        "(GELU as Erf below 20); below its floor (18) a checked version conversion (Split/Pad rewritten), "
        "else the TorchScript-based exporter at that opset",
    )
    dynamic_batch: bool = option(
        True, "keep the batch dimension dynamic (falls back to static if the model fixes it)"
    )
    external_data_mb: int = option(
        1024, "store weights in `<file>.data` beside the model above this size (protobuf caps files at 2 GiB)"
    )


@register_stage
class ExportOnnx(Stage):
    name = "export_onnx"
    requires = ("torch", "onnx")
    transitions = {
        Kind.EAGER: Kind.ONNX,
        Kind.EXPORTED: Kind.ONNX,
        Kind.TORCHSCRIPT: Kind.ONNX,
        Kind.FX: Kind.ONNX,
    }
    Options = ExportOnnxOptions
    report_facts = ("exporter", "opset_route")

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx

        dynamic = self.options.dynamic_batch and ctx.dynamic_batch
        try:
            proto, exporter = _export(artifact, ctx, dynamic, self.options.opset)
        except Exception as e:
            if not dynamic:
                raise StageError(f"export_onnx: {_exporter_words(e)}") from None
            log.debug("export_onnx with a dynamic batch: %s", e)
            try:
                proto, exporter = _export(artifact, ctx, False, self.options.opset)
            except Exception as e:  # the exporter's words, without the graph it appends (in the build log)
                log.debug("export_onnx at a fixed batch", exc_info=True)
                raise StageError(f"export_onnx: {_exporter_words(e)}") from None
            dynamic = False
        exported_opset = _opset(proto)
        route = f"exported at opset {exported_opset}"
        if self.options.opset < exported_opset:
            proto, exporter, route, dynamic = self._down_to_opset(proto, exporter, artifact, ctx, dynamic)
        path = ctx.workdir / f"{artifact.precision}-{artifact.sha256[:12]}.onnx"
        external = proto.ByteSize() > self.options.external_data_mb * 2**20
        save_onnx(proto, path, external)
        onnx.checker.check_model(str(path), full_check=True)
        facts = {
            "exporter": exporter,
            "opset": _opset(proto),
            "exported_opset": exported_opset,
            "opset_route": route,
            "dynamic_batch": dynamic,
            "external_data": external,
            "nodes": len(proto.graph.node),
        }
        exported = dataclasses.replace(artifact, kind=Kind.ONNX, model=None, path=path, source=artifact)
        return StageResult(exported, facts)

    def _down_to_opset(self, proto, exporter: str, artifact: Artifact, ctx: BuildContext, dynamic: bool):
        """The model at the profile's opset, and how it got there (a stage fact): onnx's converter
        (with Split/Pad rewritten to their older forms where it lacks an adapter), else the
        TorchScript-based exporter, which writes that opset itself."""
        import onnx

        opset, exported_opset = self.options.opset, _opset(proto)
        try:
            converted, rewritten = convert_opset(proto, opset)
        except ConversionError as e:
            if artifact.kind is Kind.TORCHSCRIPT:
                raise StageError(
                    f"export_onnx: cannot convert the model down to opset {opset}: {e}"
                ) from None
            converting = str(e)
        else:
            done = ", ".join(f"{op} x{n}" for op, n in sorted(rewritten.items()))
            route = f"converted from opset {exported_opset}" + (
                f" ({done} rewritten to their older form)" if done else ""
            )
            return converted, exporter, route, dynamic
        # A trace records sizes the program derives from the batch (`x.shape[0]`) as constants, which
        # a dynamic batch axis does not undo: ONNX shape inference may refuse the file, or it may run
        # and compute something else at another batch size. Then the batch is fixed.
        module = _traceable(artifact)
        for batch_axis in (True, False) if dynamic else (False,):
            try:
                with _quiet(), native_stderr(stdout=True) as printed:  # its C++ log: the TorchScript graph
                    written = _export_torchscript(module, ctx, batch_axis, opset, artifact.state)
                    onnx.checker.check_model(written, full_check=True)
                if batch_axis and not _holds_batch(written, module, ctx):
                    log.debug("TorchScript-based export: a dynamic batch does not hold at batch 3")
                    continue
                break
            except Exception as e:
                failed = e
                log.debug(
                    "TorchScript-based export (dynamic batch %s): %s\n%s", batch_axis, e, "\n".join(printed)
                )
        else:
            raise StageError(
                f"export_onnx: no opset-{opset} model: {converting} (onnx's converter); "
                f"{_exporter_words(failed)} (TorchScript-based exporter)"
            ) from None
        route = (
            f"TorchScript-based exporter at opset {opset} (converting from {exported_opset}: {converting})"
        )
        return written, "torchscript", route, batch_axis


def _holds_batch(proto, module, ctx: BuildContext) -> bool:
    """Whether ``proto`` computes what ``module`` does at a batch of 3 (the export traced batch 1)."""
    import onnxruntime as ort
    import torch

    from toolchain.core.feed import ort_feed, repeat_to, torch_args
    from toolchain.core.runner import flatten_outputs

    x = repeat_to(ctx.calibration.x[:3], 3)
    try:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, ort_feed(x, [i.name for i in session.get_inputs()]))
        with torch.no_grad():
            want = [t.numpy() for _, t in flatten_outputs(module(*torch_args(x)))]
    except Exception as e:  # noqa: BLE001 - any refusal at batch 3 means the batch does not hold
        log.debug("the dynamic-batch export does not run at batch 3: %s", e)
        return False
    return len(got) == len(want) and all(
        a.shape == b.shape and np.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(got, want)
    )


def input_names(ctx: BuildContext) -> list[str]:
    """The ONNX inputs: `input` for a one-image model (the name every ONNX artifact has
    had), else the model's own."""
    return list(ctx.signature.names) if ctx.several else [INPUT_NAME]


@contextlib.contextmanager
def _quiet():
    """What the exporters print and warn: noise to the user's build (the build log has the facts)."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        quiet_logger("torch.onnx._internal.exporter._compat"),
    ):
        warnings.simplefilter("ignore")
        yield


def _torchlib_read_once() -> None:
    """The dynamo exporter rebuilds its operator registry on every export, and onnxscript re-reads the
    source of each of its ~500 torchlib functions to do it (1 s of a 3 s digits build here, paid
    again by every export of a build and of its recovery). The list it reads depends only on the
    installed onnxscript, and the exporter only reads it (translations a caller adds go into the
    registry built from it, not into this list), so it is read once per process. Where onnxscript's
    module is laid out otherwise, nothing changes."""
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis

        read = onnxscript_apis.get_torchlib_ops
    except (ImportError, AttributeError):
        return
    if not hasattr(read, "cache_info"):
        onnxscript_apis.get_torchlib_ops = functools.cache(read)


def _export(artifact: Artifact, ctx: BuildContext, dynamic: bool, opset: int):
    import torch

    _torchlib_read_once()
    example = ctx.example()
    names = input_names(ctx)
    specs = ctx.signature.inputs if ctx.several else ()
    with _quiet():
        if artifact.kind is Kind.TORCHSCRIPT:
            # the dynamo exporter cannot trace TorchScript; the TorchScript exporter still ships in 2.14
            return _export_torchscript(
                artifact.model, ctx, dynamic, min(opset, 17), artifact.state
            ), "torchscript"
        model = artifact.model
        shapes = None
        if artifact.kind is not Kind.EXPORTED and dynamic:
            batch = torch.export.Dim("batch", min=1, max=4096)
            if not specs:
                shapes = ({0: batch},)
            else:
                # one batch for every input; an axis the model leaves free (a sequence) shared by the inputs
                # that have it
                free = {}
                shapes = tuple(
                    None
                    if s.scalar
                    else {
                        0: batch,
                        **{1 + a: free.setdefault(a, torch.export.Dim(f"axis{1 + a}")) for a in s.dynamic},
                    }
                    for s in specs
                )
        if artifact.kind is Kind.EXPORTED and not dynamic:
            model = model.module()
        # asked for the target's opset, torchlib writes operators that exist there (GELU as Erf, not
        # Gelu-20) at max(opset, 18), its floor; below 18 mostly attribute forms (Reduce*, Split, Pad)
        # differ, which passes.opset converts (or the TorchScript-based exporter writes it instead)
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            dynamic_shapes=shapes,
            opset_version=opset,
            input_names=names,
            output_names=[OUTPUT_NAME],
            verbose=False,
        )
    return program.model_proto, "dynamo"


def _export_torchscript(model, ctx: BuildContext, dynamic: bool, opset: int, state=None):
    """The TorchScript-based exporter (``dynamo=False``): it traces (or reads a scripted model's
    graph) and writes ``opset`` itself, below the dynamo exporter's floor of 18 too. A stateful
    model (``state``) is exported as saved: that state becomes the graph's constants."""
    import onnx
    import torch

    specs = ctx.signature.inputs if ctx.several else ()
    axes = None
    if dynamic:
        axes = {OUTPUT_NAME: {0: "batch"}}
        axes.update(
            {INPUT_NAME: {0: "batch"}}
            if not specs
            else {
                s.name: {0: "batch", **{1 + a: f"{s.name}_{1 + a}" for a in s.dynamic}}
                for s in specs
                if not s.scalar
            }
        )
    f = io.BytesIO()
    if state is not None:
        state.restore(model)
    printed: list[str] = []
    try:
        with integer_symbolics(opset), native_stderr(stdout=True) as printed:  # its C++ log: the graph
            torch.onnx.export(
                model,
                ctx.example(),
                f,
                dynamo=False,
                input_names=input_names(ctx),
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=opset,
            )
    finally:
        if printed:
            log.debug("TorchScript-based exporter:\n%s", "\n".join(printed))
    if state is not None:
        state.restore(model)
    return onnx.load_from_string(f.getvalue())


def _traceable(artifact: Artifact):
    """A module the TorchScript-based exporter can trace. An exported program's module refuses
    ``train()``, which that exporter calls to set inference mode: the program is already in the
    mode it was exported in, so the call is made a no-op on this instance."""
    if artifact.kind is not Kind.EXPORTED:
        return artifact.model
    module = artifact.model.module()
    module.train = lambda mode=True: module
    return module


def _exporter_words(e: BaseException) -> str:
    """The exporter's first sentence, without the TorchScript graph it may append ("[Caused by …")."""
    words = reason(e).split(" [Caused by")[0].strip()
    return words.split(". ")[0].rstrip(".")


def save_onnx(proto, path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(path))


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def opset_of(path) -> int:
    """The default-domain opset of the ONNX file at ``path``."""
    import onnx

    return _opset(onnx.load(str(path), load_external_data=False))
