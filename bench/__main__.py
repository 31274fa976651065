"""`make bench`: the MAC table of every preset and, with CUDA, the kernel micro-benchmark.

Every run writes bench/results/<date>-<device>-<commit>.json: the machine's state (before and
after, with CUDA), the MAC rows and the kernel rows. Until the sampling bench lands, this is the
whole main job.
"""

import json
import sys

import torch

from harmonica.bench.kernel_bench import default_cases, format_rows, measure, target_verdict
from harmonica.bench.machine import REPO, machine_info
from harmonica.bench.macs import format_mac_table, mac_table


def main() -> int:
    before = machine_info()
    results = {"machine_before": before, "macs": mac_table(), "kernels": []}
    print("MACs per image per transformer forward (FlopCounterMode on the meta device)\n")
    print(format_mac_table(results["macs"]))
    if torch.cuda.is_available():
        results["kernels"] = measure(default_cases())
        results["machine_after"] = machine_info()
        print(f"\nKernel micro-benchmark on {before['gpu']} (triton.testing.do_bench medians)\n")
        print(format_rows(results["kernels"]))
        print("\n" + target_verdict(results["kernels"]))
    else:
        print("\nNo CUDA device: the kernel micro-benchmark needs one and was not run.")
    device = before.get("gpu", "cpu").replace(" ", "-")
    path = REPO / "bench" / "results" / f"{before['date'][:10]}-{device}-{before['commit']}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nraw results: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
