"""Every stage registers itself on import; importing this package registers them all."""

from toolchain.stages import (  # noqa: F401
    cast_torch,
    compile_qnn,
    convert_openvino,
    decompose_onnx,
    export_onnx,
    float16_onnx,
    fuse,
    lower_executorch,
    mobile_passes,
    onnx_passes,
    optimize_torchscript,
    quantize_dynamic,
    quantize_int4,
    quantize_nncf,
    quantize_onnx,
    quantize_onnx_int4,
    quantize_pt2e,
    quantize_torch,
    save_lite,
    save_torchscript,
)
