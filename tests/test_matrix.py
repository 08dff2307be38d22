"""`toolchain matrix`: two models trained here on two targets (the outlier model on x86 alone),
built twice as a nightly job would.

The second night a target profile turns INT8 recovery off; the outlier-channel model, whose
onnx_int8 only passes through recovery, must raise exactly one alarm (its parity), naming the
profile change, and nothing else may ring. A cell that outlives its time limit is killed and
recorded as crashed while the matrix goes on; a matrix killed halfway is finished by --resume
without rebuilding what it finished; Ray runs the same cells into a PostgreSQL history started
for the test; the dashboard is checked against the database in headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from .conftest import XAVIER, cli, fast_profile, without_artifacts
from .models import export, outlier_classifier
from .test_report_html import rendered_charts

# Two workers on 2 cores: every cell is timed beside the other's build, so no latency is compared
# (the quiet-machine rule); were a cell timed alone, its ~0.02 ms p50 (per-call overhead) could
# still move between nights by more than one night's spread, so only a 10x slowdown would count
# here. The latency rule itself, at its default threshold, is tested on rows below.
MATRIX = """
[matrix]
name = "nightly"
targets = ["x86_onnx.toml", "xavier.toml"]
workers = 2
latency_repeats = 2
out = "build"

[alarms]
latency_growth = 9.0

[models.digits]
model = "{digits}/digits_cnn.pt2"
calib = "{digits}/calib.npz"
val = "{digits}/val.npz"

[models.outlier]
model = "{outlier}/outlier.pt2"
calib = "{outlier}/cal.npz"
val = "{outlier}/val.npz"
targets = ["x86_onnx.toml"]

[models.stuck]
model = "{digits}/digits_cnn.pt2"
calib = "{digits}/calib.npz"
targets = ["x86_onnx.toml"]
time_limit_s = 2
"""


def x86_onnx_profile(folder: Path, extra: str = "") -> Path:
    """The x86 profile with its ONNX Runtime artifacts only, fewer samples and timed runs."""
    # 192: one near-tie digit is 0.5 %, not a failed 1 %
    path = fast_profile(folder, 64, 192, batch_sizes="[1]")
    text = re.sub(r"^\[artifacts\.torch_int8\]\n(?:(?!\[).*\n)*", "", path.read_text(), flags=re.M)
    path.unlink()
    out = folder / "x86_onnx.toml"
    out.write_text(text + extra)
    return out


@pytest.fixture(scope="module")
def models(digits, digits_arrays, tmp_path_factory):
    outlier = tmp_path_factory.mktemp("outlier")
    x_train, x_test, y_train, y_test = digits_arrays
    export(outlier_classifier(x_train, y_train), x_train, outlier / "outlier.pt2")
    np.savez(outlier / "cal.npz", x=x_train[:128])
    np.savez(outlier / "val.npz", x=x_test[:96], y=y_test[:96])
    return {"digits": Path(digits["model"]).parent, "outlier": outlier}


def matrix_folder(root: Path, models: dict, text: str = MATRIX) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    x86_onnx_profile(root)
    # FP16: not this test's subject
    xavier = fast_profile(root, 64, 96, base=without_artifacts(XAVIER, root, "onnx_fp16"), batch_sizes=None)
    xavier.rename(root / "xavier.toml")
    (root / "matrix.toml").write_text(text.format(**{k: str(v) for k, v in models.items()}))
    return root / "matrix.toml"


@pytest.fixture(scope="module")
def two_nights(models, tmp_path_factory):
    """Night 1 as configured. Night 2, after INT8 recovery was turned off in the x86 profile, is
    killed (SIGKILL) once it has recorded its first build, then finished with --resume."""
    root = tmp_path_factory.mktemp("matrix")
    matrix = matrix_folder(root, models)
    first = cli("matrix", "run", str(matrix), "--junit", str(root / "night1.xml"))
    x86_onnx_profile(root, "\n[recovery]\nenabled = false\n")
    # no timing: nothing to compare
    matrix.write_text(matrix.read_text().replace("latency_repeats = 2", "latency_repeats = 0"))
    db = root / "matrix.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolchain", "matrix", "run", str(matrix)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and _built_cells(db, 2) < 1:
        time.sleep(0.2)
    proc.kill()  # no cleanup of its own
    proc.wait()

    def running() -> str:
        return subprocess.run(
            ["pgrep", "-f", str(root / "build")], capture_output=True, text=True
        ).stdout.strip()

    # the kernel kills the builds as their parent dies (PR_SET_PDEATHSIG); tearing down a process that
    # holds torch, OpenVINO and NNCF took over a second on a loaded machine (two test workers). A build
    # that outlived the matrix would still be running: the next cell's build had just started.
    gone = time.monotonic() + 5
    while running() and time.monotonic() < gone:
        time.sleep(0.2)
    killed = {
        "cells": rows(db, "select key, folder from cells where run_id = 2"),
        "status": rows(db, "select status from runs where id = 2"),
        "running": running(),
    }
    killed["mtimes"] = {
        key: (Path(folder) / "report.json").stat().st_mtime_ns for key, folder in killed["cells"] if folder
    }
    second = cli("matrix", "run", str(matrix), "--resume", "--junit", str(root / "night2.xml"))
    again = cli("matrix", "run", str(matrix), "--resume")
    return root, first, second, killed, again


def _built_cells(db: Path, run_id: int) -> int:
    try:
        return rows(db, f"select count(*) from cells where run_id = {run_id} and folder is not null")[0][0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def rows(db: Path, query: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def test_the_first_night_builds_every_cell_and_records_it(two_nights):
    root, first, *_ = two_nights
    assert first.returncode == 3, first.stderr[-3000:]  # the stuck cell crashed: a failure, not a regression
    cells = dict(rows(root / "matrix.sqlite", "select key, status from cells where run_id = 1"))
    assert cells == {
        "digits/x86_onnx": "passed",
        "digits/xavier": "passed",
        "outlier/x86_onnx": "passed",
        "stuck/x86_onnx": "crashed",
    }
    recovered = rows(
        root / "matrix.sqlite",
        "select a.recovery_status from artifacts a join cells c on a.cell_id = c.id "
        "where c.run_id = 1 and c.key = 'outlier/x86_onnx' and a.name = 'onnx_int8'",
    )
    assert recovered == [("recovered",)]  # the outlier model passes only through recovery
    for key, folder, versions, model_sha, profile_sha, data_sha in rows(
        root / "matrix.sqlite",
        "select key, folder, versions, model_sha256, profile_sha256, data_sha256 from cells "
        "where run_id = 1 and status = 'passed'",
    ):
        report = json.loads((Path(folder) / "report.json").read_text())
        assert json.loads(versions)["onnxruntime"] and model_sha == report["model"]["sha256"]
        assert len(profile_sha) == 64 and len(data_sha) == 64
    for name, p50, repeats, busy in rows(
        root / "matrix.sqlite",
        "select a.name, a.latency_p50_ms, a.latency_repeats, c.timing_busy "
        "from artifacts a join cells c on a.cell_id = c.id where c.run_id = 1",
    ):
        # re-measured twice
        assert len(json.loads(repeats)) == 2 and all(v > 0 for v in json.loads(repeats)) and p50 > 0
        # how much of the machine others used meanwhile (the other worker's build, here)
        assert 0 <= busy <= 1
    (run,) = rows(
        root / "matrix.sqlite", "select status, toolchain_version, host_cpu, executor from runs where id = 1"
    )
    assert run[0] == "finished" and run[1] and run[3] == "local, 2 workers"
    assert "[4/4]" in first.stderr


def test_a_cell_over_its_time_limit_is_killed_recorded_as_crashed_and_the_matrix_goes_on(two_nights):
    root, first, *_ = two_nights
    ((reason, folder, log),) = rows(
        root / "matrix.sqlite",
        "select reason, folder, log from cells where key = 'stuck/x86_onnx' and run_id = 1",
    )
    assert reason == "killed at the cell's time limit (2 s)" and folder is None
    assert "toolchain build" in Path(log).read_text() or "-m toolchain build" in Path(log).read_text()
    assert (
        not list((root / "build" / "run-1").glob("*stuck*partial*"))
        and not (root / "build" / "run-1" / "stuck-x86_onnx").exists()
    )
    suites = ET.parse(root / "night1.xml").getroot()
    case = suites.find(".//testcase[@name='stuck']")
    assert case.find("error").get("type") == "crashed"
    assert suites.find(".//testcase[@name='digits'][@classname='matrix.nightly.xavier']") is not None
    assert len(suites.findall(".//testcase")) == 4


def test_the_degraded_artifact_raises_exactly_its_alarm_naming_what_changed(two_nights):
    root, _, second, *_ = two_nights
    assert second.returncode == 5, second.stderr[-3000:]  # a regression: distinct from a plain failure (3)
    alarms = rows(
        root / "matrix.sqlite", "select key, artifact, kind, message, changes, baseline_run_id from alarms"
    )
    assert [a[:3] for a in alarms] == [("outlier/x86_onnx", "onnx_int8", "parity")], alarms
    key, artifact, kind, message, changes, baseline = alarms[0]
    assert baseline == 1 and "fails parity since run 1" in message
    assert [c for c in json.loads(changes) if c.startswith("target profile sha256")], changes
    assert not [c for c in json.loads(changes) if "model sha256" in c or "data sha256" in c]
    statuses = dict(rows(root / "matrix.sqlite", "select key, status from cells where run_id = 2"))
    assert statuses["outlier/x86_onnx"] == "failed" and statuses["digits/x86_onnx"] == "passed", statuses
    assert "ALARM outlier/x86_onnx onnx_int8 [parity]" in second.stdout, second.stdout
    failures = ET.parse(root / "night2.xml").getroot().findall(".//failure[@type='regression:parity']")
    assert len(failures) == 1 and "target profile sha256" in failures[0].get("message"), [
        f.attrib for f in failures
    ]


def test_the_dashboard_shows_the_database_and_renders_in_chromium(two_nights, tmp_path):
    root, *_ = two_nights
    out = root / "site" / "matrix.html"
    done = cli("matrix", "report", "--db", str(root / "matrix.sqlite"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    data = json.loads(
        re.search(r'<script type="application/json" id="matrix-json">(.*?)</script>', page, re.S).group(1)
    )
    assert data["run"]["id"] == 2 and data["runs"] == [1, 2]
    assert [(a["key"], a["kind"]) for a in data["alarms"]] == [("outlier/x86_onnx", "parity")]
    assert page.index("class='alarm'") < page.index("Verdict per cell")  # alarms at the top
    for key, status in rows(root / "matrix.sqlite", "select key, status from cells where run_id = 2"):
        assert re.search(rf"data-key='{re.escape(key)}' data-status='{status}'", page)
    assert re.search(
        r"data-key='outlier/x86_onnx' data-status='failed'><b[^>]*>FAILED</b> "
        r"<span class='alarmed' data-alarms='1'>",
        page,
    )
    assert page.count("class='alarmed'") == 1  # the one cell that rang
    href = re.search(r"data-key='digits/xavier'.*?<a href='([^']+)'>report</a>", page, re.S).group(1)
    assert (out.parent / href).resolve() == (
        root / "build" / "run-2" / "digits-xavier" / "report.html"
    ).resolve()
    points = re.findall(
        r"data-chart='trend:outlier/x86_onnx:sqnr_db' data-label='onnx_int8' data-run='(\d)' "
        r"data-value='([^']+)'",
        page,
    )
    db = rows(
        root / "matrix.sqlite",
        "select c.run_id, a.sqnr_db from artifacts a join cells c on a.cell_id = c.id "
        "where c.key = 'outlier/x86_onnx' and a.name = 'onnx_int8' order by c.run_id",
    )
    assert [(int(r), float(v)) for r, v in points] == [(r, v) for r, v in db]

    rendered = rendered_charts(out, tmp_path)
    for chart in ("sqnr_db", "latency_ms", "quality"):
        drawn = rendered[f"trend:outlier/x86_onnx:{chart}"]
        assert drawn["marks"] == 2 * 2 and drawn["width"] > 100  # onnx_fp32 and onnx_int8, two nights each


def test_resume_finishes_a_killed_run_without_rebuilding_what_it_finished(two_nights):
    root, _, second, killed, again = two_nights
    # whole cells, the run open
    assert 1 <= len(killed["cells"]) < 4 and killed["status"] == [("running",)], killed
    assert killed["running"] == "", "a build outlived the killed matrix"
    assert second.returncode == 5, second.stderr[-3000:]
    assert rows(root / "matrix.sqlite", "select status from runs where id = 2") == [("finished",)]
    assert len(rows(root / "matrix.sqlite", "select key from cells where run_id = 2")) == 4
    for key, mtime in killed["mtimes"].items():
        folder = rows(root / "matrix.sqlite", f"select folder from cells where run_id = 2 and key = '{key}'")[
            0
        ][0]
        assert (Path(folder) / "report.json").stat().st_mtime_ns == mtime, f"{key} was built again"
    left = 4 - len(killed["cells"])
    assert f"[{left}/{left}]" in second.stderr and f"{len(killed['cells'])} finished before" in second.stderr
    # the killed builds' half-written folders are gone
    assert not list((root / "build" / "run-2").glob(".*partial*"))
    assert again.returncode == 2 and "no unfinished run" in again.stderr


# --- Ray and PostgreSQL: the real things, started here


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of Debian's packages on a loopback port, for this module only."""
    import shutil
    import socket
    import tempfile

    pg = _postgres_bin()
    if pg is None:
        if os.environ.get("TOOLCHAIN_REQUIRE_SERVICES"):
            pytest.fail("PostgreSQL is required here (make test installs Debian's postgresql)")
        pytest.skip("PostgreSQL is not installed (Debian package `postgresql`; `make test` installs it)")
    root = Path(tempfile.mkdtemp(prefix="toolchain-pg-", dir="/tmp"))
    # initdb refuses to run as root
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *args: subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)
    run(str(pg / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(
        str(pg / "pg_ctl"),
        "-D",
        str(root / "data"),
        "-l",
        str(root / "log"),
        "-w",
        "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
        "start",
    )
    try:
        run(str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "matrix")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/matrix"
    finally:
        run(str(pg / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_ray_runs_the_cells_into_a_postgresql_history(models, postgres, tmp_path):
    pytest.importorskip(
        "ray", reason="Ray is an optional extra (pip install 'toolchain[ray]'); the test extra has it"
    )
    text = MATRIX.replace("latency_repeats = 2", "latency_repeats = 1").split("[models.outlier]")[0]
    matrix = matrix_folder(tmp_path / "m", models, text)
    # one shard
    done = cli("matrix", "run", str(matrix), "--ray", "local", "--db", postgres, "--target", "x86_onnx")
    assert done.returncode == 0, done.stderr[-3000:]
    import sqlalchemy as sa

    engine = sa.create_engine(postgres)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select version_num from alembic_version")).scalar() == "0003"
        assert conn.execute(sa.text("select executor, status, shard from runs")).all() == [
            ("ray local", "finished", "x86_onnx")
        ]
        cells = conn.execute(sa.text("select key, status, folder from cells")).all()
        names = conn.execute(sa.text("select name from artifacts order by name")).scalars().all()
    engine.dispose()
    assert [(k, s) for k, s, _ in cells] == [("digits/x86_onnx", "passed")] and names == [
        "onnx_fp32",
        "onnx_int8",
    ]
    assert json.loads((Path(cells[0][2]) / "report.json").read_text())["passed"] is True
    page = tmp_path / "matrix.html"
    assert cli("matrix", "report", "--db", postgres, "--out", str(page)).returncode == 0
    assert "data-key='digits/x86_onnx' data-status='passed'" in page.read_text()


# --- the file, the rules and the errors, without building anything


def test_matrix_file_errors_name_the_file_and_key(tmp_path):
    from toolchain.core.errors import ConfigError
    from toolchain.matrix.spec import load_matrix

    cases = {
        '[matrix]\ntargets = ["x86_fbgemm"]\nworkers = "two"\n[models.m]\nmodel = "m.pt2"\n': (
            "`matrix.workers` must be an integer"
        ),
        '[matrix]\ntargets = ["x86_fbgemm"]\n[models.m]\nmodel = "m.pt2"\ncalibration = "c.npz"\n': (
            "unknown key `models.m.calibration`"
        ),
        '[matrix]\ntargets = ["x86_fbgemm"]\n[models.m]\nmodel = "m.pt2"\ntargets = ["jetson"]\n': (
            "`models.m.targets[0]` = 'jetson' is not a target"
        ),
        '[matrix]\ntargets = []\n[models.m]\nmodel = "m.pt2"\n': (
            "`matrix.targets` must name at least one target"
        ),
        '[matrix]\ntargets = ["x86_fbgemm"]\n[models.m]\ncalib = "c.npz"\n': "missing key `models.m.model`",
        "[matrix\n": "not valid TOML",
        '[matrix]\ntargets = ["x86_fbgemm", "x86_fbgemm"]\n[models.m]\nmodel = "m.pt2"\n': (
            "cell `m/x86_fbgemm` appears twice"
        ),
        '[matrix]\ntargets = ["x86_fbgemm"]\n[models.m]\nmodel = "m.pt2"\ncpus = 0\n': (
            "`models.m.cpus` must be positive"
        ),
    }
    for text, message in cases.items():
        path = tmp_path / "m.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)) as e:
            load_matrix(path)
        assert str(path) in str(e.value)


def test_a_matrix_naming_an_unknown_target_stops_before_any_build(tmp_path):
    (tmp_path / "m.toml").write_text(
        '[matrix]\ntargets = ["jetson_nano"]\n[models.m]\nmodel = "torchvision:resnet18"\n'
    )
    done = cli("matrix", "run", str(tmp_path / "m.toml"))
    assert (
        done.returncode == 2
        and "unknown target `jetson_nano`" in done.stderr
        and "Traceback" not in done.stderr
    )
    assert not (tmp_path / "build").exists()
    (tmp_path / "m.toml").write_text(
        '[matrix]\ntargets = ["x86_fbgemm"]\n[models.m]\nmodel = "torchvision:resnet18"\n'
    )
    done = cli("matrix", "run", str(tmp_path / "m.toml"), "--target", "nvidia_xavier")
    assert (
        done.returncode == 2
        and "--target `nvidia_xavier` is not a target of" in done.stderr
        and "valid: x86_fbgemm" in done.stderr
    )
    done = cli("matrix", "report", "--db", str(tmp_path / "none.sqlite"))
    assert (
        done.returncode == 2
        and "no such history file" in done.stderr
        and not (tmp_path / "none.sqlite").exists()
    )


def test_an_older_history_is_migrated_and_keeps_its_runs(tmp_path):
    """A database written by the first schema is brought up to date when it is opened."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    from toolchain.matrix.history import MIGRATIONS, History

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(
            sa.text(
                "insert into runs (matrix, matrix_sha256, status, started, cells_total, executor) "
                "values ('nightly', 'f', 'finished', '2026-11-30 02:00:00', 4, 'local, 1 worker')"
            )
        )
    engine.dispose()
    history = History(url)
    (run,) = history.runs("nightly")
    assert (run.id, run.status, run.shard) == (1, "finished", None)
    assert (
        history.start_run("nightly", "f", 1, "local", 1, None, None, None, shard="x86_fbgemm").shard
        == "x86_fbgemm"
    )
    history.close()
    with sqlite3.connect(tmp_path / "old.sqlite") as conn:
        assert conn.execute("select version_num from alembic_version").fetchall() == [("0003",)]


def _row(**kw):
    row = dict(
        name="onnx_int8",
        passed=True,
        failures=[],
        sqnr_db=30.0,
        accuracy=0.98,
        top1_agreement=0.995,
        size_bytes=100_000,
        latency_p50_ms=1.0,
        latency_p95_ms=1.1,
        latency_repeats=[1.0, 1.02, 0.98],
    )
    return {**row, **kw}


def _cells(new: dict, old: dict, status: str = "passed", versions=None):
    import datetime

    from toolchain.matrix.history import Run

    run = lambda i, cpu="cpu A", workers=1: Run(
        i, "m", "finished", datetime.datetime.now(), None, 1, "local", workers, cpu, "0.1.0", "abc", "f"
    )
    cell = {
        "key": "m/t",
        "status": status,
        "reason": "killed by SIGSEGV",
        "versions": versions or {"onnxruntime": "1.32.0"},
        "model_sha256": "a" * 64,
        "data_sha256": "d" * 64,
        "profile_sha256": "p" * 64,
        "artifacts": {"onnx_int8": new},
        "timing_busy": 0.02,
        "host_cpu": "cpu A",
    }
    base = {
        **cell,
        "status": "passed",
        "versions": {"onnxruntime": "1.31.1"},
        "artifacts": {"onnx_int8": old},
        "run": run(1),
    }
    return cell, run(2), base


def test_alarm_rules_each_raise_once_and_say_what_changed():
    from toolchain.matrix.alarms import compare
    from toolchain.matrix.spec import AlarmOptions

    o = AlarmOptions()
    kinds = lambda new, old=_row(), **kw: [
        (a["kind"], a["changes"]) for a in compare(*_cells(new, old, **kw), o, _cells(new, old, **kw)[2])
    ]
    assert kinds(_row()) == []
    # one alarm, its drops in the message, not three
    assert kinds(_row(passed=False, failures=["top-1 agreement 50% < 99%"], accuracy=0.5, sqnr_db=3.0)) == [
        ("parity", ["onnxruntime 1.31.1 -> 1.32.0"])
    ]
    assert [k for k, _ in kinds(_row(accuracy=0.97))] == ["accuracy"]
    assert kinds(_row(accuracy=0.978)) == []  # 0.2 pt: within the 0.5 pt threshold
    assert [k for k, _ in kinds(_row(sqnr_db=26.0))] == ["sqnr"]
    assert [k for k, _ in kinds(_row(size_bytes=120_000))] == ["size"]
    assert [k for k, _ in kinds({}, status="crashed")] == ["crashed"]
    # passed before, not judged now (random weights)
    assert [k for k, _ in kinds({}, status="not_judged")] == ["parity"]
    cell, run, base = _cells(_row(), _row())
    cell["artifacts"] = {}
    assert [a["kind"] for a in compare(cell, run, base, o)] == ["missing"]
    assert compare(cell, run, None, o) == []  # never passed before: nothing to regress from


def test_latency_alarms_only_beyond_the_measured_spread_and_on_the_same_machine():
    from toolchain.matrix.alarms import compare, latency_regression
    from toolchain.matrix.spec import AlarmOptions

    noisy_old = _row(latency_repeats=[1.0, 1.4, 0.9])  # spread 0.5 ms
    # +30 %, inside the noise
    assert latency_regression(_row(latency_repeats=[1.3, 1.35, 1.25]), noisy_old, 0.10) is None
    assert latency_regression(_row(latency_repeats=[2.0, 2.05, 1.95]), noisy_old, 0.10)  # +100 %, beyond it
    # +5 %
    assert (
        latency_regression(
            _row(latency_repeats=[1.05, 1.06, 1.04]), _row(latency_repeats=[1.0, 1.0, 1.0]), 0.10
        )
        is None
    )
    # a single measurement: its p95 - p50 is the spread
    one = _row(latency_repeats=[1.5], latency_p50_ms=1.5, latency_p95_ms=1.6)
    assert latency_regression(one, _row(latency_repeats=[1.0], latency_p50_ms=1.0, latency_p95_ms=1.1), 0.10)
    cell, run, base = _cells(_row(latency_repeats=[3.0, 3.0, 3.0]), _row())
    assert [a["kind"] for a in compare(cell, run, base, AlarmOptions(), base)] == ["latency"]
    # no quiet passing run to compare timings with
    assert compare(cell, run, base, AlarmOptions(), None) == []
    # another machine's latency is no regression
    assert compare({**cell, "host_cpu": "cpu B"}, run, base, AlarmOptions(), base) == []
    # nor one timed beside other work
    assert compare({**cell, "timing_busy": 0.5}, run, base, AlarmOptions(), base) == []
    # nor one whose machine is unknown
    assert compare({**cell, "timing_busy": None}, run, base, AlarmOptions(), base) == []


def test_the_share_of_the_machine_other_processes_use_is_measured():
    from toolchain.matrix.remeasure import OthersCpu

    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"]
    )
    try:
        time.sleep(0.5)
        with OthersCpu() as busy:
            time.sleep(1.5)  # this process idles; the spinner runs
    finally:
        spinner.wait()
    # at least half a core of the machine, all of it not ours
    assert busy.share >= 0.5 / os.cpu_count(), busy.share


def test_the_example_matrix_and_the_nightly_workflow_agree():
    """The repository's own nightly job: the example matrix loads, and the workflow shards it by
    every target it names, with only flags `matrix run` has."""
    from toolchain.matrix.spec import load_matrix
    from toolchain.target import builtin_targets

    repo = Path(__file__).resolve().parent.parent
    matrix = load_matrix(repo / "examples" / "matrix.toml")
    assert set(matrix.options.targets) == set(builtin_targets())
    workflow = (repo / ".github" / "workflows" / "nightly.yml").read_text()
    shards = re.search(r"target: \[([^\]]+)\]", workflow).group(1)
    assert {t.strip() for t in shards.split(",")} == set(matrix.options.targets)
    assert "cron:" in workflow and "docker/cpu.Dockerfile" in workflow
    assert "make test-full" in workflow  # the tests `make test` leaves to the night run there
    done = cli("matrix", "run", "--help")
    command = re.search(r"matrix run examples/matrix.toml([^\n]*)", workflow).group(1)
    flags = re.findall(r"(--[a-z][\w-]*)", command)
    assert flags == ["--target", "--db", "--junit"], command
    assert all(flag in done.stdout for flag in flags)


def test_a_build_that_segfaults_is_a_crashed_cell_with_the_signal(tmp_path):
    import torch

    from toolchain.matrix.cell import run_cell
    from toolchain.matrix.spec import Cell

    from .models import Segfaults

    torch.save(Segfaults(), tmp_path / "segv.pt")
    cell = Cell(
        "segv",
        str(fast_profile(tmp_path)),
        str(tmp_path / "segv.pt"),
        input_shape="1x1x8x8",
        trust_pickle=True,
    )
    result = run_cell(cell, tmp_path / "run" / "segv-fast", tmp_path / "run" / "segv-fast.log", repeats=2)
    assert (result.status, result.reason) == ("crashed", "killed by SIGSEGV"), Path(result.log).read_text()[
        -2000:
    ]
    assert result.folder is None and result.report is None and result.latency_repeats == {}
    # no half-written build folder
    assert list((tmp_path / "run").iterdir()) == [tmp_path / "run" / "segv-fast.log"]


def test_the_dashboard_shows_the_newest_cell_of_each_key_across_shards(tmp_path):
    """An unsharded run, then a shard that builds one of its cells again: the page shows that
    cell from the shard, the other from the older run, and the superseded cell's alarm no more."""
    from toolchain.matrix.cell import CellResult
    from toolchain.matrix.dashboard import dashboard_data
    from toolchain.matrix.history import History

    history = History(f"sqlite:///{tmp_path / 'h.sqlite'}")
    result = lambda key, status: CellResult(
        key,
        key.split("/")[0],
        key.split("/")[1],
        status,
        None,
        "2026-12-01T02:00:00+00:00",
        1.0,
        None,
        "log",
        None,
        {},
        {"versions": {}},
    )
    whole = history.start_run("nightly", "f", 2, "local", 1, "cpu", None, None)
    history.record_cell(
        whole,
        result("m/x86_fbgemm", "crashed"),
        [
            {
                "artifact": None,
                "kind": "crashed",
                "message": "m/x86_fbgemm crashed",
                "baseline_run_id": 0,
                "changes": [],
            }
        ],
    )
    history.record_cell(whole, result("m/nvidia_xavier", "passed"), [])
    history.finish_run(whole.id)
    shard = history.start_run("nightly", "f", 1, "local", 1, "cpu", None, None, shard="x86_fbgemm")
    history.record_cell(shard, result("m/x86_fbgemm", "passed"), [])
    history.finish_run(shard.id)
    data = dashboard_data(history, history.runs("nightly"))
    history.close()
    assert {c["key"]: c["status"] for c in data["cells"]} == {
        "m/x86_fbgemm": "passed",
        "m/nvidia_xavier": "passed",
    }
    assert data["alarms"] == [] and data["shown_runs"] == [whole.id, shard.id]
