"""Wan 2.2 A14B's two experts (tiny-wan2.2: two tiny random WanTransformer3DModel of different seeds) through
diffusers' own WanPipeline: one engine per expert on the one schedule of the generation's steps (CPU, fp32).

With 4 steps at shift 5 the timesteps are 1000, 909, 714, 5: the high-noise expert (t >= 875) runs steps 0-1, the
low-noise one steps 2-3, and its first step (2) must compute every unit."""

import diffusers
import pytest
import torch
from _helpers import rounding_bound

import harmonica
from harmonica import CacheSchedule, cli
from harmonica.flow import flow_task
from harmonica.forecast import Forecast
from harmonica.macs import count_macs
from harmonica.models import FLOW_PRESETS, build_transformer
from harmonica.prompts import random_embeddings
from harmonica.router import Router
from harmonica.search import Rollouts, SearchConfig, search_router, spread, task_engine
from harmonica.units import cached_units

NAME, STEPS, BOUNDARY = "tiny-wan2.2", 4, 2  # BOUNDARY: the low-noise expert's first step
SPEC = FLOW_PRESETS[NAME]
UNITS = 2 * 3  # 2 blocks x (attn1, attn2, ffn)


def make_pipe(boundary_ratio=SPEC.pipeline_config["boundary_ratio"]):
    """diffusers' WanPipeline of the preset's experts (seeds 0 and 1), no text encoder, no VAE."""
    experts = [build_transformer(NAME, seed=seed) for seed in range(SPEC.experts)]
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=experts[0],
                                 transformer_2=experts[1], scheduler=SPEC.family.scheduler.scheduler(),
                                 boundary_ratio=boundary_ratio)


def prompt_and_noise(pipe):
    """A bank of one random prompt and the noise (1, C, F, h, w) of a generation."""
    bank = random_embeddings(pipe.transformer, 1, SPEC.text_tokens, torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, SPEC.family.latent_frames(SPEC.frames), SPEC.height // 8, SPEC.width // 8,
                        generator=torch.Generator().manual_seed(1))
    return bank, noise


def generate(pipe):
    """The pipeline's final latents (1, C, F, h, w) of one random prompt, with CFG, from fixed noise."""
    bank, noise = prompt_and_noise(pipe)
    return pipe(**bank, latents=noise, num_inference_steps=STEPS, height=SPEC.height, width=SPEC.width,
                num_frames=SPEC.frames, guidance_scale=SPEC.guidance, output_type="latent",
                guidance_scale_2=SPEC.guidance_2 if pipe.config.boundary_ratio else None).frames


def test_the_steps_cross_the_boundary_inside_the_run():
    pipe = make_pipe()
    pipe.scheduler.set_timesteps(STEPS)
    boundary = SPEC.pipeline_config["boundary_ratio"] * pipe.scheduler.config.num_train_timesteps
    assert [t >= boundary for t in pipe.scheduler.timesteps.tolist()] == [True] * BOUNDARY + [False] * 2


def test_caching_off_is_bitwise_diffusers_two_expert_pipeline_and_disable_restores_both():
    pipe = make_pipe()
    plain = generate(pipe)
    assert not torch.equal(plain, generate(make_pipe(boundary_ratio=None)))  # the low-noise expert ran
    engine = harmonica.enable(pipe, CacheSchedule.no_cache(STEPS, UNITS))
    assert engine is pipe.transformer._harmonica.engine and pipe.transformer_2._harmonica.engine is not engine
    assert torch.equal(generate(pipe), plain)
    harmonica.disable(pipe)
    assert torch.equal(generate(pipe), plain)
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert not hasattr(transformer, "_harmonica")
        assert not any("forward" in vars(m) or "cache_context" in vars(m) for m in transformer.modules())
        assert not transformer._forward_hooks and not transformer._forward_pre_hooks
    assert "set_timesteps" not in vars(pipe.scheduler)


# FORA:2, and a table whose rows differ between the experts' halves (a low-noise engine that ran rows 0-1 for
# global steps 2-3 would differ)
UNEVEN = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [1] * 6, [0, 0, 0, 0, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("schedule", [CacheSchedule.fora(STEPS, UNITS, 2), CacheSchedule(UNEVEN, "uneven")],
                         ids=["fora2", "uneven"])
def test_each_expert_runs_the_rows_of_its_global_steps_and_reuses(schedule):
    """Every forward (cond and uncond, two generations) of each expert runs at the engine step equal to the global
    step (its timestep's index); the units each expert's modules ran per global step are the schedule's rows of the
    steps it serves, none of the others'; the reusing steps change the result."""
    pipe = make_pipe()
    plain = generate(pipe)
    harmonica.enable(pipe, schedule)
    timesteps = []
    experts = (pipe.transformer, pipe.transformer_2)
    calls = torch.zeros(len(experts), STEPS, UNITS, dtype=torch.bool)
    current = {}  # expert -> the global step of its forward in flight
    steps_seen = []  # (expert, global step, engine step) of every forward

    def before(e):
        def hook(module, args, kwargs):
            if not timesteps:
                timesteps.extend(pipe.scheduler.timesteps.tolist())
            current[e] = timesteps.index(float(kwargs["timestep"][0]))
            steps_seen.append((e, current[e], module._harmonica.engine.step))
        return hook

    def ran(e, k):
        def hook(module, args, output):
            calls[e, current[e], k] = True
        return hook

    hooks = [expert.register_forward_pre_hook(before(e), with_kwargs=True) for e, expert in enumerate(experts)]
    hooks += [module.register_forward_hook(ran(e, k)) for e, expert in enumerate(experts)
              for k, (_, module) in enumerate(cached_units(expert))]
    try:
        cached = generate(pipe)
        assert torch.equal(generate(pipe), cached)  # a second generation begins both experts again
        report = harmonica.summary(pipe)  # the slots of both experts
        held = [expert._harmonica.engine.cache_bytes() for expert in experts]
        assert report.experts == 2 and report.cache_bytes == sum(held) and min(held) > 0
        assert "(its 2 experts together)" in str(report)
    finally:
        for hook in hooks:
            hook.remove()
        harmonica.disable(pipe)
    assert all(global_step == engine_step for _, global_step, engine_step in steps_seen)
    assert sorted({(e, step) for e, step, _ in steps_seen}) == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert len(steps_seen) == 2 * 2 * STEPS  # two generations, cond and uncond
    high, low = schedule.table.clone(), schedule.table.clone()
    high[BOUNDARY:], low[:BOUNDARY] = False, False
    assert torch.equal(calls[0], high) and torch.equal(calls[1], low)
    assert not calls[0, 1].all() and not calls[1, 3].all()  # both experts reused
    assert not torch.equal(cached, plain)


def test_a_schedule_that_reuses_at_the_boundary_is_refused_before_any_work():
    pipe = make_pipe()
    harmonica.enable(pipe, CacheSchedule.fora(STEPS, UNITS, 3))  # computes at steps 0 and 3: reuses at 2
    forwards = []
    hooks = [expert.register_forward_pre_hook(lambda *_: forwards.append(1))
             for expert in (pipe.transformer, pipe.transformer_2)]
    with pytest.raises(ValueError, match=r"schedule: expected every unit computed at step 2 \(this transformer's "
                                         r"first step of the generation\), got 6 of 6 reused \(blocks\.0\.attn1"):
        generate(pipe)
    assert not forwards
    for hook in hooks:
        hook.remove()
    harmonica.disable(pipe)


@pytest.mark.parametrize("as_list", [False, True], ids=["pipeline", "list"])
def test_a_forecast_is_refused_for_two_experts(as_list):
    """The pipeline's experts, or the same transformers given as a list (a task's experts)."""
    pipe = make_pipe()
    schedule = CacheSchedule.fora(STEPS, UNITS, 2)
    forecast = Forecast(torch.ones(STEPS, UNITS), torch.zeros(STEPS, UNITS), schedule.table)
    with pytest.raises(ValueError, match="forecast: expected none for a pipeline of 2 transformers that take turns"):
        harmonica.enable([pipe.transformer, pipe.transformer_2] if as_list else pipe, schedule, forecast=forecast)
    assert not hasattr(pipe.transformer, "_harmonica") and not hasattr(pipe.transformer_2, "_harmonica")


def test_enable_again_and_a_wan21_pipeline_keep_one_engine_each():
    """enable twice replaces both engines; without a boundary_ratio the pipeline's transformer alone is cached."""
    pipe = make_pipe()
    harmonica.enable(pipe, CacheSchedule.fora(STEPS, UNITS, 2))
    harmonica.enable(pipe, CacheSchedule.no_cache(STEPS, UNITS))
    assert pipe.transformer_2._harmonica.engine.policy.schedule.cur == 0
    harmonica.disable(pipe)
    single = make_pipe(boundary_ratio=None)
    harmonica.enable(single, CacheSchedule.no_cache(STEPS, UNITS))
    assert not hasattr(single.transformer_2, "_harmonica")
    harmonica.disable(single)


def test_the_a14b_macs_per_step_are_one_experts():
    """The real size (720 x 1280, 81 frames: 21 latent frames of 45 x 80 tokens, 512 text tokens): the MACs of a step
    are one expert's 40 blocks of width 5120, each attn1 over the video tokens, attn2 to the text, ffn 13824 wide."""
    from test_macs import joint_attention_macs

    count = count_macs("wan2.2-t2v-a14b")
    n, t, d = 21 * 45 * 80, 512, 40 * 128
    cross = 2 * n * d * d + 2 * t * d * d + 2 * n * t * d  # q and out of the video, k and v of the text, QK^T, PV
    assert count.unit_macs == (joint_attention_macs(n, d, n), cross, 2 * n * d * 13824) * 40
    assert count_macs("wan2.2-t2v-a14b-720p").total == count.total


def test_harmonica_sample_runs_both_experts(tmp_path, capsys):
    """`harmonica sample` on tiny-wan2.2 loads both experts (random weights, seeds s and s + 1), one engine each on
    the one schedule: it writes `samplers.sample`'s latents of the two-expert task on the same prompt and noise. A
    schedule that reuses at the boundary step (the low-noise expert's first: 3 of 6 steps) is refused before any
    weights load."""
    from safetensors.torch import load_file

    from harmonica import samplers
    from harmonica.generation import first_conditions, given_bank
    from harmonica.models import load_experts, preset_task

    out = tmp_path / "x.safetensors"
    argv = ["sample", "--model", NAME, "--random-weights", "--schedule", "fora:2", "--out", str(out)]
    assert cli.main(argv + ["--steps", str(STEPS)]) == 0
    assert "fora:2 (FlowMatchEulerDiscreteScheduler): 4 steps x 6 units, CUR 50.0%" in capsys.readouterr().out
    generator = torch.Generator().manual_seed(0)  # the command's: the random prompt, then the noise
    with torch.device("meta"):
        meta = build_transformer(NAME)
    bank = given_bank(SPEC, meta, random_weights=True, generator=generator)
    experts = load_experts(NAME, random_weights=True)
    task = preset_task(NAME, experts, None, bank, STEPS, SPEC.guidance)
    noise = samplers.initial_noise(task, 1, generator)
    harmonica.enable(experts, CacheSchedule.fora(STEPS, UNITS, 2))
    expected = samplers.sample(task, first_conditions(SPEC), noise)
    assert torch.equal(load_file(str(out))["latents"], task.unpack(expected))
    out.unlink()
    assert cli.main(argv + ["--steps", "6"]) == 2
    assert ("--schedule: expected every unit computed at step 3, where tiny-wan2.2's next transformer begins (its "
            "slots are empty), got 6 of 6 reused by --schedule fora:2 at 6 steps") in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_harmonica_train_refuses_an_sdt_objective_for_two_experts(tmp_path, capsys):
    assert cli.main(["train", "--model", NAME, "--random-weights", "--objective", "iepo",
                     "--out", str(tmp_path / "run")]) == 2
    assert ("--objective: expected search for a two-expert model (tiny-wan2.2: its pipeline switches between 2 "
            "transformers by step; SDT and IEPO train one transformer's router), got iepo") in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_harmonica_train_searches_both_experts_and_compares_rivals_computing_row_b(tmp_path, capsys):
    """`harmonica train` on both experts (random weights, seeds 0 and 1): the router computes rows 0 and b, no
    forecast (refused for experts, one line), and the closing table's static rivals compute row b too (FORA:3
    computes rows 0 and 3: row 2 is added and named)."""
    assert cli.main(["train", "--model", NAME, "--random-weights", "--steps", str(STEPS), "--batch", "2", "--rounds",
                     "1", "--candidates", "2", "--eval-batch", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    table = Router.from_pretrained(tmp_path / "router").schedule().table
    assert table[[0, BOUNDARY]].all() and not table.all()
    assert "forecast: none: a forecast is refused for a model of 2 experts" in printed
    rows = printed[printed.index("held-out comparison on 2 calibration noises"):].splitlines()
    assert [line.split()[0] for line in rows[2:-1]] == ["learned", "fora:2", "fora:3+row2", "delta-dit:b=2,n=2"]
    assert rows[-1].startswith(("a static schedule is better: ", "learned beats every static schedule"))


def expert_task(pipe):
    """The Wan task of the pipeline's two experts (as harmonica train and search run it), on its prompt."""
    bank, _ = prompt_and_noise(pipe)
    return flow_task(pipe.transformer, bank, STEPS, SPEC.guidance, transformer_2=pipe.transformer_2,
                     guidance_2=SPEC.guidance_2, **SPEC.pipeline_config, **SPEC.size)


def test_the_search_start_computes_each_experts_first_row():
    assert spread(4, UNITS, 2 * UNITS, (0, 3)).all(1).tolist() == [True, False, False, True]
    table = spread(40, UNITS, 20 * UNITS, (0, 17))  # FORA:2 but row 17 for row 16
    assert table.all(1).nonzero().flatten().tolist() == [*range(0, 16, 2), 17, *range(18, 40, 2)]


def test_a_search_across_the_boundary_is_the_pipelines_generation_under_its_router(tmp_path):
    """The task runs each step on its expert with its guidance: its uncached rollout is diffusers' two-expert
    pipeline's generation; `search_router` gives one (T, K) schedule for both experts, whose rows 0 and 2 (the
    low-noise expert's first) compute; the pipeline enabled with that router generates the search's rollout of it.
    The pipeline steps x + (sigma_next - sigma) v, the task a x + b (x - sigma v): a few roundings of |x| per step."""
    pipe = make_pipe()
    task = expert_task(pipe)
    assert task.experts() == [(pipe.transformer, 0), (pipe.transformer_2, BOUNDARY)]
    _, noise = prompt_and_noise(pipe)
    cond = {"prompt_index": torch.tensor([0])}
    plain = generate(pipe)
    tolerance = rounding_bound(plain, 8 * STEPS)
    config = SearchConfig(num_steps=STEPS, target_cur=0.5, batch=1, rounds=1, candidates=2)
    router, _ = search_router(task, config, tmp_path, task.macs())
    table = router.schedule().table
    assert table[[0, BOUNDARY]].all() and not table.all()
    with task_engine(task) as engine:
        rollouts = Rollouts(task, engine, noise, cond, STEPS)
        assert (rollouts.reference - plain).abs().max().item() <= tolerance
        searched = rollouts.sample(table)
    harmonica.enable(pipe, router)
    cached = generate(pipe)
    harmonica.disable(pipe)
    assert (searched - cached).abs().max().item() <= tolerance
    assert (cached - plain).abs().max().item() > tolerance  # the router reuses


def test_the_closing_comparison_runs_each_step_on_its_expert():
    """`closing_table` on the task of both experts: the high-noise expert sees only timesteps >= boundary_ratio x
    1000, the low-noise one only the others (and runs)."""
    from harmonica.cli.train import closing_table

    pipe = make_pipe()
    task = expert_task(pipe)
    seen = {0: set(), 1: set()}
    hooks = [expert.register_forward_pre_hook(
        lambda module, args, kwargs, e=e: seen[e].update(kwargs["timestep"].tolist()), with_kwargs=True)
        for e, expert in enumerate((pipe.transformer, pipe.transformer_2))]
    try:
        text = closing_table(task, CacheSchedule.fora(STEPS, UNITS, 2).table, task.macs(), 2, 0, None)
    finally:
        for hook in hooks:
            hook.remove()
    boundary = SPEC.pipeline_config["boundary_ratio"] * 1000
    assert seen[0] and seen[1] and min(seen[0]) >= boundary > max(seen[1])
    assert "fora:3+row2" in text


def test_the_one_loop_runs_each_step_on_its_expert_as_the_pipeline_does():
    """`samplers.sample` of the task of both experts: caching off, the pipeline's generation (within the rounding of
    the two step forms, as above); with FORA:2 enabled on the list of both experts (one engine each, disabled
    together), each runs the rows of its global steps (the low-noise expert from its first, computing, step): the
    generation of the pipeline enabled with FORA:2."""
    from harmonica import samplers

    pipe = make_pipe()
    task = expert_task(pipe)
    _, noise = prompt_and_noise(pipe)
    cond = {"prompt_index": torch.tensor([0])}
    plain = generate(pipe)
    tolerance = rounding_bound(plain, 8 * STEPS)
    seen = {0: [], 1: []}
    hooks = [expert.register_forward_pre_hook(lambda module, args, kwargs, k=k: seen[k].append(
        float(kwargs["timestep"][0])), with_kwargs=True) for k, expert in enumerate((pipe.transformer,
                                                                                     pipe.transformer_2))]
    sampled = samplers.sample(task, cond, noise)
    for hook in hooks:
        hook.remove()
    assert {k: [int(t) for t in ts] for k, ts in seen.items()} == {0: task.timesteps[:BOUNDARY],
                                                                   1: task.timesteps[BOUNDARY:]}
    assert (sampled - plain).abs().max().item() <= tolerance
    schedule = CacheSchedule.fora(STEPS, UNITS, 2)
    harmonica.enable([pipe.transformer, pipe.transformer_2], schedule)
    cached = samplers.sample(task, cond, noise)
    report = harmonica.summary(pipe.transformer_2)
    harmonica.disable(pipe.transformer_2)  # both
    assert not hasattr(pipe.transformer, "_harmonica") and not hasattr(pipe.transformer_2, "_harmonica")
    harmonica.enable(pipe, schedule)
    piped = generate(pipe)
    harmonica.disable(pipe)
    assert (cached - piped).abs().max().item() <= tolerance
    assert (cached - plain).abs().max().item() > tolerance  # FORA:2 reuses
    assert (report.cur, report.experts) == (0.5, 2)


def experts_under_fora(setup=lambda expert, task: None, **options):
    """The two-expert task's generation with FORA:2 enabled on both experts: (the eager engines' latents, the latents
    of two generations with `options` passed to enable, the experts, still enabled: the caller disables them, the
    task); `setup(expert, task)` runs for each expert after the enable (e.g. a graph stand-in)."""
    from harmonica import samplers

    pipe = make_pipe()
    task, (_, noise), experts = expert_task(pipe), prompt_and_noise(pipe), (pipe.transformer, pipe.transformer_2)
    cond, schedule = {"prompt_index": torch.tensor([0])}, CacheSchedule.fora(STEPS, UNITS, 2)
    with torch.no_grad():
        harmonica.enable(experts, schedule)
        eager = samplers.sample(task, cond, noise)
        harmonica.enable(experts, schedule, **options)
        for expert in experts:
            setup(expert, task)
        runs = [samplers.sample(task, cond, noise) for _ in range(2)]
    return eager, runs, experts, task


def test_the_one_loop_under_graphs_on_the_stand_in_is_the_eager_engines():
    """Both experts under cuda_graphs on the strict graph stand-in (capture rules and graph semantics): each captures
    its computing and reusing rows once and replays them (2 of its 4 forwards over two generations), and the
    latents are bitwise the eager engines'."""
    from graph_standin import StandInGraphs, runner_inputs
    from test_flow_graphs import cached_tables

    runners = []

    def stand_in(expert, task):
        runner = expert._harmonica.graphs
        runner.backend = StandInGraphs(lambda: runner_inputs(runner) + cached_tables(expert, task))
        runners.append(runner)

    eager, runs, experts, _ = experts_under_fora(cuda_graphs=True, setup=stand_in)
    harmonica.disable(experts)
    assert [(runner.captures, runner.replays) for runner in runners] == [(2, 2), (2, 2)]
    assert all(torch.equal(latents, eager) for latents in runs)


def test_the_one_loop_compiles_once_per_unit_kind_of_each_expert():
    """Both experts with their unit bodies compiled (counting backend): one graph per unit kind of each expert's
    engine (3 each), all from the first generation, none after, no graph break; the latents bitwise the eager
    engines'."""
    from test_compile import CountingBackend
    from test_compile_flow import entries_per_kind
    from torch._dynamo.utils import counters

    backend = CountingBackend()
    counters.clear()
    eager, runs, experts, _ = experts_under_fora(compile={"backend": backend})
    per_engine = [entries_per_kind(expert._harmonica.engine) for expert in experts]
    harmonica.disable(experts)
    assert len(backend.graphs) == 6 and not counters["graph_break"]
    assert per_engine == [{("WanTransformerBlock", kind): 1 for kind in ("attn1", "attn2", "ffn")}] * 2
    assert all(torch.equal(latents, eager) for latents in runs)
