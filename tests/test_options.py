"""Every option of every command is checked by one table (harmonica/options.py) before any model is built:
a bad value, an empty value or an option the chosen model, objective or suite does not use is one line
`--option: expected X, got Y` on stderr, exit status 2, and nothing is created or removed. Many cases run
through `cli.main` in this process (model builders replaced by a failure); a few per class run the real
`python -m harmonica` in a subprocess."""

import os
import re
import subprocess
import sys

import pytest
import torch
from _faults import damage_bytes
from _helpers import patch_cli
from safetensors.torch import save_file

import harmonica
from harmonica import cli
from harmonica.models import build_transformer
from harmonica.options import RULES, SUBCOMMANDS
from harmonica.router import Router

DIT = ["sample", "--model", "tiny-dit", "--random-weights"]
PIXART = ["sample", "--model", "tiny-pixart", "--random-weights"]
FLUX = ["sample", "--model", "tiny-flux", "--random-weights"]
IEPO = ["train", "--model", "tiny-dit", "--random-weights", "--objective", "iepo", "--steps", "3", "--out", "RUN"]
SEARCH = ["train", "--model", "tiny-dit", "--random-weights", "--out", "RUN"]
TRAIN_PIXART = ["train", "--model", "tiny-pixart", "--random-weights", "--objective", "iepo", "--out", "RUN"]
DIGITS = ["train", "--model", "digits-dit", "--out", "RUN"]
PROFILE = ["profile", "nsys", "--model", "tiny-dit", "--random-weights"]
EMBED = ["embed", "--model", "tiny-pixart", "--prompts", "PROMPTS", "--out", "TMP/e.safetensors"]
SDT_ONLY = r"expected only with an SDT --objective \(iepo, cumulative, leave-one-out, l2c\)"

# command line -> the one line after "harmonica: error: " (RUN: a run directory that does not exist yet; TMP: an
# empty directory; EMBEDS: a file of prompt embeddings with one defect, named after the colon)
CASES = {
    # class 1: type, range, finiteness, applicability, for every command
    "train-refresh-0": (IEPO + ["--refresh", "0"], r"--refresh: expected an integer >= 1, got 0"),
    "train-checkpoint-every-0": (IEPO + ["--checkpoint-every", "0"], r"--checkpoint-every: expected an integer >= 1, "
                                                                     r"got 0"),
    "train-batch-0": (IEPO + ["--batch", "0"], r"--batch: expected an integer >= 1, got 0"),
    "train-lambda-batch-negative": (IEPO + ["--lambda-batch", "-1"], r"--lambda-batch: expected an integer >= 1, "
                                                                     r"got -1"),
    "train-iterations-0": (IEPO + ["--iterations", "0"], r"--iterations: expected an integer >= 1, got 0"),
    "train-lr-inf": (IEPO + ["--lr", "inf"], r"--lr: expected a finite number > 0, got inf"),
    "train-beta-negative": (IEPO + ["--beta", "-1"], r"--beta: expected a finite number >= 0, got -1.0"),
    "train-beta-nan": (IEPO + ["--beta", "nan"], r"--beta: expected a finite number >= 0, got nan"),
    "train-guidance-nan": (IEPO + ["--guidance", "nan"], r"--guidance: expected a finite scale >= 0, got nan"),
    "train-guidance-negative": (IEPO + ["--guidance", "-5"], r"--guidance: expected a finite scale >= 0, got -5.0"),
    "train-steps-1001": (IEPO + ["--steps", "1001"], r"--steps: expected 2 to 1000 \(step 0 only fills the cache; "
                                                     r"the model has 1000 training timesteps\), got 1001"),
    "train-tau-0": (IEPO + ["--tau", "0"], r"--tau: expected a threshold in \(0, 1\), got 0.0"),
    "train-target-cur-1": (SEARCH + ["--target-cur", "1"], r"--target-cur: expected a finite number in \(0, 1\), "
                                                           r"got 1.0"),
    "train-checkpoint-minutes-nan": (IEPO + ["--checkpoint-minutes", "nan"], r"--checkpoint-minutes: expected a "
                                                                             r"finite number > 0, got nan"),
    "train-eval-batch-negative": (SEARCH + ["--eval-batch", "-1"], r"--eval-batch: expected an integer >= 0, got -1"),
    "train-embeds-on-dit": (IEPO + ["--embeds", "x.safetensors"], r"--embeds: expected only with a PixArt or "
                            r"flow-matching model, got --embeds 'x.safetensors' with --model tiny-dit"),
    "train-sampler-on-dit": (IEPO + ["--sampler", "iddpm"], r"--sampler: expected only with a PixArt model, got "
                                                            r"--sampler 'iddpm' with --model tiny-dit"),
    "train-unknown-sampler": (TRAIN_PIXART + ["--sampler", "ddim"], r"--sampler: expected one of \['dpm-solver\+\+', "
                                                                    r"'sa-solver', 'iddpm'\], got 'ddim'"),
    "train-weights-on-digits": (DIGITS + ["--weights", "x"], r"--weights: expected only with a DiT or PixArt or "
                                r"flow-matching model, got --weights 'x' with --model digits-dit"),
    "train-random-weights-on-digits": (DIGITS + ["--random-weights"], r"--random-weights: expected only with a .*, "
                                                                      r"got --random-weights with --model digits-dit"),
    "train-sdt-option-with-search": (SEARCH + ["--lr", "0.1"], r"--lr: " + SDT_ONLY + r", got --lr 0.1 with "
                                                                                      r"--objective search"),
    "train-abbreviated-option": (SEARCH + ["--iter", "5"], r"--iterations: " + SDT_ONLY),
    "train-lambda-option-with-l2c": (IEPO[:4] + ["--objective", "l2c", "--out", "RUN", "--refresh", "5"],
                                     r"--refresh: expected only with an --objective with IEPO's lambda \(iepo, "
                                     r"cumulative, leave-one-out\), got --refresh 5 with --objective l2c"),
    "train-search-option-with-iepo": (IEPO + ["--rounds", "2"], r"--rounds: expected only with --objective search, "
                                                                r"got --rounds 2 with --objective iepo"),
    "sample-seed-huge": (DIT + ["--seed", str(10**20)], r"--seed: expected an integer in \[0, 4294967295\], got "
                                                        r"100000000000000000000"),
    "sample-seed-negative": (DIT + ["--seed", "-1"], r"--seed: expected an integer in \[0, 4294967295\], got -1"),
    "sample-prompt-embeddings-on-dit": (DIT + ["--prompt-embeddings", "x"], r"--prompt-embeddings: expected only "
                                        r"with a PixArt or flow-matching model, got --prompt-embeddings 'x' with "
                                        r"--model tiny-dit"),
    "sample-class-label-on-flux": (FLUX + ["--class-label", "3"], r"--class-label: expected only with a DiT model"),
    "embed-max-sequence-length-0": (EMBED + ["--max-sequence-length", "0"], r"--max-sequence-length: expected an "
                                                                            r"integer >= 1, got 0"),
    "bench-repeat-0": (["bench", "--repeat", "0"], r"--repeat: expected an integer >= 1, got 0"),
    "bench-resolutions-0": (["bench", "--resolutions", "256", "0"], r"--resolutions: expected an integer >= 1, got 0"),
    "profile-launch-count-0": (["profile", "ncu", "--model", "tiny-dit", "--launch-count", "0"],
                               r"--launch-count: expected an integer >= 1, got 0"),
    "profile-dpm-solver-1-step": (["profile", "nsys", "--model", "tiny-pixart", "--steps", "1"],
                                  r"--steps: expected 2 to 1000 for the sampler dpm-solver\+\+, got 1"),
    "profile-warmup-negative": (PROFILE + ["--warmup", "-1"], r"--warmup: expected an integer >= 0, got -1"),
    # class 2: an empty value is an error, never the default
    **{f"empty-{option}": (argv + [f"--{option}", ""], rf"--{option}: expected a non-empty value, got ''")
       for argv, option in ((DIT, "schedule"), (DIT, "router"), (DIT, "sampler"), (FLUX, "prompt-embeddings"),
                            (DIT, "out"), (IEPO[:-2], "out"), (TRAIN_PIXART, "embeds"), (PROFILE, "config"),
                            (["bench"], "out"), (["bench"], "configs"), (EMBED[:-2], "out"), (EMBED, "weights"),
                            (PIXART, "prompt"))},
    "empty-in-a-list": (["bench", "--models", "tiny-dit", " "], r"--models: expected a non-empty value, got ' '"),
    # class 6: the digits suite refuses what it does not use
    **{f"digits-suite-{option}": (["bench", "--suite", "digits", f"--{option}", *values],
                                  rf"--{option}: expected only with --suite sampling, got --{option}.* with --suite "
                                  r"digits")
       for option, values in (("models", ["tiny-dit"]), ("steps", ["20"]), ("repeat", ["2"]), ("device", ["cpu"]),
                              ("seed", ["1"]), ("router", ["r"]), ("no-progress", []), ("part", ["suite"]))},
    "digits-suite-needs-yes": (["bench", "--suite", "digits"], r"--yes: this run is estimated at \d+ min on the CPU "
                                                               r"\(over 5 min; --plan lists its jobs\)"),
    # class 7: prompt-embedding files named with their defect
    **{f"embeds-{case}": (TRAIN_PIXART + ["--embeds", f"EMBEDS:{case}"], message) for case, message in {
        "int32": r"--embeds: expected floating-point prompt_embeds in \S+, got torch.int32",
        "nan": r"--embeds: expected finite prompt_embeds in \S+, got 4 NaN/inf values",
        "no-prompts": r"--embeds: expected at least one prompt in prompt_\w+ of \S+, got shape \(0, 2(, 32)?\)",
        "width": r"--embeds: expected prompt_embeds of shape \(prompts, tokens, 32\) in \S+, got \(1, 2, 7\)",
        "missing-key": r"--embeds: expected the keys .* in \S+, missing \['negative_attention_mask'\]",
        "random-bytes": r"--embeds: expected a safetensors file of prompt embeddings, got \S+ \(",
        "absent": r"--embeds: expected a safetensors file of prompt embeddings, got \S+ \(no such file\)",
    }.items()},
    "flow-embeds-int32": (FLUX + ["--prompt-embeddings", "EMBEDS:flow-int32"],
                          r"--prompt-embeddings: expected floating-point prompt_embeds in \S+, got torch.int32"),
    "prompts-not-utf8": (EMBED, r"--prompts: expected a UTF-8 text file, got \S+ \(byte 0xff at offset 3 is not "
                                r"UTF-8\)"),
    # class 8: each sampler's own step range
    "dpm-solver-1-step": (PIXART + ["--steps", "1"], r"--steps: expected 2 to 1000 for the sampler dpm-solver\+\+, "
                                                     r"got 1"),
    "sa-solver-1-step": (PIXART + ["--sampler", "sa-solver", "--steps", "1"], r"--steps: expected 2 to 1000 for the "
                                                                              r"sampler sa-solver, got 1"),
}


def embeddings_file(path, case: str):
    """A PixArt (caption width 32 for tiny-pixart) or flow prompt-embedding file with one defect."""
    tensors = {"prompt_embeds": torch.zeros(1, 2, 32), "prompt_attention_mask": torch.ones(1, 2),
               "negative_embeds": torch.zeros(1, 2, 32), "negative_attention_mask": torch.ones(1, 2)}
    if case == "int32":
        tensors["prompt_embeds"] = tensors["prompt_embeds"].int()
    elif case == "nan":
        tensors["prompt_embeds"][0, 0, :4] = float("nan")
    elif case == "no-prompts":
        tensors["prompt_embeds"], tensors["prompt_attention_mask"] = torch.zeros(0, 2, 32), torch.ones(0, 2)
    elif case == "width":
        tensors["prompt_embeds"] = torch.zeros(1, 2, 7)
    elif case == "missing-key":
        del tensors["negative_attention_mask"]
    elif case == "flow-int32":
        tensors = {"prompt_embeds": torch.zeros(1, 2, 32, dtype=torch.int32), "pooled_prompt_embeds": torch.zeros(1, 8)}
    if case == "random-bytes":
        path.write_bytes(os.urandom(64))
    elif case != "absent":
        save_file(tensors, str(path))
    return path


def files_under(directory) -> dict:
    """{relative path: bytes} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def no_work(monkeypatch):
    """Building or loading a model fails the test: every error must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the error")

    for name in ("load_experts", "load_text_encoders"):
        patch_cli(monkeypatch, name, refuse)
    import harmonica.digits

    monkeypatch.setattr(harmonica.digits, "load_digits_dit", refuse)


def words_of(argv, tmp_path) -> list:
    words = []
    for word in argv:
        if word.startswith("EMBEDS:"):
            word = str(embeddings_file(tmp_path / "embeds.safetensors", word.partition(":")[2]))
        elif word == "PROMPTS":
            (tmp_path / "prompts.txt").write_bytes(b"a c\xff\n")
            word = str(tmp_path / "prompts.txt")
        words.append(word.replace("RUN", str(tmp_path / "run")).replace("TMP", str(tmp_path)))
    return words


@pytest.mark.parametrize("argv,message", list(CASES.values()), ids=list(CASES))
def test_bad_option_is_one_line_before_any_work(argv, message, tmp_path, capsys, no_work):
    words = words_of(argv, tmp_path)
    before = files_under(tmp_path)
    assert cli.main(words) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harmonica: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert files_under(tmp_path) == before and not (tmp_path / "run").exists()


def test_every_option_of_every_command_has_a_rule():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        parsers = [command]
        for action in command._actions:
            if action.dest in SUBCOMMANDS:
                parsers = list(action.choices.values())  # profile nsys / ncu
        dests = {a.dest for p in parsers for a in p._actions} - {"help", *SUBCOMMANDS}
        assert dests <= set(RULES[name]), f"{name}: no rule for {sorted(dests - set(RULES[name]))}"
        assert set(RULES[name]) <= dests, f"{name}: rules for no option {sorted(set(RULES[name]) - dests)}"


def test_help_states_each_samplers_step_range(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    assert "1 to 1000; dpm-solver++, sa-solver: 2 to 1000" in " ".join(capsys.readouterr().out.split())


def test_two_steps_are_enough_for_the_multistep_samplers(tmp_path):
    for sampler in ("dpm-solver++", "sa-solver"):
        out = tmp_path / f"{sampler}.png"
        assert cli.main(PIXART + ["--sampler", sampler, "--steps", "2", "--out", str(out)]) == 0 and out.is_file()


def test_a_diverging_training_fails_and_saves_nothing(tmp_path, monkeypatch, capsys):
    """The model's output turns NaN (as NaN prompt embeddings make it): the loss is not finite."""
    from harmonica import training

    forward = training.RouterTrainer._forward
    monkeypatch.setattr(training.RouterTrainer, "_forward",
                        lambda self, *args: forward(self, *args) * float("nan"))
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-dit", "--random-weights", "--objective", "iepo", "--steps", "3", "--iterations",
            "2", "--batch", "1", "--lambda-batch", "1", "--refresh", "2", "--out", str(out)]
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert re.fullmatch(r"harmonica: error: training: expected a finite loss, got nan at iteration 1 .*nothing more "
                        r"saved", last), last
    assert not out.exists()


# ---- class 9: the Python API enforces what the command line enforces, with the same words ----


@pytest.mark.parametrize("tau", [5, float("nan"), -1, 0, 1])
def test_enable_refuses_a_tau_outside_0_1(tau):
    model = build_transformer("tiny-dit")
    router = Router(4, len(harmonica.units.cached_units(model)))
    with pytest.raises(ValueError, match=r"^tau: expected a threshold in \(0, 1\), got "):
        harmonica.enable(model, router, tau=tau)
    assert not hasattr(model, "_harmonica")
    with pytest.raises(ValueError, match=r"^tau: expected only with a Router"):
        harmonica.enable(model, harmonica.CacheSchedule.fora(4, 4, 2), tau=0.2)


def official_file(path, case: str):
    routers = {f"{i}.prob": torch.zeros(4) for i in range(3)}
    args = __import__("argparse").Namespace(ste_threshold=0.1)
    if case == "nan":
        routers = {key: torch.full((4,), float("nan")) for key in routers}
    elif case == "threshold-7":
        args.ste_threshold = 7.0
    torch.save({"routers": routers, "args": args}, path)
    damage_bytes(path, case)
    return path


@pytest.mark.parametrize("case,message", [
    ("nan", r"path: expected finite logits in \S+, got 12 NaN/inf values"),
    ("threshold-7", r"path: \S+ args.ste_threshold: expected a threshold in \(0, 1\), got 7.0"),
    ("empty", r"path: expected a file written by torch.save, got \S+ \(an empty file\)"),
    ("truncated", r"path: expected a file written by torch.save, got \S+ \("),
    ("random-bytes", r"path: expected a file written by torch.save, got \S+ \("),
])
def test_from_official_names_the_file_of_each_defect(case, message, tmp_path):
    path = official_file(tmp_path / "router.pt", case)
    with pytest.raises(ValueError, match="^" + message) as error:
        Router.from_official(path, build_transformer("tiny-dit"))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^tau: expected a threshold in \(0, 1\), got 7"):
        Router.from_official(official_file(tmp_path / "good.pt", "good"), build_transformer("tiny-dit"), tau=7)


@pytest.mark.parametrize("file,content", [("router.json", b""), ("router.safetensors", b""),
                                          ("router.safetensors", "TRUNCATED")])
def test_from_pretrained_names_an_empty_or_truncated_file(file, content, tmp_path):
    Router(4, 4).save_pretrained(tmp_path)
    path = tmp_path / file
    path.write_bytes(path.read_bytes()[:20] if content == "TRUNCATED" else content)
    with pytest.raises(ValueError, match=rf"^{path}: expected ") as error:
        Router.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)


# ---- the real command, one subprocess per class ----

SUBPROCESS_CASES = {
    "class-1-range": (IEPO + ["--refresh", "0"], r"--refresh: expected an integer >= 1, got 0"),
    "class-2-empty": (DIT + ["--out", ""], r"--out: expected a non-empty value, got ''"),
    "class-6-digits": (["bench", "--suite", "digits", "--steps", "20"],
                       r"--steps: expected only with --suite sampling"),
    "class-7-seed": (DIGITS + ["--seed", str(2**64)], r"--seed: expected an integer in \[0, 4294967295\]"),
    "class-8-steps": (PIXART + ["--steps", "1"], r"--steps: expected 2 to 1000 for the sampler dpm-solver\+\+"),
}


def run_harmonica(words, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harmonica", *words], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("argv,message", list(SUBPROCESS_CASES.values()), ids=list(SUBPROCESS_CASES))
def test_the_real_command_refuses_with_one_line(argv, message, tmp_path):
    words = words_of(argv, tmp_path)
    before = files_under(tmp_path)
    result = run_harmonica(words, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("harmonica: error: ") and re.search(message, lines[0]), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert files_under(tmp_path) == before and not (tmp_path / "run").exists()
