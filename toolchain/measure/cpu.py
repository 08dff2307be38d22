"""x86 instruction sets: what the deployment CPU has (the target says) and what the build host has.

INT8 kernels differ by instruction set. ONNX Runtime's U8S8 (uint8 activations, int8 weights)
kernels on AVX2 without VNNI multiply pairs of uint8 x int8 into 16-bit sums that saturate,
so a model quantized with full-range weights loses accuracy there while it is exact on
AVX512-VNNI or AMX. A target profile names the instruction set it deploys to; quantization
settings follow it, and parity measured on a host with another set is labelled a proxy.
"""

from __future__ import annotations

import functools
from pathlib import Path

# weakest first; avx512_bf16: AVX512-VNNI and AVX512-BF16 (Cooper Lake, AMD Zen 4), BF16 dot products
# without AMX's tiles
ISAS = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")
_VNNI = {"avx512_vnni", "avx512_bf16", "amx"}
BF16 = {"avx512_bf16", "amx"}  # the deployment CPUs that compute BF16 natively


def has_bf16(isa: str | None) -> bool:
    """Whether ``isa`` computes BF16 dot products in hardware (AVX512-BF16 or AMX-BF16)."""
    return isa in BF16


def has_vnni(isa: str | None) -> bool:
    """Whether INT8 dot products accumulate in 32 bits (no 16-bit saturation) on ``isa``."""
    return isa in _VNNI


def torch_kernels(engine: str, isa: str | None) -> str:
    """The torch quantized engine whose kernels run an ``engine`` model on the deployment CPU ``isa``.

    torch's ``x86`` engine sends a convolution to oneDNN only on CPUs with AVX512-VNNI (ATen's
    ``should_use_onednn_quant``) and everything else to fbgemm: on an ``avx2`` or ``avx512`` CPU it
    runs fbgemm's kernels alone. Host parity runs those, not the host's own dispatch: an AMX host
    would send the same convolutions to oneDNN's AMX kernels, which the device never runs (and
    which, in torch 2.14.1, compute INT8 Conv1d with fewer than 32 input channels and an even
    kernel size wrong: SQNR ~0 dB against ~40 dB on fbgemm, measured here)."""
    return "fbgemm" if engine == "x86" and isa is not None and not has_vnni(isa) else engine


def safe_reduce_range(isa: str | None) -> bool:
    """7-bit weights unless the deployment CPU has VNNI; False for non-x86 targets (``isa`` None)."""
    return isa is not None and not has_vnni(isa)


@functools.lru_cache(maxsize=1)
def host_cpu() -> dict:
    """The build host's CPU model and its x86 instruction sets, from /proc/cpuinfo."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "isa": host_isa(flags), "flags": sorted(flags & _INTERESTING)}


_INTERESTING = {
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
}


def host_isa(flags: set[str]) -> str | None:
    """The strongest of :data:`ISAS` that ``flags`` cover; None when not even AVX2 (or not x86)."""
    if {"amx_tile", "amx_int8"} <= flags:
        return "amx"
    if "avx512f" in flags and flags & {"avx512_vnni", "avx512vnni"} and "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags and flags & {"avx512_vnni", "avx512vnni"}:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else None


def isa_facts(target_isa: str | None) -> dict:
    """For report.json: the host's CPU, the target's instruction set, and whether parity
    measured on this host is a proxy for the device's (with the reason)."""
    host = host_cpu()
    if target_isa is None:
        why = "the target is not an x86 CPU: artifacts ran on this host's kernels, not the device's"
    elif _int8_kernels(host["isa"]) != _int8_kernels(target_isa):
        why = (
            f"this host is {host['isa'] or 'not AVX2-capable'}, the target {target_isa}: "
            "INT8 kernels differ between them"
        )
    else:
        why = None
    return {
        "host_cpu": host["model"],
        "host_isa": host["isa"],
        "host_flags": host["flags"],
        "target_isa": target_isa,
        "proxy": why is not None,
        "proxy_reason": why,
    }


def _int8_kernels(isa: str | None) -> str | None:
    """The INT8 kernels an instruction set runs: AVX512-VNNI's and AVX512-BF16's are the same."""
    return "avx512_vnni" if isa == "avx512_bf16" else isa


def host_has_bf16() -> bool:
    """Whether this host computes BF16 natively (AVX512-BF16 or AMX-BF16); elsewhere torch emulates it
    in FP32 arithmetic, so a BF16 artifact's parity holds but its latency says nothing."""
    return bool({"avx512_bf16", "amx_bf16"} & set(host_cpu()["flags"]))
