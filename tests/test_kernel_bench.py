"""The micro-benchmark harness on CPU: providers agree, and its arithmetic on an injected timer."""

import pytest
import torch

from harmonica.bench.kernel_bench import PROVIDERS, Case, build, eager_bytes, format_rows, measure, target_verdict

CASES = [Case(op, (2, 5, 8), torch.float32) for op in PROVIDERS]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_providers_produce_the_same_tensors(case):
    results = {p: [t.clone() for t in build(case, p, device="cpu")[0]()] for p in PROVIDERS[case.op]}
    first = results.pop("eager")
    for provider, tensors in results.items():
        for a, b in zip(first, tensors):
            torch.testing.assert_close(b, a, msg=f"{case.id}: {provider} differs from eager")


def fake_timer(case_ms):
    """Each call returns the next (median, p20, p80) of `case_ms`."""
    times = iter(case_ms)
    return lambda fn: next(times)


def test_rows_and_ratios():
    case = Case("compute", (2, 4096, 1152), torch.bfloat16)
    rows = measure([case], time_fn=fake_timer([(0.1, 0.09, 0.11), (0.03, 0.03, 0.04), (0.028, 0.027, 0.03)]),
                   device="cpu")
    by_provider = {r["provider"]: r for r in rows}
    assert set(by_provider) == {"eager", "fused", "copy"}
    fused = by_provider["fused"]
    assert fused["bytes"] == 4 * 2 * 4096 * 1152 * 2
    assert fused["speedup_vs_eager"] == pytest.approx(0.1 / 0.03)
    assert fused["copy_fraction"] == pytest.approx(0.028 / 0.03)
    assert fused["gbps"] == pytest.approx(fused["bytes"] / 0.03 / 1e6)
    size = 2 * 4096 * 1152 * 2
    ratio = (7 * size + 2 * 1152 * 2) / (4 * size)  # eager: 7 tensor passes and one read of the gate
    assert fused["byte_ratio"] == pytest.approx(ratio)
    assert "| compute | 2, 4096, 1152 | bf16 | 0.1000 | 0.0300 | 3.33x | 1.75 |" in format_rows(rows)
    assert target_verdict(rows) == (
        "target (fused compute, B2 N4096 D1152 bf16): 93% of copy bandwidth (want >= 90%), 3.33x vs eager "
        f"(want >= {0.9 * ratio:.2f}x = 0.9 x the byte ratio 1.75): met")


@pytest.mark.parametrize("eager_ms,fused_ms,copy_ms,met", [
    (0.1, 0.0634, 0.0571, True),    # 1.577x >= 0.9 x 1.75 (the byte ratio), 90.1% of the copy bandwidth
    (0.1, 0.0640, 0.0600, False),   # 1.56x: short of 0.9 x the byte ratio
    (0.1, 0.0500, 0.0440, False),   # 2x, but 88% of the copy bandwidth
])
def test_target_is_relative_to_the_byte_ratio_and_the_copy(eager_ms, fused_ms, copy_ms, met):
    case = Case("compute", (2, 4096, 1152), torch.bfloat16)
    rows = measure([case], time_fn=fake_timer([(eager_ms, 0, 0), (fused_ms, 0, 0), (copy_ms, 0, 0)]), device="cpu")
    assert target_verdict(rows).endswith(": met" if met else ": NOT met")


@pytest.mark.parametrize("op,passes", [("compute", 7), ("reuse", 5), ("blend", 18), ("cache_copy", 2 * 56)])
def test_eager_bytes_count_the_tensor_passes_of_the_reference(op, passes):
    # compute: copy_ (2), g * fresh (2), + h (3); reuse: g * cache (2), + h (3); blend: fresh - cache (3),
    # r * (2), cache + (3), where (3), cache.copy_ (2), g * (2), h + (3); cache_copy: 56 copy_ (2 each)
    # beyond the passes: the gate (32 bytes) and blend's 0-dim r and r > tau, under one tensor (2048 bytes)
    size = 2 * 64 * 8 * 2
    assert divmod(eager_bytes(Case(op, (2, 64, 8), torch.float16)), size) == (passes, {
        "compute": 32, "reuse": 32, "blend": 32 + 10, "cache_copy": 0}[op])


def test_forecast_moves_four_tensors_against_eagers_twelve():
    """Eager: a * newest, b * older, their sum, the gate product and the residual add (2 + 2 + 3 + 2 + 3 = 12
    tensor passes and one read of the gate) against the fused form's reads of h, newest, older and its write."""
    case = Case("forecast", (2, 64, 32), torch.float16)
    size = 2 * 64 * 32 * 2
    assert build(case, "fused", "meta")[1] == 4 * size
    assert eager_bytes(case) == 12 * size + 2 * 32 * 2
