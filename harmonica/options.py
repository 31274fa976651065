"""Every command-line option of `harmonica sample|train|embed|bench|profile` checked in one table, before any
model is built or file written.

`RULES[command][dest]` says what an option's value must be (`Rule`: integer or number ranges, which exclude
NaN and inf; non-empty text; choices) and what it applies to (`only`: the kinds of `--model`, the train
`--objective`, the bench `--suite`). `check_options` runs the rules of the options the command line gives
(`given_options`, abbreviations included) and raises one ValueError `--option: expected X, got Y` for the
first that breaks one: a bad value, or an option the chosen model, objective or suite does not use (refused,
not ignored). Checks that need more (a router's files, a model's config) stay with the commands, after these.
"""

import argparse
import math
from dataclasses import dataclass, field

from .router import TAU_RANGE  # `harmonica.api.enable` and `Router` say the same

SEED_MAX = 2**32 - 1  # numpy's and every generator's range
TRAIN_TIMESTEPS = 1000  # every preset's diffusion has 1000 training timesteps
MODEL_KINDS = {"dit": "DiT", "pixart": "PixArt", "flow": "flow-matching", "digits": "committed digits"}
# train --objective -> what it uses: the search; SDT with IEPO's lambda (refreshed by rollouts); SDT with lambda 1
OBJECTIVE_KINDS = {"search": "search", "iepo": "lambda", "cumulative": "lambda", "leave-one-out": "lambda",
                   "l2c": "l2c"}
OBJECTIVE_PHRASES = {("lambda", "l2c"): "an SDT --objective (iepo, cumulative, leave-one-out, l2c)",
                     ("lambda",): "an --objective with IEPO's lambda (iepo, cumulative, leave-one-out)",
                     ("search",): "--objective search"}


@dataclass(frozen=True)
class Rule:
    """What one option's value must be. kind: int, float or str (each element of a list option); low/high:
    bounds (open_low/open_high: excluded), which numbers must also be finite to meet; expected: the range as
    the message states it; choices: the allowed values; empty: whether "" is a value; only: {context key:
    the values it applies to} (keys "model", "objective", "suite")."""

    kind: type | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    expected: str | None = None
    choices: tuple | None = None
    empty: bool = False
    only: dict = field(default_factory=dict)

    def problem(self, value) -> str | None:
        """What the message expects when `value` breaks the rule, else None."""
        if self.kind is str:
            if not self.empty and not value.strip():
                return "a non-empty value"
            if self.choices is not None and value not in self.choices:
                return f"one of {list(self.choices)}"
            return None
        if self.kind in (int, float):
            finite = math.isfinite(value)
            below = self.low is not None and not (value > self.low if self.open_low else value >= self.low)
            above = self.high is not None and not (value < self.high if self.open_high else value <= self.high)
            if not finite or below or above:
                return self.expected or self.describe()
        return None

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return (f"{what} in {'(' if self.open_low else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.open_high else ']'}")
        if self.low is not None:
            return f"{what} {'>' if self.open_low else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{what} {'<' if self.open_high else '<='} {_number(self.high)}"
        return what


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def count(low: int = 1, **kwargs) -> Rule:
    return Rule(int, low=low, **kwargs)


def number(**kwargs) -> Rule:
    return Rule(float, **kwargs)


TEXT = Rule(str)
FLAG = Rule()
PIPELINES = {"model": ("dit", "pixart", "flow")}  # not the committed digits models: their own weights and sampler
WEIGHTS = Rule(str, only=PIPELINES)
RANDOM_WEIGHTS = Rule(only=PIPELINES)
SEED = count(0, high=SEED_MAX)
TAU = number(low=0, high=1, open_low=True, open_high=True, expected=TAU_RANGE)
GUIDANCE = number(low=0, expected="a finite scale >= 0")
STEPS = count(1, high=TRAIN_TIMESTEPS, expected=f"1 to {TRAIN_TIMESTEPS} (the model's training timesteps)")
TEXT_CONDITIONAL = {"model": ("pixart", "flow")}
SDT_ONLY = {"objective": ("lambda", "l2c")}
LAMBDA_ONLY = {"objective": ("lambda",)}
SEARCH_ONLY = {"objective": ("search",)}
SAMPLING_ONLY = {"suite": ("sampling",)}

PROFILE = {
    "model": FLAG, "weights": WEIGHTS, "random_weights": RANDOM_WEIGHTS, "config": TEXT, "router": TEXT,
    "mode": FLAG, "steps": STEPS, "warmup": count(0), "seed": SEED,
    "prompt_embeddings": Rule(str, only=TEXT_CONDITIONAL),
    "out": TEXT, "kernel": TEXT, "nvtx_include": TEXT, "launch_count": count(1),
}
RULES = {
    "sample": {
        "model": FLAG, "weights": WEIGHTS, "random_weights": RANDOM_WEIGHTS, "router": TEXT, "schedule": TEXT,
        "no_cache": FLAG, "tau": TAU, "sampler": Rule(str, only=PIPELINES), "steps": STEPS, "seed": SEED,
        "class_label": Rule(int, only={"model": ("dit",)}), "prompt": Rule(str, only=TEXT_CONDITIONAL),
        "prompt_embeddings": Rule(str, only=TEXT_CONDITIONAL), "guidance": GUIDANCE, "fp32": FLAG,
        "cuda_graphs": FLAG,
        "scheduler_in_graph": Rule(only=PIPELINES), "compile": FLAG, "out": TEXT,
        "context_parallel": TEXT,  # which models: parallel.py says (those with a cp plan)
    },
    "train": {
        "model": FLAG, "weights": WEIGHTS, "random_weights": RANDOM_WEIGHTS, "out": TEXT,
        "resume": Rule(only=SDT_ONLY), "overwrite": FLAG,
        "steps": count(2, high=TRAIN_TIMESTEPS, expected=f"2 to {TRAIN_TIMESTEPS} (step 0 only fills the cache; the "
                       f"model has {TRAIN_TIMESTEPS} training timesteps)"),
        "iterations": count(1, only=SDT_ONLY), "batch": count(1), "lr": number(low=0, open_low=True, only=SDT_ONLY),
        "beta": number(low=0, only=SDT_ONLY), "tau": TAU, "refresh": count(1, only=LAMBDA_ONLY), "guidance": GUIDANCE,
        "embeds": Rule(str, only=TEXT_CONDITIONAL),
        "sampler": Rule(str, choices=("dpm-solver++", "sa-solver", "iddpm"), only={"model": ("pixart",)}),
        "objective": FLAG, "rounds": count(1, only=SEARCH_ONLY), "candidates": count(1, only=SEARCH_ONLY),
        "forecast_rounds": count(0, only=SEARCH_ONLY),
        "eval_batch": count(0), "lambda_batch": count(1, only=LAMBDA_ONLY), "seed": SEED,
        "checkpoint_every": count(1, only=SDT_ONLY),
        "checkpoint_minutes": number(low=0, open_low=True, only=SDT_ONLY),
        "target_cur": number(low=0, high=1, open_low=True, open_high=True),
        "target_speedup": number(low=1, open_low=True, expected="a theoretical speedup > 1"),
        "optimizer": Rule(only=SDT_ONLY), "loss": Rule(only=SDT_ONLY), "init": Rule(str, only=SDT_ONLY),
        "no_forecast": FLAG,
    },
    "embed": {
        "model": FLAG, "weights": TEXT, "prompts": TEXT, "negative_prompt": Rule(str, empty=True),
        "max_sequence_length": count(1), "device": TEXT, "dtype": FLAG, "out": TEXT,
    },
    "bench": {
        "models": Rule(str, only=SAMPLING_ONLY), "resolutions": count(1, only=SAMPLING_ONLY),
        "configs": Rule(str, only=SAMPLING_ONLY), "modes": Rule(str, only=SAMPLING_ONLY),
        "steps": count(2, high=TRAIN_TIMESTEPS, only=SAMPLING_ONLY), "repeat": count(1, only=SAMPLING_ONLY),
        "warmup": count(1, only=SAMPLING_ONLY), "quick": FLAG, "full": Rule(only=SAMPLING_ONLY),
        "max_compiled_graphs": count(1, only=SAMPLING_ONLY), "part": Rule(only=SAMPLING_ONLY),
        "kernel_ops": Rule(str, only=SAMPLING_ONLY), "plan": FLAG,
        "device": Rule(only=SAMPLING_ONLY), "router": Rule(str, only=SAMPLING_ONLY),
        "real_weights": Rule(only=SAMPLING_ONLY), "seed": count(0, high=SEED_MAX, only=SAMPLING_ONLY), "out": TEXT,
        "yes": FLAG, "no_progress": Rule(only=SAMPLING_ONLY), "suite": FLAG,
        "context_parallel": Rule(str, only=SAMPLING_ONLY),
    },
    "profile": PROFILE,
}
SUBCOMMANDS = ("command", "tool")  # the subparsers' own dests


def model_kind(name: str) -> str:
    """"dit", "pixart", "flow" or "digits" for a --model name."""
    from .digits import DIGITS_MODELS  # committed weights, not a hub pipeline
    from .models import preset

    if name in DIGITS_MODELS:
        return "digits"
    return preset(name).family.kind


def context(command: str, args) -> dict:
    """{key: (value, how the command line says it)} of what the rules' `only` refers to."""
    found = {}
    if getattr(args, "model", None):
        found["model"] = (model_kind(args.model), f"--model {args.model}")
    if command == "train":
        found["objective"] = (OBJECTIVE_KINDS[args.objective], f"--objective {args.objective}")
    if command == "bench":
        found["suite"] = (args.suite, f"--suite {args.suite}")
    return found


def _applies_to(key: str, values: tuple) -> str:
    if key == "model":
        return f"a {' or '.join(MODEL_KINDS[v] for v in values)} model"
    if key == "objective":
        return OBJECTIVE_PHRASES[values]
    return " or ".join(f"--{key} {v}" for v in values)


def _shown(flag: str, value) -> str:
    if value is True:
        return flag
    if isinstance(value, list):
        return " ".join([flag, *map(repr, value)])
    return f"{flag} {value!r}" if isinstance(value, str) else f"{flag} {value}"


def check_options(command: str, args, given: set) -> None:
    """ValueError `--option: expected X, got Y` for the first given option (parser order) that breaks its
    rule in RULES[command]."""
    rules = RULES[command]
    where = context(command, args)
    for dest in given:
        if dest in SUBCOMMANDS:
            continue
        rule, value = rules[dest], getattr(args, dest)
        flag = "--" + dest.replace("_", "-")
        for key, values in rule.only.items():
            if key in where and where[key][0] not in values:
                raise ValueError(f"{flag}: expected only with {_applies_to(key, values)}, got {_shown(flag, value)} "
                                 f"with {where[key][1]}")
        for item in value if isinstance(value, list) else [value]:
            expected = rule.problem(item)
            if expected:
                raise ValueError(f"{flag}: expected {expected}, got {item!r}")


def given_options(parser: argparse.ArgumentParser, argv) -> list:
    """The dests `argv` sets on `parser` (and its subcommands' parsers), in parser order: a parse in which
    nothing has a default. `parser` is changed: pass a fresh one."""
    order = []

    def strip_defaults(p):
        p._defaults = {}
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    strip_defaults(sub)
            if action.dest not in order:
                order.append(action.dest)
            action.default = argparse.SUPPRESS

    strip_defaults(parser)
    given = vars(parser.parse_args(argv))
    return [dest for dest in order if dest in given]
