"""Fused Triton kernels of the cache path, each with its torch reference (`<op>_ref`).

This folder is the package `harmonica.kernels` (setup.py's package_dir). Where the clone's root is on
sys.path (`python -m ...` or `python -c ...` run there), `import kernels` finds it first; under that
name it steps aside for the next `kernels` on sys.path (Hugging Face's, which transformers imports),
or, with none installed, stays an empty module with neither a file nor a version, as a PEP 420
namespace folder would be: `importlib.util.find_spec("kernels")` finds this folder whatever it holds,
and transformers then imports the name and reads that pair as "not installed" (raising
ModuleNotFoundError here broke `import transformers.modeling_utils` from the root)."""

if __name__ != "harmonica.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _path = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        __file__ = None
        __path__ = []  # no submodule is found through this name

        def __getattr__(name):
            raise AttributeError(f"module 'kernels' has no attribute {name!r}: Hugging Face's kernels package "
                                 "is not installed (this is harmonica's kernels/ folder, importable as "
                                 "harmonica.kernels)")
    else:
        # the import statement returns what sys.modules holds once this file has run
        sys.modules[__name__] = _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
else:
    from .cache_copy import CacheCopyPlan, cache_copy, cache_copy_ref
    from .gated_residual import (
        gated_residual,
        gated_residual_compute,
        gated_residual_compute_ref,
        gated_residual_forecast,
        gated_residual_forecast_ref,
        gated_residual_ref,
        gated_residual_reuse,
        gated_residual_reuse_ref,
    )
    from .solver_step import guided_eps, solver_step, solver_step_ref

    __all__ = [
        "CacheCopyPlan", "cache_copy", "cache_copy_ref",
        "gated_residual", "gated_residual_ref",
        "gated_residual_compute", "gated_residual_compute_ref",
        "gated_residual_reuse", "gated_residual_reuse_ref",
        "gated_residual_forecast", "gated_residual_forecast_ref",
        "guided_eps", "solver_step", "solver_step_ref",
    ]
