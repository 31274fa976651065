"""`make gpu-check` with a fake interpreter: every stage runs after a failure or a timeout, each stage's
exit status is recorded, and the target fails at the end when any stage failed."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAILING = """
case "$*" in
  *test_aot_compile*) exit 4 ;;
  *"--part kernels"*) exec sleep 30 ;;
esac
"""


def run_make(tmp_path, behaviour: str):
    """make gpu-check with PY a script that logs its arguments, then does `behaviour`."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "calls.txt"}\n{behaviour}')
    python.chmod(0o755)
    return subprocess.run(["make", "-s", "-o", ".venv/.installed", "gpu-check", f"PY={python}",
                           f"GPU_CHECK_DIR={tmp_path / 'out'}", "KERNELS_TIMEOUT=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_every_stage_runs_and_failures_are_collected(tmp_path):
    done = run_make(tmp_path, FAILING)
    out = tmp_path / "out"
    stages = [line.split()[:2] for line in (out / "stages.txt").read_text().splitlines()]
    assert stages == [["aot-compile", "exit=4"], ["gpu-tests", "exit=0"], ["kernels", "exit=124"],
                      ["suite", "exit=0"], ["tables", "exit=0"]]
    assert done.returncode != 0
    assert "FAILED: aot-compile exit=4" in done.stdout and "FAILED: kernels exit=124" in done.stdout
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[:2] == ["-m pytest tests/test_aot_compile.py -q", "-m pytest -m gpu -q"]
    assert calls[2] == f"-m harmonica.bench --part kernels --out {out}/kernels.json"
    assert calls[3].startswith("-m harmonica.bench --part suite --models dit-xl-2-256 pixart-alpha-1024 --steps 20 "
                               "--configs no-cache fora:2 harmonica --modes eager fused graphs graphs-step compile")
    assert calls[4] == f"-m harmonica.bench.table --write {out}/kernels.json {out}/suite.json"
    assert sorted(p.name for p in out.glob("*.log")) == ["aot-compile.log", "gpu-tests.log", "kernels.log",
                                                         "suite.log", "tables.log"]


def test_passes_when_every_stage_passes(tmp_path):
    done = run_make(tmp_path, "exit 0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"gpu-check: every stage passed; results in {tmp_path / 'out'}" in done.stdout
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 5
