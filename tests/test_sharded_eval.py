"""Evaluation sharded over ranks (harmonica/parallel.py `sharded`) with 2 gloo ranks on the CPU: the chunks' order,
the agreed stop, and `harmonica train`'s closing evaluation (the digits quality report, the comparison table)
equal to one process's bit for bit.

One spawn of 2 ranks runs every check, each rank writing what it found to a file the tests read; one thread per
process, here as in the ranks (another thread count may sum in another order)."""

import contextlib
import io
import os
import socket
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harmonica import CacheSchedule, digits, parallel
from harmonica.bench import digits_protocol
from harmonica.bench.digits_protocol import ProtocolConfig, one_thread
from harmonica.cli import main
from harmonica.cli.train import HELD_OUT_RANK, closing_table, digits_report
from harmonica.digits import DigitsDiT
from harmonica.search import calibration_batch, compare
from harmonica.training import engine_attached

PROTOCOL = dict(objectives=("search", "harmonica"), seeds=1, workers=0, steps=2, iterations=2, batch=2, refresh=2,
                lambda_batch=2, search_batch=2, search_rounds=1, search_candidates=1, samples=120, repeats=1,
                taus=(0.01, 0.1), fora=(2,), delta_dit=(), fewer_steps=(1,), peers=())  # rows of 3 chunks (50, 50, 20)
WORLD, STEPS, COUNT, CHUNK = 2, 4, 5, 2  # 3 chunks of the 5 noises: rank 0 samples two, rank 1 one
TRAIN = ["train", "--model", "digits-dit", "--objective", "iepo", "--steps", "2", "--iterations", "2", "--batch", "2",
         "--lambda-batch", "2", "--refresh", "2", "--target-cur", "0.5",
         "--eval-batch", "120"]  # the closing table: 3 chunks (50, 50, 20)


def _metric_inputs(run):
    """(what `run()` returned, the tensors digits' quality and psnr were given in it)."""
    seen, quality, psnr = [], digits.quality, digits.psnr
    digits.quality = lambda samples, *a, **k: seen.append(samples) or quality(samples, *a, **k)
    digits.psnr = lambda x, reference: seen.extend([x, reference]) or psnr(x, reference)
    try:
        return run(), seen
    finally:
        digits.quality, digits.psnr = quality, psnr


def _evaluations():
    """The closing evaluation's parts on digits-dit, FORA:2: the report, its metrics' input tensors (the uncached
    and cached samples), the comparison's rows, and the noises this process ran the transformer on (summed over
    its forwards)."""
    model = DigitsDiT()
    schedule = CacheSchedule.fora(STEPS, 12, 2)
    forwarded = []
    hook = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: forwarded.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True)
    try:
        report, seen = _metric_inputs(lambda: digits_report(model, schedule, STEPS, count=COUNT, batch=CHUNK))
        task = model.task(STEPS, model.guidance)
        noise, cond = calibration_batch(task, COUNT, 0, rank=HELD_OUT_RANK)
        with engine_attached(task.transformer) as engine:
            rows = compare(task, engine, schedule.table, task.macs(), noise, cond, clip=(-1, 1), chunk=CHUNK)
    finally:
        hook.remove()
    return report, seen, [asdict(row) for row in rows], sum(forwarded)


def _rank(rank, ports, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    found = {}
    try:
        ran = []
        found["items"] = parallel.sharded(lambda a, b: ran.append(a) or torch.arange(a, b), 7, 2)
        found["ran"] = ran
        asked = []
        found["stopped"] = parallel.sharded(lambda a, b: ran.append(a) or torch.arange(a, b), 7, 2,
                                            stopped=lambda: asked.append(1) or (rank == 1 and len(asked) == 2))
        found["ran after stop"], found["asked"] = ran[2:], len(asked)
        found["report"], found["seen"], found["rows"], found["forwarded"] = _evaluations()
        found["protocol"] = digits_protocol.run(ProtocolConfig(**PROTOCOL), "test", progress=lambda text: None)
    finally:
        dist.destroy_process_group()
    os.environ.update(MASTER_PORT=str(ports[1]), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    printed = io.StringIO()  # `harmonica train` as torchrun runs it: it makes its own process group
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        found["status"] = main([*TRAIN, "--out", str(out / "run")])
    found["printed"] = printed.getvalue()
    torch.save(found, out / f"rank{rank}.pt")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's findings, and the folder of the 2-rank training run."""
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_rank, args=((_free_port(), _free_port()), out), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out / "run"


def test_chunks_run_round_robin_and_come_back_in_order(ranks):
    found, _ = ranks
    for rank in found:
        assert torch.equal(rank["items"], torch.arange(7))  # chunks [0, 2) [2, 4) [4, 6) [6, 7), gathered in order
    assert found[0]["ran"][:2] == [0, 4] and found[1]["ran"][:2] == [2, 6]


def test_a_stop_on_one_rank_stops_every_rank_at_the_same_round(ranks):
    found, _ = ranks
    for rank in found:  # rank 1 asked to stop before round 2: both ranks ran round 1 only, then returned None
        assert rank["stopped"] is None and rank["asked"] == 2
    assert found[0]["ran after stop"] == [0] and found[1]["ran after stop"] == [2]


def test_the_closing_evaluation_equals_one_process_bit_for_bit(ranks):
    found, _ = ranks
    with one_thread():
        report, seen, rows, forwarded = _evaluations()
    # the ranks shared the work: rank 0 sampled chunks 0 and 2 (3 noises), rank 1 chunk 1 (2 noises)
    assert [rank["forwarded"] * COUNT for rank in found] == [3 * forwarded, 2 * forwarded]
    assert len(seen) == 4  # quality(uncached), quality(cached), psnr(cached, uncached)
    for rank in found:
        assert rank["report"] == report and rank["rows"] == rows
        assert len(rank["seen"]) == len(seen)
        for mine, theirs in zip(rank["seen"], seen):
            assert mine.shape == (COUNT, 1, 8, 8) and torch.equal(mine, theirs)
    assert rows[0]["learned"] and 0 < rows[0]["mse"] < float("inf")  # a real comparison, not zeros


def test_train_under_torchrun_evaluates_on_every_rank_and_prints_once(ranks):
    found, run = ranks
    assert [rank["status"] for rank in found] == [0, 0] and found[1]["printed"] == ""
    from harmonica import Router

    router = Router.from_pretrained(run / "router")  # the 2-rank run's router, evaluated in one process
    model = DigitsDiT()
    schedule = router.schedule()
    task = model.task(2, model.guidance)
    with one_thread(), contextlib.redirect_stderr(io.StringIO()):
        report = digits_report(model, schedule, 2, forecast=router.forecast)
        table = closing_table(task, schedule.table, task.macs(), 120, 0, (-1.0, 1.0), router.forecast, 2)
    printed = found[0]["printed"].splitlines()  # the forecast's lines, the router's, then the evaluations
    after = next(i for i, line in enumerate(printed) if line.startswith("router after ")) + 1
    assert printed[0].startswith("forecast: fitted on 2 calibration noises")
    assert printed[after:] == [*report.splitlines(), *table.splitlines()]


def _untimed(results):
    """The protocol's results without what depends on the clock or the machine (timings, speedups measured)."""
    if isinstance(results, dict):
        return {key: _untimed(value) for key, value in results.items()
                if not ("seconds" in key or "measured" in key or key in ("machine", "ranks"))}
    if isinstance(results, list):
        return [_untimed(value) for value in results]
    return results


def test_the_digits_protocol_under_torchrun_equals_one_process(ranks):
    found, _ = ranks
    with one_thread():
        one = digits_protocol.run(ProtocolConfig(**PROTOCOL), "test", progress=lambda text: None)
    assert one["ranks"] == 1 and [rank["protocol"]["ranks"] for rank in found] == [2, 2]
    for rank in found:  # the routers (trained alike on every rank), every row's metrics, the summary, the pairs
        assert _untimed(rank["protocol"]) == _untimed(one)
    rows = [row for router in one["routers"] for row in router["curve"]] + one["baselines"]
    assert len(rows) >= 4 and all(0 < row["fd"] < float("inf") for row in rows)


def test_the_digits_protocol_under_torchrun_needs_workers_0(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--workers: expected 0 under torchrun .*, got 2"):
        digits_protocol.run_and_write(ProtocolConfig(workers=2), "test", None)
