"""The HarmoniCa router: one learned logit per (denoising step, unit), independent of the input.

Gate value r = sigmoid(logit). The first step's row is a constant +5 (never trained: step 0 computes
every unit and fills the cache); all logits are clamped to [-5, 5] after every optimizer step.
A router file (`save_pretrained`) records what it was trained for, and loading it into another
model, sampler or step count is an error that lists each difference (method.md section 2). It may carry a
linear forecast of its schedule (`forecast.Forecast`, `router.forecast`; format 3), which `harmonica.enable`
applies; files without one (formats 1 and 2 among them) load as pure reuse.
"""

import argparse
import hashlib
import json
import pickle
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .files import write_files
from .schedule import ROUTER_RULES, CacheSchedule
from .units import cached_units

LOGIT_BOUND = 5.0
WEIGHTS_FILE = "router.safetensors"
INFO_FILE = "router.json"
FORMAT_VERSION = 3  # 2 added the training progress (complete, iterations, planned_iterations); 3 the forecast
READABLE_VERSIONS = (1, 2, 3)
FORECAST_TENSORS = ("forecast_a", "forecast_b", "forecast_table")  # Forecast's a, b, table
SAFE_GLOBALS = [argparse.Namespace]  # the `args` of the official checkpoints
TAU_RANGE = "a threshold in (0, 1)"  # the command line says the same (harmonica.options)


def load_tensors(path, option: str):
    """`torch.load` with `weights_only=True`: tensors, containers and SAFE_GLOBALS only, so a crafted
    pickle cannot run code. A file holding anything else, and one that is missing, empty, truncated or not a
    torch.save file, is one ValueError line naming `option` and the file."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = re.search(r"WeightsUnpickler error: (.+?)(?: was not an allowed global| Please use|$)", str(error),
                           re.MULTILINE)
        if detail is None:  # not the weights_only refusal: bytes that do not unpickle
            raise _unreadable(path, option, error) from None
        raise ValueError(f"{option}: expected a file of tensors and plain containers, got {path} holding other "
                         f"objects ({detail.group(1)}); refused to load it") from None
    except (EOFError, RuntimeError, ValueError, OSError, IndexError, KeyError) as error:
        raise _unreadable(path, option, error) from None


def _unreadable(path, option: str, error: Exception) -> ValueError:
    size = Path(path).stat().st_size if Path(path).is_file() else None
    cause = ("an empty file" if size == 0 else getattr(error, "strerror", None)
             or (str(error).splitlines() or [type(error).__name__])[0][:120])
    return ValueError(f"{option}: expected a file written by torch.save, got {path} ({cause})")


def check_tau(tau, name: str = "tau") -> float:
    """`tau` when it is a threshold in (0, 1) (NaN is not); ValueError naming `name` otherwise."""
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and 0 < tau < 1):
        raise ValueError(f"{name}: expected {TAU_RANGE}, got {tau!r}")
    return float(tau)


def _bad(path, expected, got) -> ValueError:
    return ValueError(f"{path}: expected {expected}, got {got}")


def _read_info(path) -> dict:
    """The RouterInfo fields of a router.json (format_version checked and dropped); ValueError naming the file
    when it is not a JSON object of known keys with the right types, a readable version and tau in (0, 1)."""
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _bad(path, "JSON", f"unreadable text ({error})") from None
    if not isinstance(info, dict):
        raise _bad(path, "a JSON object", f"a {type(info).__name__}")
    if info.get("format_version") not in READABLE_VERSIONS:
        raise _bad(path, f"format_version in {READABLE_VERSIONS}", repr(info.get("format_version")))
    defaults = RouterInfo()
    kinds = {**{name: type(getattr(defaults, name)) for name in asdict(defaults)}, "format_version": int}
    unknown = sorted(set(info) - set(kinds))
    if unknown:
        raise _bad(path, f"keys from {sorted(kinds)}", f"unknown keys {unknown}")
    for name, value in info.items():
        kind = kinds[name]
        if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool) != (kind is bool):
            raise _bad(path, f"{name} of type {kind.__name__}", repr(value)[:60])
    if not 0 < info.get("tau", defaults.tau) < 1:
        raise _bad(path, "tau in (0, 1)", info["tau"])
    del info["format_version"]
    return info


def _read_forecast(tensors: dict, path, router):
    """The `Forecast` of a router file's tensors (None when it has none), checked against the router's schedule;
    ValueError naming the file."""
    from .forecast import Forecast

    present = [name for name in FORECAST_TENSORS if name in tensors]
    if not present:
        return None
    if len(present) != len(FORECAST_TENSORS):
        raise _bad(path, f"all of {list(FORECAST_TENSORS)} or none", f"only {present}")
    try:
        forecast = Forecast(*(tensors[name] for name in FORECAST_TENSORS))
        router.set_forecast(forecast)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return forecast


def describe_differences(mine: dict, theirs: dict, owner: str) -> list:
    """'key: <owner> has X, got Y' for every key of both dicts whose values differ; unit lists are
    shown by their length."""
    diffs = []
    for key, value in mine.items():
        other = theirs.get(key, value)
        if value != other:
            shown = (f"{len(value)} units", f"{len(other)} units") if key == "units" else (value, other)
            diffs.append(f"{key}: {owner} has {shown[0]}, got {shown[1]}")
    return diffs


def config_fingerprint(transformer) -> str:
    """Short hash of a diffusers model's config (private keys such as `_name_or_path` left out)."""
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dit_ddim_timesteps(num_steps: int) -> list:
    """The original DiT DDIM timesteps, `round(linspace(0, 999, T))`, in denoising (descending) order."""
    return torch.linspace(0, 999, num_steps, dtype=torch.float64).round().long().flip(0).tolist()


@dataclass
class RouterInfo:
    """What a router was trained for. Empty fields are not checked."""

    model_class: str = ""
    config_hash: str = ""
    units: list = field(default_factory=list)  # qualified unit names, `cached_units` order
    sampler: str = ""  # e.g. "dit-ddim", "DPMSolverMultistepScheduler"
    timesteps: list = field(default_factory=list)  # denoising order
    tau: float = 0.1
    rule: str = "harmonica"  # or "l2c-alternating"
    complete: bool = True  # False: saved by an interrupted training run
    iterations: int = 0  # training iterations done (0: not recorded)
    planned_iterations: int = 0

    @classmethod
    def for_model(cls, transformer, *, cross_attention: bool = True, **fields) -> "RouterInfo":
        units = [name for name, _ in cached_units(transformer, cross_attention=cross_attention)]
        return cls(model_class=type(transformer).__name__, config_hash=config_fingerprint(transformer), units=units,
                   **fields)

    def differences(self, other: "RouterInfo") -> list:
        """'field: router has X, got Y' for every field both sides set and that differs."""
        return describe_differences(self.identity(), other.identity(), "router")

    def identity(self) -> dict:
        """The fields set here that must match the model and sampler the router is used with."""
        fields = {name: getattr(self, name) for name in ("model_class", "config_hash", "units", "sampler", "timesteps")}
        return {name: value for name, value in fields.items() if value}


class Router(torch.nn.Module):
    """Logits `(T, K)`: T denoising steps (row 0 first), K units.

    generator: a `torch.Generator` for the N(0, 1) initialisation.
    """

    def __init__(self, num_steps: int, num_units: int, *, info: RouterInfo | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_steps < 1 or num_units < 1:
            raise ValueError(f"num_steps, num_units: expected >= 1, got {num_steps}, {num_units}")
        logits = torch.randn(num_steps, num_units, generator=generator)
        logits[0] = LOGIT_BOUND
        self.logits = torch.nn.Parameter(logits)
        self.forecast = None  # a forecast.Forecast of `schedule()` (its training tau), or None: pure reuse
        self.info = info or RouterInfo()
        if self.info.rule not in ROUTER_RULES:
            raise ValueError(f"info.rule: expected one of {ROUTER_RULES}, got {self.info.rule!r}")
        if self.info.units and len(self.info.units) != num_units:
            raise ValueError(f"info.units: expected {num_units} names (one per unit), got {len(self.info.units)}")
        if self.info.timesteps and len(self.info.timesteps) != num_steps:
            raise ValueError(f"info.timesteps: expected {num_steps} (one per step), got {len(self.info.timesteps)}")

    @property
    def num_steps(self) -> int:
        return self.logits.shape[0]

    @property
    def num_units(self) -> int:
        return self.logits.shape[1]

    def gates(self) -> torch.Tensor:
        """r = sigmoid(logits), (T, K); row 0 is the constant sigmoid(5) and carries no gradient."""
        first = torch.full_like(self.logits[:1], LOGIT_BOUND).detach()
        return torch.sigmoid(torch.cat([first, self.logits[1:]]))

    @torch.no_grad()
    def clamp_(self) -> None:
        """After each optimizer step: logits into [-5, 5], row 0 back to +5."""
        self.logits.clamp_(-LOGIT_BOUND, LOGIT_BOUND)
        self.logits[0] = LOGIT_BOUND

    def schedule(self, tau: float | None = None) -> CacheSchedule:
        """The static schedule at `tau` (default: the training tau), with this router's rule."""
        return CacheSchedule.from_gates(self.gates(), self.info.tau if tau is None else tau, self.info.rule)

    def check(self, other: RouterInfo) -> None:
        """Raise ValueError listing every way `other` (a model, sampler, timesteps) differs."""
        diffs = self.info.differences(other)
        if diffs:
            raise ValueError("router: trained for something else: " + "; ".join(diffs))

    def save_pretrained(self, directory) -> None:
        """`directory`/router.safetensors and router.json, written whole together (`files.write_files`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = {"format_version": FORMAT_VERSION, **asdict(self.info)}
        tensors = {"logits": self.logits.detach().cpu().contiguous()}
        if self.forecast is not None:
            tensors.update(zip(FORECAST_TENSORS, (self.forecast.a, self.forecast.b, self.forecast.table)))
        write_files({directory / WEIGHTS_FILE: save(tensors),
                     directory / INFO_FILE: json.dumps(info, indent=1) + "\n"})

    @classmethod
    def from_pretrained(cls, directory) -> "Router":
        """The router `save_pretrained` wrote to `directory`. Every defect of its files (missing, unreadable,
        unknown or mistyped router.json keys, tau outside (0, 1), no 2-D finite float `logits`) is one
        ValueError line naming the file; a partial router (an interrupted training run) warns."""
        directory = Path(directory)
        info_path, weights_path = directory / INFO_FILE, directory / WEIGHTS_FILE
        for path in (info_path, weights_path):
            if not path.is_file():
                raise ValueError(f"{directory}: expected a directory saved by Router.save_pretrained, with "
                                 f"{path.name}; got one without it")
        info = _read_info(info_path)
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise _bad(weights_path, "a safetensors file", f"unreadable bytes ({error})") from None
        logits = tensors.get("logits")
        if logits is None:
            raise _bad(weights_path, "a 'logits' tensor", f"tensors {sorted(tensors)}")
        if logits.dim() != 2 or not logits.is_floating_point() or logits.numel() == 0:
            raise _bad(weights_path, "float logits of shape (steps, units)",
                       f"{logits.dtype} of shape {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise _bad(weights_path, "finite logits", f"{int((~torch.isfinite(logits)).sum())} NaN/inf values")
        try:
            router = cls(*logits.shape, info=RouterInfo(**info))
        except ValueError as error:
            raise ValueError(f"{info_path}: {error}") from None
        with torch.no_grad():
            router.logits.copy_(logits)
        router.forecast = _read_forecast(tensors, weights_path, router)
        if not router.info.complete:
            warnings.warn(f"router: {directory} is partial, saved by an interrupted training run after "
                          f"{router.info.iterations} of {router.info.planned_iterations} iterations", stacklevel=2)
        return router

    def set_forecast(self, forecast) -> None:
        """Attach `forecast` (a `forecast.Forecast` fitted along `schedule()`, or None); ValueError otherwise."""
        if forecast is not None:
            forecast.check(self.schedule(), "forecast")
        self.forecast = forecast

    @classmethod
    def from_official(cls, path, transformer, *, rule: str | None = None, sampler: str = "dit-ddim",
                      timesteps: list | None = None, tau: float | None = None) -> "Router":
        """Import a router saved by the official Learning-to-Cache or HarmoniCa code.

        path: their `torch.save` checkpoint, a dict whose `routers` is a state dict
        `{"<i>.prob": (2L,)}` (row i = i-th timestep in ascending order; entries 2b and 2b+1 are
        block b's attention and MLP) and whose `args` (an `argparse.Namespace`) holds the threshold
        `ste_threshold` (None in Learning-to-Cache's files). Loaded with `weights_only=True`.
        transformer: the diffusers DiT the router is for (its units must be 2L).
        rule: default from the file: "harmonica" (unit computes iff sigmoid > tau) for a HarmoniCa file,
        whose last row (the noisiest timestep) is exactly +5, else "l2c-alternating" (Learning-to-Cache).
        sampler, timesteps: what it was trained with; default the original DiT DDIM.
        tau: default the file's threshold, else 0.1.
        Every defect of the file (unreadable, empty, truncated, NaN/inf logits, a threshold outside (0, 1)) is
        one ValueError naming it.
        """
        checkpoint = load_tensors(path, "path")
        if not isinstance(checkpoint, dict) or "routers" not in checkpoint:
            keys = list(checkpoint)[:5] if isinstance(checkpoint, dict) else "-"
            raise ValueError(f"path: expected a checkpoint dict with a 'routers' state dict, got "
                             f"{type(checkpoint).__name__} with keys {keys}")
        state = checkpoint["routers"]
        if not isinstance(state, dict):
            raise ValueError(f"path: expected a state dict as the routers of {path}, got {type(state).__name__}")
        rows = sorted((int(key.split(".")[0]), value) for key, value in state.items()
                      if isinstance(key, str) and key.endswith(".prob") and key.split(".")[0].isdigit())
        if not rows or [i for i, _ in rows] != list(range(len(rows))):
            raise ValueError(f"path: expected routers entries '0.prob' .. '<T-1>.prob', got {sorted(state)[:5]}")
        if not all(torch.is_tensor(value) and value.dim() == 1 for _, value in rows):
            raise ValueError(f"path: expected 1-D tensors as the routers entries of {path}, got "
                             f"{[type(value).__name__ for _, value in rows][:3]}")
        ascending = torch.stack([value.float() for _, value in rows])
        if not torch.isfinite(ascending).all():
            raise ValueError(f"path: expected finite logits in {path}, got {int((~torch.isfinite(ascending)).sum())} "
                             f"NaN/inf values")
        harmonica_file = bool(torch.all(ascending[-1] == LOGIT_BOUND))
        rule = rule or ("harmonica" if harmonica_file else "l2c-alternating")
        info = RouterInfo.for_model(transformer, cross_attention=False, sampler=sampler, rule=rule)
        if ascending.shape[1] != len(info.units):
            raise ValueError(f"path: expected rows of {len(info.units)} logits (2 per block of the transformer), "
                             f"got {ascending.shape[1]}")
        num_steps = ascending.shape[0]
        official_tau = getattr(checkpoint.get("args"), "ste_threshold", None)
        if tau is not None:
            info.tau = check_tau(tau)
        elif official_tau is not None:
            info.tau = check_tau(official_tau, f"path: {path} args.ste_threshold")
        else:
            info.tau = 0.1
        info.timesteps = timesteps or (dit_ddim_timesteps(num_steps) if sampler == "dit-ddim" else [])
        router = cls(num_steps, ascending.shape[1], info=info)
        with torch.no_grad():
            router.logits.copy_(ascending.flip(0))  # denoising order: the noisiest timestep first
            router.logits[0] = LOGIT_BOUND
        return router


def load_router(directory: str, option: str = "--router") -> Router:
    """`Router.from_pretrained(directory)`, its one-line errors (each naming the file) prefixed with `option`."""
    try:
        return Router.from_pretrained(directory)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from None
