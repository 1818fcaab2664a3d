"""``training.machine``: the machine facts every benchmark prints beside its timings."""

from __future__ import annotations

from pathlib import Path

from training.machine import cpu_flags, describe, has_native_bf16

# Two logical CPUs of an AVX-512 VM with native bf16 (only the first one is read).
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC Test 9000
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx_vnni sha_ni

processor\t: 1
model name\t: AMD EPYC Test 9000
flags\t\t: fpu sse2 avx
"""


def test_vector_flags_model_and_family_come_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert cpu_flags(cpuinfo) == ["avx", "avx2", "avx512_bf16", "avx512bw", "avx512f", "avx_vnni"]
    facts = describe(cpuinfo)
    assert facts["cpu"] == "AMD EPYC Test 9000"
    assert facts["cpu_family_model"] == "26/2"
    assert facts["cpu_flags"] == cpu_flags(cpuinfo)
    assert facts["logical_cpus"] >= 1


def test_native_bf16_needs_avx512_bf16_or_amx() -> None:
    assert has_native_bf16(["avx2", "avx512f", "avx512_bf16"])
    assert has_native_bf16(["avx2", "amx_bf16", "amx_tile"])
    assert not has_native_bf16(["avx", "avx2", "avx512f", "avx512_vnni"])


def test_a_machine_without_cpuinfo_is_described_without_flags(tmp_path: Path) -> None:
    facts = describe(tmp_path / "missing")
    assert facts["cpu_flags"] == []
    assert "cpu_family_model" not in facts
    assert facts["arch"]  # platform.machine() still answers
