"""Wall-clock time of one phase of a generation: CUDA events after a synchronise on a GPU,
`time.perf_counter` on the CPU; and the spread of repeated measurements."""

import statistics
import time

import torch


def timed(fn, *args, device: torch.device):
    """(fn(*args), milliseconds). On CUDA: synchronise, record events around fn on the current stream of
    `device` (whatever device is current), synchronise again."""
    if device.type != "cuda":
        start = time.perf_counter()
        result = fn(*args)
        return result, (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    result = fn(*args)
    end.record(stream)
    end.synchronize()
    return result, start.elapsed_time(end)


def spread(samples) -> dict:
    """Median, quartiles (p25, p75), min and max of repeated times; n."""
    samples = sorted(samples)
    if not samples:
        raise ValueError("samples: expected at least one time, got none")
    p25, _, p75 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples), "p25": p25, "p75": p75, "min": samples[0], "max": samples[-1],
            "n": len(samples)}
