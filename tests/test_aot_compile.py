"""Every kernel variant the public ops launch, compiled by Triton's real compiler for sm_80 and sm_90
without a GPU (harmonica.kernels.aot), and what its PTX must show: 128-bit global accesses for
every full-size tensor of the memory-bound kernels on contiguous, 16-byte aligned inputs, and no 64-bit
integer division; and that a launch of the compiled kernel (kernels/_launch.py) passes exactly what
the JIT launch bound. The interpreter the other tests use accepts kernels this compiler rejects."""

import json
import os
import subprocess
import sys

import pytest

from harmonica.kernels import aot

ARCHS = aot.ARCHS
VARIANTS = {v.name: v for v in aot.variants()}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One compile process per architecture, in parallel (a fresh process: the kernels must be built
    as JIT functions, and conftest set TRITON_INTERPRET=1 for this one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    folder = tmp_path_factory.mktemp("aot")
    runs = {arch: subprocess.Popen([sys.executable, "-m", "harmonica.kernels.aot", "--arch", str(arch),
                                    "--json", str(folder / f"sm{arch}.json"), "--ptx-dir", str(folder / "ptx")],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for arch in ARCHS}
    merged = {"leftovers": []}
    for arch, process in runs.items():
        output, _ = process.communicate(timeout=600)
        if process.returncode == 2:
            pytest.fail(f"sm_{arch}: the compile check could not start:\n{output[-2000:]}")
        result = json.loads((folder / f"sm{arch}.json").read_text())
        merged["leftovers"] += result["stand_in_leftovers"]
        for name, entry in result["variants"].items():
            merged.setdefault(name, {}).update(entry)
    return merged


def test_every_variant_is_checked_and_nothing_compiled_for_the_stand_in_is_kept(report):
    assert set(report) - {"leftovers"} == set(VARIANTS)
    assert report["leftovers"] == [], "kernels compiled for the stand-in driver outlived stubbed_launches"
    assert {name.split("-")[0] for name in VARIANTS} == {
        "gated_residual_fwd", "gated_residual_bwd", "gated_residual_forecast", "cache_copy", "solver_step"}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_compiles_to_vectorised_ptx(report, name, arch):
    variant, result = VARIANTS[name], report[name][str(arch)]
    assert result["ok"], f"{name} does not compile for sm_{arch}: {result['error']}"
    assert result["direct_launch"], f"{name}: a direct launch of the compiled kernel passes other arguments " \
                                    "than the JIT launch (kernels/_launch.py)"
    assert result["div64"] == 0, f"{name}: {result['div64']} 64-bit divisions or remainders per thread"
    if variant.aligned:
        assert result["v2"] == 0 and result["scalar"] <= variant.broadcasts, (
            f"{name}: {result['scalar']} scalar and {result['v2']} 64-bit global accesses, expected only the "
            f"{variant.broadcasts} of broadcast operands (every full-size tensor in 128-bit accesses)")
        assert result["v4"] >= variant.streams, (
            f"{name}: {result['v4']} 128-bit accesses for {variant.streams} full-size tensors")


def test_ptx_summary_counts_access_widths_and_divisions():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.nc.v2.f32 {%f1, %f2}, [%rd2];
    @%p2 ld.global.b16 { %rs1 }, [ %rd7 + 0 ];
    st.global.v4.b32 [ %rd5 + 0 ], { %r9, %r10, %r11, %r12 };
    st.global.b32 [%rd3], %r1;
    div.s64 %rd9, %rd8, %rd7;
    rem.u64 %rd10, %rd8, %rd7;
    div.s32 %r5, %r6, %r7;
    """
    assert aot.ptx_summary(ptx) == {"v4": 2, "v2": 1, "scalar": 2, "div64": 2}
