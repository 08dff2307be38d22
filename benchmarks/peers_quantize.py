"""The peers' INT8 for `int8_recovery.py`: NNCF's ONNX `quantize` and `quantize_with_accuracy_control`,
and Intel Neural Compressor's ONNX Runtime tuning, each on the same FP32 ONNX file and data.

Runs in an interpreter of its own, because Neural Compressor's last release with an ONNX Runtime
back end (2.6) needs numpy < 2 and onnx < 1.17 (it reads `onnx.mapping`), and the toolchain needs numpy 2:

    make .venv-peers   # python -m venv, then pip install "numpy<2" "onnx<1.17"
                       # neural-compressor==2.6 six nncf onnxruntime
    .venv-peers/bin/python benchmarks/peers_quantize.py FP32.onnx CAL.npz VAL.npz OUT_DIR

Writes OUT_DIR/<peer>.onnx for each peer that produced a model and OUT_DIR/peers.json with, per
peer, the file or why there is none. `int8_recovery.py --peers-python .venv-peers/bin/python` calls
it and measures every file in its own run, beside the toolchain's artifacts. The accuracy the
tuners aim at is top-1 accuracy on VAL with at most 1 pt lost, the toolchain's bar.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np

MAX_DROP = 0.01


def session(path):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 2, 1, 3
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]


def accuracy_of(path, x, y) -> float:
    run = session(path)
    out = np.concatenate([run(x[i : i + 64]) for i in range(0, len(x), 64)])
    return float(np.mean(out.argmax(1) == y))


def nncf_peers(fp32: Path, cal, x, y, out: Path) -> dict:
    import nncf
    import onnx

    proto = onnx.load(str(fp32))
    name = proto.graph.input[0].name
    calib = nncf.Dataset([cal[i : i + 1] for i in range(len(cal))], lambda v: {name: v})
    found = {}
    onnx.save(nncf.quantize(proto, calib), str(out / "nncf.onnx"))
    found["NNCF quantize (ONNX)"] = "nncf.onnx"
    val = nncf.Dataset([(x[i : i + 1], y[i]) for i in range(len(x))], lambda item: {name: item[0]})

    def validate(model, items):
        onnx.save(model, str(out / "nncf_eval.onnx"))
        run = session(out / "nncf_eval.onnx")
        return float(np.mean([run(v)[0].argmax() == label for v, label in items]))

    try:
        onnx.save(
            nncf.quantize_with_accuracy_control(proto, calib, val, validate, max_drop=MAX_DROP),
            str(out / "nncf_ac.onnx"),
        )
        found["NNCF quantize_with_accuracy_control"] = "nncf_ac.onnx"
    except Exception as e:  # noqa: BLE001 - a peer's failure is a row of the table
        found["NNCF quantize_with_accuracy_control"] = {"failed": f"{type(e).__name__}: {str(e)[:160]}"}
    return found


def inc_peer(fp32: Path, cal, x, y, out: Path) -> dict:
    """Neural Compressor 2.x post-training static quantization with its accuracy-driven tuning."""
    from neural_compressor import PostTrainingQuantConfig, quantization
    from neural_compressor.config import AccuracyCriterion, TuningCriterion

    class Loader:  # what its ONNX Runtime adaptor iterates: (inputs, labels) batches, with a batch_size
        def __init__(self, inputs, labels, batch_size=1):
            self.inputs, self.labels, self.batch_size = inputs, labels, batch_size

        def __iter__(self):
            for i in range(0, len(self.inputs), self.batch_size):
                yield self.inputs[i : i + self.batch_size], self.labels[i : i + self.batch_size]

    def evaluate(model) -> float:
        import onnx

        onnx.save(model if isinstance(model, onnx.ModelProto) else model.model, str(out / "inc_eval.onnx"))
        return accuracy_of(out / "inc_eval.onnx", x, y)

    conf = PostTrainingQuantConfig(
        approach="static",
        quant_format="QDQ",
        device="cpu",
        accuracy_criterion=AccuracyCriterion(criterion="absolute", tolerable_loss=MAX_DROP),
        tuning_criterion=TuningCriterion(max_trials=30, timeout=600),
    )
    model = quantization.fit(
        str(fp32), conf, calib_dataloader=Loader(cal, np.zeros(len(cal), np.int64)), eval_func=evaluate
    )
    if model is None:
        return {
            "INC tuning (ONNX Runtime)": {"failed": "no configuration met the accuracy goal within 30 trials"}
        }
    model.save(str(out / "inc.onnx"))
    return {"INC tuning (ONNX Runtime)": "inc.onnx"}


def main(fp32: str, cal: str, val: str, out: str) -> None:
    fp32_path, out_dir = Path(fp32), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    c, v = np.load(cal), np.load(val)
    results = {}
    for peer, names in (
        (nncf_peers, ("NNCF quantize (ONNX)", "NNCF quantize_with_accuracy_control")),
        (inc_peer, ("INC tuning (ONNX Runtime)",)),
    ):
        try:
            results.update(peer(fp32_path, c["x"], v["x"], v["y"], out_dir))
        except Exception as e:  # noqa: BLE001 - an import error or a crash of a peer is its row
            traceback.print_exc()
            results.update(
                {
                    name: {"failed": f"{type(e).__name__}: {str(e)[:160]}"}
                    for name in names
                    if name not in results
                }
            )
    (out_dir / "peers.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
