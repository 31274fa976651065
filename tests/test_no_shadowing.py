"""The clone's top-level `kernels/` is `harmonica.kernels` only: run from the clone's root (which
`python -m ...` and `python -c ...` put first on sys.path), `import kernels` must still reach the
installed package of that name (Hugging Face's, which transformers imports), or nothing."""

import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(code: str, *, pythonpath: Path | None = None, flag: str = "-c") -> str:
    """Runs `python <flag> <code>` with the clone's root as the working directory; returns stdout."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, flag, code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def installed_kernels(tmp_path):
    """A stand-in for Hugging Face's `kernels` in a site folder after the root on sys.path, with a
    submodule and the name transformers imports from it."""
    package = tmp_path / "kernels"
    package.mkdir()
    (package / "__init__.py").write_text("CUDAProperties = 'installed'\n")
    (package / "layer.py").write_text("WHERE = 'installed layer'\n")
    return tmp_path


@pytest.mark.parametrize("root_entry", ["''", "os.getcwd()"], ids=["python-c", "python-m"])
def test_an_installed_kernels_package_wins_over_the_clone_root(installed_kernels, root_entry):
    # python -c puts '' first on sys.path, python -m the working directory itself
    out = run_from_root(
        f"import os, sys; sys.path.insert(0, {root_entry}); "
        "from kernels import CUDAProperties; import kernels.layer, harmonica.kernels; "
        "print(CUDAProperties, kernels.layer.WHERE, kernels.__file__, harmonica.kernels.solver_step.__module__, "
        "sep='|')",
        pythonpath=installed_kernels)
    assert out.split("|") == ["installed", "installed layer", str(installed_kernels / "kernels" / "__init__.py"),
                              "harmonica.kernels.solver_step"]


def test_harmonica_kernels_imported_first_leaves_the_installed_package_alone(installed_kernels):
    out = run_from_root("import sys, harmonica.kernels, kernels; print(kernels.CUDAProperties, "
                        "harmonica.kernels.__name__, 'kernels.solver_step' in sys.modules)",
                        pythonpath=installed_kernels)
    assert out == "installed harmonica.kernels False"


def test_without_an_installed_kernels_package_the_folder_reads_as_not_installed():
    """What transformers reads after `find_spec("kernels")` (which finds the folder whatever it holds):
    no version and no file, as for a PEP 420 namespace folder; no submodule; no attribute."""
    # -S: no site-packages, so no `kernels` but the clone's folder
    out = run_from_root("import sys; sys.path.insert(0, '')\n"
                        "import kernels\n"
                        "print(getattr(kernels, '__version__', 'N/A'), kernels.__file__)\n"
                        "try:\n    import kernels.layer\nexcept ModuleNotFoundError as error:\n    print(error.name)\n"
                        "try:\n    kernels.get_kernel\nexcept AttributeError as error:\n    print(error)",
                        flag="-Sc")
    assert out.splitlines() == [
        "N/A None", "kernels.layer",
        "module 'kernels' has no attribute 'get_kernel': Hugging Face's kernels package is not installed "
        "(this is harmonica's kernels/ folder, importable as harmonica.kernels)"]


def test_transformers_imports_from_the_root_without_hugging_faces_kernels(tmp_path):
    """The bug the first GPU run met (its image has transformers without `kernels`): transformers
    finds the folder, imports it for a version, and must read it as not installed."""
    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / "transformers").is_dir():
        pytest.skip("transformers is not installed in this interpreter's site-packages")
    bare = tmp_path / "site"
    bare.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith("kernels"):
            (bare / entry.name).symlink_to(entry)
    out = run_from_root(f"import os, sys; sys.path[:0] = [os.getcwd(), {str(bare)!r}]\n"
                        "from transformers.utils.import_utils import is_kernels_available\n"
                        "import transformers.modeling_utils\n"
                        "print(is_kernels_available())", flag="-Sc")
    assert out == "False"


def test_transformers_reaches_hugging_faces_kernels_from_the_root():
    """The path of the bug: transformers' hub-kernels integration imports Hugging Face's `kernels`
    by name (skipped where that package is not installed)."""
    try:
        version("kernels")
    except PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    out = run_from_root("import transformers.integrations.hub_kernels; from kernels import CUDAProperties; "
                        "import kernels; print(kernels.__file__)")
    assert Path(out).parent.parent.name == "site-packages", out
