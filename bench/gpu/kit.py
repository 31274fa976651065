"""make gpu-kit: download the wheels the lent GPU image lacks, for its CPython 3.12 on manylinux x86-64.

The image (bench/gpu/image-packages.txt) has no network, so whatever the project needs and the image does not
hold travels with the device tool's `carry` as wheels. Starting from the project's requirements (install_requires
and the `test` and `bench` extras), every requirement the image lacks is downloaded without its
dependencies, then the same for the requirements in each downloaded wheel's METADATA (markers evaluated
for the image), until none is missing. Versions: the constraints file's pin where it has one, else the
newest that matches. A requirement the image holds at a known version that does not satisfy it is an
error: the image's own packages are not replaced. Wheels in the folder that are not part of the kit are
removed (two versions of one package stop an offline install); kit.txt lists the kit.

    python bench/gpu/kit.py --dest .gpu-kit [--constraints constraints-py3.11.txt]
"""

import argparse
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import requires
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from harmonica.files import write_file

IMAGE_PACKAGES = Path(__file__).with_name("image-packages.txt")
PROJECT = "harmonica-dit"
EXTRAS = ("test", "bench")  # what bench/gpu/check.sh runs: the tests and the bench
PYTHON = "3.12"
ABI = "cp312"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# the image's interpreter, for the requirements' markers
IMAGE_ENVIRONMENT = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                     "implementation_name": "cpython", "platform_python_implementation": "CPython",
                     "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                     "os_name": "posix", "extra": ""}


def read_pins(path: Path | None) -> dict[str, str]:
    """`name==version` lines of a constraints file, by canonical name."""
    if path is None:
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def image_packages(path: Path = IMAGE_PACKAGES) -> dict[str, str | None]:
    """The image's packages: canonical name -> version, None where no version was read."""
    packages = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = version or None
    return packages


def applies(requirement: Requirement, extras: tuple[str, ...] = ("",)) -> bool:
    """Whether the requirement holds on the image for one of `extras` ("" for none)."""
    return requirement.marker is None or any(
        requirement.marker.evaluate({**IMAGE_ENVIRONMENT, "extra": extra}) for extra in extras)


def project_requirements() -> list[Requirement]:
    """install_requires and the EXTRAS of the installed project."""
    return [r for r in map(Requirement, requires(PROJECT) or []) if applies(r, ("", *EXTRAS))]


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The Requires-Dist of a wheel that hold on the image without extras."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        metadata = Parser().parsestr(archive.read(name).decode())
    return [r for r in map(Requirement, metadata.get_all("Requires-Dist") or []) if applies(r)]


def check_image_version(requirement: Requirement, version: str | None) -> None:
    if version is not None and not requirement.specifier.contains(version, prereleases=True):
        raise SystemExit(f"gpu-kit: the image holds {requirement.name} {version}, which does not satisfy "
                         f"{requirement}; the kit does not replace the image's packages")


def pip_download(requirement: str, dest: Path) -> Path:
    """One wheel for the image, without its dependencies; returns its path."""
    before = set(dest.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               PYTHON, "--implementation", "cp", "--abi", ABI, "--abi", "abi3", "--abi", "none",
               *[arg for platform in PLATFORMS for arg in ("--platform", platform)], "-q", "-d", str(dest),
               requirement]
    subprocess.run(command, check=True)
    name = canonicalize_name(Requirement(requirement).name)
    found = [w for w in dest.glob("*.whl") if parse_wheel_filename(w.name)[0] == name]
    new = [w for w in found if w not in before] or found
    return max(new, key=lambda w: w.stat().st_mtime)


def build_kit(dest: Path, pins: dict[str, str], image: dict[str, str | None], download=pip_download) -> list[Path]:
    """Downloads the closure of what the project needs and the image lacks into dest; returns the wheels."""
    dest.mkdir(parents=True, exist_ok=True)
    kit: dict[str, Path] = {}
    queue = project_requirements()
    while queue:
        requirement = queue.pop(0)
        name = canonicalize_name(requirement.name)
        if name in image:
            check_image_version(requirement, image[name])
            continue
        if name in kit:
            continue
        pinned = f"{requirement.name}=={pins[name]}" if name in pins else f"{requirement.name}{requirement.specifier}"
        kit[name] = download(pinned, dest)
        queue += wheel_requirements(kit[name])
    for wheel in dest.glob("*.whl"):
        if wheel not in kit.values():
            wheel.unlink()
    wheels = sorted(kit.values())
    write_file(dest / "kit.txt", "".join(f"{w.name} {w.stat().st_size}\n" for w in wheels))
    return wheels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path(".gpu-kit"))
    parser.add_argument("--constraints", type=Path, help="pins (name==version lines) for the kit's versions")
    args = parser.parse_args(argv)
    wheels = build_kit(args.dest, read_pins(args.constraints), image_packages())
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"gpu-kit: {len(wheels)} wheels, {size:.1f} MiB in {args.dest}: " + ", ".join(w.name for w in wheels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
