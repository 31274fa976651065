"""NVTX ranges of a cached generation, for Nsight Systems / Nsight Compute (torch.cuda.nvtx).

Ranges (push/pop, default domain):
- `step t` around each transformer forward and `<unit> compute` / `<unit> reuse` around each cached unit
  (e.g. `transformer_blocks.3.attn1 reuse`): `ENGINE_RANGES`, the engine's listener (`harmonica.events`)
  while NVTX is on;
- the block's name (`transformer_blocks.i`) around each block, `scheduler step` around the sampler's update and
  `vae decode` around the decode (`PipelineRanges`).

Off by default. On with `HARMONICA_NVTX=1` in the environment when this module is imported, or with
`set_enabled(True)` (needs a CUDA build of torch; on a CPU build it warns and stays off). When off, the
engine has no listener: its only cost is one test per step and unit, no label is formatted, nothing is called.

NVTX calls are host calls: a captured CUDA graph does not repeat them when it replays, and
torch.compile would trace them away. So no range is opened while the current stream is capturing or
while torch.compile traces. With `cuda_graphs=True` the step ranges stay (the transformer's forward
hooks run around each replay) and the replayed steps have no block or unit ranges; only the eager
first run of each schedule row (the graph's warm-up) has them.
"""

import functools
import os
import warnings

import torch

from harmonica import events


def _usable(on) -> bool:
    """`on`, unless this torch has no NVTX (a CPU build): then a warning, and the ranges stay off."""
    if on and not hasattr(torch._C, "_nvtx"):
        warnings.warn("HARMONICA_NVTX: this torch build has no NVTX (a CPU build of torch), so no ranges are "
                      "recorded", stacklevel=3)
        return False
    return bool(on)


ENABLED = False  # set by set_enabled (on at import with HARMONICA_NVTX=1: the end of this module)

SCHEDULER_STEP = "scheduler step"
VAE_DECODE = "vae decode"
GENERATION = "generation"  # the timed generation of the profiling workload


def set_enabled(on: bool) -> None:
    """Switch every harmonica NVTX range on or off (the environment's HARMONICA_NVTX is the default): the flag
    `PipelineRanges` tests, and `ENGINE_RANGES` among the engine's listeners or not."""
    global ENABLED
    ENABLED = _usable(on)
    (events.listen if ENABLED else events.unlisten)(ENGINE_RANGES)


def step_label(step: int) -> str:
    return f"step {step}"


def unit_label(name: str, computes: bool) -> str:
    return f"{name} {'compute' if computes else 'reuse'}"


def _recorded() -> bool:
    """Whether a range opened now would be seen: not while torch.compile traces or a CUDA graph captures."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def open_range(label: str) -> None:
    """Push `label` (callers test `ENABLED` first); skipped where it would not be recorded."""
    if _recorded():
        torch.cuda.nvtx.range_push(label)


def close_range() -> None:
    """Pop the range `open_range` pushed in the same (compile, capture) state."""
    if _recorded():
        torch.cuda.nvtx.range_pop()


def call_in_range(label: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) inside the range `label` (callers test `ENABLED` first)."""
    open_range(label)
    try:
        return fn(*args, **kwargs)
    finally:
        close_range()


class EngineRanges(events.Listener):
    """An engine listener (`harmonica.events`) while NVTX is on: a range per step and per cached unit."""

    def step_started(self, step: int) -> None:
        open_range(step_label(step))

    def step_finished(self) -> None:
        close_range()

    def around_unit(self, name: str, computes: bool, run, *args):
        return call_in_range(unit_label(name, computes), run, *args)


ENGINE_RANGES = EngineRanges()


def _open_block(label: str):
    def hook(module, args):  # a forward pre-hook must return None (else it replaces the inputs)
        if ENABLED:
            open_range(label)

    return hook


def _close_block(module, args, output):
    if ENABLED:
        close_range()


def _ranged(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return call_in_range(label, fn, *args, **kwargs) if ENABLED else fn(*args, **kwargs)

    return wrapper


class PipelineRanges:
    """Block, scheduler-step and VAE-decode ranges of a diffusers pipeline, or block and sampler-step
    ranges of a transformer alone (flow models' `flow_sample`); the step and unit ranges come from the
    cache engine. Forward hooks on each transformer block (of `transformer_2` too where there is one);
    `pipe.vae.decode`, the sampler steps of
    `samplers.sample` (the table samplers' `harmonica.samplers.solver_step`, eager steps only, and
    `samplers.SchedulerSteps.step`) and `pipe.scheduler.step` (the pipeline's own loop) wrapped.
    Each costs one flag test while NVTX is off. `remove()` (or leaving a `with` block) undoes it all.

    Set the pipeline's scheduler before (a scheduler set later replaces the wrapped one).
    """

    def __init__(self, pipe):
        from harmonica import samplers
        from harmonica.adapters import blocks_of

        self._hooks = []
        # a pipeline (Wan 2.2 A14B's: its transformer_2 too), or a transformer alone
        transformers = [getattr(pipe, "transformer", pipe), getattr(pipe, "transformer_2", None)]
        for block in (block for transformer in transformers if transformer is not None
                      for block in blocks_of(transformer)):
            self._hooks.append(block.module.register_forward_pre_hook(_open_block(block.name)))
            self._hooks.append(block.module.register_forward_hook(_close_block))
        self._wrapped = []  # (object, attribute, its own value before or None)
        for part, method, label in (("scheduler", "step", SCHEDULER_STEP), ("vae", "decode", VAE_DECODE)):
            if getattr(pipe, part, None) is not None:
                self._wrap(getattr(pipe, part), method, label)
        self._wrap(samplers, "solver_step", SCHEDULER_STEP)
        self._wrap(samplers.SchedulerSteps, "step", SCHEDULER_STEP)

    def _wrap(self, owner, name: str, label: str) -> None:
        self._wrapped.append((owner, name, vars(owner).get(name)))
        setattr(owner, name, _ranged(getattr(owner, name), label))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for owner, name, own in reversed(self._wrapped):
            if own is None:
                delattr(owner, name)  # back to the class's attribute
            else:
                setattr(owner, name, own)
        self._hooks, self._wrapped = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


if os.environ.get("HARMONICA_NVTX", "0") not in ("", "0"):
    set_enabled(True)


def main(argv=None) -> None:
    """`python -m harmonica.profiling.nvtx SCRIPT [ARGS...]`: run SCRIPT as `__main__` (its sys.argv: SCRIPT,
    ARGS) with the ranges on, without the script importing this module (core never imports it)."""
    import runpy
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m harmonica.profiling.nvtx SCRIPT [ARGS...]")
    from harmonica.profiling import nvtx  # the module's canonical copy, not this __main__ one
    nvtx.set_enabled(True)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
