"""Errors that end a run, each with its process exit code.

Exit codes (documented in docs/trainer.md) follow Kubeflow's ``restartPolicy: ExitCode`` rule: 1-127 are
permanent (a bad config, bad data, a bug: running again cannot help, so the job fails at once and the cause is
written to the ForgeJob's status), 128-255 are retryable (the pod is restarted and the run resumes from its latest
complete checkpoint). Forge's own retryable codes are 200 and up, apart from the 128+N of a process killed by
signal N.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_MODEL = 4
EXIT_STORAGE = 5
EXIT_DISTRIBUTED = 6
# The guard stopped the run early on purpose (e.g. forgetting over budget); a rerun exits 0 at once.
EXIT_EARLY_STOP = 10
# Retryable: checkpoint storage stayed unreachable after the retries (an outage, a network partition).
EXIT_STORAGE_UNAVAILABLE = 200
# Retryable: another rank went away (crashed, killed, its node lost); this rank is collateral, not the cause.
EXIT_PEER_LOST = 201
# Retryable: the hang watchdog found a step running far longer than the recent ones (stacks are in the log).
EXIT_HANG = 202

FIRST_RETRYABLE_EXIT = 128


def is_retryable_exit(code: int) -> bool:
    """True for exit codes a PyTorchJob with ``restartPolicy: ExitCode`` restarts (Kubeflow's rule)."""
    return code >= FIRST_RETRYABLE_EXIT or code < 0


class ForgeError(Exception):
    """A failure with a clear message for the user; ends the run with ``exit_code``."""

    exit_code = EXIT_UNEXPECTED


class ConfigError(ForgeError):
    """The trainer config or the environment is invalid."""

    exit_code = EXIT_CONFIG


class DataError(ForgeError):
    """A data source is empty, unreadable, malformed beyond the threshold, or too small for its share."""

    exit_code = EXIT_DATA


class ModelError(ForgeError):
    """The base model or its tokenizer cannot be loaded or does not fit the technique."""

    exit_code = EXIT_MODEL


class StorageError(ForgeError):
    """Storage refused a request for good (no such bucket, access denied, a corrupt checkpoint)."""

    exit_code = EXIT_STORAGE


class StorageUnavailableError(StorageError):
    """Storage could not be reached, or kept failing, for longer than the retries allow (retryable)."""

    exit_code = EXIT_STORAGE_UNAVAILABLE


class DistributedError(ForgeError):
    """The distributed environment (Kubeflow variables, rendezvous) is inconsistent."""

    exit_code = EXIT_DISTRIBUTED


class PeerLostError(ForgeError):
    """Another rank of the job went away; this rank stops too (retryable; the cause is in the other rank's log)."""

    exit_code = EXIT_PEER_LOST


class HangError(ForgeError):
    """A training step ran far longer than the recent ones: the hang watchdog ended the rank (retryable)."""

    exit_code = EXIT_HANG


class EarlyStopError(ForgeError):
    """The guard stopped the run on purpose (a checkpoint was saved and the reason reported)."""

    exit_code = EXIT_EARLY_STOP
