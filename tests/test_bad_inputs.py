"""Bad command lines of `harmonica sample` and `harmonica bench`: one line naming the option, exit status 2,
raised before any model is built (load_experts is replaced by a function that fails the test)."""

import json
import re

import pytest
import torch
from _helpers import patch_cli
from safetensors.torch import save_file

from harmonica import cli, samplers
from harmonica.models import build_transformer
from harmonica.router import Router, RouterInfo, dit_ddim_timesteps

TINY_DIT = ["sample", "--model", "tiny-dit", "--random-weights"]
TINY_PIXART = ["sample", "--model", "tiny-pixart", "--random-weights"]


def write_router(directory, steps=10, sampler="dit-ddim"):
    """A router for tiny-dit trained (nominally) with `sampler` at `steps` steps."""
    with torch.device("meta"):
        transformer = build_transformer("tiny-dit")
    info = RouterInfo.for_model(transformer, sampler=sampler, timesteps=dit_ddim_timesteps(steps))
    Router(steps, len(info.units), info=info, generator=torch.Generator().manual_seed(0)).save_pretrained(directory)
    return directory


def corrupt(directory, case):
    """The router directory with one defect."""
    info_path, weights = directory / "router.json", directory / "router.safetensors"
    info = json.loads(info_path.read_text())
    if case == "garbage-weights":
        weights.write_bytes(b"not a safetensors file")
    elif case == "extra-key":
        info_path.write_text(json.dumps({**info, "temperature": 1}))
    elif case == "list-json":
        info_path.write_text("[]")
    elif case == "bad-tau":
        info_path.write_text(json.dumps({**info, "tau": "high"}))
    elif case == "no-logits":
        save_file({"weights": torch.zeros(10, 4)}, str(weights))
    elif case == "1d-logits":
        save_file({"logits": torch.zeros(40)}, str(weights))
    elif case == "nan-logits":
        save_file({"logits": torch.full((10, 4), float("nan"))}, str(weights))
    elif case == "no-json":
        info_path.unlink()
    return directory


ROUTER_CASES = {
    "garbage-weights": r"--router: \S+router.safetensors: expected a safetensors file, got unreadable bytes",
    "extra-key": r"--router: \S+router.json: expected keys from .*, got unknown keys \['temperature'\]",
    "list-json": r"--router: \S+router.json: expected a JSON object, got a list",
    "bad-tau": r"--router: \S+router.json: expected tau of type float, got 'high'",
    "no-logits": r"--router: \S+router.safetensors: expected a 'logits' tensor, got tensors \['weights'\]",
    "1d-logits": r"--router: \S+router.safetensors: expected float logits of shape \(steps, units\), got "
                 r"torch.float32 of shape \(40,\)",
    "nan-logits": r"--router: \S+router.safetensors: expected finite logits, got 40 NaN/inf values",
    "no-json": r"--router: \S+router: expected a directory saved by Router.save_pretrained, with router.json; got one "
               r"without it",
}

# command line (ROUTER: a good tiny-dit router, ten steps, dit-ddim) -> the one line on stderr
CASES = {
    "steps-0": (TINY_DIT + ["--steps", "0"], r"--steps: expected 1 to 1000 \(the model's training timesteps\), got 0"),
    "steps-1500": (TINY_DIT + ["--steps", "1500"], r"--steps: expected 1 to 1000 .*, got 1500"),
    "negative-guidance": (TINY_DIT + ["--guidance", "-1"], r"--guidance: expected a finite scale >= 0, got -1.0"),
    "nan-guidance": (TINY_DIT + ["--guidance", "nan"], r"--guidance: expected a finite scale >= 0, got nan"),
    "tau-5": (TINY_DIT + ["--router", "ROUTER", "--tau", "5"], r"--tau: expected a threshold in \(0, 1\), got 5.0"),
    "tau-negative": (TINY_DIT + ["--router", "ROUTER", "--tau", "-1"], r"--tau: expected a threshold in \(0, 1\)"),
    "tau-with-schedule": (TINY_DIT + ["--schedule", "fora:2", "--tau", "0.2"],
                          r"--tau: expected only with --router .*, got --tau 0.2 with --schedule fora:2"),
    "delta-dit-unknown-key": (TINY_DIT + ["--schedule", "delta-dit:b=2,n=2,x=3"],
                              r"--schedule: could not read 'delta-dit:b=2,n=2,x=3' \(expected b=B,n=N\[,blocks=C\]\)"),
    "delta-dit-no-n": (TINY_DIT + ["--schedule", "delta-dit:b=2"],
                       r"--schedule: could not read 'delta-dit:b=2' \(expected b=B,n=N\[,blocks=C\]\)"),
    "delta-dit-past-the-end": (TINY_DIT + ["--schedule", "delta-dit:b=30,n=2"],
                               r"--schedule: 'delta-dit:b=30,n=2' does not fit 20 steps \(.*got 30, 2, 1\)"),
    "fora-0": (TINY_DIT + ["--schedule", "fora:0"],
               r"--schedule: could not read 'fora:0' \(expected an integer >= 1\)"),
    "unknown-schedule": (TINY_DIT + ["--schedule", "taylor:2"],
                         r"--schedule: expected 'no-cache', 'fora:N' or 'delta-dit\[:b=B,n=N\[,blocks=C\]\]', got"),
    "class-5000": (TINY_DIT + ["--class-label", "5000"], r"--class-label: expected a class in \[0, 999\] for "
                                                         r"tiny-dit, got 5000"),
    "class-negative": (TINY_DIT + ["--class-label", "-1"], r"--class-label: expected a class in \[0, 999\].*got -1"),
    "class-on-pixart": (TINY_PIXART + ["--class-label", "3"],
                        r"--class-label: expected only with a DiT model, got --class-label 3 with --model tiny-pixart"),
    "prompt-on-dit": (TINY_DIT + ["--prompt", "a cat"],
                      r"--prompt: expected only with a PixArt or flow-matching model"),
    "out-missing-dir": (TINY_DIT + ["--out", "/nonexistent/x.png"],
                        r"--out: expected an existing directory, got /nonexistent \(does not exist\)"),
    "out-is-dir": (TINY_DIT + ["--out", "TMP"], r"--out: expected an image file name .*, got the directory \S+"),
    "out-unknown-suffix": (TINY_DIT + ["--out", "TMP/x.txt"], r"--out: expected an image file name .*, got '\S+x.txt'"),
    "router-steps-conflict": (TINY_DIT + ["--router", "ROUTER", "--steps", "20"],
                              r"--steps: the router \S+ was trained for 10 steps, got --steps 20; leave --steps out"),
    "router-sampler-conflict": (TINY_DIT + ["--router", "ROUTER", "--sampler", "pipeline"],
                                r"--sampler: the router \S+ was trained with dit-ddim, got --sampler pipeline"),
    "router-other-model": (TINY_PIXART + ["--router", "ROUTER"],
                           r"--router: \S+ was trained with the sampler dit-ddim, expected one of"),
    "bench-out-parent-is-a-file": (["bench", "--out", "/etc/passwd/x.json"],
                                   r"--out: expected an existing directory, got /etc/passwd \(not a directory\)"),
    "bench-out-suffix": (["bench", "--out", "TMP/x.csv"], r"--out: expected a .json file name or an existing "
                                                          r"directory, got '\S+x.csv'"),
    "bench-delta-dit-unknown-key": (["bench", "--configs", "delta-dit:b=2,n=2,x=3"],
                                    r"--configs: could not read 'delta-dit:b=2,n=2,x=3' \(expected b=B,n=N"),
    "bench-cpu-too-long": (["bench", "--models", "pixart-alpha", "--resolutions", "1024", "--device", "cpu"],
                           r"--yes: this run is estimated at \d+ min on the CPU \(over 5 min; --plan lists its rows\); "
                           r"expected --yes to run it, got none"),
    **{f"router-{case}": (TINY_DIT + ["--router", f"ROUTER:{case}"], message)
       for case, message in ROUTER_CASES.items()},
    **{f"bench-router-{case}": (["bench", "--router", f"ROUTER:{case}"], message)
       for case, message in ROUTER_CASES.items() if case in ("garbage-weights", "nan-logits")},
}


@pytest.fixture
def no_work(monkeypatch):
    """Building a model or measuring anything fails the test: every error must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the error")

    patch_cli(monkeypatch, "load_experts", refuse)
    from harmonica.bench import command

    monkeypatch.setattr(command, "machine_info", refuse)


@pytest.mark.parametrize("argv,message", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_before_any_work(argv, message, tmp_path, capsys, no_work):
    words = []
    for word in argv:
        if word.startswith("ROUTER"):
            _, _, case = word.partition(":")
            word = str(corrupt(write_router(tmp_path / "router"), case) if case else write_router(tmp_path / "router"))
        words.append(word.replace("TMP", str(tmp_path)))
    assert cli.main(words) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("harmonica: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_router_gives_its_steps_and_sampler(tmp_path, capsys):
    router = write_router(tmp_path / "router", steps=4)
    out = tmp_path / "x.png"
    assert cli.main(TINY_DIT + ["--router", str(router), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sampler dit-ddim, 4 steps" in printed and out.is_file()


def test_guidance_zero_is_not_the_default(tmp_path, monkeypatch):
    seen = []
    original = samplers.sample

    def spy(task, *args, **kwargs):
        seen.append(task.guidance)
        return original(task, *args, **kwargs)

    monkeypatch.setattr(samplers, "sample", spy)
    for guidance in ([], ["--guidance", "0"]):
        assert cli.main(TINY_DIT + ["--steps", "2", "--out", str(tmp_path / "x.png")] + guidance) == 0
    assert seen == [1.5, 0.0]


def test_non_finite_image_is_an_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(samplers, "sample", lambda task, *a, **k: torch.full((1, 4, 8, 8), float("nan")))
    out = tmp_path / "x.png"
    assert cli.main(TINY_DIT + ["--steps", "2", "--out", str(out)]) == 2
    assert "latents: expected finite values, got 256 of 256 NaN/inf" in capsys.readouterr().err
    assert not out.exists()


def test_bench_out_directory_holds_the_usual_file_name(tmp_path, monkeypatch):
    from harmonica.bench import command

    monkeypatch.setattr(command, "run_suite", lambda options, progress, done: [])
    monkeypatch.setattr(command, "_host_cost", lambda: [])
    monkeypatch.setattr(command, "machine_info", lambda: {"date": "2026-12-01T00:00", "commit": "abc1234"})
    for name in ("format_suite_table", "format_gap_table", "format_skipped"):
        monkeypatch.setattr(command, name, lambda rows: "")
    monkeypatch.setattr(command, "target_verdicts", lambda rows, device: [])
    assert cli.main(["bench", "--part", "suite", "--models", "tiny-dit", "--out", str(tmp_path), "--no-progress"]) == 0
    assert [p.name for p in tmp_path.glob("*.json")] == ["2026-12-01-cpu-abc1234.json"]
