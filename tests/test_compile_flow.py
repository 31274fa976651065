"""torch.compile of the flow-model adapters (FLUX.1, SD3.5, Wan, Qwen-Image, FLUX.2, Z-Image, HunyuanVideo 1.5, LTX-2;
tiny random models, CPU, fp32) with a counting backend: each unit kind of each block class compiles once per input
signature, whatever the step count and schedule rows; the compiled generation is bitwise the eager engine's. The
fused residual ops run in the engine's eager Python, outside the compiled bodies (engine.py), as in test_compile.py."""

import pytest
import test_adapters_flux as flux
import test_adapters_flux2 as flux2
import test_adapters_hunyuan_video15 as hunyuan
import test_adapters_ltx2 as ltx2
import test_adapters_qwen_image as qwen
import test_adapters_sd3 as sd3
import test_adapters_wan as wan
import test_adapters_z_image as z_image
import torch
from test_compile import CountingBackend, compiled_entries, many_rows
from torch._dynamo.utils import counters

import harmonica
from harmonica import CacheSchedule

# family -> (tiny model, step inputs, {(block class, unit kind): compiled graphs}, sorted outputs per graph).
# SD3.5's three blocks are three variants (dual attention, joint, context_pre_only): their adaLN chunks
# have other strides (9, 6 or 2 chunks of D), another input signature, so attn takes 3 graphs and ff 2.
FAMILIES = {
    "flux": (flux.make_flux, flux.step_inputs,
             {("FluxTransformerBlock", "attn"): 1, ("FluxTransformerBlock", "ff"): 1,
              ("FluxTransformerBlock", "ff_context"): 1, ("FluxSingleTransformerBlock", "attn_mlp"): 1},
             [1, 1, 1, 2]),
    "sd35": (lambda: sd3.make_sd3("sd35"), sd3.step_inputs,
             {("JointTransformerBlock", "attn"): 3, ("JointTransformerBlock", "attn2"): 1,
              ("JointTransformerBlock", "ff"): 2, ("JointTransformerBlock", "ff_context"): 1},
             [1, 1, 1, 1, 1, 2, 2]),
    "wan": (wan.make_wan, wan.step_inputs,
            {("WanTransformerBlock", "attn1"): 1, ("WanTransformerBlock", "attn2"): 1,
             ("WanTransformerBlock", "ffn"): 1},
            [1, 1, 1]),
    "qwen-image": (qwen.make_qwen_image, qwen.step_inputs,
                   {("QwenImageTransformerBlock", "attn"): 1, ("QwenImageTransformerBlock", "img_mlp"): 1,
                    ("QwenImageTransformerBlock", "txt_mlp"): 1},
                   [1, 1, 2]),
    "flux2": (flux2.make_flux2, flux2.step_inputs,
              {("Flux2TransformerBlock", "attn"): 1, ("Flux2TransformerBlock", "ff"): 1,
               ("Flux2TransformerBlock", "ff_context"): 1, ("Flux2SingleTransformerBlock", "attn_mlp"): 1},
              [1, 1, 1, 2]),
    "z-image": (z_image.make_z_image, z_image.step_inputs,
                {("ZImageTransformerBlock", "attention"): 1, ("ZImageTransformerBlock", "feed_forward"): 1},
                [1, 1]),
    "hunyuan-video1.5": (hunyuan.make_hunyuan, hunyuan.step_inputs,
                         {("HunyuanVideo15TransformerBlock", "attn"): 1, ("HunyuanVideo15TransformerBlock", "ff"): 1,
                          ("HunyuanVideo15TransformerBlock", "ff_context"): 1},
                         [1, 1, 2]),
    "ltx2": (ltx2.make_ltx2, ltx2.step_inputs, {("LTX2VideoTransformerBlock", kind): 1 for kind in ltx2.KINDS},
             [1] * len(ltx2.KINDS)),
}


@torch.no_grad()
def generation(model, inputs, steps):
    """The outputs at each step (Z-Image's per-sample outputs stacked, LTX-2's video and audio tokens as one)."""
    outputs = [model(**inputs(s)) for s in range(steps)]
    return [torch.cat([out.sample, out.audio_sample], dim=1) if hasattr(out, "audio_sample")
            else torch.stack(out.sample) if isinstance(out.sample, list) else out.sample for out in outputs]


def schedules(units):
    """FORA:2 and all-distinct rows, at 3 and 4 steps."""
    return [schedule for steps in (3, 4) for schedule in (CacheSchedule.fora(steps, units, 2), many_rows(steps, units))]


def entries_per_kind(engine) -> dict:
    """{(block class, unit kind): dynamo cache entries of its compiled body}."""
    kinds = [(name, kind) for name, bodies in engine.bodies.items() for kind in bodies]
    return {key: compiled_entries(code) for key, code in zip(kinds, engine._compiled_codes, strict=True)}


@pytest.mark.parametrize("family", FAMILIES)
def test_compiles_once_per_unit_kind_whatever_the_steps_and_rows(family):
    """One enable runs FORA:2 and all-distinct rows at 3 and 4 steps: the graphs all come from the first
    generation (one per unit kind of each block class and input signature), none after; every output is
    bitwise the eager engine's under the same schedule; no graph break (fullgraph)."""
    make, inputs, expected, outputs_per_graph = FAMILIES[family]
    model = make()
    units = len(harmonica.units.cached_units(model))
    plan = schedules(units)
    eager = []
    for schedule in plan:
        harmonica.enable(model, schedule)
        eager.append(generation(model, inputs, schedule.num_steps))
        harmonica.disable(model)
    backend, counts = CountingBackend(), []
    counters.clear()
    engine = harmonica.enable(model, plan[0], compile={"backend": backend})
    for schedule, reference in zip(plan, eager, strict=True):
        engine.set_schedule(schedule)
        outputs = generation(model, inputs, schedule.num_steps)
        assert all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
        counts.append(len(backend.graphs))
    per_kind = entries_per_kind(engine)
    harmonica.disable(model)
    assert not counters["graph_break"]
    assert counts == [sum(expected.values())] * len(plan)
    assert per_kind == expected
    # a joint attention (FLUX, SD3.5 blocks with a text stream, Qwen-Image) is one graph with both streams
    assert sorted(len(gm.graph.output_node().args[0]) for gm in backend.graphs) == outputs_per_graph
