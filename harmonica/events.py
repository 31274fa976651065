"""The cache engine's steps and units, told to listeners: how a tool built on harmonica observes a generation
without the engine importing it (`harmonica.profiling.nvtx` opens its NVTX ranges this way, `graphs.CollectiveLog`
names the unit that issues each collective).

`listeners` is empty until a tool calls `listen`; while it is, the engine's only cost is one test of it per
transformer forward and per cached unit. A listener is a `Listener` (each method's default does nothing):
- `step_started(step)` before the transformer forward of step `step`, `step_finished()` after it;
- `around_unit(name, computes, run, *args)` returns `run(*args)`, the residual update of the cached unit `name`
  (`transformer_blocks.3.attn1`), which computes its output (computes True) or reuses its slot (False).
Listeners are told in the order they listened; the first one's `around_unit` is the outermost.
"""

import functools

listeners = ()  # the listening `Listener`s, in the order they called `listen`


class Listener:
    """What the engine tells a listener; subclasses override what they observe."""

    def step_started(self, step: int) -> None:
        pass

    def step_finished(self) -> None:
        pass

    def around_unit(self, name: str, computes: bool, run, *args):
        return run(*args)


def listen(listener: Listener) -> None:
    """Add `listener` (once: a listener already listening stays where it is)."""
    global listeners
    if listener not in listeners:
        listeners = (*listeners, listener)


def unlisten(listener: Listener) -> None:
    """Remove `listener` (a no-op when it is not listening)."""
    global listeners
    listeners = tuple(other for other in listeners if other is not listener)


def step_started(step: int) -> None:
    for listener in listeners:
        listener.step_started(step)


def step_finished() -> None:
    for listener in reversed(listeners):
        listener.step_finished()


def around_unit(name: str, computes: bool, run, *args):
    """`run(*args)` inside every listener's `around_unit`, the first listener's outermost."""
    for listener in reversed(listeners):
        run = functools.partial(listener.around_unit, name, computes, run)
    return run(*args)
