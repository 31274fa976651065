"""Host cost per fused call (bench/host_cost.py): measured in a process without the interpreter, with the
kernels compiled for sm_90 and their launches stubbed; the table and the BENCHMARKS.md section."""

import json
import os
import subprocess
import sys

from harmonica.bench.host_cost import format_host_cost
from harmonica.bench.table import HOST_BEGIN, HOST_END, host_cost_section, update_benchmarks


def test_every_public_call_is_measured_through_its_kernel_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ("import json, sys; from harmonica.bench.host_cost import measure; "
              "json.dump(measure(calls=50, rounds=3), open(sys.argv[1], 'w'))")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "rows.json")], env=env, check=True, timeout=300)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["call"].split(" ")[0] for r in rows] == [
        "gated_residual_compute", "gated_residual_compute", "gated_residual_reuse", "solver_step", "CacheCopyPlan"]
    assert all(0 < r["host_us"] < 10_000 and r["target_us"] == 15.0 for r in rows), rows
    # every timed call reached its kernel's direct launch (not the torch reference, not the JIT)
    assert [r["direct_launches"] for r in rows] == [50 * 3] * len(rows), rows


def test_the_table_says_which_calls_meet_the_target():
    rows = [{"call": "a", "host_us": 9.04, "target_us": 15.0}, {"call": "b", "host_us": 15.5, "target_us": 15.0}]
    assert format_host_cost(rows).splitlines()[2:] == [
        "| a | 9.0 | <= 15 us: met |", "| b | 15.5 | <= 15 us: NOT met |"]
    machine = {"torch": "2.13", "triton": "3.9", "diffusers": "0.3", "cpu": "x86", "date": "2026-11-30T09:00",
               "commit": "abc"}
    results = {"command": "harmonica bench", "host_cost": rows, "machine_before": machine}
    section = host_cost_section(results, "bench/results/x.json")
    assert section.startswith(HOST_BEGIN) and section.endswith(HOST_END) and "| b | 15.5 |" in section
    updated = update_benchmarks("# B\n\nbefore\n" + section + "\nafter\n", section.replace("15.5", "14.0"))
    assert "| b | 14.0 | <= 15 us: NOT met |" in updated and "15.5" not in updated and updated.endswith("after\n")
