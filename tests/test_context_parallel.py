"""Cached sampling under diffusers' context parallelism (harmonica/parallel.py) with 2 gloo ranks on the CPU.

One spawn of 2 ranks runs every check and writes each rank's findings to a JSON file; the tests below read
them. Per family with a cp plan (tiny FLUX, Wan, Qwen-Image) and per kind (Ulysses, ring), each rank:
- samples the single-process cached generation (FORA:2 and a trained router) before any parallelism;
- enables diffusers' context parallelism (degree 2) and harmonica (FLUX: in both orders) and samples again;
- counts every collective with the unit that issued it (a counting wrapper of torch.distributed and its
  functional collectives, the unit read from `engine.run_unit`) and the bytes it sent, against
  `parallel.trace_attention(...).communication`;
- notes its slots' bytes, the summary line, refusals (a router that differs on rank 1, SD3 without a cp
  plan). CUDA graphs and compile across steps under the ranks: test_context_parallel_graphs.py.

Two stand-ins, both for what a CPU lacks: `torch.accelerator.device_count()` is 1 (`parallel.cpu_device_count_shim`,
diffusers divides by it), and for ring the native backend's forward op also returns the log-sum-exp, which
diffusers 0.42's ring needs and only its GPU backends (flash, cuDNN) give.
"""

import json
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from _helpers import rounding_bound
from test_compile import CountingBackend
from test_compile_flow import entries_per_kind

WORLD = 2
STEPS = 4
FAMILIES = ("tiny-flux", "tiny-wan", "tiny-qwen-image")
KINDS = ("ulysses", "ring")


def _forward_op_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' native forward op (q, k, v (B, S, H, D) -> (B, S, H, D)) in plain torch, with the log-sum-exp
    (B, S, H) when asked: what ring attention merges its passes with."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    lse = scores.logsumexp(-1)
    out = ((scores - lse[..., None]).exp() @ v).permute(0, 2, 1, 3)
    return (out, lse.permute(0, 2, 1)) if return_lse else out


class CollectiveCounter:
    """Wraps torch.distributed's and its functional collectives: each call logged as (unit, computed, op, bytes
    this rank sent), unit None outside any unit. Undone by `remove`."""

    def __init__(self, engine):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        self.log, self.current, self._undo = [], (None, None), []
        p = dist.get_world_size()
        sizes = {"all_to_all_single": lambda t, *a, **k: t.numel() * t.element_size() * (p - 1) / p,
                 "all_gather_tensor": lambda t, *a, **k: t.numel() * t.element_size() * (p - 1),
                 "permute_tensor": lambda t, *a, **k: t.numel() * t.element_size()}
        for name, size in sizes.items():
            self._wrap(funcol, name, size)
        self._wrap(dist, "all_gather", lambda outputs, t, *a, **k: t.numel() * t.element_size() * (p - 1))
        for name in ("all_to_all_single", "all_reduce", "broadcast", "reduce_scatter", "send",
                     "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all"):
            self._wrap(dist, name, lambda *a, **k: float("nan"))  # these are not expected inside a forward
        run_unit = engine.run_unit

        def counted_run_unit(k, *args):
            self.current = (k, k is not None and bool(engine.policy.row[k]))
            try:
                return run_unit(k, *args)
            finally:
                self.current = (None, None)

        engine.run_unit = counted_run_unit
        self._undo.append(lambda: delattr(engine, "run_unit"))

    def _wrap(self, module, name, size):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.log.append((*self.current, name, size(*args, **kwargs)))
            return original(*args, **kwargs)

        setattr(module, name, counted)
        self._undo.append(lambda: setattr(module, name, original))

    def remove(self):
        for undo in reversed(self._undo):
            undo()


def sharding_terms(engine, text_tokens: int, steps: int) -> int:
    """The roundings that sharding reorders in a generation (`rounding_bound`'s terms): the longest reduction (the
    longest attention, from the engine's slots after a generation: a unit's slot holds its output per stream, a joint
    attention's the text's too; the text; the hidden width) x the steps."""
    tokens = max(sum(part.shape[1] for part in (slot if isinstance(slot, tuple) else (slot,)))
                 for slot in engine.slots if slot is not None)
    config = engine.transformer.config
    return max(tokens, text_tokens, config.num_attention_heads * config.attention_head_dim) * steps


def _sample(task, noise):
    from harmonica.flow import flow_sample

    with torch.inference_mode():
        return flow_sample(task, torch.tensor([1]), latents=noise)


def _family(name, kind, rank):
    """The checks of one family and kind on this rank; returns its findings."""
    import diffusers
    from diffusers import ContextParallelConfig

    import harmonica
    from harmonica import parallel
    from harmonica.flow import flow_task
    from harmonica.models import FLOW_PRESETS, build_transformer
    from harmonica.prompts import random_embeddings
    from harmonica.router import Router, RouterInfo
    from harmonica.schedule import CacheSchedule
    from harmonica.training import RouterTrainer, TrainConfig, alone

    spec = FLOW_PRESETS[name]
    transformer = build_transformer(name)
    bank = random_embeddings(transformer, 2, spec.text_tokens, torch.Generator().manual_seed(0))
    task = flow_task(transformer, bank, STEPS, spec.guidance, **spec.size)
    noise = torch.randn(1, *task.latent_shape, generator=torch.Generator().manual_seed(1))
    units = len(harmonica.units.cached_units(transformer))
    info = RouterInfo.for_model(transformer, sampler=task.sampler, timesteps=task.timesteps, tau=0.5)
    with tempfile.TemporaryDirectory() as out, alone():  # a trained router (SDT + IEPO, CUR 0.5), the same per rank
        config = TrainConfig(num_steps=STEPS, iterations=6, batch=1, lambda_batch=1, refresh=3, lr=0.1, target_cur=0.5,
                             guidance=spec.guidance)
        router = RouterTrainer(task, config, out).run(progress=False)
    caches = {"fora:2": CacheSchedule.fora(STEPS, units, 2), "router": router}
    single, single_bytes = {}, {}
    for label, cache in caches.items():
        engine = harmonica.enable(transformer, cache)
        single[label] = _sample(task, noise)
        single_bytes[label] = engine.cache_bytes()
        terms = sharding_terms(engine, spec.text_tokens, STEPS)
        harmonica.disable(transformer)
    bare = _sample(task, noise)
    found = {"reference_max": max(x.abs().max().item() for x in single.values()), "diff": {}, "cache_bytes": {},
             "single_cache_bytes": single_bytes, "terms": terms}
    if name == "tiny-flux" and kind == "ulysses":  # harmonica first, diffusers' parallelism after
        harmonica.enable(transformer, caches["fora:2"])
    transformer.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": WORLD}))
    if name == "tiny-flux" and kind == "ulysses":
        found["diff"]["fora:2 enabled first"] = (_sample(task, noise) - single["fora:2"]).abs().max().item()
        harmonica.disable(transformer)
    found["diff"]["no cache after disable"] = (_sample(task, noise) - bare).abs().max().item()
    for label, cache in caches.items():
        engine = harmonica.enable(transformer, cache)
        counter = CollectiveCounter(engine)
        try:
            out = _sample(task, noise)
        finally:
            counter.remove()
        found["diff"][label] = (out - single[label]).abs().max().item()
        found["cache_bytes"][label] = engine.cache_bytes()
        found.setdefault("collectives", {})[label] = counter.log
        found.setdefault("rows", {})[label] = engine.policy.schedule.table.tolist()
        found.setdefault("summary", str(harmonica.summary(transformer)))
        harmonica.disable(transformer)
    found["outputs"] = out.flatten()[:8].tolist()  # the router's, for the ranks' agreement
    if kind == "ulysses":  # the unit bodies compiled (counting backend: the traced ops, bitwise the eager ones)
        backend = CountingBackend()
        engine = harmonica.enable(transformer, caches["fora:2"], compile={"backend": backend})
        found["diff"]["fora:2 compiled"] = (_sample(task, noise) - single["fora:2"]).abs().max().item()
        found["compiled"] = {kind: n for (_, kind), n in entries_per_kind(engine).items()}
        harmonica.disable(transformer)
    communication = parallel.trace_attention(name, batch=2 if task.guided else 1, text_tokens=spec.text_tokens
                                             ).communication(kind, WORLD, element_size=4)
    found["accounting"] = {"units": list(communication.unit_bytes), "always": communication.always_bytes}
    other = Router(STEPS, units, info=info, generator=torch.Generator().manual_seed(2 + rank))
    found["refusals"] = {}
    try:
        harmonica.enable(transformer, other)
        found["refusals"]["router on rank 1"] = None
    except ValueError as error:
        found["refusals"]["router on rank 1"] = str(error)
    assert not hasattr(transformer, "_harmonica")  # a refused enable leaves nothing behind
    if name == "tiny-flux" and kind == "ulysses":
        sd3 = build_transformer("tiny-sd3")
        with pytest.raises(ValueError):  # diffusers refuses it too, after recording the config
            sd3.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        try:
            harmonica.enable(sd3, CacheSchedule.fora(STEPS, len(harmonica.units.cached_units(sd3)), 2))
        except ValueError as error:
            found["refusals"]["sd3"] = str(error)
        assert diffusers.__version__  # the version the findings are for
    return found


def _command_line(rank, out):
    """`harmonica sample --context-parallel` as torchrun runs it (its environment; the process group exists):
    tiny Wan, FORA:2, without and with --cuda-graphs (on a CPU it runs eagerly and says so); and a degree other
    than the world size. Returns {label: (exit status, stderr)}."""
    import contextlib
    import io
    import os

    from harmonica import cli

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    results = {}
    runs = (("sample", "ulysses=2", [], "cp"), ("graphs", "ulysses=2", ["--cuda-graphs"], "cp-graphs"),
            ("degree", "ulysses=4", [], "cp"))
    for label, value, options, stem in runs:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            status = cli.main([*CLI_SAMPLE, "--context-parallel", value, *options, "--out",
                               str(out / f"{stem}{rank}.safetensors")])
        results[label] = (status, errors.getvalue().strip().splitlines()[-1:])
    with contextlib.redirect_stdout(io.StringIO()):
        results["bench"] = (cli.main([*CLI_BENCH, "--context-parallel", "ulysses=2", "--out",
                                      str(out / f"bench{rank}.json")]), [])
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        del os.environ[name]
    return results


def join_gloo(rank, port) -> None:
    """This spawned process joins the WORLD gloo ranks on `port`, one thread, the CPU counted as one device."""
    import os

    import torch.distributed as dist

    from harmonica import parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel.cpu_device_count_shim()
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _rank(rank, port, out):
    import torch.distributed as dist

    join_gloo(rank, port)
    try:
        findings = {"cli": _command_line(rank, out), **every_case(_family, rank)}
    finally:
        dist.destroy_process_group()
    with open(out / f"rank{rank}.json", "w") as f:
        json.dump(findings, f)


def every_case(family, rank) -> dict:
    """{"<family> <kind>": family(name, kind, rank)} for every kind and family; ring runs the native attention op
    given the log-sum-exp it lacks (`_forward_op_with_lse`)."""
    from diffusers.models import attention_dispatch

    findings = {}
    for kind in KINDS:
        if kind == "ring":
            attention_dispatch._native_attention_forward_op = _forward_op_with_lse
        for name in FAMILIES:
            findings[f"{name} {kind}"] = family(name, kind, rank)
    return findings


def spawn_ranks(rank_main, out) -> list:
    """`rank_main(rank, port, out)` on WORLD spawned processes (a free port for their group); each writes its
    findings to out/rank<r>.json, returned in rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(port, out), nprocs=WORLD)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """The 2 ranks' findings and the folder they wrote to."""
    out = tmp_path_factory.mktemp("cp")
    return spawn_ranks(_rank, out), out


@pytest.fixture(scope="module")
def findings(spawned):
    return spawned[0]


CASES = [f"{name} {kind}" for kind in KINDS for name in FAMILIES]
CLI_BENCH = ["bench", "--models", "tiny-wan", "--configs", "no-cache", "fora:2", "--modes", "fused", "--steps",
             str(STEPS), "--repeat", "1", "--part", "suite", "--no-progress"]
CLI_SAMPLE = ["sample", "--model", "tiny-wan", "--random-weights", "--schedule", "fora:2", "--steps", str(STEPS)]


@pytest.mark.parametrize("case", CASES)
def test_cached_generation_equals_one_process(findings, case):
    """FORA:2 and a router under context parallelism against the same schedule in one process: rounding only.
    Sharding changes the order of the attention's reductions (ring merges partial softmaxes): eps x the
    longest reduction (the joint sequence or the hidden width) x the steps x the output's scale."""
    for found in findings:
        f = found[case]
        bound = rounding_bound(torch.tensor([f["reference_max"]]), f["terms"])
        for label, diff in f["diff"].items():
            assert diff <= bound, f"{case} {label}: {diff:.3g} > {bound:.3g}"
    assert findings[0][case]["outputs"] == findings[1][case]["outputs"]  # the gathered output, on both ranks


@pytest.mark.parametrize("case", CASES)
def test_slots_hold_the_ranks_shard(findings, case):
    for found in findings:
        f = found[case]
        for label, size in f["cache_bytes"].items():
            assert size * WORLD == f["single_cache_bytes"][label] > 0
    assert "on rank 0 (" in findings[0][case]["summary"] and "on rank 1 (" in findings[1][case]["summary"]


@pytest.mark.parametrize("case", CASES)
def test_no_collective_inside_a_reused_unit(findings, case):
    """Every collective, with the unit it ran in: none in a reused unit; a computed unit sends what
    `parallel.trace_attention(...).communication` says; outside the units, the output gather of every step."""
    for found in findings:
        f = found[case]
        units, always = f["accounting"]["units"], f["accounting"]["always"]
        assert always > 0 and any(units)
        assert f["rows"]["router"] != f["rows"]["fora:2"]  # the trained router is a schedule of its own
        for label, log in f["collectives"].items():
            sent = {}
            for k, computed, op, size in log:
                assert computed is not False, f"{case} {label}: {op} inside reused unit {k}"
                sent[k] = sent.get(k, 0) + size
            rows = f["rows"][label]
            reused = sum(not c for row in rows for c in row)
            assert reused > 0
            computed = [sum(row[k] for row in rows) for k in range(len(units))]
            expected = {k: n * units[k] for k, n in enumerate(computed) if n * units[k]}
            assert {k: sent[k] for k in sent if k is not None} == pytest.approx(expected)
            assert sent[None] == pytest.approx(STEPS * always)


def test_refusals(findings):
    for found in findings:
        for case in CASES:
            refusals = found[case]["refusals"]
            assert refusals["router on rank 1"] == (
                "router_or_schedule: expected the same cache schedule on every rank of the context-parallel "
                "group, got rank 1's differing from rank 0's")
        assert found["tiny-flux ulysses"]["refusals"]["sd3"] == (
            "context parallelism: expected a transformer whose class has a diffusers cp plan (FLUX, Wan, "
            "Qwen-Image), got SD3Transformer2DModel")


def test_accounting_scales_with_the_degree():
    """Per rank, Ulysses sends (P - 1) / P^2 of the four whole q, k, v, output tensors, ring (P - 1) / P of the
    whole k and v: the same trace at 2 and 8 ranks in those ratios; a reused unit's bytes are not in a step's."""
    from harmonica import parallel
    from harmonica.schedule import CacheSchedule

    trace = parallel.trace_attention("tiny-wan", batch=2)
    for kind, factor in (("ulysses", lambda p: (p - 1) / p / p), ("ring", lambda p: (p - 1) / p)):
        two, eight = (trace.communication(kind, p, 2) for p in (2, 8))
        assert two.names == eight.names and len(two.names) == 6
        assert [b > 0 for b in two.unit_bytes] == [True, False, False] * 2  # attn1 only: attn2 and ffn run locally
        assert eight.unit_bytes == pytest.approx([b * factor(8) / factor(2) for b in two.unit_bytes])
        fora = CacheSchedule.fora(4, 6, 2)
        assert two.trajectory(fora) == pytest.approx(4 * two.always_bytes + 2 * sum(two.unit_bytes))


def test_plan_rows_for_2_4_8_gpus(capsys):
    from harmonica import cli, parallel
    from harmonica.schedule import CacheSchedule

    assert cli.main(["bench", "--plan", "--models", "tiny-wan", "tiny-sd3", "--configs", "no-cache", "fora:2",
                     "--modes", "fused", "--steps", "4"]) == 0
    out = capsys.readouterr().out.split("Context parallelism")[1]  # the table after the suite's plan
    rows = [r for r in (line.split(" | ") for line in out.splitlines())
            if r[0] == "| tiny-wan" and r[2] in ("no-cache", "fora:2")]
    assert "| tiny-sd3 |" not in out  # no cp plan
    assert [(r[2], r[3], r[4]) for r in rows] == [(config, str(p), kind) for config in ("no-cache", "fora:2")
                                                  for kind in ("ulysses", "ring") for p in (2, 4, 8)]
    trace = parallel.trace_attention("tiny-wan", batch=2)
    for r in rows:  # FORA:2 at 4 steps: the output gathered at every step, the units' traffic at 2 of them
        sent = trace.communication(r[4], int(r[3]), 4)  # fp32 on a CPU
        always, units = 4 * sent.always_bytes, 4 * sum(sent.unit_bytes)
        ratio = 1 if r[2] == "no-cache" else (always + units / 2) / (always + units)
        assert (float(r[6]), r[7]) == (pytest.approx(sent.trajectory(CacheSchedule.fora(4, 6, 2)) / 1e9 if
                                                     r[2] == "fora:2" else (always + units) / 1e9, rel=1e-3),
                                       f"{ratio:.0%} |")


def test_sample_command_under_torchrun(spawned, tmp_path, capsys):
    """The latents rank 0 wrote equal those of the same command in one process (rounding bound as above:
    tiny Wan's 8 video tokens, hidden 24, 4 steps); with --cuda-graphs (eager on a CPU) the same latents; the other
    rank wrote nothing; a degree other than the world size is refused on every rank."""
    from safetensors.torch import load_file

    from harmonica import cli

    findings, out = spawned
    for found in findings:
        assert found["cli"]["sample"][0] == found["cli"]["graphs"][0] == 0
        assert found["cli"]["degree"] == [2, ["harmonica: error: --context-parallel: expected the degree to equal the "
                                              "world size 2 (torchrun --nproc-per-node), got ulysses=4"]]
    assert cli.main([*CLI_SAMPLE, "--out", str(tmp_path / "one.safetensors")]) == 0
    assert not (out / "cp1.safetensors").exists() and not (out / "cp-graphs1.safetensors").exists()
    one, cp, graphs = (load_file(path)["latents"] for path in (tmp_path / "one.safetensors", out / "cp0.safetensors",
                                                                out / "cp-graphs0.safetensors"))
    assert torch.equal(graphs, cp)
    bound = rounding_bound(one, 24 * STEPS)
    assert (cp - one).abs().max().item() <= bound


@pytest.mark.parametrize("value, message", [
    ("ulysses=1", "--context-parallel: expected ulysses=N or ring=N with N >= 2, got 'ulysses=1'"),
    ("tensor=2", "--context-parallel: expected ulysses=N or ring=N with N >= 2, got 'tensor=2'"),
    ("ulysses=2", "--context-parallel: expected a run under torchrun (torchrun --nproc-per-node 2 -m harmonica ...), "
                  "got no RANK and WORLD_SIZE in the environment"),
], ids=["degree-1", "kind", "no-torchrun"])
def test_sample_option_refused(value, message, capsys, tmp_path, monkeypatch):
    from harmonica import cli

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main([*CLI_SAMPLE, "--context-parallel", value, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"harmonica: error: {message}"
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("model, argv, message", [
    ("tiny-sd3", ["--context-parallel", "ulysses=2"], "--context-parallel: expected models whose diffusers class has "
                                                      "a cp plan (FLUX, Wan, Qwen-Image), got tiny-sd3 "
                                                      "(SD3Transformer2DModel)"),
    ("tiny-dit", ["--context-parallel", "ulysses=2"], "--context-parallel: expected models whose diffusers class has "
                                                      "a cp plan (FLUX, Wan, Qwen-Image), got tiny-dit "
                                                      "(DiTTransformer2DModel)"),
    ("tiny-wan", ["--context-parallel", "ring=2"], "--context-parallel: expected ulysses=N without CUDA (diffusers' "
                                                   "ring attention needs a flash or cuDNN backend), got ring=2"),
    ("tiny-wan2.2", ["--context-parallel", "ulysses=2"], "--context-parallel: expected a model of one transformer, "
                                                         "got tiny-wan2.2, whose pipeline switches between 2 by step"),
], ids=["sd3", "dit", "ring-cpu", "two-experts"])
def test_sample_option_refused_under_torchrun_env(model, argv, message, capsys, tmp_path, monkeypatch):
    from harmonica import cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    command = ["sample", "--model", model, "--random-weights", "--steps", str(STEPS), *argv,
               "--out", str(tmp_path / ("x.png" if model == "tiny-dit" else "x.safetensors"))]
    assert cli.main(command) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"harmonica: error: {message}"


def test_bench_command_under_torchrun(spawned):
    """`harmonica bench --context-parallel ulysses=2` on tiny Wan under the ranks: rank 0 writes the rows (the
    option recorded), rank 1 none; no-cache equals its eager baseline exactly under context parallelism too."""
    findings, out = spawned
    assert [found["cli"]["bench"][0] for found in findings] == [0, 0]
    assert not (out / "bench1.json").exists()
    results = json.loads((out / "bench0.json").read_text())
    assert results["args"]["context_parallel"] == "ulysses=2"
    rows = {(row["config"], row["mode"]): row for row in results["suite"]}
    assert set(rows) == {("no-cache", "eager"), ("no-cache", "fused"), ("fora:2", "fused"), ("skeleton", "fused")}
    assert rows["no-cache", "fused"]["psnr"] == float("inf")
    assert 20 < rows["fora:2", "fused"]["psnr"] < float("inf") and rows["fora:2", "fused"]["cur"] == 0.5


def test_compiled_units_under_context_parallelism(findings):
    """compile=True under Ulysses: the compiled generation is within the bound of the one-process one (checked
    with the others above); one graph per unit kind as in one process, but for the first block's attention of
    Wan and Qwen-Image: diffusers' split hands it a strided view of the CFG batch (a second input signature)."""
    expected = {"tiny-flux": {"attn": 1, "ff": 1, "ff_context": 1, "attn_mlp": 1},
                "tiny-wan": {"attn1": 2, "attn2": 1, "ffn": 1},
                "tiny-qwen-image": {"attn": 2, "img_mlp": 1, "txt_mlp": 1}}
    for found in findings:
        for name, counts in expected.items():
            assert found[f"{name} ulysses"]["compiled"] == counts
            assert "fora:2 compiled" in found[f"{name} ulysses"]["diff"]
