"""The family registry (harmonica/families): one module per family (flow-matching, DiT, PixArt) holds everything
about it, and generic code asks `family_of` instead of naming a family's classes."""

from pathlib import Path

import pytest
import torch
from test_flow import STEPS, pipeline_latents

from harmonica.adapters import ADAPTERS, blocks_of
from harmonica.families import FAMILIES, family_of, register
from harmonica.flow import flow_task
from harmonica.models import FLOW_MODELS, FLOW_PRESETS, PRESETS, build_transformer
from harmonica.prompts import random_embeddings

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(path for folder in ("harmonica", "bench", "profiling") for path in (ROOT / folder).rglob("*.py"))
SHARED_VAE = "AutoencoderKL"  # DiT's, PixArt's, FLUX.1's and SD3's: no family's alone
FLOW_FAMILIES = {name: family for name, family in FAMILIES.items() if family.scheduler is not None}
TINY = {family.transformer: [name for name in family.presets if name.startswith("tiny")]
        for family in FLOW_FAMILIES.values()}


def module_of(family) -> str:
    return family.task.__module__


def family_adapters(family) -> list:
    return [adapter for adapter in ADAPTERS.values() if adapter.__module__ == module_of(family)]


def test_the_registry_covers_every_flow_class_and_preset():
    assert sorted(FLOW_FAMILIES) == ["Flux2Transformer2DModel", "FluxTransformer2DModel",
                                     "HunyuanVideo15Transformer3DModel", "LTX2VideoTransformer3DModel",
                                     "QwenImageTransformer2DModel", "SD3Transformer2DModel", "WanTransformer3DModel",
                                     "ZImageTransformer2DModel"]
    assert {spec.class_name for spec in FLOW_PRESETS.values()} == set(FLOW_FAMILIES)
    assert {model.class_name for model in FLOW_MODELS.values()} == set(FLOW_FAMILIES)
    # no two families name a preset or a model alike (the merged tables would silently keep one)
    assert sum(len(family.presets) for family in FLOW_FAMILIES.values()) == len(FLOW_PRESETS)
    assert sum(len(family.models) for family in FLOW_FAMILIES.values()) == len(FLOW_MODELS)
    for family in FLOW_FAMILIES.values():
        assert module_of(family) == f"harmonica.families.{module_of(family).rpartition('.')[2]}"
        assert all(spec.class_name == family.transformer and spec.family is family for spec in family.presets.values())
        assert all(model.class_name == family.transformer for model in family.models.values())
        assert family_adapters(family), f"{family.name}: no block adapter in {module_of(family)}"
        assert TINY[family.transformer], f"{family.name}: no tiny preset"


@pytest.mark.parametrize("name", [name for names in TINY.values() for name in names])
def test_a_tiny_presets_blocks_and_task_are_its_familys(name):
    family = FLOW_PRESETS[name].family
    transformer = build_transformer(name)
    assert {block.adapter_class for block in blocks_of(transformer)} <= set(family_adapters(family))
    bank = random_embeddings(transformer, 1, 4, torch.Generator().manual_seed(0))
    task = flow_task(transformer, bank, STEPS, FLOW_PRESETS[name].guidance, **FLOW_PRESETS[name].size)
    assert type(task) is family.task and task.family is family


@pytest.mark.parametrize("name", [names[0] for names in TINY.values()])
def test_the_task_steps_at_the_pipelines_own_timesteps_and_sigmas(name):
    """The family's scheduler spec through the task, against the scheduler its diffusers pipeline has set."""
    spec = FLOW_PRESETS[name]
    transformer = build_transformer(name)
    bank = random_embeddings(transformer, 2, spec.text_tokens, torch.Generator().manual_seed(0))
    task = flow_task(transformer, bank, STEPS, spec.guidance, **spec.size)
    scheduler = spec.family.scheduler.scheduler()
    noise = torch.randn(1, *task.latent_shape, generator=torch.Generator().manual_seed(1))
    pipeline_latents(name, transformer, bank, noise, scheduler=scheduler)
    assert torch.equal(task.scheduler.sigmas, scheduler.sigmas), (task.scheduler.sigmas, scheduler.sigmas)
    assert torch.equal(task.scheduler.timesteps, scheduler.timesteps)
    assert task.timesteps == [int(t) for t in scheduler.timesteps.tolist()]


def test_the_dit_and_pixart_families_hold_their_presets_and_samplers():
    """DiT and PixArt are the families sampled by their pipelines' schedulers (no flow-matching schedule):
    `models.PRESETS` is theirs, in the order it had as a table of its own (real ones first), each preset's sampler
    one of its family's."""
    pipeline_families = [family for family in FAMILIES.values() if family.scheduler is None]
    assert [(family.name, family.transformer, family.kind) for family in pipeline_families] == [
        ("dit", "DiTTransformer2DModel", "dit"), ("pixart", "PixArtTransformer2DModel", "pixart")]
    assert list(PRESETS) == ["dit-xl-2-256", "dit-xl-2-512", "pixart-alpha-256", "pixart-alpha-512",
                             "pixart-alpha-1024", "pixart-sigma-2048", "tiny-dit", "tiny-pixart"]
    for name, spec in PRESETS.items():
        family = family_of(spec.class_name)
        assert spec.family is family and name in family.presets and spec.sampler in family.samplers
        assert (spec.steps, spec.guidance) == family.samplers[spec.sampler][1:]  # the default sampler's defaults
        assert (spec.height, spec.width) == (spec.config["sample_size"] * 8,) * 2
        assert module_of(family) == f"harmonica.families.{family.name}"
    assert family_of("DiTTransformer2DModel").text_conditional is False
    assert family_of("PixArtTransformer2DModel").text_conditional is True
    assert PRESETS["pixart-sigma-2048"].pipeline == "PixArtSigmaPipeline"
    assert PRESETS["pixart-alpha-1024"].pipeline == family_of("PixArtTransformer2DModel").pipeline  # the family's
    assert all(spec.sampler is None and spec.pipeline == spec.family.pipeline for spec in FLOW_PRESETS.values())


@pytest.mark.parametrize("value", ["UNet2DConditionModel", torch.nn.Linear(1, 1), torch.nn.Linear])
def test_family_of_names_the_supported_classes(value):
    expected = ("transformer: expected one of ['DiTTransformer2DModel', 'Flux2Transformer2DModel', "
                "'FluxTransformer2DModel', 'HunyuanVideo15Transformer3DModel', 'LTX2VideoTransformer3DModel', "
                "'PixArtTransformer2DModel', 'QwenImageTransformer2DModel', 'SD3Transformer2DModel', "
                "'WanTransformer3DModel', 'ZImageTransformer2DModel'], got ")
    with pytest.raises(ValueError) as error:
        family_of(value)
    assert str(error.value) == expected + ("UNet2DConditionModel" if isinstance(value, str) else "Linear")


def test_one_family_per_transformer_class():
    with pytest.raises(ValueError, match=r"^family: expected one per transformer class, got a second for "
                                         r"FluxTransformer2DModel$"):
        register(FAMILIES["FluxTransformer2DModel"])


def test_family_of_takes_an_instance_a_class_or_a_name():
    import diffusers

    transformer = build_transformer("tiny-flux")
    family = FAMILIES["FluxTransformer2DModel"]
    assert family_of(transformer) is family_of(type(transformer)) is family_of(diffusers.FluxTransformer2DModel)
    assert family_of("FluxTransformer2DModel") is family


@pytest.mark.parametrize("transformer", sorted(FAMILIES))
def test_only_the_family_module_names_its_classes(transformer):
    """The done-when of one family, one module: no other source file of harmonica, bench or profiling names its
    transformer, pipeline, VAE (unless shared) or block classes."""
    family = FAMILIES[transformer]
    names = {family.transformer, family.pipeline, *(spec.pipeline for spec in family.presets.values()),
             *(adapter.block_class for adapter in family_adapters(family))}
    if family.vae != SHARED_VAE:
        names.add(family.vae)
    home = ROOT / (module_of(family).replace("harmonica.", "harmonica/", 1).replace(".", "/") + ".py")
    assert home in SOURCES
    found = [f"{path.relative_to(ROOT)} names {name}" for path in SOURCES if path != home
             for name in sorted(names) if name in path.read_text()]
    assert found == [], "\n".join(found)


def test_a_video_familys_frames_go_through_its_vae_factor():
    wan = family_of("WanTransformer3DModel")
    assert (wan.frame_factor, wan.latent_frames(81), wan.video_frames(21)) == (4, 21, 81)
    with pytest.raises(ValueError, match="frames: expected 4 n \\+ 1 frames for WanTransformer3DModel, got 80"):
        wan.latent_frames(80)
    with pytest.raises(ValueError, match="frames: expected none for FluxTransformer2DModel \\(an image model\\)"):
        family_of("FluxTransformer2DModel").latent_frames(5)
