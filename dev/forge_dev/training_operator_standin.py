"""LOCAL STAND-IN for Kubeflow's training-operator + kubelet: development and tests only, never deployed.

Runs each replica of every PyTorchJob (and each node of every Kubeflow Trainer v2 TrainJob) in the local control
plane as a local process, with the environment, volumes and ServiceAccount credentials a pod would get, and writes
the job's status as Kubeflow does.
See docs/standin.md.

    python -m forge_dev.training_operator_standin run --kubeconfig K --workdir D [--namespace N]
    python -m forge_dev.training_operator_standin logs JOB [--replica master-0] [-f]

(also ``forge-dev standin ...`` and ``forge-dev logs ...``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path
from types import FrameType

from forge_dev.standin import StandInSettings, TrainingOperatorStandIn, standin_thread
from forge_dev.standin.logs import default_workdir, show_logs

__all__ = [
    "StandInSettings",
    "TrainingOperatorStandIn",
    "add_logs_arguments",
    "add_run_arguments",
    "logs_command",
    "main",
    "run_command",
    "standin_thread",
]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", type=Path, default=None, help="admin kubeconfig (default: $KUBECONFIG)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="logs, volumes, kubeconfigs (default: $FORGE_STANDIN_WORKDIR or ~/.cache/forge/standin)",
    )
    parser.add_argument("--namespace", default=None, help="watch only this namespace (default: all)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_logs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="PyTorchJob name")
    parser.add_argument("--replica", default=None, help="master-0 (default), worker-0, ...")
    parser.add_argument("-n", "--namespace", default=None, help="the job's namespace (default: the only match)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing until the replica ends")
    parser.add_argument("--workdir", type=Path, default=None, help="the stand-in's --workdir")


def run_command(args: argparse.Namespace) -> int:
    """Run the stand-in until SIGTERM/SIGINT/SIGHUP; every child process is stopped before returning."""
    from kubernetes import config

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s forge-standin %(levelname)s %(message)s",
    )
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")  # loopback control plane
    api_client = config.new_client_from_config(config_file=str(args.kubeconfig) if args.kubeconfig else None)
    settings = StandInSettings(workdir=(args.workdir or default_workdir()).resolve(), namespace=args.namespace)
    standins = [TrainingOperatorStandIn(api_client, settings, kind) for kind in ("PyTorchJob", "TrainJob")]

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("forge_dev.standin").info("received %s: stopping", signal.Signals(signum).name)
        for standin in standins:
            standin.stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, request_stop)
    # The loops run in threads so that signal handlers never interrupt them while they hold a lock.
    workers = [threading.Thread(target=standin.run, name="forge-standin") for standin in standins]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        for worker in workers:
            worker.join(0.5)
    api_client.close()
    return 0


def logs_command(args: argparse.Namespace) -> int:
    return show_logs((args.workdir or default_workdir()).resolve(), args.job, args.namespace, args.replica, args.follow)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forge_dev.training_operator_standin",
        description="Local stand-in for Kubeflow's training-operator + kubelet (development only).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(commands.add_parser("run", help="watch PyTorchJobs and TrainJobs and run their pods locally"))
    add_logs_arguments(commands.add_parser("logs", help="print a replica's log"))
    args = parser.parse_args(argv)
    return run_command(args) if args.command == "run" else logs_command(args)


if __name__ == "__main__":
    sys.exit(main())
