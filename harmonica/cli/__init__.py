"""The `harmonica` command: one module per subcommand (`sample`, `train`, `embed`; `bench` and `profile` live in
harmonica.bench and harmonica.profiling), each with its `add_parser(commands)` and the function of its name that
runs it."""

import argparse
import sys

from ..files import one_line
from ..options import check_options, given_options
from ..profiling import nvtx  # noqa: F401  (HARMONICA_NVTX=1 switches its ranges on as it is imported)
from . import embed, sample, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmonica", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (train, sample, embed):
        command.add_parser(commands)
    from ..bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(commands.add_parser("bench", help="the benchmark suite: theoretical vs measured speedup, "
                                            "quality, peers (what make bench runs)"))
    from ..profiling.session import add_parser as add_profile_parser

    add_profile_parser(commands)
    return parser


def bench(args) -> int:
    from ..bench.command import run

    return run(args, prog="harmonica bench")


def profile(args) -> int:
    from ..profiling.session import run

    return run(args)


def main(argv=None) -> int:
    """Exit status 0; 2 with one line on stderr for any error (a refused option or file, a failed write, a
    diverged computation); 128 + N when signal N stopped a training (see train)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        check_options(args.command, args, given_options(build_parser(), argv))
        return {"sample": sample.sample, "train": train.train, "embed": embed.embed, "bench": bench,
                "profile": profile}[args.command](args)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"harmonica: error: {one_line(error)}", file=sys.stderr)
        return 2
