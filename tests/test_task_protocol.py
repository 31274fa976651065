"""One `Task` protocol (harmonica/task.py): every family's training task, built as `harmonica train` builds it,
provides each of its members and runs a generation through them alone, as `RouterTrainer` and the search do."""

from argparse import Namespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harmonica.cli.train import train_task as cli_train_task
from harmonica.families import FAMILIES
from harmonica.models import build_transformer, preset
from harmonica.prompts import random_embeddings
from harmonica.task import Task
from harmonica.training import TrainConfig

MEMBERS = {name for name in vars(Task) if not name.startswith("_")} | set(Task.__annotations__)
TINY = [name for family in FAMILIES.values() for name in family.presets if name.startswith("tiny")]
STEPS = 2


def bank(name: str) -> dict:
    """A prompt bank of two random prompts, as `harmonica embed` writes it for PixArt (`Family.read_embeddings`)."""
    with torch.device("meta"):
        transformer = build_transformer(name)
    return random_embeddings(transformer, 2, preset(name).text_tokens, torch.Generator().manual_seed(0))


def train_task(name: str) -> Task:
    """The task `harmonica train --model name --random-weights --steps STEPS` trains on (CPU)."""
    spec = preset(name)
    family = spec.family
    args = Namespace(model=name, weights=None, random_weights=True, sampler=None)
    config = TrainConfig(num_steps=STEPS, guidance=spec.guidance)
    embeddings = bank(name) if family.read_embeddings is not None else None
    return cli_train_task(args, spec, config, embeddings, "cpu")


def test_the_protocol_lists_what_the_trainer_the_search_and_the_sampling_loop_use():
    assert MEMBERS == {"transformer", "sampler", "timesteps", "latent_shape", "conditions", "begin", "prepare",
                       "model_kwargs",
                       "output", "update", "combined", "with_steps", "experts", "macs", "table", "solver_guidance",
                       "step_in_graph", "solver_output"}


@pytest.mark.parametrize("name", TINY)
def test_every_familys_task_is_a_task(name):
    task = train_task(name)
    assert type(task) is preset(name).family.task
    missing = MEMBERS - set(dir(task))
    assert not missing, f"{name}: {type(task).__name__} lacks {sorted(missing)}"
    assert len(task.timesteps) == STEPS and all(isinstance(t, int) for t in task.timesteps)
    assert len(task.with_steps(STEPS + 1).timesteps) == STEPS + 1
    experts = task.experts()
    assert experts[0] == (task.transformer, 0) and [first for _, first in experts] == sorted({f for _, f in experts})
    assert task.macs().total > 0 and isinstance(task.sampler, str) and task.sampler
    # one generation of two samples through the protocol alone (`RouterTrainer.rollout`)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, *task.latent_shape, generator=generator)
    inputs = task.prepare(task.conditions(2, generator), "cpu")
    state = task.begin()
    with torch.no_grad():
        for i in range(STEPS):
            transformer = next(t for t, first in reversed(experts) if first <= i)
            out = task.output(transformer(**task.model_kwargs(x, inputs, i)))
            stacked = torch.stack(out) if isinstance(out, list) else out  # Z-Image's per-sample list
            combined = task.combined(stacked.float(), x.shape[1])
            assert combined.shape[0] in (2, stacked.shape[0]) and torch.isfinite(combined).all()
            x = task.update(state, x, out, i)
    assert x.shape == (2, *task.latent_shape) and torch.isfinite(x).all()


# what a step may run besides putting the kwargs together: the CFG batch of the latents (and HunyuanVideo 1.5's
# condition channels after them), views of them (LTX-2's video and audio tokens, Z-Image's per-sample latents) and the
# step's timestep, a view of the timesteps `prepare` made
STEP_OPS = {"aten.cat.default", "aten.select.int", "aten.expand.default", "aten.slice.Tensor",
            "aten.unsqueeze.default", "aten.unbind.int"}


class AtenOps(TorchDispatchMode):
    """The names of the aten ops run inside the `with`."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", TINY)
def test_a_step_builds_nothing_that_prepare_built(name):
    """`model_kwargs` runs views and the CFG batch of the latents only: no factory op, no indexing of the prompt bank,
    no copy to the device (inputs and latents on the meta device, so host data a step used would be copied there)."""
    task = train_task(name)
    generator = torch.Generator().manual_seed(1)
    inputs = task.prepare(task.conditions(2, generator), "meta")
    x = torch.empty(2, *task.latent_shape, device="meta", dtype=task.transformer.dtype)
    with AtenOps() as log:
        kwargs = task.model_kwargs(x, inputs, 1)
    assert set(log.ops) <= STEP_OPS, f"{name}: a step ran {sorted(set(log.ops) - STEP_OPS)}"
    assert "aten.select.int" in log.ops  # the step's timestep, taken from inputs["timesteps"]
    tensors = [t for t in torch.utils._pytree.tree_leaves(kwargs) if isinstance(t, torch.Tensor)]
    assert tensors and all(t.is_meta for t in tensors)
