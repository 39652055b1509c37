"""Restart rules of a PyTorchJob replica (Kubeflow's restartPolicy + runPolicy.backoffLimit). Pure functions."""

from __future__ import annotations

ON_FAILURE = "OnFailure"
ALWAYS = "Always"
EXIT_CODE = "ExitCode"
NEVER = "Never"


def container_exit_code(returncode: int) -> int:
    """A Popen return code as a container exit code: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def is_retryable(restart_policy: str, exit_code: int) -> bool:
    """Whether a replica that exited with ``exit_code`` is restarted under ``restart_policy``.

    OnFailure and Always: any non-zero exit. ExitCode: Kubeflow's rule, exit codes >= 128 (killed by a
    signal, e.g. 137 after an OOM kill) are retryable, 1-127 are permanent errors. Never: no restart.
    """
    if exit_code == 0:
        return False
    if restart_policy in (ON_FAILURE, ALWAYS):
        return True
    if restart_policy == EXIT_CODE:
        return exit_code >= 128
    return False


def backoff_exhausted(restarts_so_far: int, backoff_limit: int | None) -> bool:
    """True when no restart is left: backoffLimit counts the restarts a job may have (unset: unlimited)."""
    return backoff_limit is not None and restarts_so_far >= backoff_limit


def restart_delay(restart_number: int, base_s: float, cap_s: float) -> float:
    """Seconds to wait before restart number ``restart_number`` (1, 2, ...): doubling from ``base_s``, capped."""
    if restart_number < 1:
        return 0.0
    return float(min(cap_s, base_s * 2 ** (restart_number - 1)))


def past_active_deadline(elapsed_s: float, active_deadline_s: int | None) -> bool:
    """runPolicy.activeDeadlineSeconds: the job may be active that long after its startTime."""
    return active_deadline_s is not None and elapsed_s >= active_deadline_s
