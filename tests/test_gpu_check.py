"""`make gpu-check` (bench/gpu/check.sh) with a fake interpreter: every stage runs after a failure or a timeout, each
stage's exit status is recorded, a part fails at its end when one of its stages failed, each part returns at
most 8 files, and the plan fits the device tool's limits."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the fake python logs its arguments, writes the files an `--out X.json` run writes (the suite: its plot too)
FAKE = """#!/bin/bash
echo "$@" >> {calls}
prev=
for arg; do
  [ "$prev" = --out ] && touch "$arg" && case "$*" in *"--part suite"*) touch "${{arg%.json}}.png" ;; esac
  prev=$arg
done
{behaviour}
"""
FAILING = """
case "$*" in
  *test_aot_compile*) exit 4 ;;
  *"--part kernels"*) exec sleep 30 ;;
esac
"""
PART_LIMIT, TOTAL_LIMIT, FILES_LIMIT = 540, 810, 8  # s a command; s both (900 s less two ~30 s starts); files


def fake_python(tmp_path, behaviour: str) -> Path:
    python = tmp_path / "python"
    python.write_text(FAKE.format(calls=tmp_path / "calls.txt", behaviour=behaviour))
    python.chmod(0o755)
    return python


def run_make(tmp_path, behaviour: str, *args: str):
    return subprocess.run(["make", "-s", "gpu-check", f"GPU_PY={fake_python(tmp_path, behaviour)}",
                           f"GPU_CHECK_DIR={tmp_path / 'out'}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def stages(out: Path, part: int) -> list[list[str]]:
    return [line.split()[:2] for line in (out / f"stages-{part}.txt").read_text().splitlines()]


def test_every_stage_runs_and_failures_are_collected(tmp_path):
    done = run_make(tmp_path, FAILING, "KERNELS_TIMEOUT=1")
    out = tmp_path / "out"
    assert stages(out, 1) == [["setup-1", "exit=0"], ["aot-compile", "exit=4"], ["gpu-tests", "exit=0"],
                              ["gpu-flow-tests", "exit=0"], ["kernels", "exit=124"]]
    assert stages(out, 2) == [["setup-2", "exit=0"], ["suite", "exit=0"]]
    assert done.returncode != 0
    assert "FAILED: aot-compile exit=4" in done.stdout and "FAILED: kernels exit=124" in done.stdout
    assert "gpu-check part 2: every stage passed" in done.stdout
    calls = [c for c in (tmp_path / "calls.txt").read_text().splitlines() if c.startswith("-m ")]
    assert calls[:3] == ["-m pytest tests/test_aot_compile.py -q -p no:cacheprovider",
                         "-m pytest -m gpu -v -p no:cacheprovider --durations=20 --ignore=tests/test_flow_graphs.py",
                         "-m pytest -m gpu -v -p no:cacheprovider --durations=10 tests/test_flow_graphs.py"]
    assert calls[3] == f"-m harmonica.bench --part kernels --out {out}/kernels.json"
    assert calls[4].startswith("-m harmonica.bench --part suite --models dit-xl-2-256 pixart-alpha-1024 --steps 20 "
                               "--configs no-cache fora:2 harmonica --modes eager fused graphs graphs-step compile")
    assert calls[4].endswith(f"--out {out}/suite.json")
    assert sorted(p.name for p in out.glob("*.log")) == ["aot-compile.log", "gpu-flow-tests.log", "gpu-tests.log",
                                                         "kernels.log", "setup-1.log", "setup-2.log", "suite.log"]


def test_each_part_passes_and_returns_at_most_8_files(tmp_path):
    python = fake_python(tmp_path, "exit 0")
    for part in (1, 2):
        out = tmp_path / f"out{part}"
        done = subprocess.run(["bash", "bench/gpu/check.sh", str(part)], cwd=REPO, capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "PY": str(python), "GPU_CHECK_DIR": str(out)})
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"gpu-check part {part}: every stage passed; results in {out}" in done.stdout
        files = sorted(p.name for p in out.rglob("*") if p.is_file())
        assert len(files) <= FILES_LIMIT, files
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
        assert f"stages-{part}.txt" in files and ("kernels.json" if part == 1 else "suite.json") in files


def test_setup_without_the_kit_says_so(tmp_path):
    python = fake_python(tmp_path, 'case "$*" in -I*|-c*) exit 1 ;; esac')  # nothing installed
    done = subprocess.run(["bash", "bench/gpu/check.sh", "setup"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PY": str(python), "GPU_KIT": str(tmp_path / "kit")})
    assert done.returncode == 2 and "no wheels in" in done.stdout and "make gpu-kit" in done.stdout


def plan(**timeouts) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu/check.sh", "plan"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), **timeouts})


def test_the_plan_fits_the_device_limits():
    done = plan()
    assert done.returncode == 0, done.stdout
    parts = [int(s) for s in re.findall(r"^part \d: worst case (\d+) s", done.stdout, re.M)]
    assert len(parts) == 2 and max(parts) <= PART_LIMIT and sum(parts) <= TOTAL_LIMIT
    limits = [int(s) for s in re.findall(r"timeout_s=(\d+)\)", done.stdout)]
    assert len(limits) == 2 and all(p < t <= PART_LIMIT for p, t in zip(parts, limits))
    assert sum(limits) <= TOTAL_LIMIT
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    command = (f"HARMONICA_COMMIT={commit.stdout.strip()} GPU_CHECK_DIR=$OUT bash bench/gpu/check.sh 1', "
               "carry=['.gpu-kit']")
    assert command in done.stdout
    over = plan(SUITE_TIMEOUT="400")
    assert over.returncode == 1 and "OVER THE LIMITS" in over.stdout


def test_make_gpu_check_plan_prints_the_budget_and_the_suite():
    done = subprocess.run(["make", "-n", "-B", "gpu-check-plan"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "bash bench/gpu/check.sh plan" in done.stdout
    assert "-m harmonica.bench --plan --device cuda --part suite $(bash bench/gpu/check.sh suite-args)" in done.stdout
