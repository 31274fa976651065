"""Reproducible installs: `make test` and `make bench` install through this Python's constraints file,
which pins every requirement but torch and triton (the Makefile installs those); `make test-latest`
installs the newest releases instead."""

import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / f"constraints-py{sys.version_info[0]}.{sys.version_info[1]}.txt"
# the extras the Makefile installs: test (make test), bench and peers (make bench)
INSTALLED_EXTRAS = {"test", "bench", "peers"}
NOT_PINNED = {"torch", "triton"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    lines = [line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    bad = [line for line in lines if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^=\s;]+", line)]
    assert not bad, f"{CONSTRAINTS.name}: expected name==version lines, got {bad}"
    return {canonical(line.split("==")[0]): line.split("==")[1] for line in lines}


def requirement_names() -> set[str]:
    """The project's requirements the Makefile installs: install_requires and INSTALLED_EXTRAS."""
    names = set()
    for requirement in requires("harmonica-dit"):
        extra = re.search(r'extra\s*==\s*"([^"]+)"', requirement)
        if extra is None or extra.group(1) in INSTALLED_EXTRAS:
            names.add(canonical(re.match(r"[A-Za-z0-9._-]+", requirement).group()))
    return names


@pytest.fixture
def constraints():
    if not CONSTRAINTS.exists():
        pytest.skip(f"no {CONSTRAINTS.name}: make test installs the newest releases on this Python")
    return pins()


def test_every_requirement_but_torch_and_triton_is_pinned(constraints):
    names = requirement_names()
    assert {"diffusers", "transformers", "pytest", "cache-dit"} <= names
    assert names - NOT_PINNED - set(constraints) == set()
    assert NOT_PINNED & set(constraints) == set()


def make_dry_run(*args: str) -> str:
    done = subprocess.run(["make", "-n", "-B", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_test_installs_through_the_constraints_and_test_latest_without(constraints):
    pinned = make_dry_run(".venv/.installed", ".venv/.installed-bench")
    assert pinned.count(f"pip install -q -c {CONSTRAINTS.name} -e") == 2
    latest = make_dry_run("test-latest")
    assert "rm -rf .venv-latest" in latest and "VENV=.venv-latest PIN= .venv-latest/.installed-bench" in latest
    unpinned = make_dry_run("VENV=.venv-latest", "PIN=", ".venv-latest/.installed-bench")
    assert "-c constraints" not in unpinned and unpinned.count("pip install -q  -e") == 2


def test_a_wheel_holds_every_module_of_every_package(tmp_path):
    """A non-editable install gets every module: the subpackages (harmonica.adapters, harmonica.families) too,
    under their installed names (kernels/ as harmonica.kernels), and the committed digits weights."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy without the clone's build/ folder, which setuptools would reuse
    source.mkdir()
    for name in ("setup.py", "harmonica", "kernels", "bench", "profiling"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                           if (REPO / name).is_dir() else {}))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                           "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    roots = {"harmonica": "harmonica", "kernels": "harmonica/kernels", "bench": "harmonica/bench",
             "profiling": "harmonica/profiling"}
    expected = {f"{installed}/{path.relative_to(REPO / folder).as_posix()}"
                for folder, installed in roots.items() for path in (REPO / folder).rglob("*.py")
                if (path.parent / "__init__.py").is_file() and "__pycache__" not in path.parts}
    assert "harmonica/families/flux.py" in expected and "harmonica/adapters/basic.py" in expected
    assert sorted(expected - held) == []
    assert any(name.startswith("harmonica/data/") and name.endswith(".safetensors") for name in held)
