"""The cache engine's steps and units, told to listeners: how a tool built on harmonica observes a generation
without the engine importing it (`harmonica.profiling.nvtx` opens its NVTX ranges this way, `graphs.CollectiveLog`
learns which unit issued a collective).

A listener has three methods:
- `step_started(step)` before the transformer forward of step `step`, `step_finished()` after it;
- `around_unit(name, computes, run, *args)` returns `run(*args)`, the residual update of the cached unit `name`
  (`transformer_blocks.3.attn1`), which computes its output (computes True) or reuses its slot (False).

`listen` adds one, `unlisten` removes it. The engine tells `listener`: None while there are none (its only cost is
then one test per transformer forward and per cached unit), the listener itself while there is one, and a
`Listeners` that tells each in the order they came (the first one's `around_unit` outermost) while there are more.
"""

listener = None
_listening = []  # in the order they came


class Listeners:
    """Several listeners as one."""

    def __init__(self, listeners: list):
        self.listeners = tuple(listeners)

    def step_started(self, step: int) -> None:
        for each in self.listeners:
            each.step_started(step)

    def step_finished(self) -> None:
        for each in reversed(self.listeners):
            each.step_finished()

    def around_unit(self, name: str, computes: bool, run, *args):
        for each in reversed(self.listeners):
            run = _wrapped(each, name, computes, run)
        return run(*args)


def _wrapped(each, name, computes, run):
    return lambda *args: each.around_unit(name, computes, run, *args)


def _update() -> None:
    global listener
    listener = None if not _listening else _listening[0] if len(_listening) == 1 else Listeners(_listening)


def listen(new_listener) -> None:
    """Add `new_listener` (once: a second call with it changes nothing)."""
    if not any(each is new_listener for each in _listening):
        _listening.append(new_listener)
        _update()


def unlisten(old_listener) -> None:
    """Remove `old_listener` (nothing when it is not listening)."""
    _listening[:] = [each for each in _listening if each is not old_listener]
    _update()
