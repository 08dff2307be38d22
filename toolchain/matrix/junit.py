"""`--junit FILE`: a run's cells as JUnit test cases, so that any CI lists them.

One test suite per target, one test case per cell (classname `matrix.<name>.<target>`, name the
model). A cell that failed parity is a failure, one that erred or crashed an error, one not
judged is skipped; each alarm is one more failure of its cell (type `regression:<kind>`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_junit(
    path: Path, matrix: str, run_id: int, cells: list[dict[str, Any]], alarms: list[dict[str, Any]]
) -> None:
    from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

    xml = JUnitXml(f"matrix {matrix}, run {run_id}")
    for target in dict.fromkeys(c["target"] for c in cells):
        suite = TestSuite(f"{matrix}.{target}")
        for c in (c for c in cells if c["target"] == target):
            case = TestCase(c["model"], f"matrix.{matrix}.{target}", c["seconds"])
            results = {
                "failed": [Failure(c["reason"] or c["verdict"] or "parity failed", "parity")],
                "error": [Error(c["reason"], "error")],
                "crashed": [Error(c["reason"], "crashed")],
                "not_judged": [Skipped(c["verdict"] or "not judged")],
            }.get(c["status"], [])
            results += [
                Failure(a["message"] + _changes(a), f"regression:{a['kind']}")
                for a in alarms
                if a["cell_id"] == c["id"]
            ]
            case.result = results
            case.system_out = "\n".join(
                filter(
                    None, [c["verdict"], c["folder"] and f"build folder: {c['folder']}", f"log: {c['log']}"]
                )
            )
            suite.add_testcase(case)
        xml.add_testsuite(suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    xml.write(str(path), pretty=True)


def _changes(alarm: dict[str, Any]) -> str:
    return f"; changed: {', '.join(alarm['changes'])}" if alarm["changes"] else "; nothing recorded changed"
