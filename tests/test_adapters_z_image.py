"""Z-Image's block adapter on a tiny random ZImageTransformer2DModel (CPU, fp32)."""

import pytest
import torch
from _adapter_checks import (
    assert_fora_reuses,
    assert_graph_replay_equals_eager,
    assert_no_cache_is_plain,
    distinct_random_parameters,
    fora_batch_and_rows_alone,
    trajectory,
)
from diffusers import ZImagePipeline

import harmonica
from harmonica import CacheSchedule
from harmonica.engine import CacheEngine
from harmonica.models import FLOW_PRESETS, build_transformer
from harmonica.units import cached_units

B, C, SIDE, STEPS = 2, 4, 8, 4  # latents 8 x 8: 16 tokens of 2 x 2, padded to 32 by the forward
CAPTIONS = (5, 40)  # caption tokens per row: padded to 32 and 64, so the batch's rows differ (an attention mask)
UNITS = 2 * 2  # 2 main layers (attention, feed_forward); the refiners are no units


def make_z_image():
    """The tiny-z-image preset's transformer (width 32, 2 layers, 1 refiner of each kind), every parameter random."""
    return distinct_random_parameters(build_transformer("tiny-z-image"))


def step_inputs(step, rows=slice(None)):
    """The transformer's arguments at `step` (ZImagePipeline's: per-sample lists), for the batch rows `rows`."""
    gen = torch.Generator().manual_seed(100 + step)
    latents = torch.randn(B, C, 1, SIDE, SIDE, generator=gen)
    captions = [torch.randn(n, 16, generator=gen) for n in CAPTIONS]
    return dict(x=list(latents[rows].unbind(0)), t=torch.full((B,), 0.2 * step)[rows], cap_feats=captions[rows])


def run(model, steps=STEPS, rows=slice(None)):
    """The model's outputs at each step, each (B, C, 1, h, w) (the forward returns one tensor per sample)."""
    return [torch.stack(out) for out in trajectory(model, steps, lambda s: step_inputs(s, rows))]


def test_units_are_the_main_layers():
    names = [name for name, _ in cached_units(make_z_image())]
    assert names == [f"layers.{b}.{kind}" for b in range(2) for kind in ("attention", "feed_forward")]


def test_no_cache_and_disable_are_bitwise_the_plain_model():
    """With rows of other lengths (the batch's attention mask) and the refiners run as diffusers runs them."""
    assert_no_cache_is_plain(make_z_image(), run, UNITS, STEPS)


def test_the_pipelines_own_loop_under_enable():
    """ZImagePipeline's loop (CFG as one batch, its scheduler starting each generation) under harmonica.enable(pipe):
    the no-cache schedule is bitwise the plain pipeline, twice in a row; FORA:2 is another sample."""
    spec, model = FLOW_PRESETS["tiny-z-image"], make_z_image()
    pipe = ZImagePipeline(scheduler=spec.family.scheduler.scheduler(), vae=None, text_encoder=None, tokenizer=None,
                          transformer=model)
    gen = torch.Generator().manual_seed(0)
    prompt, negative = [torch.randn(5, 16, generator=gen)], [torch.randn(3, 16, generator=gen)]
    noise = torch.randn(1, C, SIDE, SIDE, generator=gen)

    def sample():
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=noise, num_inference_steps=STEPS,
                    height=64, width=64, guidance_scale=spec.guidance, output_type="latent").images

    plain = sample()
    harmonica.enable(pipe, CacheSchedule.no_cache(STEPS, UNITS))
    try:
        assert torch.equal(sample(), plain) and torch.equal(sample(), plain)
        harmonica.enable(pipe, CacheSchedule.fora(STEPS, UNITS, 2))
        assert not torch.equal(sample(), plain)
    finally:
        harmonica.disable(pipe)


def test_fora_reuses_half_the_units_and_their_slots_hold_the_fresh_outputs():
    """A unit's fresh output is its post-norm's (attention_norm2, ffn_norm2); reusing one changes the output, by
    less than the output itself."""
    model = make_z_image()
    taps = {k: getattr(block, norm) for b, block in enumerate(model.layers)
            for k, norm in ((2 * b, "attention_norm2"), (2 * b + 1, "ffn_norm2"))}
    assert_fora_reuses(model, run, UNITS, taps=taps)
    plain = run(model)
    harmonica.enable(model, CacheSchedule.fora(STEPS, UNITS, 2))
    harmonica.reset(model)
    cached = run(model)
    harmonica.disable(model)
    change = (cached[3] - plain[3]).abs().max()
    assert 0 < change < plain[3].abs().max()


def test_batch_rows_equal_the_rows_run_alone():
    """Under FORA:2 each row's trajectory is the one it has alone (slots, gates and residual updates are per row),
    though alone the short row has no padding: its attention then has no masked keys. Up to rounding: one fp32
    rounding per term of the longest reduction (the MLP's hidden width 85) of the output's scale."""
    batch, alone = fora_batch_and_rows_alone(make_z_image(), lambda model, rows: run(model, rows=rows), UNITS, STEPS, B)
    for row in range(B):
        for together, single in zip(batch, alone[row], strict=True):
            tolerance = torch.finfo(torch.float32).eps * 85 * single.abs().max().item()
            torch.testing.assert_close(together[row:row + 1], single, rtol=0, atol=tolerance)


def test_per_token_modulation_is_refused():
    """Z-Image-Omni's noisy/clean tokens (noise_mask): one line, before any unit runs."""
    model = make_z_image()
    block, h = model.layers[0], torch.randn(B, 32, 32)
    harmonica.enable(model, CacheSchedule.no_cache(STEPS, UNITS))
    try:
        with pytest.raises(ValueError, match=r"^noise_mask: expected None \(Z-Image-Omni's per-token modulation .* "
                                             r"not supported by harmonica\), got a tensor$"):
            block(h, None, None, torch.randn(B, 32), noise_mask=torch.ones(B, 32, dtype=torch.long))
    finally:
        harmonica.disable(model)


def test_a_block_without_modulation_is_refused():
    model = make_z_image()
    model.layers[1] = model.context_refiner[0]
    with pytest.raises(ValueError, match=r"^layers\[1\]: expected a Z-Image block with adaLN modulation \(a main "
                                         r"layer\), got modulation=False"):
        CacheEngine(model, CacheSchedule.no_cache(STEPS, UNITS))


def test_graph_replay_equals_the_eager_engine():
    """The forward's per-sample lists are graph inputs like tensors; its rotary tables, cached by diffusers'
    RopeEmbedder from the first forward on, are alive across steps (graph inputs on a GPU too)."""
    model = make_z_image()
    assert_graph_replay_equals_eager(model, run, UNITS, STEPS + 1,
                                     graph_inputs=lambda: list(model.rope_embedder.freqs_cis))


def test_the_timestep_rises_along_a_generation():
    """The forward's t is 1 - sigma: a generation whose t falls is the next one started without a reset (an error
    on host timesteps), where the other families' falling timesteps are the norm."""
    model = make_z_image()
    harmonica.enable(model, CacheSchedule.fora(STEPS, UNITS, 2))
    harmonica.reset(model)
    try:
        run(model, steps=2)
        with pytest.raises(ValueError, match=r"num_inference_steps: expected 4 .*got 2 \(timestep 0 after 0.2 at "
                                             r"step 2\)"), torch.no_grad():
            model(**step_inputs(0))
    finally:
        harmonica.disable(model)
