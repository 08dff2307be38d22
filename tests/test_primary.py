"""The primary: the fastest passing artifact on latency timed alternating, ties broken by size and
runtime so that identical builds choose alike (issue 29, part 2)."""

import dataclasses
import itertools
import re
from types import SimpleNamespace

import numpy as np

from toolchain.primary import Timed, choose, choose_primary


def _runs(median: float, spread: float, n: int = 30) -> tuple[float, ...]:
    return tuple(np.linspace(median - spread, median + spread, n))


def test_a_clearly_faster_artifact_is_primary_whatever_its_size():
    fast = Timed("onnx_int8", _runs(1.0, 0.05), 500_000, "onnxruntime")
    slow = Timed("torch_int8", _runs(2.0, 0.05), 100_000, "torchscript")
    c = choose([slow, fast])
    assert c["primary"] == "onnx_int8" and c["tied"] == [] and c["margin"] == 2.0
    assert [x["name"] for x in c["candidates"]] == ["onnx_int8", "torch_int8"] and c["candidates"][0][
        "runs"
    ] == 30


def test_tied_leaders_are_ordered_by_size_then_runtime_then_name_in_any_order():
    """Runs too jittery to tell 3-5 % apart: what the in-build numbers would flip between builds."""
    a = Timed("openvino_int8", _runs(1.00, 0.30), 300_000, "openvino")
    b = Timed("onnx_int8", _runs(1.03, 0.30), 300_000, "onnxruntime")  # same size, simpler runtime
    c = Timed("torch_int8", _runs(1.05, 0.30), 250_000, "torchscript")  # the smallest
    far = Timed("onnx_fp32", _runs(3.0, 0.1), 900_000, "onnxruntime")
    for order in itertools.permutations([a, b, c, far]):
        choice = choose(list(order))
        assert choice["primary"] == "torch_int8" and set(choice["tied"]) == {
            "openvino_int8",
            "onnx_int8",
            "torch_int8",
        }
        assert "tied with" in choice["rule"] and "smallest" in choice["rule"]
    assert choose([a, b])["primary"] == "onnx_int8"  # equal sizes: ONNX Runtime before OpenVINO


def test_a_steady_five_percent_edge_is_not_a_tie_and_one_percent_always_is():
    """ResNet18 INT8 here: OpenVINO's IR 5 % faster than the TorchScript file, run after run; the
    interquartile-overlap rule once tied them and shipped the smaller, slower file."""
    fast = Timed("openvino_int8", _runs(5.60, 0.15), 11_900_000, "openvino_ir")
    slower = Timed("torch_int8", _runs(5.90, 0.15), 11_300_000, "torchscript")
    choice = choose([slower, fast])
    assert choice["primary"] == "openvino_int8" and choice["tied"] == []
    assert "measurably slower" in choice["rule"] and "Mann-Whitney p=" in choice["rule"]
    same = Timed("torch_int8", _runs(5.65, 0.15), 11_300_000, "torchscript")  # +0.9 %: a tie, the smaller
    assert choose([same, fast])["primary"] == "torch_int8"


def test_the_build_races_its_leaders_and_says_how_it_chose(tmp_path, digits):
    import toolchain

    from .conftest import fast_profile

    # every passing artifact raced, however far behind its build latency (the default: within 1.5x)
    profile = fast_profile(tmp_path, 64, 64)
    profile.write_text(
        re.sub(r"^race_within = .*\n", "", profile.read_text(), flags=re.M).replace(
            "warmup_runs = 1", "warmup_runs = 1\nrace_within = 1e9", 1
        )
    )
    report, folder = toolchain.build(
        str(digits["model"]), str(profile), tmp_path / "out", digits["calibration"], digits["validation"]
    )
    data = report.to_json()
    choice = data["primary_choice"]
    assert data["primary"] == choice["primary"] and len(choice["candidates"]) >= 2
    assert all(c["runs"] == 3 for c in choice["candidates"])  # the profile's race_runs, in turn
    assert {c["name"] for c in choice["candidates"]} <= {
        a["name"] for a in data["artifacts"] if a["parity"]["passed"]
    }
    assert f"primary: {choice['primary']} (" in (folder / "report.md").read_text()


@dataclasses.dataclass
class _Row:  # what choose_primary reads of an ArtifactReport
    name: str
    latency_ms: float
    eligible: bool = True
    parity: object = dataclasses.field(default_factory=lambda: SimpleNamespace(passed=True))
    primary: bool = False


def test_an_artifact_far_behind_in_the_build_is_not_raced():
    """The default profile races only artifacts within 1.5x of the fastest's build latency; the rule
    says so and gives the margin (nothing is loaded or timed)."""
    shipped = {n: SimpleNamespace(fixed_batch=lambda: None) for n in ("a", "b")}
    marked, choice = choose_primary([_Row("a", 1.0), _Row("b", 2.0)], shipped, None, 1, 3)
    assert [r.primary for r in marked] == [True, False] and choice["candidates"] == []
    assert choice["margin"] == 2.0 and "not raced (runtime.race_within = 1.5)" in choice["rule"]


def test_every_runtime_has_a_place_in_the_tie_break():
    """A runtime missing from SIMPLER would lose every tie (the IR runtime and the lite interpreter
    once did, listed under other names)."""
    from toolchain import runtimes
    from toolchain.primary import SIMPLER

    assert set(runtimes.names()) <= set(SIMPLER)
    openvino_ir = Timed("openvino_int8", _runs(1.0, 0.1), 300_000, "openvino_ir")
    lite = Timed("ptl_int8", _runs(1.0, 0.1), 300_000, "lite_interpreter")
    assert choose([lite, openvino_ir])["primary"] == "openvino_int8"
