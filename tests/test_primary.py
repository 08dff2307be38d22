"""The primary: the fastest passing artifact on latency timed alternating, ties broken by size and
runtime so that identical builds choose alike (issue 29, part 2)."""

import dataclasses
import itertools
import re
from types import SimpleNamespace

import numpy as np
import pytest

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
        assert (
            "tied with" in choice["rule"] and "smallest" in choice["rule"] and "threads" not in choice["rule"]
        )
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
    # then its threads: the profile's 2 and its race_threads' 1, in turn, the same runs each
    by_threads = choice["threads_choice"]
    assert choice["threads"] == by_threads["threads"] in (1, 2)
    assert sorted(c["threads"] for c in by_threads["candidates"]) == [1, 2]
    assert {c["name"] for c in by_threads["candidates"]} == {choice["primary"]}
    assert all(c["runs"] == 3 for c in by_threads["candidates"])
    assert all(c["threads"] == 2 for c in choice["candidates"])  # the artifacts raced on the profile's
    assert f"primary's threads: {choice['threads']} (" in (folder / "report.md").read_text()


def test_fewer_threads_win_a_tie_and_lose_when_measurably_slower():
    """The primary's thread count: one thread where it is not slower than two (the same latency on
    half the cores), two where one is measurably slower; the rule names the loser with its count."""
    two = Timed("onnx_int8_dynamic", _runs(0.200, 0.02), 50_000, "onnxruntime", 2)
    one_tied = Timed("onnx_int8_dynamic", _runs(0.202, 0.02), 50_000, "onnxruntime", 1)
    for order in ([two, one_tied], [one_tied, two]):
        choice = choose(order)
        assert choice["threads"] == 1 and "fewest threads" in choice["rule"]
        assert sorted(choice["tied"]) == [1, 2]  # a thread-count tie lists the counts, not one name twice
    one_slow = Timed("onnx_int8_dynamic", _runs(0.360, 0.02), 50_000, "onnxruntime", 1)
    choice = choose([one_slow, two])
    assert choice["threads"] == 2 and "onnx_int8_dynamic on 1 thread x1.8" in choice["rule"]
    one_fast = Timed("onnx_int8_dynamic", _runs(0.150, 0.02), 50_000, "onnxruntime", 1)
    assert choose([two, one_fast])["threads"] == 1


def test_race_threads_beyond_the_profiles_threads_is_one_clear_error(tmp_path):
    from toolchain.core.errors import ConfigError
    from toolchain.target import load_target

    from .conftest import fast_profile

    profile = fast_profile(tmp_path)
    text = profile.read_text()
    assert "race_threads = [1]" in text
    profile.write_text(text.replace("race_threads = [1]", "race_threads = [1, 4]"))
    with pytest.raises(ConfigError, match=re.escape("`runtime.race_threads` must be thread counts from 1")):
        load_target(str(profile))


def test_a_torch_runner_runs_on_its_own_thread_count_whatever_another_set():
    """torch's threads are process-wide: a TorchScript artifact timed on 1 and on 2 threads in one race
    must set its own count at each call, not only when it was loaded."""
    import torch

    from toolchain.core.runner import torch_runner

    class Threads(torch.nn.Module):
        def forward(self, x):
            return x + torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        one, two = torch_runner(Threads(), 1), torch_runner(Threads(), 2)
        x = np.zeros((1, 1), np.float32)
        assert [one(x)[0].item(), two(x)[0].item(), one(x)[0].item()] == [1.0, 2.0, 1.0]
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class _Row:  # what choose_primary reads of an ArtifactReport
    name: str
    latency_ms: float
    eligible: bool = True
    parity: object = dataclasses.field(default_factory=lambda: SimpleNamespace(passed=True))
    primary: bool = False
    runtime: str = "onnxruntime"
    size_bytes: int = 1000
    stage_facts: dict = dataclasses.field(default_factory=dict)


def test_an_artifact_far_behind_in_the_build_is_not_raced():
    """The default profile races only artifacts within 1.5x of the fastest's build latency; the rule
    says so and gives the margin (nothing is loaded or timed)."""
    shipped = {n: SimpleNamespace(fixed_batch=lambda: None) for n in ("a", "b")}
    marked, choice = choose_primary([_Row("a", 1.0), _Row("b", 2.0)], shipped, None, 1, 3)
    assert [r.primary for r in marked] == [True, False] and choice["candidates"] == []
    assert choice["margin"] == 2.0 and "not raced (runtime.race_within = 1.5)" in choice["rule"]


def test_a_runtime_with_process_wide_threads_keeps_the_profiles_count():
    """ExecuTorch's thread pool belongs to the process: its artifact is not timed on two counts at once,
    and the report says so (nothing is loaded or timed)."""
    shipped = {n: SimpleNamespace(fixed_batch=lambda: None) for n in ("a", "b")}
    rows = [_Row("a", 1.0, runtime="executorch"), _Row("b", 2.0)]
    marked, choice = choose_primary(rows, shipped, None, 2, 3, 1.5, (1,))
    assert [r.primary for r in marked] == [True, False] and choice["threads"] == 2
    assert "executorch sets its threads for the whole process" in choice["threads_choice"]["rule"]


def test_every_runtime_has_a_place_in_the_tie_break():
    """A runtime missing from SIMPLER would lose every tie (the IR runtime and the lite interpreter
    once did, listed under other names)."""
    from toolchain import runtimes
    from toolchain.primary import SIMPLER

    assert set(runtimes.names()) <= set(SIMPLER)
    openvino_ir = Timed("openvino_int8", _runs(1.0, 0.1), 300_000, "openvino_ir")
    lite = Timed("ptl_int8", _runs(1.0, 0.1), 300_000, "lite_interpreter")
    assert choose([lite, openvino_ir])["primary"] == "openvino_int8"


def test_an_ir_for_a_gpu_or_npu_is_not_timed_on_cpu_thread_counts():
    shipped = {"a": SimpleNamespace(fixed_batch=lambda: None)}
    rows = [_Row("a", 1.0, runtime="openvino_ir", stage_facts={"convert_openvino": {"device": "GPU"}})]
    _, choice = choose_primary(rows, shipped, None, 2, 3, 1.5, (1,))
    assert choice["threads"] == 2 and choice["rule"] == "the only passing artifact"
    assert "the IR is for the GPU" in choice["threads_choice"]["rule"]


def test_a_primary_that_cannot_be_timed_on_other_counts_ships_on_the_profiles_and_says_why(caplog):
    """It passed in its runtime at the profile's threads: it ships there, and the report and the log
    say why no other count was tried (here its file cannot be loaded again)."""
    shipped = {"a": SimpleNamespace(fixed_batch=lambda: None, path=None, lineage=("a",))}
    with caplog.at_level("WARNING", logger="toolchain"):
        _, choice = choose_primary([_Row("a", 1.0)], shipped, None, 2, 3, 1.5, (1,))
    assert choice["threads"] == 2 and "not timed on other thread counts" in choice["threads_choice"]["rule"]
    assert "has no file to load" in choice["threads_choice"]["rule"]
    assert "could not be timed on other thread counts" in caplog.text


def test_the_thread_race_leaves_torchs_thread_count_as_it_found_it(tmp_path):
    """A TorchScript primary timed on 2 then 1 threads: torch's count is the process's, and whoever
    builds in this process goes on with the count it had."""
    import torch

    from toolchain.core.artifact import Artifact, Kind
    from toolchain.primary import choose_threads

    path = tmp_path / "m.pt"
    torch.jit.script(torch.nn.Linear(4, 4)).save(str(path))
    artifact = Artifact(Kind.TORCHSCRIPT, "fp32", path=path)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        choice = choose_threads(
            _Row("m", 1.0, runtime="torchscript"), artifact, np.ones((1, 4), np.float32), [2, 1], 3
        )
        assert {c["threads"] for c in choice["candidates"]} == {1, 2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
