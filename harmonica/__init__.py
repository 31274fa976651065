"""harmonica: learned feature caching (HarmoniCa) for diffusion transformers, with Triton kernels."""

__version__ = "0.1.0"
