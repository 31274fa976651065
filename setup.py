from setuptools import find_packages, setup

# One import root, `harmonica`. The folders kernels/, bench/ and profiling/ install as
# harmonica.kernels, harmonica.bench and harmonica.profiling: a top-level module named `kernels`
# would collide with the `kernels` package that diffusers and transformers import.
PACKAGE_DIRS = {
    "harmonica": "harmonica",
    "harmonica.kernels": "kernels",
    "harmonica.bench": "bench",
    "harmonica.profiling": "profiling",
}
# with their subpackages (harmonica.adapters, harmonica.families, ...), which a wheel holds only when listed
PACKAGES = [f"{name}.{sub}" if sub else name for name, folder in PACKAGE_DIRS.items()
            for sub in ["", *find_packages(folder)]]

setup(
    name="harmonica-dit",
    version="0.1.0",
    description="Learned feature caching (HarmoniCa) for diffusion transformers, with fused Triton kernels",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIRS,
    package_data={"harmonica": ["data/*.safetensors"]},
    # triton is not required: CUDA builds of torch pin their own; the `test` extra brings it for the
    # CPU interpreter.
    # transformers: the PixArt pipelines import it (T5)
    install_requires=["torch>=2.4", "diffusers", "transformers", "numpy", "safetensors", "nvidia-ml-py", "tqdm"],
    entry_points={"console_scripts": ["harmonica=harmonica.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-benchmark", "triton", "hypothesis"],
        "xformers": ["xformers"],
        "dev": ["ruff"],
        "proof": ["scikit-learn"],  # only to refit the committed digits model: python -m harmonica.digits
        "bench": ["matplotlib"],  # the speedup plot of harmonica bench
        "peers": ["cache-dit"],  # cache-dit's DBCache rows of harmonica bench (skipped without it)
    },
)
