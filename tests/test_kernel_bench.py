"""The micro-benchmark harness on CPU: providers agree, and its arithmetic on an injected timer."""

import pytest
import torch

from harmonica.bench.kernel_bench import PROVIDERS, Case, build, format_rows, measure, target_verdict

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
    assert "| compute | 2, 4096, 1152 | bf16 | 0.1000 | 0.0300 | 3.33x |" in format_rows(rows)
    assert target_verdict(rows).endswith(": met")
    slow = measure([case], time_fn=fake_timer([(0.1, 0, 0), (0.05, 0, 0), (0.028, 0, 0)]), device="cpu")
    assert target_verdict(slow).endswith("NOT met")
