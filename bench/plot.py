"""A PNG of theoretical vs measured speedup from the suite rows (matplotlib, the `bench` extra).

    python -m harmonica.bench.plot bench/results/<file>.json   # writes <file>.png beside it

Left: measured loop speedup against theoretical (MAC) speedup, one point per row, the line of
efficiency 1. Right: efficiency (measured / theoretical) across models and resolutions, one line per
configuration in its fastest mode, with the issue's targets (0.90, 0.95). The skeleton probe rows
are left out.
"""

import argparse
import json
from pathlib import Path

from harmonica.files import file_bytes, write_file

from .configs import SKELETON

MODE_MARKERS = {"eager": "o", "fused": "s", "graphs": "^", "graphs-step": "v", "compile": "D"}


def _fastest_per_config(rows) -> dict:
    """{config: {(resolution, model, steps): row}} keeping each config's fastest mode."""
    best = {}
    for r in rows:
        key = (r["resolution"], r["model"], r["steps"])
        slot = best.setdefault(r["config"], {})
        if key not in slot or r["loop_ms"] < slot[key]["loop_ms"]:
            slot[key] = r
    return best


def plot_speedups(rows, path) -> Path:
    """Write the figure of the ok rows with a theoretical speedup to `path`; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["status"] == "ok" and r["theoretical_speedup"]
            and r["config"] not in ("no-cache", SKELETON)]
    if not rows:
        raise ValueError("rows: expected measured rows with a theoretical speedup, got none")
    models = sorted({(r["resolution"], r["model"]) for r in rows})
    colors = {m: plt.cm.viridis(i / max(1, len(models) - 1)) for i, (_, m) in enumerate(models)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    for r in rows:
        left.scatter(r["theoretical_speedup"], r["loop_speedup"], color=colors[r["model"]],
                     marker=MODE_MARKERS.get(r["mode"], "x"), s=36)
    top = max(max(r["theoretical_speedup"], r["loop_speedup"]) for r in rows) * 1.05
    left.plot([1, top], [1, top], color="grey", lw=1, label="efficiency 1")
    for (_, m) in models:
        left.scatter([], [], color=colors[m], label=m)
    for mode, marker in MODE_MARKERS.items():
        left.scatter([], [], color="black", marker=marker, label=mode)
    left.set(xlabel="theoretical (MAC) speedup", ylabel="measured transformer-loop speedup",
             title="measured vs theoretical, one point per row")
    left.legend(fontsize=7)
    groups = sorted({(r["resolution"], r["model"], r["steps"]) for r in rows})
    for i, (config, by_group) in enumerate(sorted(_fastest_per_config(rows).items())):
        points = sorted((groups.index(key), r) for key, r in by_group.items())
        xs = [p for p, _ in points]
        color = plt.cm.tab20(i % 20)
        right.plot(xs, [r["efficiency"] for _, r in points], "-o", color=color, label=config)
    for target in (0.90, 0.95):
        right.axhline(target, color="grey", lw=0.8, ls="--")
    right.set_xticks(range(len(groups)), [f"{m}\n{res}px, T={s}" for res, m, s in groups], fontsize=7)
    right.set(ylabel="efficiency = measured / theoretical speedup", title="across resolutions (fastest mode)")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    write_file(path, file_bytes(lambda f: fig.savefig(f, format="png", dpi=110)))
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results JSON written by `harmonica bench`")
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())["suite"]
    print(plot_speedups(rows, Path(args.results).with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
