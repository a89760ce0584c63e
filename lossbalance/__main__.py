"""Command line: ``python -m lossbalance demo [--steps N] [--strategies lra,relobralo] ...``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

COMMANDS = {
    "demo": "train 2-D Helmholtz with fixed and adaptive weights and compare them",
    "compare": "which weighting for my PDE? every strategy x seed of one problem, cached, in parallel",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m lossbalance",
        description="lossbalance: adaptive weighting of named loss terms for PyTorch.",
        epilog="commands: " + "; ".join(f"{name}: {text}" for name, text in COMMANDS.items())
        + ". Run `python -m lossbalance COMMAND --help` for its options.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to run")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's options")
    args = parser.parse_args(argv[:1])
    if args.command == "demo":
        from .demo.cli import main as demo_main

        return demo_main(argv[1:], prog="python -m lossbalance demo")
    if args.command == "compare":
        from .demo.cli import compare_main

        return compare_main(argv[1:], prog="python -m lossbalance compare")
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks the choices
    return 2


if __name__ == "__main__":
    sys.exit(main())
