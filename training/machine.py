"""The machine a measurement ran on: what every benchmark prints beside its timings.

Timings on the project's CPU VMs differ by a factor of two or more between CPU kinds (AVX2 only,
AVX-512 with native bf16, AMX), so a number is only meaningful with the CPU it came from. This
module reads that from the operating system and imports nothing heavy (the HTTP benchmark uses it
without torch).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

#: The flag families that decide which kernels and engines run fast here.
_VECTOR_PREFIXES = ("avx", "amx")


def _cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The value of the first ``name : value`` line of ``/proc/cpuinfo`` (None off Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path = CPUINFO) -> list[str]:
    """The CPU's vector-extension flags (``avx*``, ``amx*``), sorted; empty where unknown."""
    flags = (_cpuinfo_field("flags", cpuinfo) or "").split()
    return sorted(flag for flag in flags if flag.startswith(_VECTOR_PREFIXES))


def has_native_bf16(flags: list[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): bf16 autocast pays there."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe(cpuinfo: Path = CPUINFO) -> dict:
    """Architecture, CPU model, vector flags, logical CPUs (and torch's threads if torch is loaded)."""
    facts: dict = {
        "arch": platform.machine(),
        "cpu": _cpuinfo_field("model name", cpuinfo) or platform.processor() or None,
        "cpu_flags": cpu_flags(cpuinfo),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    family, model = _cpuinfo_field("cpu family", cpuinfo), _cpuinfo_field("model", cpuinfo)
    if family is not None:
        facts["cpu_family_model"] = f"{family}/{model}"
    torch = sys.modules.get("torch")
    if torch is not None:
        facts["torch"] = torch.__version__
        facts["torch_threads"] = torch.get_num_threads()
    return facts
