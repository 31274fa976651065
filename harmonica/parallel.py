"""Cached sampling under diffusers' context parallelism (`transformer.enable_parallelism(config=
ContextParallelConfig(ulysses_degree=N | ring_degree=N))`, diffusers 0.42).

diffusers shards the sequence at the module boundaries of the class's `_cp_plan` (FLUX, Wan and Qwen-Image
have one; DiT, PixArt and SD3 have none) through its hook registry: the tokens are split at the
transformer's or the first block's input and gathered after `proj_out`; each attention runs Ulysses (an
all-to-all of q, k, v and the output) or ring (an all-gather of k and v). So each rank runs every block
on its shard (B, N / P, D), and the engine's slots hold that rank's shard. A reused unit runs no
attention, hence no collective: the saving is compute and communication at once.

What this module adds around the engine:
- `lifted_hooks(module)`: diffusers' hooks on a module (the plan's split hooks on Wan's `blocks.0` and
  Qwen-Image's blocks) taken off while the engine swaps the module's forward and put back around the new
  one, so `enable` and `enable_parallelism` compose in either order;
- `check_supported` (a family without a cp plan is refused), `check_same_schedule` (the schedule's hash
  all-gathered over the context-parallel group; a rank that differs is named) and `check_same_collectives` (the
  same for the collectives each rank's CUDA graph captured, graphs.py: the graphs are captured per rank);
- `trace_attention(...).communication(kind, degree, element_size)`: bytes each rank sends per unit when it
  computes, and per step always (the output gather), from shapes traced on the meta device through
  diffusers' own attention dispatch;
- `check_option` / `init_context_parallel`: the CLI's `--context-parallel ulysses=N|ring=N` under torchrun
  (gloo on a CPU, NCCL on GPUs).

And evaluation sharded over ranks (data parallel): `sharded` runs chunks of a batch of noises on the ranks in
turn and gathers the samples, in order, to every rank.
"""

import contextlib
import hashlib
import inspect
import os
from dataclasses import dataclass

import torch

KINDS = ("ulysses", "ring")


def context_parallel_config(transformer):
    """diffusers' `ContextParallelConfig` of a transformer on which `enable_parallelism` ran, else None."""
    config = getattr(transformer, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None)


def describe(config) -> str:
    """'ulysses=2', 'ring=4' or 'ulysses=2,ring=2' for a ContextParallelConfig."""
    return ",".join(f"{kind}={getattr(config, kind + '_degree')}" for kind in KINDS
                    if getattr(config, kind + "_degree") > 1)


def check_supported(transformer) -> None:
    """A ValueError when context parallelism is on for a transformer class without diffusers' cp plan."""
    if context_parallel_config(transformer) is not None and getattr(type(transformer), "_cp_plan", None) is None:
        raise ValueError(f"context parallelism: expected a transformer whose class has a diffusers cp plan "
                         f"(FLUX, Wan, Qwen-Image), got {type(transformer).__name__}")


@contextlib.contextmanager
def lifted_hooks(module):
    """Take diffusers' hooks (its `HookRegistry`) off `module` for the body of the `with`, then register them
    again in their order: they wrap whatever forward the body left on the module."""
    registry = getattr(module, "_diffusers_hook", None)
    hooks = list(registry.hooks.items()) if registry is not None else []
    for name, _ in reversed(hooks):
        registry.remove_hook(name, recurse=False)
    try:
        yield
    finally:
        for name, hook in hooks:
            registry.register_hook(hook, name)


def _hash63(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


def schedule_digest(engine) -> int:
    """A 63-bit hash of what every rank must run alike: the unit names, the (T, K) compute table and the linear
    forecast's plan (slots and coefficients of every step), if any."""
    data = "\n".join(name for name, _ in engine.units).encode()
    policy = engine.policy
    if policy.schedule is not None:
        data += policy.schedule.table.to(torch.uint8).cpu().numpy().tobytes()
    if policy.forecast_plan is not None:
        data += repr(policy.forecast_plan.rows).encode()
    return _hash63(data)


def _differing_rank(engine, config, digest: int) -> tuple | None:
    """All-gather `digest` over the context-parallel group: (the group's first rank, the first rank whose digest
    differs from it), else None; the same answer on every rank."""
    import torch.distributed as dist

    group = config._flattened_mesh.get_group()  # diffusers' ring x ulysses mesh as one group (set by its setup)
    device = next(engine.transformer.parameters()).device
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    hashes = [int(h) for h in torch.cat(every).tolist()]
    for i, value in enumerate(hashes):
        if value != hashes[0]:
            return dist.get_global_rank(group, 0), dist.get_global_rank(group, i)
    return None


def check_same_schedule(engine, config) -> None:
    """A ValueError, raised on every rank alike, naming the first rank of the context-parallel group whose
    schedule differs from the group's first rank's."""
    differing = _differing_rank(engine, config, schedule_digest(engine))
    if differing is not None:
        raise ValueError(f"router_or_schedule: expected the same cache schedule on every rank of the "
                         f"context-parallel group, got rank {differing[1]}'s differing from rank {differing[0]}'s")


def check_same_collectives(engine, calls: list, config) -> None:
    """At a CUDA graph capture (graphs.py): a ValueError, raised on every rank alike, naming the first rank whose
    captured collectives `calls` ((unit, op, tensor shapes and dtypes) in order) differ in unit or op from the group's
    first rank's: its replays would pair other collectives, or other units' data, than the other ranks'. Shapes are
    not compared: diffusers' "anything" modes (ulysses_anything, ring_anything) shard unevenly, so they may differ."""
    differing = _differing_rank(engine, config, _hash63(repr([(unit, op) for unit, op, _ in calls]).encode()))
    if differing is not None:
        raise ValueError(f"cuda_graphs: expected the same collectives captured on every rank of the context-parallel "
                         f"group, got rank {differing[1]}'s differing from rank {differing[0]}'s (the graph of step "
                         f"{engine.step})")


# ---- communication accounting ----

@dataclass(frozen=True)
class Communication:
    """Bytes one rank sends for one forward under context parallelism of degree `degree` (`kind`).

    names: the units in execution order; unit_bytes: what each sends when it computes (0 when reused, and
    for units without a context-parallel attention); always_bytes: sent at every step whatever the schedule
    (the gather of the output after `proj_out`)."""

    kind: str
    degree: int
    names: tuple
    unit_bytes: tuple
    always_bytes: float

    def per_step(self, row) -> float:
        """Bytes of one step whose compute row (K booleans) is `row`."""
        return self.always_bytes + sum(b for b, computed in zip(self.unit_bytes, row) if computed)

    def trajectory(self, schedule) -> float:
        """Bytes of a whole generation under `schedule` (a CacheSchedule)."""
        return sum(self.per_step(row) for row in schedule.table.tolist())


def attention_bytes(kind: str, degree: int, query_shape: tuple, key_shape: tuple, element_size: int) -> float:
    """Bytes one rank sends for one context-parallel attention over the whole sequence: query_shape
    (B, S_q, H, D) and key_shape (B, S_kv, H, D) before sharding (each rank holds S / P of them).
    Ulysses: an all-to-all each of q, k, v and the output, of which a rank keeps 1 / P of its shard;
    ring (diffusers' allgather rotation): an all-gather of the rank's k and v shards to the P - 1 others."""
    b, s_q, h, d = query_shape
    s_kv = key_shape[1]
    p = degree
    if kind == "ulysses":
        return (p - 1) / p / p * b * h * d * (2 * s_q + 2 * s_kv) * element_size
    return (p - 1) / p * 2 * b * s_kv * h * d * element_size


def gather_bytes(degree: int, shape: tuple, element_size: int) -> float:
    """Bytes one rank sends in the all-gather of an output of `shape` (whole sequence) over P ranks."""
    numel = 1
    for size in shape:
        numel *= size
    return (degree - 1) / degree * numel * element_size


@dataclass(frozen=True)
class AttentionTrace:
    """The context-parallel traffic of one forward before sharding: per unit, the (query, key, mask) shapes
    of each context-parallel attention it runs (query and key (B, S, H, D), mask None or its shape); `always`,
    the shapes of the outputs gathered after the cp plan's `ContextParallelOutput` modules (and of attentions
    outside any unit)."""

    names: tuple
    unit_calls: tuple  # per unit: ((query shape, key shape, mask shape or None), ...)
    always_calls: tuple
    gathers: tuple  # output shapes

    def communication(self, kind: str, degree: int, element_size: int) -> Communication:
        """Bytes per rank under `kind` of `degree`, activations of `element_size` bytes (masks: bool)."""
        if kind not in KINDS or degree < 2:
            raise ValueError(f"kind, degree: expected one of {', '.join(KINDS)} and >= 2, got {kind!r}, {degree}")

        def sent(calls):
            total = 0.0
            for query, key, mask in calls:
                total += attention_bytes(kind, degree, query, key, element_size)
                if kind == "ulysses" and mask is not None:  # each rank's part of the mask, all-gathered
                    total += gather_bytes(degree, mask, 1)
            return total

        always = sent(self.always_calls) + sum(gather_bytes(degree, shape, element_size) for shape in self.gathers)
        return Communication(kind, degree, self.names, tuple(sent(calls) for calls in self.unit_calls), always)


def trace_attention(model, *, batch: int = 1, height=None, width=None, text_tokens=None,
                    frames=None) -> AttentionTrace:
    """The `AttentionTrace` of one forward of `model` (a preset name or a transformer; the size as in
    `macs.count_macs`, with the text mask the pipeline passes where the forward takes one) on `batch`
    images. Run on the meta device: every attention processor is given a stand-in parallel config and
    diffusers' own dispatch runs, so exactly the attentions that are context-parallel (not Wan's
    cross-attention) report their shapes; nothing is computed or communicated."""
    from diffusers.models import attention_dispatch
    from diffusers.models._modeling_parallel import ContextParallelOutput

    from .macs import _example_inputs, _meta_transformer, _spec
    from .units import units_of

    class_name, config, default_height, default_width, tokens, default_frames = _spec(model)
    meta = _meta_transformer(class_name, config)
    plan = getattr(type(meta), "_cp_plan", None)
    if plan is None:
        raise ValueError(f"model: expected a transformer whose class has a diffusers cp plan (FLUX, Wan, "
                         f"Qwen-Image), got {class_name}")
    inputs = _example_inputs(meta, batch, height or default_height, width or default_width,
                             tokens if text_tokens is None else text_tokens, frames or default_frames)
    if "encoder_hidden_states_mask" in inspect.signature(meta.forward).parameters:  # as the pipeline passes it
        text = inputs["encoder_hidden_states"]
        inputs["encoder_hidden_states_mask"] = torch.ones(text.shape[:2], dtype=torch.bool, device="meta")
    units = units_of(meta)
    owner = {module: k for k, unit in enumerate(units) for module in unit.modules}
    unit_calls, always_calls, gathers = [[] for _ in units], [], []
    current = [None]

    def templated(query, key, value, attn_mask=None, *args, **kwargs):
        call = (tuple(query.shape), tuple(key.shape), None if attn_mask is None else tuple(attn_mask.shape))
        (always_calls if current[0] is None else unit_calls[current[0]]).append(call)
        return torch.empty_like(query)

    handles = []
    stand_in = object()  # any parallel config sends the native backend down its templated cp path
    for name, module in meta.named_modules():
        if name in owner:
            k = owner[name]
            handles.append(module.register_forward_pre_hook(lambda m, a, k=k: current.__setitem__(0, k)))
            handles.append(module.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = stand_in
    for name, entry in plan.items():
        if isinstance(entry, ContextParallelOutput):
            handles.append(meta.get_submodule(name).register_forward_hook(
                lambda m, a, out: gathers.append(tuple(out.shape))))
    original = attention_dispatch._templated_context_parallel_attention
    attention_dispatch._templated_context_parallel_attention = templated
    try:
        with torch.no_grad():
            meta(**inputs)
    finally:
        attention_dispatch._templated_context_parallel_attention = original
        for handle in handles:
            handle.remove()
    return AttentionTrace(tuple(unit.name for unit in units), tuple(tuple(c) for c in unit_calls),
                          tuple(always_calls), tuple(gathers))


# ---- the command line ----

OPTION = "--context-parallel"


def check_option(text: str | None, models: dict) -> tuple | None:
    """`--context-parallel` before any work: (kind, degree), or None without it. models: {preset name: diffusers
    class name} of what will run. Refused, each with one line: a value other than ulysses=N / ring=N (N >= 2),
    no torchrun environment, a degree other than the world size (diffusers' mesh spans the world), a model
    class without a cp plan, ring without CUDA (diffusers 0.42's ring needs an attention backend that returns
    the log-sum-exp: flash or cuDNN, GPU only)."""
    import diffusers

    if text is None:
        return None
    kind, _, value = text.partition("=")
    if kind not in KINDS or not value.isdigit() or int(value) < 2:
        raise ValueError(f"{OPTION}: expected ulysses=N or ring=N with N >= 2, got {text!r}")
    degree = int(value)
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError(f"{OPTION}: expected a run under torchrun (torchrun --nproc-per-node {degree} -m harmonica "
                         f"...), got no RANK and WORLD_SIZE in the environment")
    world = int(os.environ["WORLD_SIZE"])
    if degree != world:
        raise ValueError(f"{OPTION}: expected the degree to equal the world size {world} (torchrun "
                         f"--nproc-per-node), got {text}")
    for name, class_name in models.items():
        if getattr(getattr(diffusers, class_name, None), "_cp_plan", None) is None:
            raise ValueError(f"{OPTION}: expected models whose diffusers class has a cp plan (FLUX, Wan, Qwen-Image), "
                             f"got {name} ({class_name})")
    if kind == "ring" and not torch.cuda.is_available():
        raise ValueError(f"{OPTION}: expected ulysses=N without CUDA (diffusers' ring attention needs a flash or "
                         f"cuDNN backend), got {text}")
    return kind, degree


def summary_line(model: str, transformer, schedule, batch: int, element_size: int, cache_bytes: int) -> str:
    """What one rank holds and sends in a generation of `schedule` on the preset `model` (its size)."""
    from .api import _format_bytes
    from .schedule import CacheSchedule

    config = context_parallel_config(transformer)
    kind = "ulysses" if config.ulysses_degree > 1 else "ring"
    sent = trace_attention(model, batch=batch).communication(kind, config._world_size, element_size)
    every = CacheSchedule.no_cache(schedule.num_steps, schedule.num_units)
    return (f"context parallelism {describe(config)}: rank {config._rank} of {config._world_size}, cache "
            f"{_format_bytes(cache_bytes)} per rank, {_format_bytes(sent.trajectory(schedule))} sent per rank per "
            f"generation (no cache: {_format_bytes(sent.trajectory(every))}; from the shapes, not measured)")


def rank() -> int:
    """This process's rank under torchrun (0 without)."""
    return int(os.environ.get("RANK", "0"))


def cpu_device_count_shim() -> None:
    """diffusers' `_resolve_parallel_config` places rank r on accelerator r % `torch.accelerator.device_count()`,
    which is 0 without one (a ZeroDivisionError). On a machine without an accelerator, count the CPU as one
    device. Only ever applied there (it changes nothing the CPU ranks compute)."""
    if torch.accelerator.current_accelerator() is None and torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def init_context_parallel(transformer, kind: str, degree: int) -> str:
    """Under torchrun: the process group (NCCL on CUDA, else gloo; the rank's GPU made current) and
    `transformer.enable_parallelism` with `kind`=`degree`. Returns the device the rank runs on."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    else:
        cpu_device_count_shim()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
    transformer.to(device)
    transformer.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": degree}))
    return device


# ---- evaluation sharded over ranks ----

EVAL_CHUNK = 50  # noises sampled at once in an evaluation, whatever the world size


def sharded(sample, count: int, chunk: int = EVAL_CHUNK, *, stopped=None, advance=None):
    """The results of items 0 .. count - 1, `sample(start, stop)` -> tensor (stop - start, ...), concatenated
    in item order on the CPU, on every rank; None when `stopped()` turned true.

    The items are cut into chunks of `chunk` (boundaries independent of the world size); under torchrun chunk
    j runs on rank j % world and the chunks are all-gathered at the end, so every chunk is computed with the
    shapes it has in one process and the result equals one process's bit for bit (on one device kind and
    thread count). One process: the chunks in turn, no collective. stopped(): asked before every round of
    `world` chunks and agreed (true on any rank stops every rank), so the ranks stay in lockstep;
    advance(n): called after each round with its n chunks (a progress bar)."""
    import torch.distributed as dist

    from .training import _any_rank, _rank_world

    rank, world = _rank_world()
    device = "cuda" if world > 1 and dist.get_backend() == "nccl" else "cpu"  # NCCL: the rank's current GPU
    starts = list(range(0, count, chunk))
    mine = []
    for first in range(0, len(starts), world):
        if stopped is not None and _any_rank([stopped()], device)[0]:
            return None
        if first + rank < len(starts):
            start = starts[first + rank]
            mine.append(sample(start, min(start + chunk, count)).cpu())
        if advance is not None:
            advance(min(world, len(starts) - first))
    if world == 1:
        return torch.cat(mine)
    every = [None] * world
    dist.all_gather_object(every, mine)
    return torch.cat([every[j % world][j // world] for j in range(len(starts))])
