"""What this machine can build and run: each library a stage or runtime needs, with its version or
the reason it is missing. Found without importing anything (``toolchain targets`` stays instant, and
a broken optional library cannot break it); ``toolchain doctor`` also asks OpenVINO which devices it
sees (what an `intel_openvino` profile's `device` can name on this machine)."""

from __future__ import annotations

from toolchain.core.libraries import library, missing


def report(openvino_devices: bool = False) -> dict[str, list]:
    """Every runtime and stage with the libraries it needs, and whether it is available here;
    ``openvino_devices``: also the devices OpenVINO sees (that one imports OpenVINO)."""
    from toolchain import runtimes, stages  # noqa: F401  (stages register themselves; none imports its libraries at import time)
    from toolchain.core.stage import STAGES

    def row(name: str, requires: tuple[str, ...]) -> dict:
        return {
            "name": name,
            "available": missing(requires) is None,
            "reason": missing(requires),
            "libraries": {n: library(n).version for n in requires},
        }

    found = {
        "runtimes": [row(n, runtimes.get(n).requires) for n in runtimes.names()],
        "stages": [row(n, STAGES.get(n).requires) for n in STAGES],
    }
    if openvino_devices:
        from toolchain.runtimes.openvino import devices

        found["openvino_devices"] = devices()
    return found


def lines(data: dict[str, list[dict]]) -> list[str]:
    out = []
    for section in ("runtimes", "stages"):
        out.append(f"{section}:")
        for r in data[section]:
            versions = ", ".join(f"{k} {v}" for k, v in r["libraries"].items() if v)
            state = f"ok ({versions})" if r["available"] else f"unavailable: {r['reason']}"
            out.append(f"  {r['name']:<18} {state}")
    if "openvino_devices" in data:  # what an intel_openvino profile's `device` can name here
        out.append(f"openvino devices: {', '.join(data['openvino_devices']) or 'none'}")
    return out
