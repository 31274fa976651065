"""`make bench`: the MAC table of every preset and, with CUDA, the kernel micro-benchmark.

The kernel rows go to bench/results/<date>-<gpu>-<commit>-kernels.json with the machine's state
before and after. Until the sampling bench lands, this is the whole main job.
"""

import json
import sys

import torch

from harmonica.bench.kernel_bench import default_cases, format_rows, measure, target_verdict
from harmonica.bench.machine import REPO, machine_info
from harmonica.bench.macs import format_mac_table, mac_table


def main() -> int:
    print("MACs per image per transformer forward (FlopCounterMode on the meta device)\n")
    print(format_mac_table(mac_table()))
    if not torch.cuda.is_available():
        print("\nNo CUDA device: the kernel micro-benchmark needs one and was not run.")
        return 0
    before = machine_info()
    rows = measure(default_cases())
    after = machine_info()
    print(f"\nKernel micro-benchmark on {before['gpu']} (triton.testing.do_bench medians)\n")
    print(format_rows(rows))
    print("\n" + target_verdict(rows))
    name = f"{before['date'][:10]}-{before['gpu'].replace(' ', '-')}-{before['commit']}-kernels.json"
    path = REPO / "bench" / "results" / name
    path.write_text(json.dumps({"machine_before": before, "machine_after": after, "rows": rows}, indent=1))
    print(f"\nraw results: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
