"""Errors that end a run, each with its process exit code.

Exit codes (documented in docs/trainer.md). Codes 1-127 are "permanent" for a PyTorchJob with restartPolicy
ExitCode, so config and data errors are not retried; a crash by signal (128+N) is retried and resumes from the
latest complete checkpoint.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_MODEL = 4
EXIT_STORAGE = 5
EXIT_DISTRIBUTED = 6
# The guard (issue 5) stopped the run early on purpose (e.g. forgetting over budget); a rerun exits 0 at once.
EXIT_EARLY_STOP = 10


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
    """A checkpoint cannot be written, uploaded, listed or downloaded."""

    exit_code = EXIT_STORAGE


class DistributedError(ForgeError):
    """The distributed environment (Kubeflow variables, rendezvous) is inconsistent."""

    exit_code = EXIT_DISTRIBUTED


class EarlyStopError(ForgeError):
    """The guard stopped the run on purpose (a checkpoint was saved and the reason reported)."""

    exit_code = EXIT_EARLY_STOP
