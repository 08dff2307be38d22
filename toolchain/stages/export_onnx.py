"""Export to ONNX, check it, and keep the batch dimension dynamic where the model allows."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.export import quiet_logger
from toolchain.core.options import option
from toolchain.core.stage import Stage, StageResult, register_stage

INPUT_NAME, OUTPUT_NAME = "input", "output"


@dataclasses.dataclass(frozen=True)
class ExportOnnxOptions:
    opset: int = option(
        18,
        "ONNX opset written: the exporter is asked for it, so it picks operator forms that exist there "
        "(GELU as Erf below 20); below its floor (18) a checked version conversion of attribute forms",
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

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx

        dynamic = self.options.dynamic_batch and ctx.dynamic_batch
        try:
            proto, exporter = _export(artifact, ctx, dynamic, self.options.opset)
        except Exception as e:
            if not dynamic:
                raise StageError(f"export_onnx: {reason(e)}") from None
            proto, exporter = _export(artifact, ctx, False, self.options.opset)
            dynamic = False
        exported_opset = _opset(proto)
        if self.options.opset < exported_opset:
            proto = convert_opset(proto, self.options.opset)
        path = ctx.workdir / f"{artifact.precision}-{artifact.sha256[:12]}.onnx"
        external = proto.ByteSize() > self.options.external_data_mb * 2**20
        save_onnx(proto, path, external)
        onnx.checker.check_model(str(path), full_check=True)
        facts = {
            "exporter": exporter,
            "opset": _opset(proto),
            "exported_opset": exported_opset,
            "dynamic_batch": dynamic,
            "external_data": external,
            "nodes": len(proto.graph.node),
        }
        return StageResult(dataclasses.replace(artifact, kind=Kind.ONNX, model=None, path=path), facts)


def input_names(ctx: BuildContext) -> list[str]:
    """The ONNX inputs: `input` for a one-image model (the name every ONNX artifact has
    had), else the model's own."""
    return list(ctx.signature.names) if ctx.several else [INPUT_NAME]


def _export(artifact: Artifact, ctx: BuildContext, dynamic: bool, opset: int):
    import torch

    example = ctx.example()
    names = input_names(ctx)
    specs = ctx.signature.inputs if ctx.several else ()
    quiet = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(quiet),
        quiet_logger("torch.onnx._internal.exporter._compat"),
    ):
        warnings.simplefilter("ignore")
        if artifact.kind is Kind.TORCHSCRIPT:
            # the dynamo exporter cannot trace TorchScript; the TorchScript exporter still ships in 2.14
            f = io.BytesIO()
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
            torch.onnx.export(
                artifact.model,
                example,
                f,
                dynamo=False,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=min(opset, 17),
            )
            import onnx

            return onnx.load_from_string(f.getvalue()), "torchscript"
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
        # Gelu-20) at max(opset, 18), its floor; below 18 only attribute forms (Reduce*, Split) differ,
        # which the checked conversion after this changes
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


def convert_opset(proto, opset: int):
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, opset)
        _drop_default_noop_with_empty_axes(converted, opset)
        onnx.checker.check_model(converted)
    except Exception as e:
        raise StageError(
            f"export_onnx: cannot convert the model down to opset {opset}: {reason(e)}"
        ) from None
    return converted


def _drop_default_noop_with_empty_axes(proto, opset: int) -> None:
    """onnx's converter copies Reduce*-18's `noop_with_empty_axes` onto the opset-13 form,
    which has no such attribute. At its default (0) it means nothing and is dropped; any
    other value cannot be expressed below opset 18."""
    if opset >= 18:
        return
    for node in proto.graph.node:
        if not node.op_type.startswith("Reduce"):
            continue
        kept = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
        if any(a.name == "noop_with_empty_axes" and a.i != 0 for a in node.attribute):
            raise StageError(
                f"export_onnx: {node.op_type} `{node.name}` needs noop_with_empty_axes, "
                f"which opset {opset} lacks"
            )
        del node.attribute[:]
        node.attribute.extend(kept)


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
