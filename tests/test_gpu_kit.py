"""bench/gpu/kit.py (make gpu-kit): the closure of what the project needs and the lent image lacks, read from each
downloaded wheel's METADATA with the image's markers (CPython 3.12, Linux x86-64), pinned where the constraints
pin; the image's packages are never replaced; stale wheels go. Downloads are stand-ins (no network)."""

import importlib.util
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_kit", REPO / "bench" / "gpu" / "kit.py")
kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kit)

METADATA = {  # what the stand-in index serves: name -> Requires-Dist lines
    "diffusers": ["importlib_metadata", "huggingface-hub<3.0,>=1.32.0", "numpy", 'torch>=2; extra == "torch"'],
    "importlib_metadata": ["zipp>=3.20", 'lazy-importer>=0.1; python_version < "3.15"',
                           'tomli; python_version < "3.11"', 'pytest; extra == "test"'],
    "lazy_importer": [],
}


def stand_in_download(requested: list):
    def download(requirement: str, dest: Path) -> Path:
        requested.append(requirement)
        name = requirement.split("=")[0].split("<")[0].split(">")[0].replace("-", "_")
        wheel = dest / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            lines = "".join(f"Requires-Dist: {line}\n" for line in METADATA[name])
            archive.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\n{lines}")
        return wheel
    return download


def test_the_kit_is_what_the_image_lacks_and_nothing_else(tmp_path):
    stale = tmp_path / "diffusers-0.1-py3-none-any.whl"
    stale.write_bytes(b"")
    requested = []
    wheels = kit.build_kit(tmp_path, {"diffusers": "0.42.1"}, kit.image_packages(), stand_in_download(requested))
    assert requested == ["diffusers==0.42.1", "importlib_metadata", "lazy-importer>=0.1"]
    assert [w.name.split("-")[0] for w in wheels] == ["diffusers", "importlib_metadata", "lazy_importer"]
    assert not stale.exists() and sorted(tmp_path.glob("*.whl")) == wheels
    assert (tmp_path / "kit.txt").read_text().splitlines()[0].startswith("diffusers-1.0-py3-none-any.whl ")


def test_an_image_package_too_old_is_an_error_not_a_replacement(tmp_path):
    image = {**kit.image_packages(), "huggingface-hub": "1.0.0"}
    with pytest.raises(SystemExit, match="the image holds huggingface-hub 1.0.0, which does not satisfy"):
        kit.build_kit(tmp_path, {}, image, stand_in_download([]))


def test_the_image_list_holds_what_the_set_up_relies_on():
    image = kit.image_packages()
    assert {"torch", "triton", "transformers", "pytest", "setuptools", "wheel", "pip", "numpy"} <= set(image)
    assert "diffusers" not in image and image["torch"] == "2.11.0"
