"""Router (save/load, compatibility errors, official imports) and the baseline schedules."""

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

import harmonica
from harmonica import CacheSchedule, Router, RouterInfo
from harmonica.models import build_transformer
from harmonica.router import LOGIT_BOUND, dit_ddim_timesteps
from harmonica.units import cached_units


@pytest.fixture(scope="module")
def dit():
    return build_transformer("tiny-dit")


def info_for(model, **fields):
    return RouterInfo.for_model(model, sampler="dit-ddim", timesteps=dit_ddim_timesteps(10), **fields)


def test_first_row_frozen_and_clamp(dit):
    router = Router(10, 4, generator=torch.Generator().manual_seed(0))
    assert torch.all(router.logits[0] == LOGIT_BOUND)
    router.gates().sum().backward()
    assert torch.all(router.logits.grad[0] == 0) and torch.all(router.logits.grad[1:] != 0)
    with torch.no_grad():
        router.logits.mul_(100)
    router.clamp_()
    assert router.logits.abs().max() == LOGIT_BOUND and torch.all(router.logits[0] == LOGIT_BOUND)


def test_schedule_at_tau():
    router = Router(3, 2)
    with torch.no_grad():
        router.logits.copy_(torch.tensor([[-5.0, -5.0], [-2.0, 0.0], [-3.0, 5.0]]))
    # sigmoid: row 1 = 0.119, 0.5; row 2 = 0.047, 0.993; row 0 always computes
    assert router.schedule(0.1).table.tolist() == [[True, True], [True, True], [False, True]]
    assert router.schedule(0.2).table.tolist() == [[True, True], [False, True], [False, True]]


def test_save_and_load_round_trip(tmp_path, dit):
    router = Router(10, 4, info=info_for(dit, tau=0.2), generator=torch.Generator().manual_seed(1))
    router.save_pretrained(tmp_path)
    loaded = Router.from_pretrained(tmp_path)
    assert torch.equal(loaded.logits, router.logits)
    assert loaded.info == router.info


def test_every_difference_is_listed(dit):
    router = Router(10, 4, info=info_for(dit))
    other = build_transformer("tiny-pixart")
    with pytest.raises(ValueError) as error:
        router.check(RouterInfo.for_model(other, sampler="DDIMScheduler", timesteps=list(range(20, 0, -1))))
    message = str(error.value)
    assert message.startswith("router: trained for something else: ") and "\n" not in message
    diffs = message.removeprefix("router: trained for something else: ").split("; ")
    assert [d.split(":")[0] for d in diffs] == ["model_class", "config_hash", "units", "sampler", "timesteps"]
    assert diffs[0] == "model_class: router has DiTTransformer2DModel, got PixArtTransformer2DModel"
    assert diffs[2:4] == ["units: router has 4 units, got 6 units", "sampler: router has dit-ddim, got DDIMScheduler"]
    assert diffs[4].startswith("timesteps: router has [999, 888")


def test_enable_checks_model_and_generation(dit):
    router = Router(10, 4, info=info_for(dit))
    harmonica.enable(dit, router)
    with pytest.raises(ValueError, match=r"sampler: router has dit-ddim, got DDIMScheduler"):
        harmonica.api.begin_generation(dit, "DDIMScheduler", dit_ddim_timesteps(10))
    with pytest.raises(ValueError, match=r"timesteps: router has \[999"):
        harmonica.api.begin_generation(dit, "dit-ddim", list(range(10)))
    harmonica.disable(dit)
    bigger = build_transformer("tiny-dit")
    bigger.register_to_config(sample_size=16)
    with pytest.raises(ValueError, match=r"config_hash: router has"):
        harmonica.enable(bigger, router)


def test_missing_files_and_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match=rf"^{tmp_path}: expected a directory saved by Router.save_pretrained, with "
                                         r"router.json; got one without it$"):
        Router.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"info.units: expected 4 names \(one per unit\), got 2"):
        Router(3, 4, info=RouterInfo(units=["a", "b"]))


def official_checkpoint(path, num_steps, num_units, harmonica_file=True):
    """As the official scripts save them: HarmoniCa's with the noisiest timestep's row (ascending row
    T-1) at +5 and `ste_threshold` in its args; Learning-to-Cache's with that row trained and None."""
    gen = torch.Generator().manual_seed(2)
    rows = {f"{i}.prob": torch.randn(num_units, generator=gen) for i in range(num_steps)}
    if harmonica_file:
        rows[f"{num_steps - 1}.prob"] = torch.full((num_units,), 5.0)
    args = argparse.Namespace(ste_threshold=0.3 if harmonica_file else None, num_sampling_steps=num_steps)
    torch.save({"routers": rows, "args": args}, path)
    return torch.stack([rows[f"{i}.prob"] for i in range(num_steps)])


@pytest.mark.parametrize("harmonica_file", [True, False], ids=["harmonica-file", "l2c-file"])
def test_official_checkpoints(tmp_path, dit, harmonica_file):
    ascending = official_checkpoint(tmp_path / "router.pt", 10, 4, harmonica_file)
    router = Router.from_official(tmp_path / "router.pt", dit)
    assert torch.equal(router.logits[1:], ascending.flip(0)[1:])  # row i = the (T-1-i)-th ascending timestep
    assert router.info.rule == ("harmonica" if harmonica_file else "l2c-alternating")
    assert router.info.tau == (0.3 if harmonica_file else 0.1) and router.info.timesteps == dit_ddim_timesteps(10)
    assert router.info.units == [name for name, _ in cached_units(dit)]
    table = router.schedule().table
    expected = torch.sigmoid(ascending.flip(0)) > router.info.tau
    expected[0] = True
    if not harmonica_file:  # ascending row 9 - i odd computes everything: i = 0, 2, 4, ...
        expected[0::2] = True
    assert torch.equal(table, expected)
    overridden = Router.from_official(tmp_path / "router.pt", dit, rule="harmonica", tau=0.2)
    assert (overridden.info.rule, overridden.info.tau) == ("harmonica", 0.2)


def test_official_checkpoint_for_another_depth(tmp_path, dit):
    official_checkpoint(tmp_path / "router.pt", 10, 56)
    with pytest.raises(ValueError, match=r"path: expected rows of 4 logits \(2 per block of the transformer\), got 56"):
        Router.from_official(tmp_path / "router.pt", dit)


def test_dit_ddim_timesteps():
    assert dit_ddim_timesteps(10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert dit_ddim_timesteps(4) == [999, 666, 333, 0]


@pytest.mark.parametrize("schedule,cur", [
    (CacheSchedule.no_cache(20, 56), 0.0),
    (CacheSchedule.fora(20, 56, 2), 0.5),
    (CacheSchedule.fora(20, 56, 3), 1 - 7 / 20),
    (CacheSchedule.delta_dit([f"transformer_blocks.{b}.{k}" for b in range(28) for k in ("attn1", "ff")], 20, 10, 2),
     10 * 28 / (20 * 56)),
], ids=["no-cache", "fora2", "fora3", "delta-dit"])
def test_baseline_cur(schedule, cur):
    assert schedule.cur == pytest.approx(cur)
    assert schedule.table[0].all()


def test_delta_dit_reuses_rear_blocks_early_and_front_blocks_late():
    names = [f"transformer_blocks.{b}.{k}" for b in range(4) for k in ("attn1", "ff")]
    table = CacheSchedule.delta_dit(names, 6, boundary=3, interval=2).table
    assert table[1].tolist() == [True] * 4 + [False] * 4  # early: rear blocks reused
    assert table[5].tolist() == [False] * 4 + [True] * 4  # late: front blocks reused
    assert table[2].all() and table[4].all()


def test_delta_dit_counts_blocks_across_block_lists_in_execution_order():
    """FLUX: 2 dual-stream blocks (3 units each) then 2 single-stream blocks; the front half is the dual ones."""
    names = ([f"transformer_blocks.{b}.{k}" for b in range(2) for k in ("attn", "ff", "ff_context")]
             + [f"single_transformer_blocks.{b}.attn_mlp" for b in range(2)])
    table = CacheSchedule.delta_dit(names, 6, boundary=3, interval=2).table
    assert table[1].tolist() == [True] * 6 + [False] * 2  # early: the single-stream (rear) blocks reused
    assert table[5].tolist() == [False] * 6 + [True] * 2  # late: the dual-stream (front) blocks reused


def test_l2c_rule_caps_cur_at_half():
    router = Router(20, 8)
    with torch.no_grad():
        router.logits[1:] = -5.0
    schedule = CacheSchedule.l2c_alternating(router, 0.1)
    assert schedule.cur == pytest.approx(0.5)
    assert schedule.computed_per_step()[:4] == [8, 0, 8, 0]


def test_slot_writes_only_before_a_reuse():
    schedule = CacheSchedule(torch.tensor([[True, True], [False, True], [True, True], [False, True]]), "t")
    assert schedule.writes == [[True, False], [False, False], [True, False], [False, False]]
    assert schedule.written_units() == [0]


def test_theoretical_speedup_weights_units_by_macs():
    from harmonica.macs import count_macs

    macs = count_macs("dit-xl-2-256")
    names = macs.names
    ff_only = torch.ones(10, len(names), dtype=torch.bool)
    ff_only[1:, [k for k, n in enumerate(names) if n.endswith("ff")]] = False
    attn_only = torch.ones(10, len(names), dtype=torch.bool)
    attn_only[1:, [k for k, n in enumerate(names) if n.endswith("attn1")]] = False
    ff, attn = CacheSchedule(ff_only, "ff"), CacheSchedule(attn_only, "attn")
    assert ff.cur == attn.cur
    assert ff.theoretical_speedup(macs) > attn.theoretical_speedup(macs) > 1  # the MLP costs 1.8x attention at 256
    assert CacheSchedule.no_cache(10, len(names)).theoretical_speedup(macs) == 1.0


def test_schedule_validation_and_heat_map():
    with pytest.raises(ValueError, match=r"table: expected row 0 .* to compute every unit"):
        CacheSchedule(torch.tensor([[True, False]]), "bad")
    with pytest.raises(ValueError, match=r"table: expected a 2-D bool tensor"):
        CacheSchedule(torch.ones(2, 2), "bad")
    text = str(CacheSchedule.fora(3, 4, 2))
    assert text.splitlines()[0] == "fora:2: 3 steps x 4 units, CUR 33.3% (█ compute, · reuse)"
    assert text.splitlines()[2] == "   1 ····    0"


def saved_router(directory, dit, info=None, logits=None):
    """A router saved to `directory`, then its router.json replaced by `info` and its logits by `logits`."""
    Router(10, 4, info=info_for(dit)).save_pretrained(directory)
    if info is not None:
        (directory / "router.json").write_text(info if isinstance(info, str) else json.dumps(info))
    if logits is not None:
        save_file({"logits": logits}, str(directory / "router.safetensors"))
    return directory


def test_from_pretrained_names_the_file_of_each_defect(tmp_path, dit):
    """The checks `harmonica sample --router` relies on (tests/test_bad_inputs.py) are the Python API's."""
    good = json.loads((saved_router(tmp_path / "good", dit) / "router.json").read_text())
    cases = {
        "router.json": [
            ("{", r"expected JSON, got unreadable text \(Expecting"),
            ({**good, "format_version": 4}, r"expected format_version in \(1, 2, 3\), got 4"),
            ({**good, "temperature": 1}, r"expected keys from .*, got unknown keys \['temperature'\]"),
            ({**good, "complete": 1}, r"expected complete of type bool, got 1"),
            ({**good, "tau": 1.5}, r"expected tau in \(0, 1\), got 1.5"),
            ({**good, "units": ["a"]}, r"info.units: expected 4 names \(one per unit\), got 1"),
        ],
        "router.safetensors": [
            (torch.zeros(10, 4, dtype=torch.long), r"expected float logits of shape \(steps, units\), got torch.int64"),
            (torch.full((10, 4), float("inf")), r"expected finite logits, got 40 NaN/inf values"),
        ],
    }
    for file, defects in cases.items():
        for k, (defect, message) in enumerate(defects):
            directory = tmp_path / f"{file}-{k}"
            saved_router(directory, dit, **({"info": defect} if file == "router.json" else {"logits": defect}))
            with pytest.raises(ValueError, match=rf"^{directory / file}: {message}"):
                Router.from_pretrained(directory)
