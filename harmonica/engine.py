"""The cache engine: runs each block of a diffusers transformer with its units computed or reused.

`CacheEngine(transformer, schedule)` makes its own instance of the adapter (harmonica/adapters) of each block class
it finds, whose `setup` keeps the family's state for this model on it (DiT's shared embedding; `remove` tears it
down), and replaces the `forward` of every block (restored by `remove`) by its adapter's: the block's forward unit
by unit, each unit's residual update going through `run_unit` and the fused ops:
- computed unit: `gated_residual_compute` (`h + gate * out`, slot <- out when a later step reads it);
- reused unit: `gated_residual_reuse` (`h + gate * slot`, the current step's gate); its norm,
  modulation and attention/MLP are skipped; with a linear forecast (forecast.py: two slots per unit, set by
  `set_schedule`), `gated_residual_forecast` (`h + gate * (a * newest + b * older)`) where it applies;
- training: `gated_residual` with the router value r, slot <- blend where r > tau.
Which of these a unit does is its policy's answer (policies.py): `engine.policy` is `Off` (`set_off`),
`Inference` (`set_schedule`: the schedule's rows and forecast plan) or `Training` (`set_training`: the router values).
Each cache context's slots are a `SlotStore` (slots.py: written, reallocated and read per slot and stream).
A unit that feeds several residual streams (Flux's joint attention) does this once per stream, its slot
holding one tensor per stream.
The step index is a host counter advanced by a forward hook of the transformer and reset by
`begin` (the pipeline's `scheduler.set_timesteps` calls it), so no step reads a device value; a transformer that its
pipeline runs from a later step on (Wan 2.2's low-noise expert) begins there, `begin(start=b)`, and row b must
compute every unit. A
generation that nothing began (the counter wrapped after the schedule's last step) warns once; where the
timestep is a host value (a number or a CPU tensor), one that rises within a generation or keeps falling
across a wrap is an error (the sampler's step count differs from the schedule's).

A pipeline that runs classifier-free guidance as two transformer calls per step (Wan, Qwen-Image) wraps
each in diffusers' `transformer.cache_context("cond")` / `("uncond")`: the engine keeps one set of slots
and one step counter (with its generation checks) per context name, a `CacheContext` each: the current one is
`engine.clock`, the others wait in `engine.other_contexts`, so switching contexts swaps one object; a forward
outside any context uses the default one. All sets follow the same schedule rows; `begin` restarts
them all. SD3.5's skip-layer guidance (a forward with `skip_layers`) is refused: it runs some steps only, with
some blocks skipped.

Other modules never assign the engine's attributes: they drive it through its methods (`set_schedule`,
`set_training`, `set_off`, `seek`, `swap_slots`, `begin`, `refuse_contexts`; tests/test_engine_api.py checks it).

Each unit's computation (its norm, shift/scale modulation and attention/MLP) is a function of the block, the adapter
class's `bodies[kind]` (no adapter instance's state reaches it); `compile` swaps in torch.compile'd copies. The block
is an argument, so all blocks of one shape share one compiled graph per unit kind, and the cache decisions (compute or
reuse, slot writes, the fused residual ops) stay in eager Python: no compiled code sees the step or the row.
"""

import contextlib
import inspect
import types
import warnings
from dataclasses import dataclass

import torch
from torch._C._dynamo.eval_frame import reset_code

from . import events, kernels, parallel
from .adapters import blocks_of
from .families import forward_arguments
from .modulation import ModulationTable
from .policies import Inference, Off, Training
from .slots import SlotStore
from .units import units_of


@dataclass
class CacheContext:
    """One diffusers cache context's step clock and slots (the engine's current one is `engine.clock`): its step
    counter, its generation checks' state, and its slots."""

    step: int  # the step its next forward runs
    begun: bool  # whether `begin` started its generation (else its counter wrapped)
    previous_timestep: float | None  # the host timestep of its latest forward of this generation, when readable
    slots: SlotStore  # its slots (slots.py)

    def begin(self, start: int) -> None:
        """A generation begins at step `start`; the slots stay (its first row computes every unit)."""
        self.step, self.begun, self.previous_timestep = start, True, None


class CacheEngine:
    """Cached execution of one diffusers transformer whose block classes have adapters.

    schedule: `CacheSchedule` of K = number of units (the `Inference` policy; None: `Off`).
    cross_attention: whether cross-attention (PixArt's `attn2`) is a unit (else it always computes).
    fused: the fused Triton ops (on CUDA); False runs their torch references (`<op>_ref`), the eager
    sequence diffusers would run, for comparisons.
    forecast: a `Forecast` fitted along `schedule` (see `set_schedule`), or None.
    """

    def __init__(self, transformer, schedule=None, *, cross_attention: bool = True, on_first_step=None,
                 fused: bool = True, forecast=None):
        self.transformer = transformer
        self.fused = fused
        self._compute, self._reuse, self._soft, self._forecast = (
            (kernels.gated_residual_compute, kernels.gated_residual_reuse, kernels.gated_residual,
             kernels.gated_residual_forecast) if fused else
            (_compute_ref, kernels.gated_residual_reuse_ref, _soft_ref, kernels.gated_residual_forecast_ref))
        self.on_first_step = on_first_step  # called before each step-0 forward
        self.cross_attention = cross_attention
        self.blocks = blocks_of(transformer)
        for block in self.blocks:
            block.adapter_class.check(block.label, block.module)
        units = units_of(transformer, cross_attention=cross_attention)
        self.units = [(unit.name, transformer.get_submodule(unit.modules[0])) for unit in units]
        self.unit_index = {name: k for k, (name, _) in enumerate(self.units)}
        # adapter class -> this engine's instance, in the order of the classes' first blocks
        own = {cls: cls() for cls in dict.fromkeys(block.adapter_class for block in self.blocks)}
        # this engine's adapters, one per block class, each holding its family's state for this model (`setup`) ->
        # the class's blocks in execution order
        self.adapters = {adapter: [block.module for block in self.blocks if block.adapter_class is type(adapter)]
                         for adapter in own.values()}
        self.timesteps = None  # host timesteps of the current generation, when its sampler told them
        self.modulation = ModulationTable()  # DiT: every step's adaLN modulations, per generation
        self.modulation_active = False
        self.policy = Off()  # what each unit does at each step (policies.py)
        self.start = 0  # the generation's first step: a pipeline that switches transformers by step begins one later
        self.clock = CacheContext(0, False, None, SlotStore(self.units, len(self.units)))  # the current cache context
        self.warned_unbegun = False
        # the forward's (latents, timestep, text) argument names and positions (None: keyword only, or none), and
        # whether its timestep rises along a generation
        self.arguments, self.timestep_rises = forward_arguments(transformer)
        parameters = list(inspect.signature(transformer.forward).parameters)
        self.argument_index = [parameters.index(name) if name in parameters else None for name in self.arguments]
        self.context = None  # the name of the cache context `clock` is (None: the default one)
        self.entered_context = None  # the name of the `transformer.cache_context` the caller is inside
        self.other_contexts = {}  # name -> `CacheContext` of each context not current
        self.contexts_refused_by = None  # e.g. "cuda_graphs=True": what allows one cache context only
        self.ranks_checked = False  # whether the schedule was checked equal on every context-parallel rank
        self.bodies = self._plain_bodies()  # block class -> kind -> computation, torch.compile'd by `compile`
        self._compiled_codes = []
        # the latents' shape in the latest forward: (B, C, H, W), (B, C, F, H, W) or (B, L, C) (a per-sample list:
        # (B, *its first's shape))
        self.last_input_shape = None
        self.last_text_tokens = None  # the text's tokens in the latest forward (a per-sample list: its longest)
        self.last_sizes = {}  # the latest forward's int arguments (LTX-2's latent grid)
        if schedule is not None:
            self.set_schedule(schedule, forecast)
        for adapter, blocks in self.adapters.items():
            adapter.setup(self, blocks)
        self._originals = []
        for block in self.blocks:
            adapter = own[block.adapter_class]
            index = {kind: self.unit_index.get(f"{block.name}.{kind}") for kind in adapter.kinds}
            with parallel.lifted_hooks(block.module):  # diffusers' hooks (a cp plan's splits) wrap the new forward
                self._originals.append(vars(block.module).get("forward"))  # an instance's own; None: the class's
                block.module.forward = types.MethodType(_block_forward(self, adapter, block, index), block.module)
        self._own_cache_context = vars(transformer).get("cache_context")
        if hasattr(transformer, "cache_context"):  # diffusers' CacheMixin
            transformer.cache_context = self._cache_context(transformer.cache_context)
        self._hooks = [transformer.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       transformer.register_forward_hook(self._after_forward, with_kwargs=True)]

    # ---- configuration ----

    def set_schedule(self, schedule, forecast=None) -> None:
        """Inference with `schedule`; forecast: a `Forecast` fitted along it (reused units forecast from their last
        two computed outputs, two slots per unit), a `ForecastFit` (the fitting pass), or None (pure reuse)."""
        if schedule.num_units != len(self.units):
            raise ValueError(f"schedule: expected {len(self.units)} units (from the transformer), "
                             f"got {schedule.num_units}")
        self.policy = Inference(schedule, forecast)
        count = len(self.units) * self.policy.slots_per_unit
        self.clock.slots.resize(count)
        self.ranks_checked = False
        self.begin()

    def set_training(self, gates: torch.Tensor, tau: float) -> None:
        """Soft gating with router values `gates` (T, K) at threshold `tau` (the training issue)."""
        if gates.dim() != 2 or gates.shape[1] != len(self.units):
            raise ValueError(f"gates: expected shape (T, {len(self.units)}), got {tuple(gates.shape)}")
        self.policy = Training(gates, tau)

    def set_off(self) -> None:
        """Caching off: every unit computes and no slot is written (the teacher's and the reference's forwards)."""
        self.policy = Off()

    def seek(self, step: int) -> None:
        """The next forward runs step `step` (a trainer or search that drives the steps itself)."""
        if not 0 <= step < (self.policy.num_steps or step + 1):
            raise ValueError(f"step: expected 0 <= step < {self.policy.num_steps}, got {step}")
        self.step = step

    def swap_slots(self, slots: list) -> list:
        """Make `slots` (one entry per slot, None: empty) the current cache context's slots; returns the ones
        they replace (a rollout that must not touch a trajectory's slots swaps them out and back)."""
        store = self.clock.slots
        if len(slots) != len(store.entries):
            raise ValueError(f"slots: expected {len(store.entries)} slots, got {len(slots)}")
        previous, store.entries = store.entries, list(slots)
        return previous

    def refuse_contexts(self, reason: str) -> None:
        """Allow one cache context only (`reason`, e.g. "cuda_graphs=True", names what needs it in the error a
        second context gets)."""
        self.contexts_refused_by = reason

    @property
    def step(self) -> int:
        """The step the current cache context's next forward runs."""
        return self.clock.step

    @step.setter
    def step(self, value: int) -> None:
        """The policy readies the step's rows (`Policy.at`)."""
        self.clock.step = value
        self.policy.at(value)

    @property
    def slots(self) -> list:
        """The current cache context's slot entries (slots.py; `swap_slots` replaces them)."""
        return self.clock.slots.entries

    def graph_key(self) -> tuple:
        """What the current step's forward depends on besides its inputs (graphs.py: steps with equal keys share a
        captured graph): its policy's key (`Inference`: the schedule rows and the forecast row, slots and
        coefficients, host constants a capture bakes) and whether DiT's modulation table is on."""
        return (*self.policy.key, self.modulation_active)

    def begin(self, num_steps: int | None = None, timesteps: list | None = None, start: int = 0) -> None:
        """Start a generation at step `start` (0; a transformer that a pipeline runs from a later step on, as Wan
        2.2's low-noise expert, its first step: that row must compute every unit, `Inference.check_start`); with
        `num_steps`, check it against the schedule. `timesteps`: the values every forward of this generation will
        pass, in order (lets DiT precompute its modulations; see modulation.py)."""
        expected = self.policy.num_steps
        if num_steps is not None and expected is not None and num_steps != expected:
            raise ValueError(f"num_inference_steps: expected {expected} (the cache schedule's steps), "
                             f"got {num_steps}")
        self.policy.check_start(start, self.units)
        self.timesteps = timesteps
        self.start = start
        for clock in (self.clock, *self.other_contexts.values()):
            clock.begin(start)
        self.policy.at(start)

    def compile(self, options: dict) -> None:
        """torch.compile each unit kind's body with `options` (default fullgraph=True, dynamic=False): one
        compile per unit kind and input signature (shapes, dtypes, grad mode), whatever the steps or rows.
        More signatures than dynamo's recompile_limit raise (fullgraph never falls back to eager)."""
        options = {"fullgraph": True, "dynamic": False, **options}
        bodies = {name: {kind: _own_copy(body) for kind, body in kinds.items()}
                  for name, kinds in self._plain_bodies().items()}
        self._compiled_codes = [body.__code__ for kinds in bodies.values() for body in kinds.values()]
        self.bodies = {name: {kind: torch.compile(body, **options) for kind, body in kinds.items()}
                       for name, kinds in bodies.items()}

    def _plain_bodies(self) -> dict:
        return {adapter.block_class: dict(adapter.bodies) for adapter in self.adapters}

    def remove(self) -> None:
        """Restore every block's forward, drop the hooks, tear the adapters down (`Adapter.teardown`), drop the compiled
        bodies and free the slots."""
        for block, own in zip(self.blocks, self._originals):
            with parallel.lifted_hooks(block.module):
                if own is None:
                    del block.module.forward
                else:
                    block.module.forward = own
        for hook in self._hooks:
            hook.remove()
        for adapter, blocks in self.adapters.items():
            adapter.teardown(self, blocks)
        for code in self._compiled_codes:
            reset_code(code)
        self.bodies, self._compiled_codes = self._plain_bodies(), []
        if "cache_context" in vars(self.transformer):
            if self._own_cache_context is None:
                del self.transformer.cache_context
            else:
                self.transformer.cache_context = self._own_cache_context
        self.clock.slots = SlotStore(self.units, len(self.units))
        self.context, self.entered_context, self.other_contexts = None, None, {}
        self.modulation, self.modulation_active = ModulationTable(), False

    # ---- memory ----

    def cache_bytes(self) -> int:
        """Bytes of the slots of every cache context (with a forecast: both slots of each unit)."""
        return sum(context.slots.nbytes() for context in (self.clock, *self.other_contexts.values()))

    # ---- cache contexts ----

    def _cache_context(self, enter):
        """`transformer.cache_context` that also tells the engine the context's name."""
        @contextlib.contextmanager
        def cache_context(name, **kwargs):
            outer, self.entered_context = self.entered_context, name
            try:
                with enter(name, **kwargs):
                    yield
            finally:
                self.entered_context = outer
        return cache_context

    def _use_context(self, name) -> None:
        """Make cache context `name`'s counter and slots the current ones (a new context starts at step 0 of
        the current generation). Where one set is allowed (`contexts_refused_by`), every name shares it and a
        second name is refused."""
        if name == self.context:
            return
        if self.contexts_refused_by is not None:
            if name is not None and self.context is not None:
                raise ValueError(f"{self.contexts_refused_by}: expected one cache context (classifier-free "
                                 f"guidance as one batch), got the pipeline's {self.context!r} and {name!r} "
                                 f"passes; enable without it")
            self.context = self.context if name is None else name
            return
        current = self.other_contexts[self.context] = self.clock
        self.clock = self.other_contexts.pop(name, None) or CacheContext(
            self.start, current.begun, None, SlotStore(self.units, len(current.slots.entries)))
        self.context = name
        self.policy.at(self.clock.step)

    # ---- context parallelism ----

    def check_ranks(self) -> None:
        """Under diffusers' context parallelism (enabled before or after the engine), once per schedule: the
        family has a cp plan and every rank of the group runs the same schedule (parallel.py). A no-op without
        context parallelism."""
        config = parallel.context_parallel_config(self.transformer)
        if self.ranks_checked or config is None:
            return
        parallel.check_supported(self.transformer)
        parallel.check_same_schedule(self, config)
        self.ranks_checked = True

    # ---- step counter ----

    def _before_forward(self, module, args, kwargs):
        self.check_ranks()
        if self.policy.caches and kwargs.get("skip_layers") is not None:
            raise ValueError(f"skip_guidance_layers: expected None under harmonica (every block runs once per "
                             f"step), got a transformer call with skip_layers={kwargs['skip_layers']}")
        self._use_context(self.entered_context)
        hidden = self.argument(args, kwargs, 0)
        self.last_input_shape = (len(hidden), *hidden[0].shape) if isinstance(hidden, list) else tuple(hidden.shape)
        self.last_sizes = {name: value for name, value in kwargs.items() if type(value) is int}
        text = self.argument(args, kwargs, 2)
        if isinstance(text, list):
            self.last_text_tokens = max(len(prompt) for prompt in text)
        else:
            self.last_text_tokens = text.shape[1] if isinstance(text, torch.Tensor) and text.dim() == 3 else None
        if self.step == self.start and self.on_first_step is not None:
            self.on_first_step()
        if self.policy.sampling:
            self._check_generation(self.argument(args, kwargs, 1))
        if self.step == self.start:
            self.modulation_active = self._compute_modulations(hidden, args, kwargs)
        if self.modulation_active:
            self.modulation.load(self.step)
        if events.listeners:
            events.step_started(self.step)

    def argument(self, args, kwargs, which: int):
        """The forward's latents (which 0), timestep (1) or text (2) argument, positional or keyword; None when
        not passed. Latents and text are a tensor or a per-sample list of tensors (Z-Image)."""
        index = self.argument_index[which]
        return args[index] if index is not None and len(args) > index else kwargs.get(self.arguments[which])

    def _after_forward(self, module, args, kwargs, output):
        if events.listeners:
            events.step_finished()
        following = self.step + 1
        if following == self.policy.num_steps:
            self.timesteps = None  # the generation is complete; the next call starts another, as told
            self.clock.begun = False
            following = self.start = 0
        self.step = following

    def _check_generation(self, timestep) -> None:
        """Inference: warn once when a generation starts without `begin` (only the step count delimits it);
        with a host timestep, raise when it goes back within a generation (rises; falls where the family's timestep
        rises along a generation) or keeps going across a wrap."""
        t = _host_value(timestep)
        clock, steps = self.clock, self.policy.num_steps
        previous = clock.previous_timestep
        # how far the timestep went back toward the noise (it falls along a generation, or rises where the family's
        # does); None where either value is unknown
        back = None if t is None or previous is None else (previous - t if self.timestep_rises else t - previous)
        if back is not None and (back > 0 if self.step else back < 0):
            got = str(self.step) if self.step else "more"
            raise ValueError(f"num_inference_steps: expected {steps} (the cache schedule's steps), got {got} "
                             f"(timestep {t:g} after {previous:g} at step {self.step}); pass the pipeline to "
                             f"harmonica.enable or call harmonica.reset(transformer) before each generation")
        clock.previous_timestep = t
        if clock.step == 0 and not clock.begun and not self.warned_unbegun:
            self.warned_unbegun = True
            warnings.warn(f"harmonica: a generation started that no sampler announced, so only the cache schedule's "
                          f"{steps} steps delimit generations (a sampler with another step count runs the wrong "
                          f"rows, undetected where timesteps are device tensors); pass the pipeline to "
                          f"harmonica.enable, call harmonica.reset(transformer) before each generation or sample "
                          f"with harmonica.samplers", stacklevel=2)

    def _compute_modulations(self, hidden, args, kwargs) -> bool:
        """At step 0: every step's modulations, when this generation allows it and an adapter computes them
        (DiT; modulation.py)."""
        policy = self.policy
        if not (policy.sampling and self.timesteps is not None and len(self.timesteps) == policy.num_steps):
            return False
        return any([adapter.precompute(self, blocks, hidden, args, kwargs)
                    for adapter, blocks in self.adapters.items()])

    # ---- one unit ----

    def run_unit(self, k, compute, gate, h):
        """Add unit k's (gated) output to h (B, N, D); gate (B, D), (B, 1, D) or None. compute: () -> fresh
        output (B, N, D). A unit feeding several residual streams passes tuples h and gate, one per stream,
        and a compute that returns one output per stream; it returns one tensor per stream. k None: not a
        cached unit (always computes). With listeners (events.py), through their `around_unit`."""
        run = self._run_streams if isinstance(h, tuple) else self._run_unit
        if events.listeners and k is not None:
            computes = self.policy.computes(k)
            return events.around_unit(self.units[k][0], computes, run, k, compute, gate, h)
        return run(k, compute, gate, h)

    def _run_streams(self, k, compute, gates, hs):
        """run_unit for several streams: one computation, then each stream with its gate and slot part."""
        computes = k is None or self.policy.computes(k)
        fresh = compute() if computes else self.policy.reused_outputs(self, k, compute, hs)
        return tuple(self._run_unit(k, lambda i=i: fresh[i], gate, h, i) for i, (gate, h) in enumerate(zip(gates, hs)))

    def _run_unit(self, k, compute, gate, h, part=None):
        """One stream's residual update (the policy's `run`); part: the stream's index in a several-stream unit's
        slot."""
        if k is None:
            return self._compute(h, compute(), gate)
        return self.policy.run(self, k, compute, gate, h, part)


def _host_value(timestep) -> float | None:
    """The first value of a timestep argument that lives on the host (a number or CPU tensor), else None:
    a device tensor is never read (no sync)."""
    if isinstance(timestep, (int, float)):
        return float(timestep)
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" and timestep.numel():
        return float(timestep.reshape(-1)[0])
    return None


def _compute_ref(h, fresh, gate=None, *, cache=None):
    return kernels.gated_residual_compute_ref(h, fresh, gate, cache)


def _soft_ref(h, fresh, cache, r, gate=None, *, tau=None):
    return kernels.gated_residual_ref(h, fresh, cache, r, gate, tau)


def _block_forward(engine: CacheEngine, adapter, block, index: dict):
    """The forward that replaces `block`'s: `adapter`'s (the engine's instance for its class), unit k of each kind
    from `index`."""
    position = block.position

    def forward(module, *args, **kwargs):
        return adapter.forward(engine, module, index, position, *args, **kwargs)

    return forward


def _own_copy(fn):
    """`fn` with a code object of its own. Dynamo keeps compiled entries on the code object, so an engine's
    are neither shared with another engine's nor left behind by its `remove`."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
