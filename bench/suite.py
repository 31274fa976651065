"""The sampling suite: each model x step count x configuration x execution mode, timed against the
no-cache baseline of the same run, with the theoretical (MAC) speedup, quality and the gap between them.

A generation has three timed phases: text encoding (PixArt with real weights; random weights have
no text encoder and DiT is class-conditional: not timed), the transformer loop (the preset's task,
`Family.make_task`, through `samplers.sample`: DiT's original DDIM and PixArt's DPM-Solver++ as coefficient
tables, equal to the pipelines' latents within fp32 rounding; PixArt's other samplers stepping their
scheduler as the pipeline does; scheduler steps included) and the VAE decode. Each row warms up (`warmup`
generations, which also capture CUDA graphs and count the units peers ran), then times `repeat` generations (CUDA
events after a synchronise on a GPU, `perf_counter` on the CPU); medians, quartiles and extremes.

Execution modes of a harmonica configuration (peers run once, as their hooks run):
- eager: `enable(..., fused=False)` (torch references); for no-cache and fewer-steps the plain pipeline;
- fused: `enable(...)` (fused Triton ops on CUDA);
- graphs: `enable(..., cuda_graphs=True)` (CUDA only): the sampler step runs after each replay;
- graphs-step: `enable(..., cuda_graphs=True, scheduler_in_graph=True)` (CUDA only, table samplers):
  the sampler step runs inside each graph (method.md: keep the faster of the two);
- compile: `enable(..., cuda_graphs=True, compile=True)` (CUDA only).

Which rows a run makes is decided before anything runs (`plan_group`, which `harmonica bench --plan`
prints too). Rows are flat dicts (one per model, resolution, steps, configuration, mode), `status` "ok" or
"skipped" with the `reason`. Quality: PSNR / SSIM of the decoded image against the baseline image of
the same seed (for fewer-steps: the baseline at the full step count).

The flow-matching presets (`FLOW_MODELS`: tiny-flux, tiny-sd3, tiny-sd35, tiny-wan, tiny-qwen-image, tiny-flux2,
and the real flux.1-dev, sd3.5-large, wan2.1-1.3b, qwen-image, flux.2-dev; `--models` only) run `flow.flow_sample` (the
pipeline's Euler loop through `SolverLoop`) on the transformer alone with one random prompt: no text encoder, no VAE
(`FlowWorkload`; random weights, or with `--real-weights` the hub transformer of a real preset; bf16 on CUDA);
their quality is the PSNR of the final latents against the baseline's, at the baseline's peak-to-peak range
(no SSIM). The tiny ones run 20 steps, the real ones their pipeline's default.
"""

import contextlib
import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

import harmonica
from harmonica import parallel
from harmonica.flow import SAMPLER as FLOW_SAMPLER
from harmonica.flow import as_4d, flow_sample
from harmonica.generation import default_guidance, first_conditions, given_bank
from harmonica.macs import count_macs
from harmonica.models import (
    FLOW_PRESETS,
    PRESETS,
    REAL_MODELS,
    build_pipeline,
    build_transformer,
    load_experts,
    move_pipeline,
    preset,
    preset_task,
)
from harmonica.prompts import random_embeddings
from harmonica.router import Router
from harmonica.samplers import TABLE_SAMPLERS, initial_noise, sample
from harmonica.schedule import CacheSchedule

from .configs import (
    DEFAULT_CONFIGS,
    LEARNED_RULES,
    MODE_OPTIONS,
    MODES,
    SKELETON,
    Config,
    engine_schedule,
    fewer_steps,
    parse_config,
)
from .gap import attribute_gap
from .peers import PeerUnavailable, UnitCounter, make_peer
from .quality import psnr, ssim
from .timing import spread, timed


@dataclass(frozen=True)
class Matrix:
    """What a run covers when --models, --configs, --modes or --steps are not given. dit_steps: the step
    counts of the real models sampled by `MATRIX_SAMPLER`, DiT-XL/2's (the others run their sampler's default,
    20)."""

    models: tuple
    configs: tuple
    modes: tuple
    dit_steps: tuple


# CUDA default: sized to <= 15 min by `harmonica bench --plan` (bench/plan.py); covers every target
# of table.target_verdicts. --full: the whole matrix. CPU: the tiny models, every configuration and mode.
MATRICES = {
    "cuda": Matrix(("dit-xl-2-256", "pixart-alpha-256", "pixart-alpha-1024", "pixart-sigma-2048"),
                   ("no-cache", "fewer-steps", "fora:2", "harmonica", "fbcache", "dbcache"),
                   ("eager", "fused", "graphs", "graphs-step"), (20,)),
    "full": Matrix(REAL_MODELS, DEFAULT_CONFIGS, MODES, (10, 20, 50)),
    "cpu": Matrix(("tiny-dit", "tiny-pixart"), DEFAULT_CONFIGS, MODES, (20,)),
}
# the flow presets, --models only; the tiny ones at 20 steps as the tiny DiT/PixArt, the real ones at their
# pipeline's default (--steps to change)
FLOW_MODELS = tuple(FLOW_PRESETS)
FLOW_STEPS = 20
MATRIX_SAMPLER = "dit-ddim"  # the sampler of `Matrix.dit_steps`
PROMPT = "A small cactus with a happy face in the Sahara desert."


def family(name: str) -> str:
    """'pixart-alpha-512' -> 'pixart-alpha'; names without a resolution suffix are their own family."""
    stem, _, suffix = name.rpartition("-")
    return stem if suffix.isdigit() else name


FAMILIES = {}
for _name in PRESETS:
    FAMILIES.setdefault(family(_name), []).append(_name)


@dataclass
class SuiteOptions:
    """What to run. models, configs, modes, steps: None for the matrix's (`MATRICES`: "full" with `full`
    on CUDA, else "cuda" or "cpu"); resolutions: pixels (None: every resolution of the models); steps: one
    list for every model (None: DiT-XL/2 the matrix's DDIM step counts; others their sampler's, 20;
    --quick: 20 only). max_compiled_graphs: compile rows whose schedule needs more graphs are skipped."""

    models: tuple | None = None
    resolutions: tuple | None = None
    configs: tuple | None = None
    modes: tuple | None = None
    steps: tuple | None = None
    repeat: int = 5
    warmup: int = 1
    quick: bool = False
    full: bool = False
    max_compiled_graphs: int | None = None
    router: str | None = None
    real_weights: bool = False
    seed: int = 0
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    context_parallel: str | None = None  # under torchrun: "ulysses=N" or "ring=N" (harmonica/parallel.py)

    def __post_init__(self):
        self.matrix = MATRICES["cpu" if self.device != "cuda" else "full" if self.full else "cuda"]
        if self.quick:
            self.repeat = min(self.repeat, 2)
        self.configs = tuple(parse_config(c) if isinstance(c, str) else c
                             for c in (self.matrix.configs if self.configs is None else self.configs))
        self.modes = self.matrix.modes if self.modes is None else tuple(self.modes)
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"--modes: expected names from {list(MODES)}, got {unknown[0]!r}")
        for name, value, least in (("--repeat", self.repeat, 1), ("--warmup", self.warmup, 1)):
            if value < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {value}")
        if self.steps is not None and min(self.steps) < 2:
            raise ValueError(f"--steps: expected step counts >= 2, got {list(self.steps)}")
        if self.max_compiled_graphs is not None and self.max_compiled_graphs < 1:
            raise ValueError(f"--max-compiled-graphs: expected an integer >= 1, got {self.max_compiled_graphs}")
        self.model_names = select_models(self.models, self.resolutions, self.matrix.models)
        self.parallel = parallel.check_option(self.context_parallel,
                                              {name: preset(name).class_name for name in self.model_names})
        experts = [name for name in self.model_names if preset(name).experts > 1]
        if self.parallel and experts:
            raise ValueError(f"--context-parallel: expected models of one transformer, got {experts[0]}, whose "
                             f"pipeline switches between {preset(experts[0]).experts} by step")

    def steps_for(self, name: str) -> tuple:
        if self.steps is not None:
            return tuple(self.steps)
        if name in FLOW_MODELS and name.startswith("tiny-"):
            return (FLOW_STEPS,)
        spec = preset(name)  # (a flow preset has no sampler: its own steps)
        if self.quick or spec.sampler != MATRIX_SAMPLER or name not in REAL_MODELS:
            return (spec.steps,)
        return self.matrix.dit_steps


def select_models(models, resolutions, defaults: tuple) -> list:
    """Preset names to run (`models`, else `defaults`); ValueError naming --models or --resolutions for a
    name or resolution that does not exist or that a named model cannot take."""
    explicit = models is not None
    names = []
    for name in (models if explicit else defaults):
        if name not in PRESETS and name not in FAMILIES and name not in FLOW_MODELS:
            raise ValueError(f"--models: expected preset or family names from {sorted(PRESETS)}, "
                             f"{sorted(FAMILIES)} or {list(FLOW_MODELS)}, got {name!r}")
        members = [name] if name in PRESETS or name in FLOW_MODELS else FAMILIES[name]
        if resolutions:
            taken = [m for m in members if resolution(m) in resolutions]
            if explicit and not taken:
                raise ValueError(f"--resolutions: {name} takes {sorted(resolution(m) for m in members)}, "
                                 f"got {list(resolutions)}")
            members = taken
        names += [m for m in members if m not in names]
    if not names:
        raise ValueError(f"--resolutions: none of the default models takes {list(resolutions)}")
    return names


def later_firsts(name: str, num_steps: int, transformer) -> tuple:
    """The first step of each transformer after the first of a preset whose experts take turns by step (Wan 2.2
    A14B: the low-noise expert's, the boundary step) at `num_steps`: rows every schedule must compute; () for a
    preset of one. transformer: one expert (its config; meta is enough)."""
    spec = preset(name)
    if spec.experts == 1:
        return ()
    bank = random_embeddings(transformer, 1, spec.text_tokens, torch.Generator())
    task = preset_task(name, [transformer] * spec.experts, None, bank, num_steps, spec.guidance)
    return tuple(first for _, first in task.experts()[1:])


def resolution(name: str) -> int:
    """Pixels per side of a preset (a flow preset: its height)."""
    return preset(name).height


def model_macs(name: str, transformer=None):
    """`count_macs` of a preset at its size: its height, width, frames and prompt tokens."""
    spec = preset(name)
    return count_macs(transformer if transformer is not None else name, spec.height, spec.width,
                      text_tokens=spec.text_tokens, frames=spec.frames)


class Workload:
    """One model's pipeline on the device and the three phases of a generation of one image."""

    def __init__(self, name: str, options: SuiteOptions):
        self.name, self.spec, self.resolution = name, preset(name), resolution(name)
        self.device = torch.device(options.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.seed = options.seed
        pipe = build_pipeline(name, random_weights=not options.real_weights, seed=options.seed)
        move_pipeline(pipe, self.device, self.dtype)
        self.pipe = pipe
        self.transformers = [pipe.transformer]  # what the engine rows enable
        self.macs = count_macs(name)
        self.has_text_encoder = self.spec.family.text_conditional and options.real_weights
        self.prompt = None if self.has_text_encoder else self.encode()  # drawn once without a text encoder

    @property
    def sampler(self) -> str:
        return self.spec.sampler

    def encode(self) -> tuple:
        """(prompt bank or None, conditions) of the benchmark's class or prompt: PixArt's prompt through the text
        encoder (timed), or a random one of the seed."""
        spec = self.spec
        bank = (spec.family.encode(self.pipe, [PROMPT], None, {}) if self.has_text_encoder else
                given_bank(spec, self.pipe.transformer, random_weights=True,
                           generator=torch.Generator().manual_seed(self.seed)))
        return bank, first_conditions(spec)

    def loop(self, prompt: tuple, num_steps: int, transformer):
        """Latents (1, C, h, w) after `num_steps` denoising steps of the seed's noise through `transformer`, at the
        sampler's default guidance."""
        bank, cond = prompt
        generator = torch.Generator().manual_seed(self.seed)
        task = preset_task(self.name, [transformer], self.pipe.scheduler, bank, num_steps,
                           default_guidance(self.spec, self.sampler), self.sampler)
        return sample(task, cond, initial_noise(task, 1, generator), generator=generator)

    def decode(self, latents):
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)

    def quality(self, images, reference) -> dict:
        return {"psnr": psnr(images, reference), "ssim": ssim(images, reference)}

    def generate(self, num_steps: int, transformer, generation) -> tuple:
        """(images, {"text", "loop", "decode"} ms, bytes the loop left allocated beyond its output (CUDA
        only: caches, graph pools)) of one generation; `generation()` is entered around its loop."""
        cuda = self.device.type == "cuda"
        with generation():
            if self.has_text_encoder:
                prompt, text_ms = timed(self.encode, device=self.device)
            else:
                prompt, text_ms = self.prompt, 0.0
            allocated = torch.cuda.memory_allocated(self.device) if cuda else 0
            latents, loop_ms = timed(self.loop, prompt, num_steps, transformer, device=self.device)
            retained = (torch.cuda.memory_allocated(self.device) - allocated - latents.numel() * latents.element_size()
                        if cuda else None)
        images, decode_ms = timed(self.decode, latents, device=self.device)
        return images, {"text": text_ms, "loop": loop_ms, "decode": decode_ms}, retained

    @torch.inference_mode()
    def measure(self, num_steps: int, repeat: int, warmup: int, transformer=None, generation=None,
                count_units: bool = False) -> dict:
        """Spreads of the text, loop, decode and pipeline times of `repeat` generations after `warmup`
        untimed ones; the last images; what the first loop left allocated; the peak memory of the timed
        ones (CUDA); with `count_units`, the (T, K) table of the units the first generation ran.
        transformer: default the pipeline's; generation: a context factory entered around each loop
        (a peer's state reset)."""
        transformer = transformer if transformer is not None else self.pipe.transformer
        cuda = self.device.type == "cuda"
        times = {"text": [], "loop": [], "decode": [], "pipeline": []}
        result = {"peak_bytes": None, "units_run": None}
        for i in range(warmup + repeat):
            if i == warmup and cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            counter = UnitCounter(transformer) if count_units and i == 0 else contextlib.nullcontext()
            with counter:
                images, ms, retained = self.generate(num_steps, transformer, generation or contextlib.nullcontext)
            if i == 0:
                result["retained_bytes"] = retained
                if count_units:
                    result["units_run"] = counter.table()
            if i >= warmup:
                for part, value in {**ms, "pipeline": sum(ms.values())}.items():
                    times[part].append(value)
        if cuda:
            result["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        result["images"] = images.float().cpu()
        for part, samples in times.items():
            result[part] = spread(samples)
        return result


class FlowWorkload(Workload):
    """A flow preset: its transformer alone (Wan 2.2 A14B: both experts, each step on its own) on the device (random
    weights, or the hub's with `real_weights`; bf16 on CUDA), one random prompt of the preset's text length,
    `flow_sample` as the loop (seed's noise, the preset's guidance); the "decode" is the final latents unpacked to
    (1, C, H, W) (video: frames along H), not timed work."""

    def __init__(self, name: str, options: SuiteOptions):
        self.name, self.spec, self.resolution = name, preset(name), resolution(name)
        if options.real_weights and self.spec.hub_id is None:
            raise ValueError(f"--real-weights: {name} runs with random weights only (no published weights)")
        self.device = torch.device(options.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.seed = options.seed
        # random weights are built on the device, except under context parallelism (its rank picks the device)
        self.transformers = load_experts(name, random_weights=not options.real_weights, seed=options.seed,
                                         device="cpu" if options.parallel else self.device)
        transformer = self.transformers[0]
        if options.parallel:  # the rank's device, diffusers' context parallelism on the transformer (one: checked)
            self.device = torch.device(parallel.init_context_parallel(transformer, *options.parallel))
        for expert in self.transformers:
            move_pipeline(expert, self.device, self.dtype)
        self.pipe = SimpleNamespace(transformer=transformer)
        self.bank = given_bank(self.spec, transformer, random_weights=True,
                               generator=torch.Generator().manual_seed(options.seed))
        self.tasks = {}
        self.macs = model_macs(name, transformer)
        self.has_text_encoder, self.prompt = False, None

    sampler = FLOW_SAMPLER

    def task(self, num_steps: int):
        if num_steps not in self.tasks:  # of every expert (Wan 2.2 A14B's two take turns by step)
            self.tasks[num_steps] = preset_task(self.name, self.transformers, None, self.bank, num_steps,
                                                self.spec.guidance)
        return self.tasks[num_steps]

    def loop(self, prompt, num_steps: int, transformer):
        task = self.task(num_steps)
        task.transformer = transformer  # a peer's copy or the workload's transformer
        try:
            return flow_sample(task, torch.tensor([0]), generator=torch.Generator().manual_seed(self.seed))
        finally:
            task.transformer = self.pipe.transformer

    def decode(self, latents):
        return as_4d(next(iter(self.tasks.values())).unpack(latents)).float()

    def quality(self, images, reference) -> dict:
        return {"psnr": latent_psnr(images, reference), "ssim": None}


def latent_psnr(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of latents against the reference's, at the reference's peak-to-peak range."""
    peak = (reference.max() - reference.min()).double()
    mse = torch.mean((latents.double() - reference.double()) ** 2)
    return float("inf") if mse == 0 else (10 * torch.log10(peak ** 2 / mse)).item()


def make_workload(name: str, options: SuiteOptions) -> Workload:
    return (FlowWorkload if name in FLOW_MODELS else Workload)(name, options)


def _skip_reason(config: Config, mode: str, device: str, sampler: str, parallel=None) -> str | None:
    if mode in ("graphs", "graphs-step", "compile") and device != "cuda":
        return "needs CUDA"
    if mode == "graphs-step" and sampler not in TABLE_SAMPLERS:
        return f"the {sampler} step cannot run inside a graph (table samplers: {', '.join(TABLE_SAMPLERS)})"
    if mode == "compile" and "compile" not in inspect.signature(harmonica.enable).parameters:
        return "torch.compile option not implemented yet (harmonica.enable has no compile argument)"
    return None


@dataclass(frozen=True)
class PlannedRow:
    """A row of the suite before it runs. schedule: what `harmonica.enable` takes (a `CacheSchedule` or
    `Router`; None for peers and skipped rows); reason: why it is skipped, None when it runs."""

    config: Config
    mode: str
    row_steps: int
    schedule: object = None
    synthetic: bool = False
    reason: str | None = None

    @property
    def table(self) -> CacheSchedule | None:
        return self.schedule.schedule() if isinstance(self.schedule, Router) else self.schedule

    @property
    def graphs(self) -> int | None:
        """CUDA graphs the row captures (one per distinct step key; compile: +1 compiled graph for the first
        step, which also allocates the slots); None when it captures none."""
        if self.mode not in ("graphs", "graphs-step", "compile") or self.table is None:
            return None
        return len(set(self.table.step_keys)) + (self.mode == "compile")


def matched_speedup(configs, transformer, macs, num_steps: int, router: Router | None) -> float:
    """Theoretical speedup that fewer-steps matches: the first harmonica configuration's."""
    learned = next((c for c in configs if c.kind == "harmonica"), parse_config("harmonica"))
    try:
        schedule, _ = engine_schedule(learned, transformer, num_steps, router)
    except ValueError:
        schedule, _ = engine_schedule(parse_config("harmonica"), transformer, num_steps)
    schedule = schedule.schedule() if isinstance(schedule, Router) else schedule
    return schedule.theoretical_speedup(macs)


def plan_group(name: str, num_steps: int, options: SuiteOptions, router: Router | None = None,
               transformer=None, macs=None) -> list:
    """The `PlannedRow`s of one model at one step count, in the order they run: the no-cache eager baseline,
    every configuration in every mode (peers once, eager), then the skeleton in each mode where a
    configuration reuses. transformer, macs: the model's (default: a meta-device transformer, its MACs)."""
    if transformer is None:
        with torch.device("meta"):
            transformer = build_transformer(name)
    macs = macs or model_macs(name, transformer)
    sampler = FLOW_SAMPLER if name in FLOW_MODELS else preset(name).sampler
    matched = matched_speedup(options.configs, transformer, macs, num_steps, router)
    experts = preset(name).experts

    def planned(config: Config, mode: str) -> PlannedRow:
        row_steps = fewer_steps(config, num_steps, matched) if config.kind == "fewer-steps" else num_steps
        if config.is_peer:
            reason = ("not under context parallelism" if options.parallel else
                      f"{name}'s pipeline switches between {experts} transformers by step; a peer runs on one"
                      if experts > 1 else None)
            return PlannedRow(config, mode, row_steps, reason=reason)
        reason = _skip_reason(config, mode, options.device, sampler, options.parallel)
        if reason:
            return PlannedRow(config, mode, row_steps, reason=reason)
        try:
            schedule, synthetic = engine_schedule(config, transformer, row_steps,
                                                  router if config.kind in LEARNED_RULES else None)
        except ValueError as error:
            return PlannedRow(config, mode, row_steps, reason=str(error))
        firsts = later_firsts(name, row_steps, transformer)
        if isinstance(schedule, CacheSchedule):  # each later expert's first row computes (its slots are empty)
            schedule = schedule.computing(firsts)
        elif not schedule.schedule().table[list(firsts)].all():
            return PlannedRow(config, mode, row_steps, reason=f"the router reuses at step "
                              f"{', '.join(map(str, firsts))}, where a later expert begins (its slots are empty)")
        row = PlannedRow(config, mode, row_steps, schedule, synthetic)
        limit = options.max_compiled_graphs
        if mode == "compile" and limit and row.graphs > limit:
            return PlannedRow(config, mode, row_steps, reason=f"needs {row.graphs} compiled graphs, over "
                              f"--max-compiled-graphs {limit}")
        return row

    rows = [planned(parse_config("no-cache"), "eager")]
    for config in options.configs:
        modes = ("eager",) if config.is_peer else options.modes
        rows += [planned(config, mode) for mode in modes if (config.kind, mode) != ("no-cache", "eager")]
    reusing = {r.mode for r in rows if r.reason is None and (r.config.is_peer or r.table.cur > 0)}
    return rows + [planned(Config(SKELETON, SKELETON), mode) for mode in MODES if mode in reusing]


class GroupRun:
    """The rows of one model at one step count: baseline first, then every configuration and mode,
    the skeleton rows the gap attribution needs, then the attribution."""

    def __init__(self, workload: Workload, num_steps: int, options: SuiteOptions, router: Router | None, bar):
        self.w, self.steps, self.options, self.router, self.bar = workload, num_steps, options, router, bar
        self.rows = []
        self.reference = None
        self.baseline = None

    def row(self, config_name: str, mode: str, **fields) -> dict:
        spec = self.w.spec
        row = {"model": self.w.name, "resolution": self.w.resolution, "steps": self.steps, "sampler": self.w.sampler,
               "config": config_name, "mode": mode, "status": "ok", "reason": None, "synthetic": False,
               "peer_config": None, "device": self.options.device, "dtype": str(self.w.dtype).removeprefix("torch."),
               "weights": spec.hub_id if self.options.real_weights else "random", **fields}
        self.rows.append(row)
        self.bar.set_postfix_str(f"{self.w.name} T={self.steps} {config_name} {mode}")
        self.bar.update()
        return row

    def skip(self, config_name: str, mode: str, reason: str) -> dict:
        return self.row(config_name, mode, status="skipped", reason=reason)

    def measured(self, config_name, mode, measurement, *, cur, theoretical, row_steps=None, **fields) -> dict:
        """An ok row from a measurement: speedups against the baseline, efficiency, quality.
        theoretical: None when unknown (then no efficiency)."""
        base = self.baseline
        loop, pipeline = measurement["loop"]["median"], measurement["pipeline"]["median"]
        loop_speedup = base["loop"]["median"] / loop
        return self.row(
            config_name, mode, row_steps=row_steps or self.steps, cur=cur, theoretical_speedup=theoretical,
            text_encoder=self.w.has_text_encoder,
            **{f"{part}_ms": measurement[part]["median"] for part in ("text", "loop", "decode", "pipeline")},
            **{f"{part}_ms_{q}": measurement[part][q] for part in ("loop", "pipeline")
               for q in ("p25", "p75", "min", "max")},
            repeats=measurement["loop"]["n"], loop_speedup=loop_speedup,
            pipeline_speedup=base["pipeline"]["median"] / pipeline,
            efficiency=None if theoretical is None else loop_speedup / theoretical,
            **self.w.quality(measurement["images"], self.reference),
            retained_bytes=measurement["retained_bytes"], peak_bytes=measurement["peak_bytes"], **fields)

    def run(self) -> list:
        options, w = self.options, self.w
        baseline, *planned = plan_group(w.name, self.steps, options, self.router, w.pipe.transformer, w.macs)
        self.baseline = w.measure(baseline.row_steps, options.repeat, options.warmup)
        self.reference = self.baseline["images"]
        self.measured("no-cache", "eager", self.baseline, cur=0.0, theoretical=1.0, cache_bytes=0)
        for row in planned:
            if row.reason:
                self.skip(row.config.name, row.mode, row.reason)
            elif row.config.is_peer:
                self.run_peer(row.config)
            else:
                self.run_engine(row)
        self.check_drift(baseline.row_steps)
        self.attribute_gaps()
        return self.rows

    def check_drift(self, steps: int) -> None:
        """The baseline timed again after every other row of the group, into the baseline row's `loop_ms_after`:
        how far the machine drifted while the rows between ran (they are compared with the first timing)."""
        again = self.w.measure(steps, self.options.repeat, self.options.warmup)
        base = next(r for r in self.rows if (r["config"], r["mode"]) == ("no-cache", "eager"))
        base["loop_ms_after"] = again["loop"]["median"]

    def run_engine(self, planned: PlannedRow) -> None:
        config, mode, row_steps, plan, schedule = (planned.config, planned.mode, planned.row_steps, planned.schedule,
                                                   planned.table)
        theoretical = self.steps / row_steps * schedule.theoretical_speedup(self.w.macs)
        cur = schedule.cur
        plain = mode == "eager" and config.kind == "fewer-steps"
        target, enabled, report = self.w.transformers, False, None  # experts: one engine each, one schedule
        try:
            if not plain:
                harmonica.enable(target, plan, **MODE_OPTIONS[mode])
                enabled = True
            measurement = self.w.measure(row_steps, self.options.repeat, self.options.warmup)
            if enabled:
                report = harmonica.summary(target)
        except Exception as error:  # a failing row is recorded, the suite goes on
            self.skip(config.name, mode, f"failed: {type(error).__name__}: {error}")
            return
        finally:
            if enabled:
                harmonica.disable(target)
        self.measured(config.name, mode, measurement, cur=cur, theoretical=theoretical, row_steps=row_steps,
                      synthetic=planned.synthetic, schedule=schedule.name,
                      cache_bytes=report.cache_bytes if report else 0,
                      graphs=report.graphs if report else None,
                      graph_pool_bytes=report.graph_pool_bytes if report and report.graphs is not None else None)

    def run_peer(self, config: Config) -> None:
        try:
            peer = make_peer(config, self.w.pipe.transformer, self.steps)
        except PeerUnavailable as error:
            self.skip(config.name, "eager", str(error))
            return
        except Exception as error:  # the peer does not take this model
            self.skip(config.name, "eager", f"failed: {type(error).__name__}: {error}")
            return
        try:
            with torch.inference_mode():
                peer.calibrate(lambda: self.w.loop(self.w.prompt, self.steps, peer.transformer))
            measurement = self.w.measure(self.steps, self.options.repeat, self.options.warmup, peer.transformer,
                                         lambda: peer.generation(self.steps), count_units=True)
        except Exception as error:
            self.skip(config.name, "eager", f"failed: {type(error).__name__}: {error}")
            return
        finally:
            peer.close()
            del peer.transformer
        table = measurement["units_run"]
        try:  # the units that really ran, as a schedule: its CUR and MAC speedup
            ran = CacheSchedule(table, config.name)
            cur, theoretical, note = ran.cur, ran.theoretical_speedup(self.w.macs), None
        except ValueError as error:
            cur, theoretical, note = 1.0 - table.float().mean().item(), None, f"no MAC count: {error}"
        self.measured(config.name, "eager", measurement, cur=cur, theoretical=theoretical,
                      peer_config=peer.description, cache_bytes=None, theoretical_note=note,
                      units_run_per_step=table.sum(1).tolist())

    def attribute_gaps(self) -> None:
        ok = {(r["config"], r["mode"]): r for r in self.rows if r["status"] == "ok"}
        base = ok[("no-cache", "eager")]
        base_other = base["text_ms"] + base["decode_ms"]
        always_share = self.w.macs.always_macs / self.w.macs.total
        for row in ok.values():
            if not row["theoretical_speedup"] or row["theoretical_speedup"] <= 1.0:
                continue
            graphs = ok.get((row["config"], "graphs")) if row["mode"] not in ("graphs", "compile") else None
            reference_mode = "graphs" if graphs else row["mode"]
            skeleton = ok.get((SKELETON, reference_mode))
            reuses = row["config"].partition(":")[0] != "fewer-steps"
            row.update(attribute_gap(
                steps=self.steps, theoretical=row["theoretical_speedup"], always_share=always_share,
                baseline_loop_ms=base["loop_ms"], baseline_other_ms=base_other, loop_ms=row["loop_ms"],
                other_ms=row["text_ms"] + row["decode_ms"],
                skeleton_loop_ms=skeleton["loop_ms"] if skeleton and reuses else None,
                graphs_loop_ms=graphs["loop_ms"] if graphs else None))


def run_suite(options: SuiteOptions, progress: bool = True, done=None) -> list:
    """Every row of the suite, model by model (each model built, run and freed in turn); `done(rows)` is
    called with the rows so far after each model."""
    router = Router.from_pretrained(options.router) if options.router else None
    total = sum(len(plan_group(name, steps, options, router)) for name in options.model_names
                for steps in options.steps_for(name))
    rows = []
    with tqdm(total=total, disable=not progress, desc="bench", unit="row") as bar:
        for name in options.model_names:
            workload = make_workload(name, options)
            for num_steps in options.steps_for(name):
                rows += GroupRun(workload, num_steps, options, router, bar).run()
            del workload
            if options.device == "cuda":
                torch.cuda.empty_cache()
            if done:
                done(rows)
    return rows

