"""`harmonica profile nsys|ncu`: the workload (one generation, after warm-up) run in a subprocess under
Nsight Systems or Nsight Compute with NVTX on; the reports, `command.txt` (every command line, as run)
and the parsed summary (`summary.md`, `summary.json`) in one results folder.
"""

import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

from harmonica.bench.machine import REPO, machine_info
from harmonica.files import write_file

from . import ncu, nsys
from .workload import add_arguments, check_workload_steps, workload_argv

RESULTS = REPO / "profiling" / "results"
INSTALL = {
    "nsys": "NVIDIA Nsight Systems (its command-line tool `nsys`; it comes with the CUDA toolkit, or as the "
            "nsight-systems-cli package of NVIDIA's CUDA apt/yum repositories)",
    "ncu": "NVIDIA Nsight Compute (its command-line tool `ncu`; it comes with the CUDA toolkit, or as the "
           "nsight-compute package of NVIDIA's CUDA apt/yum repositories)",
}
NVTX_ENV = {"HARMONICA_NVTX": "1"}


def add_parser(commands) -> None:
    """The `profile` subcommand on `harmonica`'s subparsers."""
    profile = commands.add_parser("profile", help="one generation under nsys or ncu; reports and summary in a "
                                                  "results folder")
    tools = profile.add_subparsers(dest="tool", required=True)
    parsers = {
        "nsys": tools.add_parser("nsys", help="per-step and per-unit GPU time, kernel count, idle gaps"),
        "ncu": tools.add_parser("ncu", help="our fused kernels: DRAM bandwidth against peak, occupancy, top stall"),
    }
    for parser in parsers.values():
        add_arguments(parser)
        parser.add_argument("--out", help="results folder (default: "
                                          "profiling/results/<date>-<tool>-<model>-<config>-<mode>)")
    parsers["ncu"].add_argument("--kernel", default=ncu.KERNELS, help="regex of the kernel names to profile")
    parsers["ncu"].add_argument("--nvtx-include", help="only kernels inside these NVTX ranges, in ncu's syntax, "
                                                       "e.g. 'regex:.* reuse/'")
    parsers["ncu"].add_argument("--launch-count", type=int, default=ncu.LAUNCH_COUNT, help="launches profiled")


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool}: not found on PATH; install {INSTALL[tool]} and put `{tool}` on PATH")


def results_dir(args) -> Path:
    if args.out:
        return Path(args.out)
    config = "router" if args.router else re.sub(r"[^\w.=-]+", "-", args.config)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    return RESULTS / f"{stamp}-{args.tool}-{args.model}-{config}-{args.mode}"


def commands(args, report: Path) -> list:
    """[(argv, file for its stdout or None)] of the session."""
    workload = workload_argv(args)
    if args.tool == "nsys":
        return [(nsys.profile_command(report, workload), None), (nsys.stats_command(report), None)]
    profile = ncu.profile_command(report, workload, kernels=args.kernel, nvtx_include=args.nvtx_include,
                                  launch_count=args.launch_count)
    return [(profile, None), (ncu.import_command(report), report.parent / "ncu_raw.csv")]


def command_lines(steps: list) -> str:
    """command.txt: each command as a shell line, with the environment it ran with."""
    env = " ".join(f"{k}={v}" for k, v in NVTX_ENV.items())
    return "".join(f"{env} {shlex.join(argv)}" + (f" > {shlex.quote(str(stdout))}" if stdout else "") + "\n"
                   for argv, stdout in steps)


def _execute(argv: list, stdout: Path | None, out: Path) -> None:
    """Run `argv`; its standard output written whole to `stdout` (None: the terminal's)."""
    result = subprocess.run(argv, env={**os.environ, **NVTX_ENV}, stdout=subprocess.PIPE if stdout else None)
    if result.returncode != 0:
        raise RuntimeError(f"`{argv[0]} {argv[1]}` exited with status {result.returncode} (command lines in "
                           f"{out / 'command.txt'})")
    if stdout:
        write_file(stdout, result.stdout)


def summarize(args, report: Path) -> tuple:
    """(markdown, JSON-ready dict) of the session's reports."""
    if args.tool == "nsys":
        text = {name: nsys.report_path(report, name).read_text() for name in nsys.REPORTS}
        ranges = nsys.summarize(text["nvtx_kern_sum"], text["nvtx_gpu_proj_trace"], text["cuda_gpu_trace"])
        kernels = nsys.top_kernels(text["cuda_gpu_kern_sum"])
        return nsys.format_summary(ranges, kernels), {"ranges": [asdict(r) for r in ranges], "top_kernels": kernels}
    kernels = ncu.parse_raw((report.parent / "ncu_raw.csv").read_text())
    return ncu.format_summary(kernels), {"kernels": [{**asdict(k), "dram_pct_of_peak": k.dram_pct_of_peak}
                                                     for k in kernels]}


def run(args) -> int:
    check_workload_steps(args.model, args.steps)
    require(args.tool)
    out = results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    report = out / args.tool
    steps = commands(args, report)
    write_file(out / "command.txt", command_lines(steps))
    for argv, stdout in steps:
        _execute(argv, stdout, out)
    machine = machine_info()
    table, data = summarize(args, report)
    title = (f"# {args.tool}: {args.model}, {'router ' + args.router if args.router else args.config}, "
             f"mode {args.mode}\n\n{machine.get('gpu', 'no GPU')}, commit {machine['commit']}, {machine['date']}; "
             f"commands in command.txt\n\n")
    write_file(out / "summary.md", title + table)
    write_file(out / "summary.json", json.dumps({"machine": machine, "args": vars(args), **data}, indent=1) + "\n")
    print(title + table)
    print(f"reports and summary: {out}")
    return 0
