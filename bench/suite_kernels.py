"""pytest-benchmark suite of the cache-path kernels (CUDA only): `pytest bench/suite_kernels.py`.

pytest-benchmark's own timer is host wall clock, so every round synchronises; the device-side
quantiles from `triton.testing.do_bench`, the bandwidth and the ratios go into `extra_info`.
"""

import pytest
import torch

from harmonica.bench.kernel_bench import PROVIDERS, build, copy_baseline, default_cases, do_bench_ms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel benchmark needs CUDA")

CASES = [(case, provider) for case in default_cases() for provider in PROVIDERS[case.op]]


@pytest.mark.parametrize("case,provider", CASES, ids=[f"{c.id}-{p}" for c, p in CASES])
def test_kernel(benchmark, case, provider):
    fn, moved = build(case, provider)

    def synchronised():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronised, rounds=50, warmup_rounds=5)
    median, p20, p80 = do_bench_ms(fn)
    copy_median = do_bench_ms(copy_baseline(moved))[0]
    benchmark.extra_info.update(median_ms=median, p20_ms=p20, p80_ms=p80, gbps=moved / median / 1e6,
                                copy_fraction=copy_median / median)
