"""Public API: `enable`, `disable`, `reset`, `summary` on a diffusers pipeline or transformer."""

import functools
import warnings
from dataclasses import dataclass

from . import parallel
from .adapters import block_lists, supported
from .engine import CacheEngine
from .families import FAMILIES
from .forecast import Forecast
from .graphs import GraphRunner
from .router import Router, RouterInfo, check_tau
from .schedule import CacheSchedule

ATTRIBUTE = "_harmonica"


@dataclass
class Attachment:
    """What `enable` attached to one transformer (its `_harmonica` attribute), recorded as it attaches; `detach`
    undoes exactly that: the engine (its block forwards, hooks and adapters), the graph runner it made the
    transformer's forward, the hook on the scheduler's set_timesteps, the attribute."""

    engine: CacheEngine
    router: Router | None
    group: tuple = ()  # the transformers enabled together (a pipeline's experts, this one first); disabled together
    sampler: str = ""  # the sampler of the latest generation
    graphs: GraphRunner | None = None  # the graph runner it made the transformer's forward (cuda_graphs)
    replaced_forward: object = None  # the transformer's own forward attribute the runner replaced (None: the class's)
    scheduler: object | None = None  # the pipeline's scheduler whose set_timesteps it hooked (starts generations)
    hook: object = None  # the set_timesteps it set on the scheduler
    replaced_set_timesteps: object = None  # the scheduler's own set_timesteps attribute it replaced (None: the class's)

    def detach(self) -> None:
        """Undo what was attached; an attribute since replaced by someone else stays theirs."""
        transformer = self.engine.transformer
        if self.scheduler is not None:
            _restore(self.scheduler, "set_timesteps", self.hook, self.replaced_set_timesteps)
        if self.graphs is not None:  # before the engine's teardown, which may restore the forward the runner wrapped
            with parallel.lifted_hooks(transformer):  # diffusers' hooks (context parallelism) stay
                _restore(transformer, "forward", self.graphs, self.replaced_forward)
        self.engine.remove()
        if vars(transformer).get(ATTRIBUTE) is self:
            delattr(transformer, ATTRIBUTE)


def _restore(owner, name: str, ours, replaced) -> None:
    """`owner.name` back to the instance attribute `replaced` (None: delete, the class's shows again), where it is
    still `ours`."""
    if vars(owner).get(name) is not ours:
        return
    if replaced is None:
        delattr(owner, name)
    else:
        setattr(owner, name, replaced)


def _parts(pipe_or_transformer):
    """(the transformer, the pipeline's scheduler or None) of a pipeline, a transformer, or a list of transformers
    that take turns by step (the first; no scheduler)."""
    group = pipe_or_transformer if isinstance(pipe_or_transformer, (list, tuple)) else [pipe_or_transformer]
    for part in group or [None]:
        transformer = getattr(part, "transformer", part)
        if not (hasattr(transformer, "named_children") and block_lists(transformer)):
            raise ValueError(f"pipe_or_transformer: expected a diffusers pipeline, transformer or list of transformers "
                             f"with blocks of {', '.join(supported())}, got "
                             f"{'an empty list' if part is None else type(part).__name__}")
    first = group[0]
    return getattr(first, "transformer", first), getattr(pipe_or_transformer, "scheduler", None)


def _experts(pipe_or_transformer) -> list:
    """[(transformer, serves)]: a pipeline's transformers that take turns by step (its family's `experts`, e.g. Wan
    2.2's two), serves(t) whether one runs the step of timestep t; else [(transformer, None)], which runs every
    step."""
    if isinstance(pipe_or_transformer, (list, tuple)):  # a task's experts: `samplers.sample` begins each
        return [(transformer, None) for transformer in pipe_or_transformer]
    transformer, scheduler = _parts(pipe_or_transformer)
    family = FAMILIES.get(type(transformer).__name__)
    if scheduler is None or family is None or family.experts is None:
        return [(transformer, None)]
    return family.experts(pipe_or_transformer)


def _first_step(serves, timesteps: list) -> int:
    """The first of the steps an expert serves (0 for one that serves every step, or none); a ValueError unless
    they are consecutive (its step counter runs them in a row)."""
    steps = [i for i, t in enumerate(timesteps) if serves is None or serves(float(t))]
    if not steps:
        return 0
    if steps != list(range(steps[0], steps[-1] + 1)):
        raise ValueError(f"timesteps: expected each transformer to run consecutive steps, got steps {steps}")
    return steps[0]


def _state(pipe_or_transformer) -> Attachment:
    transformer, _ = _parts(pipe_or_transformer)
    state = getattr(transformer, ATTRIBUTE, None)
    if state is None:
        raise ValueError("pipe_or_transformer: expected one with harmonica enabled, got one without "
                         "(call harmonica.enable first)")
    return state


def _inductor_graphs(options: dict) -> bool:
    """Whether torch.compile arguments make inductor capture CUDA graphs itself (modes reduce-overhead and
    max-autotune, or its triton.cudagraphs option)."""
    return (options.get("mode") in ("reduce-overhead", "max-autotune")
            or bool((options.get("options") or {}).get("triton.cudagraphs")))


def enable(pipe_or_transformer, router_or_schedule, tau: float | None = None, *,
           cross_attention: bool = True, cuda_graphs: bool = False, scheduler_in_graph: bool = False,
           fused: bool = True, compile: bool | dict = False, forecast: Forecast | bool | None = None) -> CacheEngine:
    """Cache the units of a DiT/PixArt pipeline (or bare transformer) with a router or schedule.

    router_or_schedule: a trained `Router` (checked against the model, and at each generation against
    the sampler and timesteps) or a `CacheSchedule`.
    tau: router threshold in (0, 1) (else ValueError, as the command line's --tau); default the router's
    training tau (method.md: they should match; another one warns).
    cross_attention: whether PixArt's cross-attention is a unit of its own.
    cuda_graphs: run each distinct schedule row as one captured CUDA graph (see `graphs.py`); on the
    CPU it does nothing and says so once. Opt-in until it has been validated on a GPU.
    scheduler_in_graph: with cuda_graphs, the samplers that can (`dit_ddim_sample`, `pixart_sample`) run
    their step (guidance and solver update) inside each graph instead of after it.
    fused: the fused Triton ops on CUDA; False runs their torch references (the eager baseline).
    compile: `torch.compile` each unit kind's computation (LayerNorm, shift/scale, attention/MLP) with
    fullgraph=True, shared by all blocks: one compile per unit kind and input shape, whatever the steps or
    schedule rows (the cache decisions run eagerly); a dict is passed to torch.compile (backend, mode); with
    cuda_graphs, a mode or option under which inductor makes CUDA graphs itself (reduce-overhead) is refused.
    forecast: a reused unit adds `a * newest + b * older` of its last two computed outputs instead of the newest
    (forecast.py; two slots per unit, the fused reuse still one kernel): None (default) applies the router's
    forecast when it has one, False turns it off, a `Forecast` fitted along the schedule applies that one.
    A pipeline's `scheduler.set_timesteps` starts each generation. A bare transformer has no scheduler to
    hook: `reset`, `samplers.dit_ddim_sample` or `samplers.pixart_sample` start its generations; else only
    the schedule's step count delimits them, which warns once. Driven by a sampler of another step count,
    it raises where the timesteps are host values (numbers, CPU tensors); device tensors are never read,
    so on a GPU that goes undetected: pass the pipeline (e.g. `enable(pipe, ...)`, not `pipe.transformer`).
    A pipeline that runs classifier-free guidance as two passes (Wan, Qwen-Image: diffusers'
    `cache_context("cond")`/`("uncond")`) gets one slot set and step counter per pass (not with
    cuda_graphs); SD3.5's skip_guidance_layers is refused.
    A pipeline that switches transformers by step (Wan 2.2 A14B's high- and low-noise experts, `Family.experts`)
    gets one engine per transformer on the one schedule of the generation's steps: each runs the rows of the steps
    it serves (its step counter begins at its first step), the first of which must compute every unit (no slot
    holds another transformer's outputs; else set_timesteps raises). The returned engine is `pipe.transformer`'s;
    `disable` undoes all. Outside a pipeline, pass such transformers as a list (a task's experts, `Task.experts`):
    the same engines, each begun at its first step by `samplers.sample`.
    Under diffusers' context parallelism (`transformer.enable_parallelism`, before or after this call; FLUX, Wan,
    Qwen-Image) each rank's slots hold its shard of the tokens, and the schedule is checked equal on every rank of
    the group (see parallel.py); with cuda_graphs each rank captures its graphs, the collectives of each checked
    alike on every rank (graphs.py).
    """
    transformer, scheduler = _parts(pipe_or_transformer)
    if scheduler_in_graph and not cuda_graphs:
        raise ValueError("scheduler_in_graph: expected together with cuda_graphs=True, got cuda_graphs=False")
    if cuda_graphs and isinstance(compile, dict) and _inductor_graphs(compile):
        raise ValueError(f"compile: {compile} makes CUDA graphs of its own, which cannot be captured inside those of "
                         "cuda_graphs=True; use mode 'default' or 'max-autotune-no-cudagraphs', or drop cuda_graphs")
    if forecast is not None and forecast is not False and not isinstance(forecast, Forecast):
        raise ValueError(f"forecast: expected a Forecast, None or False, got {type(forecast).__name__}")
    router = router_or_schedule if isinstance(router_or_schedule, Router) else None
    if tau is not None:
        check_tau(tau)
        if router is None:
            raise ValueError(f"tau: expected only with a Router (it thresholds the router's gates), got tau={tau} "
                             f"with a {type(router_or_schedule).__name__}")
    experts = _experts(pipe_or_transformer)
    for expert, _ in experts:
        if getattr(expert, ATTRIBUTE, None) is not None:
            disable(expert)
    if router is not None:
        router.check(RouterInfo.for_model(transformer, cross_attention=cross_attention))
        if tau is not None and tau != router.info.tau:
            warnings.warn(f"tau: {tau} differs from the router's training tau {router.info.tau}", stacklevel=2)
        schedule = router.schedule(tau)
    elif isinstance(router_or_schedule, CacheSchedule):
        schedule = router_or_schedule
    else:
        raise ValueError(f"router_or_schedule: expected a Router or CacheSchedule, "
                         f"got {type(router_or_schedule).__name__}")
    if forecast is None:
        forecast = router.forecast if router is not None else None
    elif forecast is False:
        forecast = None
    if forecast is not None:
        source = "the router's forecast" if router is not None and forecast is router.forecast else "forecast"
        try:
            forecast.check(schedule, source)
        except ValueError as error:
            hint = f" (tau {tau} gives another schedule than its training tau); pass forecast=False" if tau else ""
            raise ValueError(f"{error}{hint}") from None
    if forecast is not None and len(experts) > 1:
        raise ValueError(f"forecast: expected none for a pipeline of {len(experts)} transformers that take turns by "
                         f"step (a reused unit would forecast from another transformer's steps), got one; pass "
                         f"forecast=False")
    pipe = pipe_or_transformer if scheduler is not None else None
    on_first_step = (lambda: _check_scheduler(pipe, scheduler)) if pipe is not None else None
    attachments = []
    try:
        for expert, _ in experts:
            attachments.append(_attach(expert, schedule, router, scheduler if expert is transformer else None, experts,
                                       on_first_step, cross_attention=cross_attention, fused=fused, forecast=forecast,
                                       compile=compile, cuda_graphs=cuda_graphs,
                                       scheduler_in_graph=scheduler_in_graph))
    except ValueError:
        for attachment in attachments:
            attachment.detach()
        raise
    return attachments[0].engine


def _attach(transformer, schedule, router, scheduler, experts, on_first_step, *, cross_attention, fused, forecast,
            compile, cuda_graphs, scheduler_in_graph) -> Attachment:
    """One transformer's engine and what else `enable` attaches to it, as an `Attachment` (on a ValueError,
    detached before it is raised); scheduler: the one whose set_timesteps starts the generations of every
    transformer of `experts` ((transformer, serves) of `_experts`), hooked by the first one's."""
    engine = CacheEngine(transformer, schedule, cross_attention=cross_attention, fused=fused, forecast=forecast,
                         on_first_step=on_first_step)
    attachment = Attachment(engine, router, group=tuple(expert for expert, _ in experts))
    try:
        engine.check_ranks()
        if compile:
            engine.compile(compile if isinstance(compile, dict) else {})
        if cuda_graphs:  # an instance attribute: Module.__call__ and its hooks stay
            engine.refuse_contexts("cuda_graphs=True")  # a graph replays one set of slots
            with parallel.lifted_hooks(transformer):  # diffusers' hooks stay outermost
                attachment.replaced_forward = vars(transformer).get("forward")
                transformer.forward = attachment.graphs = GraphRunner(engine, transformer.forward,
                                                                      scheduler_inside=scheduler_in_graph)
        if scheduler is not None:
            attachment.scheduler, attachment.replaced_set_timesteps = scheduler, vars(scheduler).get("set_timesteps")
            scheduler.set_timesteps = attachment.hook = _beginning_generations(scheduler, experts)
    except ValueError:
        attachment.detach()
        raise
    setattr(transformer, ATTRIBUTE, attachment)
    return attachment


def _beginning_generations(scheduler, experts: list):
    """`scheduler.set_timesteps` that then begins a generation of each transformer of `experts` at its first step."""
    set_timesteps = scheduler.set_timesteps

    @functools.wraps(set_timesteps)  # keeps its signature: diffusers' retrieve_timesteps inspects it
    def set_timesteps_and_begin(*args, **kwargs):
        result = set_timesteps(*args, **kwargs)
        timesteps = scheduler.timesteps.tolist()
        for expert, serves in experts:
            begin_generation(expert, type(scheduler).__name__, timesteps, _first_step(serves, timesteps))
        return result

    return set_timesteps_and_begin


def _check_scheduler(pipe, hooked) -> None:
    if pipe.scheduler is not hooked:
        raise RuntimeError("pipe.scheduler: replaced after harmonica.enable, so generations are no longer "
                           "tracked; call harmonica.enable(pipe, ...) again after setting the scheduler")


def begin_generation(transformer, sampler: str, timesteps: list, start: int = 0) -> None:
    """Start a generation at step `start` (0; a later one for a transformer that runs from there on, see
    `CacheEngine.begin`; a no-op without harmonica): checks the step count and, for a router, the sampler and
    timesteps it was trained with. Called once per generation."""
    state = getattr(transformer, ATTRIBUTE, None)
    if state is None:
        return
    if state.router is not None:
        state.router.check(RouterInfo(sampler=sampler, timesteps=[int(t) for t in timesteps]))
    state.engine.begin(len(timesteps), list(timesteps), start)
    state.sampler = sampler


def step_runner(transformer) -> GraphRunner | None:
    """The graph runner that takes the sampler's step inside its graphs (enable(..., scheduler_in_graph=True)),
    else None (the sampler steps eagerly)."""
    state = getattr(transformer, ATTRIBUTE, None)
    runner = state.graphs if state is not None else None
    return runner if runner is not None and runner.scheduler_inside else None


def reset(pipe_or_transformer) -> None:
    """Start the next forward at step 0 (for samplers that are not a pipeline's step loop)."""
    _state(pipe_or_transformer).engine.begin()


def disable(pipe_or_transformer) -> None:
    """Undo `enable`: original block forwards, no hooks, no compiled code, slots freed (of every transformer it
    enabled together: a pipeline's experts)."""
    for transformer in _state(pipe_or_transformer).group:
        getattr(transformer, ATTRIBUTE).detach()


@dataclass
class Summary:
    schedule: str
    sampler: str
    steps: int
    units: int
    cur: float
    theoretical_speedup: float
    counted_at: str  # the size the speedup was counted at: "HxW" pixels (video "HxWxF"), or "L image tokens"
    cache_bytes: int  # slots allocated by the latest generation
    graphs: int | None = None  # captured CUDA graphs (None: cuda_graphs off)
    graph_pool_bytes: int = 0  # device memory the graphs' pool holds (its segments)
    static_bytes: int = 0  # static input buffers of the graphs and the sampler state they update
    capture_seconds: float = 0.0  # total time spent capturing
    modulation_bytes: int = 0  # DiT: the per-generation modulation table and its step buffer
    forecast: bool = False  # reused units forecast from their last two computed outputs (two slots per unit)
    context_parallel: str = ""  # e.g. "ulysses=2": cache_bytes are this rank's slots (its shard of the tokens)
    rank: int = 0
    experts: int = 1  # transformers that take turns by step (Wan 2.2 A14B: 2), each with its engine and slots

    def __str__(self) -> str:
        where = f" on rank {self.rank} ({self.context_parallel})" if self.context_parallel else ""
        text = (f"{self.schedule} ({self.sampler or 'sampler not yet seen'}): {self.steps} steps x {self.units} units, "
                f"CUR {self.cur:.1%}, theoretical speedup {self.theoretical_speedup:.2f}x at "
                f"{self.counted_at}, cache {_format_bytes(self.cache_bytes)}{where}"
                f"{f' (its {self.experts} experts together)' if self.experts > 1 else ''}"
                f"{' (linear forecast: two slots per unit)' if self.forecast else ''}")
        if self.graphs is not None:
            text += (f", {self.graphs} CUDA graphs (pool {_format_bytes(self.graph_pool_bytes)}, static buffers "
                     f"{_format_bytes(self.static_bytes)}, captured in {self.capture_seconds:.2f} s)")
        return text


def _format_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def summary(pipe_or_transformer, counted: tuple | None = None) -> Summary:
    """CUR, theoretical MAC speedup (at the latest generation's resolution, else the model's native
    one) and cache memory of an enabled pipeline or transformer. A pipeline whose transformers take turns by step
    (Wan 2.2 A14B's experts): the memory of all of them, the MACs of the first (the experts share one config).
    counted: (MacCount, where) to give the speedup at instead, e.g. a task's `macs()` at its pixel size (packed
    latents only tell their tokens)."""
    from .macs import count_macs, count_macs_for_input

    state = _state(pipe_or_transformer)
    engine = state.engine
    transformer = engine.transformer
    if counted is not None:
        macs, where = counted
    elif engine.last_input_shape is not None:
        macs, where = count_macs_for_input(transformer, engine.last_input_shape, engine.last_text_tokens,
                                           cross_attention=engine.cross_attention, sizes=engine.last_sizes)
    else:
        macs, where = count_macs(transformer, cross_attention=engine.cross_attention), "the native size"
    schedule = engine.policy.schedule
    engines = [_state(expert).engine for expert in state.group] or [engine]
    report = Summary(schedule.name, state.sampler, schedule.num_steps, schedule.num_units, schedule.cur,
                     schedule.theoretical_speedup(macs), where, sum(e.cache_bytes() for e in engines),
                     modulation_bytes=sum(e.modulation.nbytes() for e in engines),
                     forecast=engine.policy.forecast_plan is not None, experts=len(engines))
    config = parallel.context_parallel_config(transformer)
    if config is not None:
        report.context_parallel, report.rank = parallel.describe(config), config._rank
    if state.graphs is not None:
        runner = state.graphs
        report.graphs, report.graph_pool_bytes = len(runner.graphs), runner.pool_bytes
        report.static_bytes, report.capture_seconds = runner.static_bytes(), runner.capture_seconds
    return report
