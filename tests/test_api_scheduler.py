"""enable(pipe) hooks the scheduler's set_timesteps without hiding its signature (diffusers'
retrieve_timesteps inspects it for `sigmas`/`timesteps` support)."""

import inspect

from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps
from test_adapters_flux import STEPS, UNITS, make_flux

import harmonica
from harmonica import CacheSchedule


class Pipe:  # the two attributes enable reads from a pipeline
    def __init__(self):
        self.transformer, self.scheduler = make_flux(), FlowMatchEulerDiscreteScheduler()


def test_hooked_set_timesteps_keeps_its_signature_and_begins_generations():
    pipe = Pipe()
    before = inspect.signature(pipe.scheduler.set_timesteps)
    engine = harmonica.enable(pipe, CacheSchedule.fora(STEPS, UNITS, 2))
    assert inspect.signature(pipe.scheduler.set_timesteps) == before
    engine.step = 3
    timesteps, steps = retrieve_timesteps(pipe.scheduler, sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.5)
    assert steps == STEPS and len(timesteps) == STEPS
    assert engine.step == 0 and engine.clock.begun
    harmonica.disable(pipe)
