"""The cache engine's steps and units, told to a listener: how a tool built on harmonica observes a generation
without the engine importing it (`harmonica.profiling.nvtx` opens its NVTX ranges this way).

`listener` is None until a tool calls `listen`; while it is None the engine's only cost is one test of it per
transformer forward and per cached unit. One listener at a time, with three methods:
- `step_started(step)` before the transformer forward of step `step`, `step_finished()` after it;
- `around_unit(name, computes, run, *args)` returns `run(*args)`, the residual update of the cached unit `name`
  (`transformer_blocks.3.attn1`), which computes its output (computes True) or reuses its slot (False).
"""

listener = None


def listen(new_listener) -> None:
    """Make `new_listener` the engine's listener, replacing the one before; None: no listener."""
    global listener
    listener = new_listener
