"""Where a measured speedup falls short of the theoretical (MAC) one, from the MAC model and the
per-part timings of the same run.

With `S` the theoretical speedup, the ideal pipeline time is the baseline's divided by `S`. The gap
(this row's pipeline time minus the ideal) splits into parts that add up to it:

- **VAE and text**: decode and text encoding do not shrink with caching:
  `(text + decode) - (baseline text + decode) / S`.
- **launch gaps**: what CUDA graphs remove from this configuration: this row's loop minus the loop
  of the same configuration with graphs (none when that row was not measured).
- **always-run parts**: every step pays the *skeleton* (embeddings, adaLN, final layer, the sampler
  step, the reuse adds), measured as the per-step time `s` of a step whose units are all reused:
  `s = (skeleton loop - t_full) / (T - 1)`, the skeleton schedule computing step 0 only and
  `t_full` = baseline loop / T. The MAC model charges it only its MAC share `a` of a full step.
  With `f = (1/S - a) / (1 - a)` the computed share of unit MACs, the excess over the ideal is
  `T (1 - f) (s - a t_full)`. Schedules that reuse nothing (fewer steps) have none.
- **cache and router overhead**: the rest of the loop gap: slot writes, per-unit decisions on the
  host, units whose time share differs from their MAC share.
"""


def attribute_gap(*, steps: int, theoretical: float, always_share: float, baseline_loop_ms: float,
                  baseline_other_ms: float, loop_ms: float, other_ms: float, skeleton_loop_ms: float | None = None,
                  graphs_loop_ms: float | None = None) -> dict:
    """The gap in ms and its parts (see the module docstring); `*_other_ms` = text + decode.

    skeleton_loop_ms: loop time of the skeleton schedule in the mode the parts refer to (the graphs
    mode when `graphs_loop_ms` is given), None for schedules without reuse.
    """
    if theoretical <= 0 or steps < 2 or not 0 <= always_share < 1:
        raise ValueError(f"theoretical, steps, always_share: expected > 0, >= 2, in [0, 1); got {theoretical}, "
                         f"{steps}, {always_share}")
    ideal_loop = baseline_loop_ms / theoretical
    vae_text = other_ms - baseline_other_ms / theoretical
    launch = None if graphs_loop_ms is None else loop_ms - graphs_loop_ms
    always_run = None
    computed_share = (1 / theoretical - always_share) / (1 - always_share)
    if skeleton_loop_ms is not None:
        t_full = baseline_loop_ms / steps
        skeleton_step = (skeleton_loop_ms - t_full) / (steps - 1)
        always_run = steps * (1 - computed_share) * (skeleton_step - always_share * t_full)
    loop_gap = loop_ms - ideal_loop
    return {
        "gap_ms": loop_gap + vae_text,
        "gap_always_run_ms": always_run,
        "gap_overhead_ms": loop_gap - (always_run or 0.0) - (launch or 0.0),
        "gap_launch_ms": launch,
        "gap_vae_text_ms": vae_text,
        "ideal_ms": (baseline_loop_ms + baseline_other_ms) / theoretical,
        "ideal_loop_ms": ideal_loop,
        "computed_share": computed_share,
    }
