"""The matrix history: every run, cell, artifact and alarm, in SQLite or any SQLAlchemy database.

The schema is created and migrated by Alembic (`migrations/`, the one place it is written down)
whenever a history is opened, so an older database is brought up to date before anything is
written; the tables are then read back from the database itself. Each finished cell is
written in one transaction, with its artifacts and alarms: a run that is killed leaves every
cell it finished and nothing half-written, and `--resume` carries on from there.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from toolchain.core.errors import ToolchainError, reason
from toolchain.matrix.cell import CellResult

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


@dataclasses.dataclass(frozen=True)
class Run:
    id: int
    matrix: str
    status: str
    started: datetime.datetime
    finished: datetime.datetime | None
    cells_total: int
    executor: str
    workers: int | None
    host_cpu: str | None
    toolchain_version: str | None
    toolchain_commit: str | None
    matrix_sha256: str
    shard: str | None = None  # the targets the run was limited to (`--target`), comma-separated; None: all


class History:
    """One open history database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.shown = shown = _shown(url)  # the URL without its password: for messages
        try:
            self.engine = sa.create_engine(url)
            with self.engine.begin() as conn:
                # shards opening one database at once migrate it one at a time
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7311501)"))
                _upgrade(conn)
                tables = sa.MetaData()
                tables.reflect(bind=conn)
        except ToolchainError:
            raise
        except Exception as e:  # a driver's own error types: unreachable server, bad file, missing driver
            raise ToolchainError(
                f"cannot open the matrix history `{shown}`: {type(e).__name__}: {reason(e)}"
            ) from None
        self._runs, self._cells = tables.tables["runs"], tables.tables["cells"]
        self._artifacts, self._alarms = tables.tables["artifacts"], tables.tables["alarms"]

    def close(self) -> None:
        self.engine.dispose()

    # runs

    def start_run(
        self,
        matrix: str,
        matrix_sha256: str,
        cells_total: int,
        executor: str,
        workers: int | None,
        host_cpu: str | None,
        version: str | None,
        commit: str | None,
        shard: str | None = None,
    ) -> Run:
        """A new run; an older one of the same matrix and shard still marked running was interrupted."""
        same = self._runs.c.shard.is_(None) if shard is None else self._runs.c.shard == shard
        with self.engine.begin() as conn:
            conn.execute(
                self._runs.update()
                .where(self._runs.c.matrix == matrix, same, self._runs.c.status == "running")
                .values(status="interrupted")
            )
            run_id = conn.execute(
                self._runs.insert().values(
                    matrix=matrix,
                    matrix_sha256=matrix_sha256,
                    status="running",
                    started=_now(),
                    cells_total=cells_total,
                    executor=executor,
                    workers=workers,
                    host_cpu=host_cpu,
                    toolchain_version=version,
                    toolchain_commit=commit,
                    shard=shard,
                )
            ).inserted_primary_key[0]
        return self.run(run_id)

    def resumable_run(self, matrix: str, shard: str | None = None) -> Run | None:
        """The newest run of ``matrix`` (and ``shard``) if it did not finish."""
        latest = [r for r in self.runs(matrix) if r.shard == shard][-1:]
        return latest[0] if latest and latest[0].status in ("running", "interrupted") else None

    def reopen_run(self, run: Run, executor: str, workers: int | None) -> Run:
        with self.engine.begin() as conn:
            conn.execute(
                self._runs.update()
                .where(self._runs.c.id == run.id)
                .values(status="running", executor=executor, workers=workers)
            )
        return self.run(run.id)

    def finish_run(self, run_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                self._runs.update()
                .where(self._runs.c.id == run_id)
                .values(status="finished", finished=_now())
            )

    def run(self, run_id: int) -> Run:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self._runs).where(self._runs.c.id == run_id)).mappings().one()
        return Run(**row)

    def runs(self, matrix: str | None = None) -> list[Run]:
        query = sa.select(self._runs).order_by(self._runs.c.id)
        if matrix is not None:
            query = query.where(self._runs.c.matrix == matrix)
        with self.engine.connect() as conn:
            return [Run(**row) for row in conn.execute(query).mappings()]

    # cells

    def record_cell(self, run: Run, result: CellResult, found: list[dict[str, Any]]) -> int:
        """Write one finished cell, its artifacts and its alarms, in one transaction."""
        cell = cell_row(result)
        with self.engine.begin() as conn:
            cell_id = conn.execute(self._cells.insert().values(run_id=run.id, **cell)).inserted_primary_key[0]
            rows = artifact_rows(result)
            if rows:
                conn.execute(self._artifacts.insert(), [{**r, "cell_id": cell_id} for r in rows])
            if found:
                conn.execute(
                    self._alarms.insert(),
                    [{**a, "run_id": run.id, "cell_id": cell_id, "key": result.key} for a in found],
                )
        return cell_id

    def done_keys(self, run_id: int) -> set[str]:
        with self.engine.connect() as conn:
            return set(
                conn.execute(sa.select(self._cells.c.key).where(self._cells.c.run_id == run_id)).scalars()
            )

    def cells_of(self, run_ids: list[int]) -> list[dict[str, Any]]:
        """Every cell of these runs, each with its artifacts (``artifacts``: name -> row)."""
        if not run_ids:
            return []
        with self.engine.connect() as conn:
            found = [
                dict(r)
                for r in conn.execute(
                    sa.select(self._cells).where(self._cells.c.run_id.in_(run_ids)).order_by(self._cells.c.id)
                ).mappings()
            ]
            ids = [c["id"] for c in found]
            rows = (
                conn.execute(
                    sa.select(self._artifacts)
                    .where(self._artifacts.c.cell_id.in_(ids))
                    .order_by(self._artifacts.c.id)
                ).mappings()
                if ids
                else []
            )
            by_cell: dict[int, dict[str, dict]] = {}
            for r in rows:
                by_cell.setdefault(r["cell_id"], {})[r["name"]] = dict(r)
        return [{**c, "artifacts": by_cell.get(c["id"], {})} for c in found]

    def last_passing(
        self, matrix: str, key: str, before_run: int, quiet_below: float | None = None
    ) -> dict[str, Any] | None:
        """The newest passing run of cell ``key`` before run ``before_run``, with its artifacts and
        run; with ``quiet_below``, the newest whose latency was measured on a quiet machine."""
        query = (
            sa.select(self._cells.c.id, self._cells.c.run_id)
            .join(self._runs, self._runs.c.id == self._cells.c.run_id)
            .where(
                self._runs.c.matrix == matrix,
                self._cells.c.key == key,
                self._cells.c.status == "passed",
                self._runs.c.id < before_run,
            )
            .order_by(self._runs.c.id.desc())
            .limit(1)
        )
        if quiet_below is not None:
            query = query.where(self._cells.c.timing_busy <= quiet_below)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        cell = next(c for c in self.cells_of([row.run_id]) if c["id"] == row.id)
        return {**cell, "run": self.run(row.run_id)}

    def alarms_of(self, run_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    sa.select(self._alarms).where(self._alarms.c.run_id == run_id).order_by(self._alarms.c.id)
                ).mappings()
            ]


def cell_row(result: CellResult) -> dict[str, Any]:
    report, p = result.report or {}, result.provenance
    ref = report.get("reference") or {}
    return dict(
        key=result.key,
        model=result.model_name,
        target=result.target,
        status=result.status,
        reason=result.reason,
        verdict=report.get("verdict"),
        started=result.started,
        seconds=result.seconds,
        build_seconds=report.get("build_seconds"),
        folder=result.folder,
        log=result.log,
        model_sha256=p.get("model_sha256"),
        data_sha256=p.get("data_sha256"),
        profile_sha256=p.get("profile_sha256"),
        versions=p.get("versions") or {},
        reference_accuracy=_number(ref.get("accuracy")),
        reference_latency_ms=_number(ref.get("latency_ms")),
        timing_busy=result.timing_busy,
        host_cpu=result.host_cpu,
    )


def artifact_rows(result: CellResult) -> list[dict[str, Any]]:
    """One row per artifact of the cell's report, with the cell's repeated latency measurements."""
    rows = []
    for a in (result.report or {}).get("artifacts", []):
        p, rec = a["parity"], a.get("recovery") or {}
        metric = (p.get("metric") or {}).get("value") if isinstance(p.get("metric"), dict) else None
        rows.append(
            dict(
                name=a["name"],
                precision=a["precision"],
                is_primary=bool(a["primary"]),
                passed=p["passed"],
                sqnr_db=_number(p["sqnr_db"]),
                cosine=_number(p["cosine"]),
                top1_agreement=_number(p["top1_agreement"]),
                accuracy=_number(p["accuracy"]),
                metric=_number(metric),
                latency_p50_ms=_number(a["latency_ms"]),
                latency_p95_ms=_number(a["latency_p95_ms"]),
                latency_p99_ms=_number(a["latency_p99_ms"]),
                latency_repeats=result.latency_repeats.get(a["name"], []),
                size_bytes=a["size_bytes"],
                sha256=a["sha256"],
                recovery_status=rec.get("status"),
                recovery_summary=rec.get("summary"),
                failures=list(p["failures"]),
            )
        )
    return rows


def _number(v: Any) -> float | None:
    """report.json's numbers, with its "inf" / "nan" strings as floats; NaN is stored as NULL."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _upgrade(conn: sa.Connection) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


def _shown(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
