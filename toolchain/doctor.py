"""What this machine can build and run: each library a stage or runtime needs, with its version or
the reason it is missing. Found without importing anything (``toolchain targets`` and ``toolchain
doctor`` stay instant, and a broken optional library cannot break them)."""

from __future__ import annotations

from toolchain.core.libraries import library, missing


def report() -> dict[str, list[dict]]:
    """Every runtime and stage with the libraries it needs, and whether it is available here."""
    from toolchain import runtimes, stages  # noqa: F401  (stages register themselves; none imports its libraries at import time)
    from toolchain.core.stage import STAGES

    def row(name: str, requires: tuple[str, ...]) -> dict:
        return {
            "name": name,
            "available": missing(requires) is None,
            "reason": missing(requires),
            "libraries": {n: library(n).version for n in requires},
        }

    return {
        "runtimes": [row(n, runtimes.get(n).requires) for n in runtimes.names()],
        "stages": [row(n, STAGES.get(n).requires) for n in STAGES],
    }


def lines(data: dict[str, list[dict]]) -> list[str]:
    out = []
    for section in ("runtimes", "stages"):
        out.append(f"{section}:")
        for r in data[section]:
            versions = ", ".join(f"{k} {v}" for k, v in r["libraries"].items() if v)
            state = f"ok ({versions})" if r["available"] else f"unavailable: {r['reason']}"
            out.append(f"  {r['name']:<18} {state}")
    return out
