"""harmonica: learned feature caching (HarmoniCa) for diffusion transformers, with Triton kernels.

    import harmonica
    harmonica.enable(pipe, harmonica.Router.from_pretrained("router/"))   # or a CacheSchedule
    image = pipe(...).images[0]
    print(harmonica.summary(pipe))
"""

from .api import disable, enable, reset, summary
from .engine import CacheEngine
from .router import Router, RouterInfo
from .schedule import CacheSchedule

__version__ = "0.1.0"
__all__ = ["CacheEngine", "CacheSchedule", "Router", "RouterInfo", "disable", "enable", "reset", "summary"]
