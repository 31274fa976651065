"""Fused Triton kernels of the cache path, each with its torch reference (`<op>_ref`)."""

from .cache_copy import CacheCopyPlan, cache_copy, cache_copy_ref
from .gated_residual import (
    gated_residual,
    gated_residual_compute,
    gated_residual_compute_ref,
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
    "guided_eps", "solver_step", "solver_step_ref",
]
