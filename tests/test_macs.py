"""MAC accounting on the meta device against the published figures and its own invariants."""

import pytest
import torch
from diffusers import DiTTransformer2DModel

from harmonica.bench.macs import count_macs, format_mac_table, mac_table


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
    longer = count_macs("pixart-alpha-256", caption_tokens=300).by_kind()
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
