"""The command line: a thin layer over :func:`toolchain.build` and friends."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from toolchain.core.errors import (
    EXIT_NOT_JUDGED,
    EXIT_OK,
    EXIT_PARITY_FAILURE,
    EXIT_REGRESSION,
    EXIT_USER_ERROR,
    ToolchainError,
)


class _UserErrors(click.Group):
    """A ToolchainError prints one line and exits 2; anything else is a bug with its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ToolchainError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)


# the model's target, as `build` and `qat` take it
TARGET = click.option(
    "-t",
    "--target",
    default="x86_fbgemm",
    show_default=True,
    help="Target name (see `toolchain targets`) or a .toml profile.",
)

TRUST_PICKLE = click.option(
    "--trust-pickle", is_flag=True, help="Allow a pickled nn.Module (unpickling runs code from the file)."
)


@click.group(cls=_UserErrors)
@click.version_option(package_name="toolchain")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Debug detail, libraries' own logs and warnings, tracebacks of skipped artifacts.",
)
@click.pass_context
def main(ctx, quiet: bool, verbose: bool) -> None:
    """Export, quantize and validate PyTorch models for deployment targets."""
    from toolchain.reporting.console import Terminal

    ctx.obj = Terminal(quiet=quiet, verbose=verbose)
    ctx.obj.configure()


@main.command()
@click.argument("model")
@TARGET
@click.option("-o", "--out", type=click.Path(), help="Build folder [default: build/<model>-<target>].")
@click.option("--calib", type=click.Path(), help="Calibration inputs: .npy, .npz (x) or a folder of images.")
@click.option(
    "--val",
    type=click.Path(),
    help="Held-out validation inputs: .npy, .npz (x, optional labels y) or an image folder.",
)
@click.option(
    "--input-shape",
    help="Input shape with batch, e.g. 1x3x224x224, or per input NAME=SHAPE[:DTYPE],... "
    "(when the model does not say).",
)
@TRUST_PICKLE
@click.option(
    "--constant",
    "constants",
    multiple=True,
    metavar="NAME=VALUE",
    help="Fix a forward argument that is a Python number (a TorchScript `sr: int`) at VALUE in every "
    "artifact [default: the data's 0-d array of that name, else the argument's default]. Repeatable.",
)
@click.option(
    "--outputs",
    "output_roles",
    metavar="KEY=ROLE,...",
    help="Role of each output, by index or name: classification, probabilities, regression, embedding "
    "(e.g. 0=classification,landmarks=regression); overrides the profile's [parity.outputs].",
)
@click.option(
    "--metric",
    metavar="FILE.py:FUNCTION",
    help="Your metric of the outputs and the --val labels; with it, "
    "the metric (and the sanity checks) decide the verdict [default: the profile's parity.metric].",
)
@click.option(
    "--max-metric-drop", type=float, help="Largest loss of the metric against FP32 [default: the profile's]."
)
@click.option(
    "--qat",
    type=click.Path(),
    metavar="STATE",
    help="A fine-tuned QAT state from `toolchain qat`: its artifact takes the learned weights and "
    "ranges instead of calibrating (judged against MODEL's FP32 outputs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the table.")
@click.pass_obj
def build(
    terminal,
    model,
    target,
    out,
    calib,
    val,
    input_shape,
    trust_pickle,
    constants,
    output_roles,
    metric,
    max_metric_drop,
    qat,
    as_json,
):
    """Build MODEL (torch.export archive, TorchScript, pickled module, or torchvision:<name>) for a target.

    Exit codes: 0 passed, 2 user error, 3 parity failed, 4 built but not judged (random weights)."""
    from toolchain.build import build as run_build
    from toolchain.core.native import stdout_to_stderr
    from toolchain.reporting.report import (
        int4_lines,
        metric_lines,
        near_ties_lines,
        primary_lines,
        qat_lines,
        recovery_lines,
        sensitivity_top,
        subset_lines,
        table,
    )

    if as_json:
        terminal.plain = True  # stdout is for the JSON; stderr gets plain lines
    roles = parse_output_roles(output_roles)
    with terminal.live(), stdout_to_stderr():  # native libraries' stdout never mixes with the JSON
        report, folder = run_build(
            model,
            target,
            out,
            calib,
            val,
            input_shape,
            trust_pickle,
            progress=terminal.progress,
            outputs=roles,
            metric=metric,
            max_metric_drop=max_metric_drop,
            constants=constants,
            qat=qat,
        )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(table(report))
        for line in metric_lines(report) + subset_lines(report):
            click.echo(line)
        for line in sensitivity_top(report, folder):
            click.echo(line)
        for line in (
            recovery_lines(report)
            + near_ties_lines(report)
            + primary_lines(report)
            + int4_lines(report)
            + qat_lines(report)
        ):
            click.echo(line)
        for s in report.skipped:
            click.echo(f"skipped {s['name']}: {s['reason']}")
        if report.engine:
            click.echo(f"TensorRT engine: {report.engine['status']}; plan: {folder / 'engine_plan.json'}")
        colour = {True: "green", False: "red", None: "yellow"}[report.passed]
        verdict = report.verdict if terminal.plain else click.style(report.verdict, fg=colour, bold=True)
        click.echo(f"{verdict} in {report.build_seconds:.1f} s; build folder: {folder}")
        click.echo(f"report: {folder / 'report.html'}")
    sys.exit({True: EXIT_OK, False: EXIT_PARITY_FAILURE, None: EXIT_NOT_JUDGED}[report.passed])


def parse_output_roles(text: str | None) -> dict[str, str]:
    """`0=classification,landmarks=regression` -> {"0": "classification", "landmarks": "regression"}."""
    from toolchain.verdict.parity import ROLES

    roles = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, role = (part.strip() for part in item.partition("="))
        if not sep or not key or role not in ROLES:
            raise ToolchainError(f"--outputs `{item}` must be KEY=ROLE with ROLE one of {', '.join(ROLES)}")
        roles[key] = role
    return roles


@main.command("bench")
@click.argument("build_dir", type=click.Path())
@click.option("--batch-sizes", help="Comma-separated batch sizes [default: the build's].")
@click.option("--runs", type=int, help="Timed runs at batch 1 [default: the build's].")
@click.option("--sweep-runs", type=int, help="Timed runs at each larger batch size [default: the build's].")
@click.option("--threads", type=int, help="Threads [default: the build's].")
@click.option(
    "--budget-ms",
    type=float,
    help="Latency budget (p95) for choosing the batch size [default: the profile's].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_obj
def bench_cmd(terminal, build_dir, batch_sizes, runs, sweep_runs, threads, budget_ms, as_json):
    """Latency p50/p95/p99, throughput per batch size, best batch and peak memory of every
    artifact in BUILD_DIR (and of the FP32 model); writes BUILD_DIR/bench.json."""
    from pathlib import Path

    from toolchain.bench import bench_build, bench_table

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",")) if batch_sizes else None
    except ValueError:
        raise ToolchainError(
            f"--batch-sizes must be integers separated by commas (got {batch_sizes!r})"
        ) from None
    if sizes and min(sizes) < 1:
        raise ToolchainError("--batch-sizes must be at least 1")
    from toolchain.core.native import native_stderr_off, stdout_to_stderr

    quiet = native_stderr_off() if not terminal.verbose else contextlib.nullcontext()
    # TorchScript's kernels print deprecation notices from C++; native stdout never mixes with the JSON
    with terminal.live(), quiet, stdout_to_stderr():
        data = bench_build(Path(build_dir), sizes, runs, threads, budget_ms, sweep_runs)
    (Path(build_dir) / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    s = data["settings"]
    larger = f", {s['sweep_runs']} at larger batches" if max(s["batch_sizes"]) > 1 else ""
    click.echo(
        f"{data['target']}: input {'x'.join(map(str, data['input_shape'][1:]))}, {s['threads']} threads, "
        f"{s['runs']} runs at batch 1 after {s['warmup']} warm-up{larger}, budget "
        f"{'none' if s['budget_ms'] is None else str(s['budget_ms']) + ' ms (p95)'}"
    )
    click.echo(bench_table(data))
    if data["note"]:
        click.echo(data["note"])
    click.echo(f"written: {Path(build_dir) / 'bench.json'}")


@main.command()
@click.argument("model")
@TARGET
@click.option("--calib", type=click.Path(), required=True, help="Calibration inputs, as for `build`.")
@click.option(
    "--train",
    metavar="FILE.py:FUNCTION",
    required=True,
    help="Your fine-tuning loop: a function that takes the prepared model and trains it in place "
    "(or returns the trained model).",
)
@click.option(
    "--artifact",
    help="The INT8 artifact whose quantizer to prepare: torch_int8, onnx_int8 or openvino_int8 on x86, "
    "pte_int8 or ptl_int8 on Snapdragon, onnx_int8_qdq on Xavier [default: the first QAT can prepare].",
)
@click.option("-o", "--out", type=click.Path(), default="qat.pt", show_default=True, help="State to write.")
@click.option("--input-shape", help="Input shape with batch (when the model does not say), as for `build`.")
@TRUST_PICKLE
@click.option(
    "--constant",
    "constants",
    multiple=True,
    metavar="NAME=VALUE",
    help="Fix a forward argument that is a Python number, as for `build` (give the build the same).",
)
def qat(model, target, calib, train, artifact, out, input_shape, trust_pickle, constants):
    """Quantization-aware training of MODEL for a target's own INT8 quantizer: for a model whose
    post-training INT8 misses parity even after recovery.

    \b
    1. MODEL is fused as the build fuses it and given the fake-quantization of the target
       artifact's quantizer (the same observers, dtypes and ranges), its ranges calibrated
       once on --calib.
    2. Your --train function fine-tunes it: `def finetune(qat_model): ...` (a torch.fx.GraphModule
       in training mode; a few epochs at a low learning rate, with your labels or MODEL's own
       outputs as targets).
    3. The learned weights and ranges are written to --out.

    \b
    Then `toolchain build MODEL --target TARGET --qat OUT`: that artifact converts them instead of
    calibrating (report.json: "ranges": "qat"), and every artifact is judged against MODEL's FP32
    outputs. In Python: toolchain.qat.prepare(...), your loop, toolchain.qat.save(...).
    A worked example: docs/qat.md."""
    from pathlib import Path

    from toolchain.qat import finetune

    path = finetune(model, train, out, target, calib, artifact, input_shape, trust_pickle, constants)
    folder = Path("build") / f"{Path(model).stem}-{Path(target).stem}-qat"  # beside, not over, a PTQ build
    click.echo(
        f"wrote {path}; next: toolchain build {model} --target {target} --calib {calib} --val VAL "
        f"--qat {path} --out {folder}"
    )


@main.command()
@click.argument("build_dir", type=click.Path())
@click.argument("artifacts", nargs=-1)
@click.pass_obj
def sensitivity(terminal, build_dir, artifacts):
    """Per-layer sensitivity of BUILD_DIR's INT8 ARTIFACTS (default: all with a quantization
    stage): each layer kept in float alone, checked in the artifact's runtime against FP32.
    Rebuilds from the model, data and profile the build recorded; writes sensitivity/<artifact>.json."""
    from pathlib import Path

    from toolchain.sensitivity import measure_build

    with terminal.live():
        written = measure_build(Path(build_dir), tuple(artifacts), progress=terminal.progress)
    for name, path in written.items():
        if path is None:  # a stage that cannot keep single layers in float (TorchScript models' torch_int8)
            click.echo(
                f"{name}: no per-layer sensitivity (its quantization stage cannot keep "
                "single layers in float)"
            )
            continue
        rows = json.loads((Path(build_dir) / path).read_text())["layers"]
        click.echo(
            f"{name}: {len(rows)} layers, most sensitive first (SQNR gain with that layer in float); "
            f"{Path(build_dir) / path}"
        )
        for r in rows[:5]:
            gain = r["sqnr_gain_db"]
            top1 = "" if r["top1_agreement"] is None else f", top-1 agreement {r['top1_agreement']:.2%}"
            click.echo(f"  {r['layer']:40} {'n/a' if gain is None else f'{gain:+.1f} dB'}{top1}")


@main.command()
@click.option(
    "-v", "--verbose", is_flag=True, help="Print each target as TOML with every setting, defaults included."
)
def targets(verbose: bool) -> None:
    """List the target profiles (-v: each as TOML, every setting that applies, defaults included)."""
    from toolchain.target import builtin_targets, parse_target, target_toml

    if verbose:
        from toolchain.doctor import lines, report

        click.echo(
            "\n".join(f"# {line}" for line in ["this machine (toolchain doctor):", *lines(report())]) + "\n"
        )
    for name, path in builtin_targets().items():
        t = parse_target(path)
        if verbose:
            click.echo(f"# {name}: {t.description}\n# file: {path}\n{target_toml(t)}")
        else:
            click.echo(f"{name:24} {t.description}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def doctor(as_json: bool) -> None:
    """What this machine can build and run: each runtime and stage, with its libraries'
    versions or why it is unavailable, and the devices OpenVINO sees."""
    from toolchain.doctor import lines, report

    data = report(openvino_devices=True)
    click.echo(json.dumps(data, indent=2) if as_json else "\n".join(lines(data)))


@main.group()
def engine() -> None:
    """TensorRT engines: build on the device, check before use."""


@engine.command("build")
@click.argument("build_dir", type=click.Path())
@click.option(
    "--trtexec", "use_trtexec", is_flag=True, help="Build with the plan's trtexec command (no parity run)."
)
def engine_build(build_dir: str, use_trtexec: bool) -> None:
    """Build the TensorRT engine of BUILD_DIR here, run it on the kept inputs, compare with FP32."""
    from toolchain.on_device import engine_build as run

    record = run(build_dir, use_trtexec)
    click.echo(json.dumps(record, indent=2, default=list))
    if record.get("parity") and record["parity"]["passed"] is False:
        sys.exit(EXIT_PARITY_FAILURE)


@engine.command("check")
@click.argument("engine_file", type=click.Path())
def engine_check(engine_file: str) -> None:
    """Refuse ENGINE_FILE if it was built by another TensorRT version or for another GPU."""
    from pathlib import Path

    from toolchain.tensorrt.engine import check_engine

    click.echo(json.dumps(check_engine(Path(engine_file)), indent=2))


@main.group()
def matrix() -> None:
    """Nightly parity: a models x targets matrix of builds, its history, alarms and dashboard."""


@matrix.command("run")
@click.argument("matrix_file", type=click.Path())
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Cells built at once here [default: the file's, else the cores / each build's threads].",
)
@click.option(
    "--ray",
    metavar="local|auto|ADDRESS",
    help="Run the cells as Ray tasks: `local` starts Ray for this run, "
    "`auto` or host:port joins a running cluster.",
)
@click.option("--db", help="History: SQLite file or SQLAlchemy URL [default: the file's `matrix.db`].")
@click.option(
    "--resume", is_flag=True, help="Finish the matrix's interrupted run; finished cells are not built again."
)
@click.option("--junit", type=click.Path(), help="Also write the cells as JUnit XML test cases to this file.")
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="NAME",
    help="Only this target's cells (repeatable): one "
    "shard of the matrix, with runs, interruptions and --resume of its own.",
)
@click.pass_obj
def matrix_run(terminal, matrix_file, workers, ray, db, resume, junit, targets):
    """Build every model of MATRIX_FILE for every target, each cell in its own process; record
    the results, compare each cell with its last passing run.

    Exit codes: 0 every cell passed (or was not judged), 2 user error, 3 a cell failed, erred or
    crashed, 5 a regression alarm (with or without failures)."""
    from pathlib import Path

    from toolchain.matrix.history import History
    from toolchain.matrix.junit import write_junit
    from toolchain.matrix.run import run_matrix
    from toolchain.matrix.spec import database_url, load_matrix

    spec = load_matrix(matrix_file)
    history = History(database_url(db) if db else spec.db_url)
    with _matrix_progress(terminal, len(spec.cells)) as progress:
        done = run_matrix(
            spec, history, workers=workers, ray=ray, resume=resume, targets=targets, progress=progress
        )
    cells = history.cells_of([done.run.id])
    for c in cells:
        click.echo(f"{c['key']:40} {c['status']:10} {c['verdict'] or c['reason'] or ''}")
    for a in done.alarms:
        click.echo(
            f"ALARM {a['key']} {a['artifact'] or ''} [{a['kind']}]: {a['message']}; "
            f"changed: {', '.join(a['changes']) or 'nothing recorded'}"
        )
    if junit:
        write_junit(Path(junit), spec.name, done.run.id, cells, list(done.alarms))
    statuses = [c["status"] for c in cells]
    counts = ", ".join(f"{statuses.count(s)} {s.replace('_', ' ')}" for s in dict.fromkeys(statuses))
    click.echo(
        f"run {done.run.id}: {len(cells)} cells ({counts}), {len(done.alarms)} alarms; "
        f"build folders: {done.folder}; history: {history.shown}"
    )
    history.close()
    if done.alarms:
        sys.exit(EXIT_REGRESSION)
    sys.exit(EXIT_PARITY_FAILURE if set(statuses) - {"passed", "not_judged"} else EXIT_OK)


@contextlib.contextmanager
def _matrix_progress(terminal, total: int):
    """A bar with the count and an ETA on a terminal; a line per finished cell elsewhere."""

    def line(done, of, result, left):
        eta = f", ETA {left:.0f} s" if left else ""
        return f"[{done}/{of}] {result.key}: {result.status} in {result.seconds:.1f} s{eta}"

    if terminal.plain or terminal.quiet:
        yield None if terminal.quiet else (lambda *a: click.echo(line(*a), err=True))
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        SpinnerColumn(),
        TextColumn("matrix"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("matrix", total=total)

    def progress(done, of, result, left):
        bar.update(task, total=of, completed=done)
        bar.console.print(line(done, of, result, left), highlight=False)

    with bar:
        yield progress


@matrix.command("report")
@click.option(
    "--db", default="matrix.sqlite", show_default=True, help="History: SQLite file or SQLAlchemy URL."
)
@click.option(
    "--out", type=click.Path(), default="matrix.html", show_default=True, help="Dashboard file to write."
)
@click.option("--name", help="Matrix name [default: the matrix of the newest run].")
def matrix_report(db, out, name):
    """Write the dashboard: today's verdict per cell, alarms, trends per cell, links to each report."""
    from pathlib import Path

    from toolchain.matrix.dashboard import write_dashboard
    from toolchain.matrix.history import History
    from toolchain.matrix.spec import database_url

    url = database_url(db)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise ToolchainError(f"--db `{db}`: no such history file (`toolchain matrix run` writes one)")
    history = History(url)
    path = write_dashboard(history, Path(out), name)
    history.close()
    click.echo(f"written: {path}")


@main.command()
@click.argument("name", type=click.Choice(["digits"]), default="digits")
@click.option("-o", "--out", type=click.Path(), default="build/example", show_default=True)
def example(name: str, out: str) -> None:
    """Train the built-in example model and write it with calibration and validation data."""
    from toolchain.inputs.examples import write_digits_example

    paths = write_digits_example(out)
    for role, path in paths.items():
        click.echo(f"{role:12} {path}")
