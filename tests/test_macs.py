"""MAC accounting on the meta device against the published figures and its own invariants."""

import diffusers
import pytest
import torch
from diffusers import DiTTransformer2DModel

import harmonica.macs
from harmonica.bench.macs import (
    MACS_BEGIN,
    MACS_END,
    flow_mac_table,
    format_flow_mac_table,
    format_mac_table,
    mac_table,
    macs_section,
)
from harmonica.bench.table import update_benchmarks
from harmonica.families import FlowModel
from harmonica.macs import count_macs, count_macs_for_input
from harmonica.models import FLOW_MODELS, build_transformer


def test_dit_xl2_256_matches_the_dit_paper():
    count = count_macs("dit-xl-2-256")
    assert count.total / 1e9 == pytest.approx(118.6, abs=0.2)
    assert len(count.names) == 56
    assert count.names[:3] == ("transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1.attn1")


def test_dit_xl2_512_matches_the_dit_paper():
    assert count_macs("dit-xl-2-512").total / 1e9 == pytest.approx(524.6, abs=0.5)


def test_unit_split():
    count = count_macs("dit-xl-2-256")
    kinds = count.by_kind()
    # at 256 tokens an MLP unit costs ~1.8x an attention unit (method.md section 3)
    assert kinds["ff"] / kinds["attn1"] == pytest.approx(1.8, abs=0.05)
    assert len(set(count.unit_macs)) == 2  # every block alike: one attention and one MLP cost
    assert 0 < count.always_macs < 0.01 * count.total
    assert sum(count.unit_macs) + count.always_macs == pytest.approx(count.total)


def test_pixart_has_cross_attention_units():
    count = count_macs("pixart-alpha-256")
    assert len(count.names) == 84
    kinds = count.by_kind()
    assert kinds["attn2"] > 0
    without = count_macs("pixart-alpha-256", cross_attention=False)
    assert len(without.names) == 56
    assert without.total == pytest.approx(count.total)
    assert without.always_macs == pytest.approx(count.always_macs + kinds["attn2"])
    # longer captions cost cross-attention MACs only
    longer = count_macs("pixart-alpha-256", text_tokens=300).by_kind()
    assert longer["attn2"] > kinds["attn2"] and longer["attn1"] == kinds["attn1"]


def test_per_image_and_resolution():
    one = count_macs("dit-xl-2-256")
    four = count_macs("dit-xl-2-256", batch=4)
    assert four.unit_macs == pytest.approx(one.unit_macs)
    # attention grows quadratically in tokens, the MLP linearly: at 4x tokens attention's share rises
    big = count_macs("dit-xl-2-256", 512, 512)
    assert big.by_kind()["ff"] == pytest.approx(4 * one.by_kind()["ff"], rel=1e-6)
    assert big.by_kind()["attn1"] > 4 * one.by_kind()["attn1"]


def test_counts_a_model_instance_from_its_config():
    with torch.device("meta"):
        model = DiTTransformer2DModel(sample_size=32, out_channels=8)
    assert count_macs(model).total == pytest.approx(count_macs("dit-xl-2-256").total)


@pytest.mark.parametrize("args,message", [
    (("dit-xl-3",), r"model: expected one of \[.*'dit-xl-2-256'.*\], got 'dit-xl-3'"),
    (("dit-xl-2-256", 250), r"height, width: expected multiples of 16 .*, got 250x250"),
])
def test_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        count_macs(*args)


def test_table_lists_every_preset():
    rows = mac_table(["dit-xl-2-256", "pixart-alpha-256"])
    text = format_mac_table(rows)
    assert "| dit-xl-2-256 | 256 | 256 | 56 | 118.7 |" in text
    assert "| pixart-alpha-256 | 256 | 256 | 84 |" in text


def test_flux_dev_1024_counts_37_19_tmacs():
    """FLUX.1-dev at 1024^2 with 512 text tokens: every block alike, so one double and one single block
    (the hub config otherwise) give the whole forward; each unit checked against its matmul count."""
    config = {**FLOW_MODELS["flux.1-dev-1024"].config, "num_layers": 1, "num_single_layers": 1}
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(**config)
    count = count_macs(model, 1024, text_tokens=512)
    assert count.names == ("transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                           "single_transformer_blocks.0.attn_mlp")
    image, text, d = 4096, 512, 3072
    tokens = image + text
    joint_attention = 4 * tokens * d * d + 2 * tokens * tokens * d  # q, k, v, out projections; QK^T and PV
    mlp = 2 * d * 4 * d  # per token
    # single block: q, k, v, QK^T, PV, the MLP's up projection (d -> 4d), proj_out (5d -> d)
    single = 3 * tokens * d * d + 2 * tokens * tokens * d + tokens * 4 * d * d + tokens * 5 * d * d
    assert count.unit_macs == (joint_attention, image * mlp, text * mlp, single)
    forward = count.always_macs + 19 * sum(count.unit_macs[:3]) + 38 * count.unit_macs[3]
    assert forward / 1e12 == pytest.approx(37.19, rel=0.005)


def test_flux2_dev_1024_counts_141_30_tmacs():
    """FLUX.2-dev at 1024^2 with 512 text tokens: every block alike and the modulations computed once outside them,
    so one double and one single block (the hub config otherwise) give the whole forward; each unit checked
    against its matmul count (no biases; SwiGLU MLPs of ratio 3, their input projection 2 x 3d wide)."""
    config = {**FLOW_MODELS["flux.2-dev-1024"].config, "num_layers": 1, "num_single_layers": 1}
    with torch.device("meta"):
        model = diffusers.Flux2Transformer2DModel(**config)
    count = count_macs(model, 1024, text_tokens=512)
    assert count.names == ("transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                           "single_transformer_blocks.0.attn_mlp")
    image, text, d = 4096, 512, 6144
    tokens = image + text
    joint_attention = 4 * tokens * d * d + 2 * tokens * tokens * d  # q, k, v, out projections; QK^T and PV
    mlp = d * 6 * d + 3 * d * d  # per token: d -> 2 x 3d, then 3d -> d
    # single block: the fused q, k, v and MLP input (d -> 3d + 6d), QK^T, PV, the fused output (3d + d -> d)
    single = tokens * 9 * d * d + 2 * tokens * tokens * d + tokens * 4 * d * d
    assert count.unit_macs == (joint_attention, image * mlp, text * mlp, single)
    forward = count.always_macs + 8 * sum(count.unit_macs[:3]) + 48 * count.unit_macs[3]
    assert forward / 1e12 == pytest.approx(141.30, rel=0.005)


def joint_attention_macs(tokens, d, out_tokens):
    """q, k, v of every token, the output projections of `out_tokens`, QK^T and PV."""
    return 3 * tokens * d * d + out_tokens * d * d + 2 * tokens * tokens * d


def test_sd3_units_are_its_sub_modules():
    """A tiny SD3.5-style model (block 0 with dual attention, block 1 the last, without text MLP) at 64^2:
    16 image tokens, 5 text tokens, width 16."""
    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
            pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
    count = count_macs(model, 64, text_tokens=5)
    n, t, d = 16, 5, 16
    assert count.names == ("transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.0.ff",
                           "transformer_blocks.0.ff_context", "transformer_blocks.1.attn", "transformer_blocks.1.ff")
    assert count.unit_macs == (joint_attention_macs(n + t, d, n + t), joint_attention_macs(n, d, n), 8 * n * d * d,
                               8 * t * d * d, joint_attention_macs(n + t, d, n), 8 * n * d * d)
    assert count.always_macs > 0


def test_wan_units_and_frames():
    """A tiny Wan 2.1-style model on 5 frames of 32^2: 2 latent frames of 2 x 2 tokens, 6 text tokens."""
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    count = count_macs(model, 32, text_tokens=6, frames=5)
    n, t, d = 8, 6, 16
    assert count.names == tuple(f"blocks.{i}.{kind}" for i in range(2) for kind in ("attn1", "attn2", "ffn"))
    cross = 2 * n * d * d + 2 * t * d * d + 2 * n * t * d  # q and out of the video, k and v of the text, QK^T, PV
    assert count.unit_macs == (joint_attention_macs(n, d, n), cross, 2 * n * d * 32) * 2
    with pytest.raises(ValueError, match="frames: expected 4 n \\+ 1 frames for WanTransformer3DModel, got 6"):
        count_macs(model, 32, frames=6)


def test_qwen_image_units():
    """A tiny Qwen-Image-style model at 64^2: 16 packed image tokens, 5 text tokens, width 16."""
    with torch.device("meta"):
        model = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    count = count_macs(model, 64, text_tokens=5)
    n, t, d = 16, 5, 16
    assert count.names == ("transformer_blocks.0.attn", "transformer_blocks.0.img_mlp", "transformer_blocks.0.txt_mlp")
    assert count.unit_macs == (joint_attention_macs(n + t, d, n + t), 8 * n * d * d, 8 * t * d * d)
    with pytest.raises(ValueError, match="height, width: expected multiples of 16 .*, got 72x72"):
        count_macs(model, 72)


def test_a_flow_model_instance_needs_a_size():
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8,
                                                 num_attention_heads=2, axes_dims_rope=(2, 2, 4))
    with pytest.raises(ValueError, match="height: expected pixels for a FluxTransformer2DModel"):
        count_macs(model)


def test_flow_table_and_section(monkeypatch):
    monkeypatch.setitem(FLOW_MODELS, "tiny-wan", FlowModel("WanTransformer3DModel", {
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
        "text_dim": 16, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2, "rope_max_seq_len": 32}, 32, 48, 6, "test",
        frames=5))
    rows = flow_mac_table(["tiny-wan"])
    count = count_macs("tiny-wan")
    assert rows[0]["image_tokens"] == 2 * 2 * 3 and rows[0]["units"] == 6
    assert sum(rows[0]["kind_shares"].values()) * count.total / 1e9 + rows[0]["always_gmacs"] == pytest.approx(
        count.total / 1e9)
    text = format_flow_mac_table(rows)
    assert f"| tiny-wan | 32x48x5 | 12 | 6 | 6 | {count.total / 1e12:.2f} | attn1 " in text
    machine = {"date": "2026-11-30T12:00:00", "commit": "abc1234", "torch": "2.13", "diffusers": "0.42.1"}
    section = macs_section(mac_table(["tiny-dit"]), rows, machine)
    markdown = "# Benchmarks\n\nintro\n\n" + MACS_BEGIN + "\nold\n" + MACS_END + "\n\nafter\n"
    updated = update_benchmarks(markdown, section)
    assert updated == "# Benchmarks\n\nintro\n\n" + section + "\n\nafter\n"
    assert "| tiny-dit | 64 | 16 | 4 |" in section and "| tiny-wan | 32x48x5 |" in section


def test_image_tokens_of_every_real_flow_model():
    """The token column of the flow MAC table at each hub model's native size: its latent frames x its latent grid over
    the family's token side (8x VAE and 2 x 2 packing or patch 2; HunyuanVideo 1.5's 16x VAE, patch 1; LTX-2's 32x)."""
    from harmonica.bench.macs import image_tokens

    expected = {"flux.1-dev-1024": 4096, "sd3.5-large-1024": 4096, "wan2.1-t2v-1.3b-480p": 21 * 30 * 52,
                "wan2.2-t2v-a14b-720p": 21 * 45 * 80,
                "qwen-image-1328": 83 * 83, "flux.2-dev-1024": 4096, "z-image-turbo-1024": 4096,
                "hunyuan-video15-480p-t2v": 31 * 30 * 53, "ltx-2-512x768": 16 * 24 * 16}
    assert {name: image_tokens(spec) for name, spec in FLOW_MODELS.items()} == expected


def z_image_block_macs(tokens, d, hidden):
    """One Z-Image block over `tokens`: q, k, v, out projections, QK^T and PV; the SwiGLU MLP's three matmuls."""
    return 4 * tokens * d * d + 2 * tokens * tokens * d, 3 * tokens * d * hidden


def test_z_image_units_are_its_main_layers():
    """A tiny Z-Image-style model at 64^2: 16 image tokens and 5 caption tokens, each padded to 32 by the forward,
    one stream of 64 tokens, width 32; its refiners (one block over each modality's 32 tokens) always run."""
    with torch.device("meta"):
        model = diffusers.ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
                                                   n_kv_heads=2, cap_feat_dim=16, axes_dims=(4, 6, 6),
                                                   axes_lens=(256, 32, 32))
    count = count_macs(model, 64, text_tokens=5)
    d, hidden = 32, int(32 / 3 * 8)
    assert count.names == ("layers.0.attention", "layers.0.feed_forward", "layers.1.attention", "layers.1.feed_forward")
    assert count.unit_macs == z_image_block_macs(64, d, hidden) * 2
    assert count.always_macs > 2 * sum(z_image_block_macs(32, d, hidden))
    with pytest.raises(ValueError, match="height, width: expected multiples of 16 .*, got 72x72"):
        count_macs(model, 72)


def test_z_image_turbo_1024_counts_31_25_tmacs():
    """Z-Image-Turbo at 1024^2 with 512 caption tokens (the hub model's row of `python -m harmonica.bench.macs`):
    each of its 30 layers over the 4096 + 512 tokens; always run: the refiners (2 blocks over the image tokens, 2
    over the caption's), the adaLN linears (256 -> 4 x 3840) of the 32 modulated blocks, the embedders, the timestep
    MLP and the final layer, each checked against its matmul count."""
    count = count_macs("z-image-turbo")
    image, text, d, hidden = 4096, 512, 3840, 10240
    assert count.names == tuple(f"layers.{b}.{kind}" for b in range(30) for kind in ("attention", "feed_forward"))
    assert count.unit_macs == z_image_block_macs(image + text, d, hidden) * 30
    refiners = 2 * sum(z_image_block_macs(image, d, hidden)) + 2 * sum(z_image_block_macs(text, d, hidden))
    embedders = image * 64 * d + text * 2560 * d + (256 * 1024 + 1024 * 256)  # x, caption, timestep
    final = (image + text) * d * 64 + 256 * d  # its linear over every token of the stream, its adaLN
    assert count.always_macs == refiners + 32 * 256 * 4 * d + embedders + final
    assert count.total / 1e12 == pytest.approx(31.25, abs=0.005)


def test_hunyuan_video15_480p_counts_721_02_tmacs():
    """HunyuanVideo 1.5 480p text-to-video (the hub model's row of `python -m harmonica.bench.macs`): 121 frames are
    31 latent frames of 30 x 53 tokens (16x VAE, patch 1); the text stream joins the 1000 Qwen2.5-VL, 256 ByT5 and
    729 image tokens. Each of its 54 blocks: the joint attention (image projections `to_*`, text ones `add_*`), and
    the GELU MLPs of ratio 4 of each stream, checked against their matmul counts."""
    count = count_macs("hunyuan-video15-480p")
    image, text, d = 31 * 30 * 53, 1000 + 256 + 729, 2048
    tokens = image + text
    assert count.names == tuple(f"transformer_blocks.{b}.{kind}" for b in range(54)
                                for kind in ("attn", "ff", "ff_context"))
    mlp = 2 * d * 4 * d  # per token: d -> 4d -> d
    assert count.unit_macs == (4 * tokens * d * d + 2 * tokens * tokens * d, image * mlp, text * mlp) * 54
    assert count.total / 1e12 == pytest.approx(721.02, abs=0.005)


def ltx2_block_macs(n, a, text, d, d_audio):
    """One LTX-2 block's eight units over n video and a audio tokens and `text` tokens (video width d, audio width
    d_audio, text projected to each): projections, QK^T and PV of each attention (the a2v and v2a attentions at the
    audio width), the 4x MLPs."""
    def cross(queries, keys, query_dim, key_dim, inner):
        return queries * query_dim * inner * 2 + keys * key_dim * inner * 2 + 2 * queries * keys * inner

    return (cross(n, n, d, d, d), cross(a, a, d_audio, d_audio, d_audio), cross(n, text, d, d, d),
            cross(a, text, d_audio, d_audio, d_audio), cross(n, a, d, d_audio, d_audio),
            cross(a, n, d_audio, d, d_audio), 8 * n * d * d, 8 * a * d_audio * d_audio)


def test_ltx2_512x768x121_counts_its_eight_units_per_block():
    """LTX-2 at its pipeline's default 512x768, 121 frames, 1024 text tokens (its row of `python -m
    harmonica.bench.macs`): 16 x 16 x 24 video tokens (32x VAE, 8x in time), 126 audio tokens (121 frames at 24 fps,
    25 audio latents a second), each of the 48 blocks' units as its matmul count."""
    count = count_macs("ltx-2-512x768")
    kinds = ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn", "ff",
             "audio_ff")
    assert count.names == tuple(f"transformer_blocks.{b}.{kind}" for b in range(48) for kind in kinds)
    assert count.unit_macs == ltx2_block_macs(16 * 16 * 24, 126, 1024, 4096, 2048) * 48
    assert 0 < count.always_macs < 0.01 * count.total
    assert count.total / 1e12 == pytest.approx(99.39, abs=0.005)


def test_ltx2_counts_a_forward_at_its_latent_grid():
    """LTX-2's hidden_states are packed video tokens: the forward's num_frames, height, width tell its size."""
    with torch.device("meta"):
        model = build_transformer("tiny-ltx2")
    count, where = count_macs_for_input(model, (2, 8, 8), 8, sizes={"num_frames": 2, "height": 2, "width": 2})
    assert where == "64x64x9"
    assert count.unit_macs == count_macs("tiny-ltx2", 64, 64, text_tokens=8, frames=9).unit_macs
    assert count.total > count_macs("tiny-ltx2", 64, 64, text_tokens=8, frames=1).total
    with pytest.raises(ValueError, match=r"forward: expected the int arguments num_frames, height, width of "
                                         r"LTX2VideoTransformer3DModel, missing \['num_frames'\]"):
        count_macs_for_input(model, (2, 8, 8), 8, sizes={"height": 2, "width": 2})


def test_a_count_is_kept_for_the_process_per_config_and_size(monkeypatch):
    """The second ask of one count is the first's object, no forward again; another size, config or
    cross_attention is counted afresh, and a kept count equals one made without the store."""
    counted = []
    count = harmonica.macs._count
    monkeypatch.setattr(harmonica.macs, "_COUNTS", {})
    monkeypatch.setattr(harmonica.macs, "_count", lambda *args: counted.append(args[1:]) or count(*args))
    first = count_macs("tiny-flux", 64, 96)
    assert count_macs("tiny-flux", 64, 96) is first and len(counted) == 1
    wider = count_macs("tiny-flux", 64, 128)
    assert wider.total > first.total and len(counted) == 2
    with torch.device("meta"):
        deeper, shallower = (DiTTransformer2DModel(num_layers=layers, num_attention_heads=2, attention_head_dim=8,
                                                   sample_size=8) for layers in (3, 2))
    assert len(count_macs(deeper).names) == 6 and len(count_macs(shallower).names) == 4 and len(counted) == 4
    assert count_macs(deeper, cross_attention=False) == count_macs(deeper) and len(counted) == 5
    with torch.device("meta"):
        assert count(build_transformer("tiny-flux"), 1, 64, 128, 8, None, True) == wider
