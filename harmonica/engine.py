"""The cache engine: runs each `BasicTransformerBlock` with its units computed or reused.

`CacheEngine(transformer, schedule)` replaces the `forward` of every block (restored by `remove`).
The replacement is diffusers' block forward for the two norm types of DiT (`ada_norm_zero`) and
PixArt (`ada_norm_single`), with each unit's residual update going through the fused ops:
- computed unit: `gated_residual_compute` (`h + gate * out`, slot <- out when a later step reads it);
- reused unit: `gated_residual_reuse` (`h + gate * slot`, the current step's gate); its LayerNorm,
  modulation and attention/MLP are skipped;
- training: `gated_residual` with the router value r, slot <- blend where r > tau.
The step index is a host counter advanced by a forward hook of the transformer and reset by
`begin` (the pipeline's `scheduler.set_timesteps` calls it), so no step reads a device value. A
generation that nothing began (the counter wrapped after the schedule's last step) warns once; where the
timestep is a host value (a number or a CPU tensor), one that rises within a generation or keeps falling
across a wrap is an error (the sampler's step count differs from the schedule's).

Each unit's computation (its LayerNorm, shift/scale modulation and attention/MLP) is a function of the
block, `UNIT_BODIES[kind]`; `compile` swaps in torch.compile'd copies. The block is an argument, so all
blocks of one shape share one compiled graph per unit kind, and the cache decisions (compute or reuse,
slot writes, the fused residual ops) stay in eager Python: no compiled code sees the step or the row.
"""

import inspect
import types
import warnings

import torch
from torch._C._dynamo.eval_frame import reset_code

from . import kernels
from .modulation import ModulationTable
from .profiling import nvtx as _nvtx
from .units import UNIT_KINDS, cached_units

SUPPORTED_NORMS = ("ada_norm_zero", "ada_norm_single")


def _check_block(i: int, block) -> None:
    problems = []
    if block.norm_type not in SUPPORTED_NORMS:
        problems.append(f"norm_type {block.norm_type!r} (supported: {SUPPORTED_NORMS})")
    if block.pos_embed is not None:
        problems.append("a positional embedding inside the block")
    if block.only_cross_attention:
        problems.append("only_cross_attention")
    if block._chunk_size is not None:
        problems.append("feed-forward chunking")
    if getattr(block, "fuser", None) is not None:
        problems.append("GLIGEN")
    if problems:
        raise ValueError(f"transformer_blocks[{i}]: expected a DiT or PixArt block, got one with "
                         + ", ".join(problems))


class CacheEngine:
    """Cached execution of one diffusers DiT/PixArt transformer.

    schedule: `CacheSchedule` of K = number of units (inference mode).
    cross_attention: whether PixArt's `attn2` is a unit (else it always computes).
    fused: the fused Triton ops (on CUDA); False runs their torch references (`<op>_ref`), the eager
    sequence diffusers would run, for comparisons.
    """

    def __init__(self, transformer, schedule=None, *, cross_attention: bool = True, on_first_step=None,
                 fused: bool = True):
        self.transformer = transformer
        self.fused = fused
        self._compute, self._reuse, self._soft = (
            (kernels.gated_residual_compute, kernels.gated_residual_reuse, kernels.gated_residual) if fused else
            (_compute_ref, kernels.gated_residual_reuse_ref, _soft_ref))
        self.on_first_step = on_first_step  # called before each step-0 forward
        self.cross_attention = cross_attention
        self.units = cached_units(transformer, cross_attention=cross_attention)
        self.unit_index = {name: k for k, (name, _) in enumerate(self.units)}
        for i, block in enumerate(transformer.transformer_blocks):
            _check_block(i, block)
        self.shared_embedding = _shares_embedding(transformer.transformer_blocks)
        self.embedding = None  # DiT: the step's timestep/class embedding, computed by block 0 when shared
        self.timesteps = None  # host timesteps of the current generation, when its sampler told them
        self.modulation = ModulationTable()  # DiT: every step's adaLN modulations, per generation
        self.modulation_active = False
        self.mode = "off"
        self.schedule = None
        self.gates = None  # training: (T, K) router values of the current step's graph
        self.tau = None
        self.row = self.write_row = None  # inference: the current step's schedule rows, as tuples
        self.step = 0
        self.begun = False  # whether `begin` started the current generation (else the counter wrapped)
        self.warned_unbegun = False
        self.previous_timestep = None  # host timestep of the latest forward of this generation, when readable
        self.timestep_index = list(inspect.signature(transformer.forward).parameters).index("timestep")
        self.slots = [None] * len(self.units)
        self.bodies = UNIT_BODIES  # each unit kind's computation, torch.compile'd by `compile`
        self._compiled_codes = []
        self.last_input_shape = None  # (B, C, H, W) of the latest forward
        if schedule is not None:
            self.set_schedule(schedule)
        self._originals = []
        for i, block in enumerate(transformer.transformer_blocks):
            index = {kind: self.unit_index.get(f"transformer_blocks.{i}.{kind}") for kind in UNIT_KINDS}
            self._originals.append(vars(block).get("forward"))  # an instance's own forward; None: the class's
            block.forward = types.MethodType(_make_block_forward(self, index, i), block)
        self._hooks = [transformer.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       transformer.register_forward_hook(self._after_forward, with_kwargs=True)]

    # ---- configuration ----

    def set_schedule(self, schedule) -> None:
        if schedule.num_units != len(self.units):
            raise ValueError(f"schedule: expected {len(self.units)} units (from the transformer), "
                             f"got {schedule.num_units}")
        self.schedule = schedule
        self.mode = "inference"
        self.begin()

    def set_training(self, gates: torch.Tensor, tau: float) -> None:
        """Soft gating with router values `gates` (T, K) at threshold `tau` (the training issue)."""
        if gates.dim() != 2 or gates.shape[1] != len(self.units):
            raise ValueError(f"gates: expected shape (T, {len(self.units)}), got {tuple(gates.shape)}")
        self.gates, self.tau, self.mode = gates, tau, "training"

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """Steps reach the units only through `row`/`write_row`: what a captured forward is specialised on
        (steps with equal rows share it)."""
        self._step = value
        if self.mode == "inference":
            self.row, self.write_row = self.schedule.step_keys[value]

    @property
    def num_steps(self):
        if self.mode == "inference":
            return self.schedule.num_steps
        return self.gates.shape[0] if self.mode == "training" else None

    def begin(self, num_steps: int | None = None, timesteps: list | None = None) -> None:
        """Start a generation at step 0; with `num_steps`, check it against the schedule. `timesteps`:
        the values every forward of this generation will pass, in order (lets DiT precompute its
        modulations; see modulation.py)."""
        if num_steps is not None and self.num_steps is not None and num_steps != self.num_steps:
            raise ValueError(f"num_inference_steps: expected {self.num_steps} (the cache schedule's steps), "
                             f"got {num_steps}")
        self.timesteps = timesteps
        self.step = 0
        self.begun, self.previous_timestep = True, None

    def compile(self, options: dict) -> None:
        """torch.compile each unit kind's body with `options` (default fullgraph=True, dynamic=False): one
        compile per unit kind and input signature (shapes, dtypes, grad mode), whatever the steps or rows.
        More signatures than dynamo's recompile_limit raise (fullgraph never falls back to eager)."""
        options = {"fullgraph": True, "dynamic": False, **options}
        bodies = {kind: _own_copy(body) for kind, body in UNIT_BODIES.items()}
        self._compiled_codes = [body.__code__ for body in bodies.values()]
        self.bodies = {kind: torch.compile(body, **options) for kind, body in bodies.items()}

    def remove(self) -> None:
        """Restore every block's forward, drop the hooks, the compiled bodies and free the slots."""
        for block, own in zip(self.transformer.transformer_blocks, self._originals):
            if own is None:
                del block.forward
            else:
                block.forward = own
        for hook in self._hooks:
            hook.remove()
        for code in self._compiled_codes:
            reset_code(code)
        self.bodies, self._compiled_codes = UNIT_BODIES, []
        self.slots = [None] * len(self.units)
        self.embedding = None
        self.modulation, self.modulation_active = ModulationTable(), False

    # ---- memory ----

    def cache_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots if s is not None)

    # ---- step counter ----

    def _before_forward(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.last_input_shape = tuple(hidden.shape)
        if self.step == 0 and self.on_first_step is not None:
            self.on_first_step()
        if self.mode == "inference":
            self._check_generation(args[self.timestep_index] if len(args) > self.timestep_index
                                   else kwargs.get("timestep"))
        if self.step == 0:
            self.modulation_active = self._compute_modulations(hidden, args, kwargs)
        if self.modulation_active:
            self.modulation.load(self.step)
        if _nvtx.ENABLED:
            _nvtx.open_range(_nvtx.step_label(self.step))

    def _after_forward(self, module, args, kwargs, output):
        if _nvtx.ENABLED:
            _nvtx.close_range()
        following = self.step + 1
        if self.num_steps is not None and following == self.num_steps:
            self.timesteps = None  # the generation is complete; the next call starts another, as told
            self.begun = False
            following = 0
        self.step = following

    def _check_generation(self, timestep) -> None:
        """Inference: warn once when a generation starts without `begin` (only the step count delimits it);
        with a host timestep, raise when it rises within a generation or keeps falling across a wrap."""
        t = _host_value(timestep)
        previous, steps = self.previous_timestep, self.num_steps
        if t is not None and previous is not None and (t > previous if self.step else t < previous):
            got = str(self.step) if self.step else "more"
            raise ValueError(f"num_inference_steps: expected {steps} (the cache schedule's steps), got {got} "
                             f"(timestep {t:g} after {previous:g} at step {self.step}); pass the pipeline to "
                             f"harmonica.enable or call harmonica.reset(transformer) before each generation")
        self.previous_timestep = t
        if self.step == 0 and not self.begun and not self.warned_unbegun:
            self.warned_unbegun = True
            warnings.warn(f"harmonica: a generation started that no sampler announced, so only the cache schedule's "
                          f"{steps} steps delimit generations (a sampler with another step count runs the wrong "
                          f"rows, undetected where timesteps are device tensors); pass the pipeline to "
                          f"harmonica.enable, call harmonica.reset(transformer) before each generation or sample "
                          f"with harmonica.samplers", stacklevel=2)

    def _compute_modulations(self, hidden, args, kwargs) -> bool:
        """At step 0: every step's DiT modulations, when this generation allows it (modulation.py)."""
        labels = args[2] if len(args) > 2 else kwargs.get("class_labels")
        if not (self.mode == "inference" and self.shared_embedding and isinstance(labels, torch.Tensor)
                and self.timesteps is not None and len(self.timesteps) == self.num_steps):
            return False
        self.modulation.compute(self.transformer.transformer_blocks, self.timesteps, labels, hidden.dtype)
        return True

    # ---- one unit ----

    def run_unit(self, k, compute, gate, h):
        """Add unit k's (gated) output to h. compute: () -> fresh output (B, N, D). With NVTX on
        (profiling/nvtx.py), inside a range named after the unit and whether it computes or reuses."""
        if _nvtx.ENABLED and k is not None:
            label = _nvtx.unit_label(self.units[k][0], self.mode != "inference" or self.row[k])
            return _nvtx.call_in_range(label, self._run_unit, k, compute, gate, h)
        return self._run_unit(k, compute, gate, h)

    def _run_unit(self, k, compute, gate, h):
        if k is None or self.mode == "off":
            return self._compute(h, compute(), gate)
        if self.mode == "training":
            fresh = compute()
            if self.step == 0:
                return self._compute(h, fresh, gate, cache=self._slot(k, fresh))
            return self._soft(h, fresh, self._read_slot(k, h), self.gates[self.step, k], gate, tau=self.tau)
        if self.row[k]:
            fresh = compute()
            slot = self._slot(k, fresh) if self.write_row[k] else None
            return self._compute(h, fresh, gate, cache=slot)
        return self._reuse(h, self._read_slot(k, h), gate)

    def _slot(self, k, like):
        slot = self.slots[k]
        if slot is None or slot.shape != like.shape or slot.dtype != like.dtype or slot.device != like.device:
            slot = self.slots[k] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return slot

    def _read_slot(self, k, h):
        slot = self.slots[k]
        if slot is None or slot.shape != h.shape or slot.dtype != h.dtype or slot.device != h.device:
            name = self.units[k][0]
            raise RuntimeError(f"{name}: step {self.step} reuses a cache slot that no earlier step of this "
                               f"generation filled for hidden states {tuple(h.shape)} {h.dtype}")
        return slot


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


def _shares_embedding(blocks) -> bool:
    """Whether every DiT block holds the same timestep/class embedder (diffusers copies the original
    DiT's single embedder into each block): then one embedding per step serves all blocks. Checked once,
    at enable."""
    embedders = [block.norm1.emb for block in blocks if block.norm_type == "ada_norm_zero"]
    if len(embedders) != len(blocks) or any(e is None for e in embedders):
        return False
    reference = dict(embedders[0].named_parameters())
    return all(torch.equal(p, reference[name]) for e in embedders[1:] for name, p in e.named_parameters())


def _make_block_forward(engine: CacheEngine, index: dict, block_index: int):
    """diffusers' `BasicTransformerBlock.forward` for ada_norm_zero / ada_norm_single, unit by unit.
    DiT: the step's modulations come from the per-generation table when it is active; else block 0
    computes the step's shared embedding (blocks run in order in every forward, captured graphs
    included, so no embedding outlives its step)."""
    first = block_index == 0

    def forward(block, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        kwargs = dict(cross_attention_kwargs or {})
        if kwargs.get("scale") is not None:
            warnings.warn("Passing `scale` to `cross_attention_kwargs` is deprecated. `scale` will be ignored.",
                          stacklevel=2)
        h = hidden_states
        if block.norm_type == "ada_norm_zero":
            norm1 = block.norm1
            if engine.modulation_active:
                emb = engine.modulation.step_buffer[block_index]
            else:
                if not engine.shared_embedding:
                    emb = norm1.emb(timestep, class_labels, hidden_dtype=h.dtype) if norm1.emb is not None else None
                elif first:
                    emb = engine.embedding = norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
                else:
                    emb = engine.embedding
                emb = norm1.linear(norm1.silu(emb))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
            shift_msa, scale_msa, shift_mlp, scale_mlp = (t[:, None] for t in (shift_msa, scale_msa, shift_mlp,
                                                                                scale_mlp))
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                block.scale_shift_table[None] + timestep.reshape(h.shape[0], 6, -1)).chunk(6, dim=1)

        bodies = engine.bodies
        h = engine.run_unit(index["attn1"], lambda: bodies["attn1"](block, h, shift_msa, scale_msa, attention_mask,
                                                                   kwargs), gate_msa, h)
        if block.attn2 is not None:
            h = engine.run_unit(index["attn2"], lambda: bodies["attn2"](block, h, encoder_hidden_states,
                                                                       encoder_attention_mask, kwargs), None, h)
        return engine.run_unit(index["ff"], lambda: bodies["ff"](block, h, shift_mlp, scale_mlp), gate_mlp, h)

    return forward


def self_attention(block, h, shift, scale, attention_mask, kwargs):
    """Unit attn1 of `block`: self-attention over the LayerNorm of h (B, N, D) modulated by shift and
    scale (B, 1, D). Returns (B, N, D)."""
    norm = block.norm1.norm if block.norm_type == "ada_norm_zero" else block.norm1
    return block.attn1(norm(h) * (1 + scale) + shift, encoder_hidden_states=None, attention_mask=attention_mask,
                       **kwargs)


def cross_attention(block, h, encoder_hidden_states, encoder_attention_mask, kwargs):
    """Unit attn2 of `block`: h (B, N, D) (PixArt: as is, else its LayerNorm) attending to
    encoder_hidden_states (B, M, D). Returns (B, N, D)."""
    query = h if block.norm_type == "ada_norm_single" else block.norm2(h)
    return block.attn2(query, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                       **kwargs)


def feed_forward(block, h, shift, scale):
    """Unit ff of `block`: the MLP of the LayerNorm of h (B, N, D) modulated by shift and scale (B, 1, D).
    Returns (B, N, D)."""
    norm = block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2
    return block.ff(norm(h) * (1 + scale) + shift)


UNIT_BODIES = {"attn1": self_attention, "attn2": cross_attention, "ff": feed_forward}


def _own_copy(fn):
    """`fn` with a code object of its own. Dynamo keeps compiled entries on the code object, so an engine's
    are neither shared with another engine's nor left behind by its `remove`."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
