"""bench/gpu/check.sh's set-up on a simulated device image, offline: a venv whose site holds what the image holds
(bench/gpu/image-packages.txt: torch, triton, transformers, pytest, setuptools..., here the current environment's
copies, linked, not installed) and not diffusers; the set-up installs the kit of `make gpu-kit` and the project with
PIP_NO_INDEX=1. Skipped without a kit, or when a wheel of the CPython 3.12 kit cannot install on this Python."""

import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / ".gpu-kit"
PROJECT_FILES = ["setup.py", "pytest.ini", "harmonica", "kernels", "bench", "profiling", "tests"]


def image_names() -> set[str]:
    lines = (REPO / "bench" / "gpu" / "image-packages.txt").read_text().splitlines()
    return {canonicalize_name(line.split("==")[0]) for line in lines if line and not line.startswith("#")}


def image_distributions() -> dict:
    """This environment's distributions the image holds, with everything they require here (so the simulation
    imports with this environment's versions); never the project, never what the image lacks at the top."""
    here = {canonicalize_name(d.metadata["Name"]): d for d in distributions()}
    chosen, queue = {}, [name for name in image_names() if name in here]
    while queue:
        name = queue.pop()
        if name in chosen or name not in here or name == "harmonica-dit":
            continue
        chosen[name] = here[name]
        for requirement in map(Requirement, here[name].requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(canonicalize_name(requirement.name))
    return chosen


def link_site(site: Path) -> None:
    """A folder of links to the top-level files and folders of the image's distributions."""
    site.mkdir()
    for dist in image_distributions().values():
        for top in {file.parts[0] for file in dist.files or [] if file.parts[0] != ".."}:
            target = Path(dist.locate_file(top))
            if target.exists() and not (site / top).exists():
                (site / top).symlink_to(target)


@pytest.fixture(scope="module")
def kit():
    wheels = sorted(KIT.glob("*.whl"))
    if not wheels:
        pytest.skip(f"no kit in {KIT}: make gpu-kit (needs the network)")
    tags = set(sys_tags())
    foreign = [w.name for w in wheels if not parse_wheel_filename(w.name)[3] & tags]
    if foreign:
        pytest.skip(f"the CPython 3.12 kit cannot be simulated on Python {sys.version.split()[0]}: {foreign}")
    return wheels


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(python, environment) of the simulated image: a venv made as the image's, site linked from this one."""
    root = tmp_path_factory.mktemp("image")
    link_site(root / "image-site")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "image.pth").write_text(f"import site; site.addsitedir({str(root / 'image-site')!r})\n")
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(root), "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TRITON_INTERPRET": "1"}
    return python, env


def run(command, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_setup_installs_offline_on_the_simulated_image(kit, image, tmp_path):
    python, env = image
    before = run([python, "-c", "import torch, triton, pytest\nimport diffusers"], tmp_path, env)
    assert "No module named 'diffusers'" in before.stderr  # the image as described: torch, no diffusers
    for name in PROJECT_FILES:  # a copy: the set-up writes its egg-info beside setup.py
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, tmp_path / name)
    done = run(["bash", "bench/gpu/check.sh", "setup"], tmp_path, {**env, "PY": str(python), "GPU_KIT": str(KIT)})
    assert done.returncode == 0, done.stdout + done.stderr
    diffusers = next(parse_wheel_filename(w.name)[1] for w in kit if w.name.startswith("diffusers-"))
    assert re.search(rf"torch {re.escape(version('torch'))} .* diffusers {diffusers} ", done.stdout), done.stdout
    where = run([python, "-c", "import harmonica.kernels, diffusers; print(harmonica.kernels.__file__); "
                 "print(diffusers.__file__)"], REPO.parent, env)
    assert where.returncode == 0, where.stderr
    kernels, diffusers_file = where.stdout.split()
    assert kernels == str(tmp_path / "kernels" / "__init__.py")  # the project, editable
    assert diffusers_file.startswith(f"{python.parent.parent}/")  # the kit, in the image's venv
    again = run(["bash", "bench/gpu/check.sh", "setup"], tmp_path, {**env, "PY": str(python), "GPU_KIT": str(KIT)})
    assert again.returncode == 0 and "set-up: already done" in again.stdout
    # the gpu-tests stage collects on the image (a module importing what the image lacks stops the whole run)
    collected = run([python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                    tmp_path, env)
    assert collected.returncode == 0 and re.search(r"\d+/\d+ tests collected", collected.stdout), collected.stdout
