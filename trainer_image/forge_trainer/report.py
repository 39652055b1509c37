"""Status reports to the ForgeJob's /status subresource: pure patch builders, and a throttled sender.

The sender runs in a thread on rank 0. It sends at most one JSON merge patch per ``minIntervalSeconds`` (30 s by
default: progress in between lives in the Prometheus metrics); patches submitted in between are coalesced (merged,
later values win). A patch that carries news (a new evaluation, a checkpoint, the baseline, a guard verdict, the
probe's result, an error: ``is_significant``) is sent within ``URGENT_INTERVAL_SECONDS`` instead, together with
whatever is pending. The checkpoint list is always sent whole (a merge
patch replaces lists), so coalescing never loses a checkpoint. An unreachable API server only delays reports:
errors are logged and retried with backoff, and training never waits for the API. A patch the API server rejects
with a 4xx (other than 401, 408, 429) is logged and dropped: the CRD refused it and would refuse it again.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from forge_trainer.config import ForgeJobRef, TrainerConfig
from forge_trainer.errors import is_retryable_exit
from forge_trainer.evaluate import EvalResult

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
Patch = dict[str, Any]


def r4(x: float | None) -> float | None:
    """Round to 4 decimals; NaN and infinities become None (JSON has no such numbers)."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), 4)


def rfc3339(moment: float | None = None) -> str:
    """A wall-clock time as the API server writes it (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if moment is None else moment))


def progress_status(
    step: int,
    total_steps: int,
    tokens: int,
    eta_seconds: float | None,
    *,
    at: str | None = None,
    step_seconds: float | None = None,
    report_interval_seconds: float | None = None,
    data_wait_percent: float | None = None,
) -> dict[str, Any]:
    """status.progress while training: the step, when it was reached, and the pace the operator's stall limit is
    derived from (unknown figures are left out: null would delete them in a merge patch)."""
    out: dict[str, Any] = {
        "step": step,
        "totalSteps": total_steps,
        "tokens": tokens,
        "percent": round(100.0 * step / total_steps, 2) if total_steps else 0.0,
        "etaSeconds": None if eta_seconds is None else max(0, round(eta_seconds)),
        "phase": "train",
        "time": at or rfc3339(),
        "stepSeconds": r4(step_seconds),
        "reportIntervalSeconds": r4(report_interval_seconds),
        "dataWaitPercent": None if data_wait_percent is None else round(data_wait_percent, 2),
    }
    return {k: v for k, v in out.items() if v is not None or k == "etaSeconds"}


# Phases other than train: each is reported when it begins (within a second), so that the operator judges a stall
# against the phase's own limit (spec.monitoring.startupMinutes) rather than the training one.
PHASES = ("setup", "compile", "train", "evaluate", "candidates")


def phase_status(phase: str, at: str | None = None) -> dict[str, Any]:
    """status.progress fields of a phase that begins now (merged into the last progress reported)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
    return {"phase": phase, "time": at or rfc3339()}


def unseen_fields(ev: EvalResult | None) -> dict[str, Any]:
    """The figures of the never-replayed general sets (eval.unseenGeneral), and the replayed general set's own
    forgetting (forgettingPercent may be the unseen one), rounded, camelCase; empty when no unseen set was measured."""
    if ev is None or ev.unseen_loss is None:
        return {}
    fields = {
        "generalForgettingPercent": r4(ev.general_forgetting_percent),
        "unseenLoss": r4(ev.unseen_loss),
        "unseenForgettingPercent": r4(ev.unseen_forgetting_percent),
        "unseenStderrPercent": r4(ev.unseen_stderr_percent),
    }
    return {k: v for k, v in fields.items() if v is not None}


def eval_fields(ev: EvalResult | None) -> dict[str, Any]:
    """The held-out figures, rounded, camelCase (forgettingPercent: the worse of the general and unseen sets')."""
    if ev is None:
        return {
            "domainLoss": None,
            "generalLoss": None,
            "forgettingPercent": None,
            "domainGainPercent": None,
            "klBaseNats": None,
            "forgettingStderrPercent": None,
        }
    return {
        "domainLoss": r4(ev.domain_loss),
        "generalLoss": r4(ev.general_loss),
        "forgettingPercent": r4(ev.forgetting_percent),
        "domainGainPercent": r4(ev.domain_gain_percent),
        "klBaseNats": r4(ev.kl_base),
        "forgettingStderrPercent": r4(ev.forgetting_stderr_percent),
    }


def general_sources(ev: EvalResult | None, uris: list[str]) -> list[dict[str, Any]] | None:
    """status.latest.generalSources: loss and forgetting per general held-out source (None when not measured)."""
    if ev is None or ev.general_source_losses is None or len(ev.general_source_losses) != len(uris):
        return None
    forgetting = ev.general_source_forgetting or [None] * len(uris)
    rows = []
    for uri, loss, percent in zip(uris, ev.general_source_losses, forgetting, strict=True):
        row = {"uri": uri, "loss": r4(loss), "forgettingPercent": r4(percent)}
        rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def latest_status(
    ev: EvalResult | None,
    tokens_per_second: float | None,
    mfu: float | None,
    learning_rate: float | None,
    realised_domain_percent: float | None,
    general_source_uris: list[str] | None = None,
    realised_domain_gradient_percent: float | None = None,
) -> dict[str, Any]:
    """status.latest: the last held-out figures, throughput, learning rate and the realised mix (by tokens and by
    the tokens that carry loss, i.e. the shares of the gradient).

    Unknown values are left out rather than sent as null: in a merge patch null deletes, and a figure not known
    yet (no evaluation since a restart, no MFU on CPU) must not erase the last one reported.
    """
    out = eval_fields(ev) | unseen_fields(ev)
    out["tokensPerSecond"] = r4(tokens_per_second)
    out["mfu"] = r4(mfu)
    out["learningRate"] = None if learning_rate is None else float(f"{learning_rate:.6g}")
    out["realisedDomainPercent"] = r4(realised_domain_percent)
    out["realisedDomainGradientPercent"] = r4(realised_domain_gradient_percent)
    out["generalSources"] = general_sources(ev, general_source_uris or [])
    return {k: v for k, v in out.items() if v is not None}


def checkpoint_entry(step: int, uri: str, ev: EvalResult | None) -> dict[str, Any]:
    """One item of status.checkpoints (only complete checkpoints are ever reported)."""
    fields = eval_fields(ev)
    for optional in ("klBaseNats", "forgettingStderrPercent"):
        if fields[optional] is None:
            del fields[optional]  # not measured: no key rather than a null the API server drops
    return {"step": step, "uri": uri, **fields, **unseen_fields(ev), "complete": True}


# status.checkpoints holds at most this many entries (the CRD's maxItems): the newest STATUS_NEWEST_CHECKPOINTS and the
# Pareto set, which holds whatever any selection policy can choose; the rest are summarised in checkpointsOmitted.
STATUS_CHECKPOINTS_LIMIT = 64
STATUS_NEWEST_CHECKPOINTS = 16


# One-sided z of the confidence levels people set in spec.checkpoints.budgetConfidencePercent: 50, 80 (the default),
# 95 and 99.
SELECTION_Z_LEVELS = (0.0, 0.8416, 1.6449, 2.3263)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a is at least as good as b in every coordinate (lower is better) and better in one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def _front(entries: list[dict[str, Any]], key: Callable[[dict[str, Any]], tuple[float, ...]]) -> list[int]:
    """Indices of the scored entries no other scored entry dominates under ``key``."""
    scored = [
        i
        for i, e in enumerate(entries)
        if e.get("domainGainPercent") is not None and e.get("forgettingPercent") is not None
    ]
    keys = {i: key(entries[i]) for i in scored}
    return [i for i in scored if not any(_dominates(keys[j], keys[i]) for j in scored)]


def _stderr(e: dict[str, Any]) -> float:
    return float(e.get("forgettingStderrPercent") or 0.0)


def _margin_key(z: float, e: dict[str, Any]) -> tuple[float, ...]:
    """(domain gain, forgetting + z x stderr), both lower-is-better: what selection compares at confidence z."""
    return (-float(e["domainGainPercent"]), float(e["forgettingPercent"]) + z * _stderr(e))


def _three_way_key(e: dict[str, Any]) -> tuple[float, ...]:
    return (-float(e["domainGainPercent"]), float(e["forgettingPercent"]), _stderr(e))


def pareto_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries no other entry dominates in (domain gain, forgetting, forgetting's standard error).

    Selection counts a checkpoint within budget when forgetting + z x stderr <= budget, for a z set by
    spec.checkpoints.budgetConfidencePercent (which may change at any time). An entry dominated in all three is
    beaten at every z, so this set holds the choice of every policy at every confidence level.
    """
    return [entries[i] for i in _front(entries, _three_way_key)]


def bounded_checkpoints(
    entries: list[dict[str, Any]],
    limit: int = STATUS_CHECKPOINTS_LIMIT,
    newest: int = STATUS_NEWEST_CHECKPOINTS,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """status.checkpoints (at most ``limit`` entries, in the given order) and status.checkpointsOmitted (or None).

    Kept, in this order of priority until ``limit``: the end-of-run candidates (at most 17: one average and 16
    interpolations) and the ``newest`` latest saved checkpoints; the non-dominated entries of (domain gain,
    forgetting + z x stderr) at each of SELECTION_Z_LEVELS (every policy's choice at those confidence levels); then
    the rest of the three-way Pareto set, least forgetting first. The summary counts the rest and names their
    first and last step.
    """
    if len(entries) <= limit:
        return list(entries), None
    plain = [i for i, e in enumerate(entries) if e.get("kind", "checkpoint") == "checkpoint"]
    keep = set(range(len(entries))) - set(plain)
    keep.update(plain[-newest:])
    tiers: list[int] = []
    for z in SELECTION_Z_LEVELS:
        tiers += _front(entries, functools.partial(_margin_key, z))
    three_way = {id(e) for e in pareto_entries(entries)}
    tiers += sorted(
        (i for i, e in enumerate(entries) if id(e) in three_way), key=lambda i: float(entries[i]["forgettingPercent"])
    )
    for i in tiers:
        if len(keep) >= limit:
            break
        keep.add(i)
    omitted = [int(e["step"]) for i, e in enumerate(entries) if i not in keep]
    summary = {"count": len(omitted), "firstStep": min(omitted), "lastStep": max(omitted)}
    return [e for i, e in enumerate(entries) if i in keep], summary


def checkpoint_status(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The status fields that report the checkpoints: checkpoints, and checkpointsOmitted once some are left out."""
    kept, omitted = bounded_checkpoints(entries)
    return {"checkpoints": kept} if omitted is None else {"checkpoints": kept, "checkpointsOmitted": omitted}


def baseline_status(ev: EvalResult) -> dict[str, Any]:
    """status.baseline: the base model's held-out losses."""
    out = {"domainLoss": r4(ev.domain_loss), "generalLoss": r4(ev.general_loss)}
    if ev.unseen_loss is not None:
        out["unseenLoss"] = r4(ev.unseen_loss)
    return out


ERROR_MESSAGE_LIMIT = 4096


def raised_at(err: BaseException) -> str | None:
    """'forge_trainer/data/records.py:160': where in the code ``err`` was raised (the innermost frame)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return None
    last = frames[-1]
    path = last.filename.replace("\\", "/")
    for package in ("forge_trainer/", "site-packages/"):
        if package in path:
            path = (package if package == "forge_trainer/" else "") + path.split(package, 1)[1]
            break
    return f"{path}:{last.lineno}"


def error_status(err: BaseException, exit_code: int, rank: int, at: str) -> dict[str, Any]:
    """status.trainerError: the error a rank exits with, whether the job retries it, and where it was raised."""
    message = str(err) or type(err).__name__
    if len(message) > ERROR_MESSAGE_LIMIT:
        message = message[: ERROR_MESSAGE_LIMIT - 3] + "..."
    out: dict[str, Any] = {
        "kind": type(err).__name__,
        "message": message,
        "exitCode": exit_code,
        "retryable": is_retryable_exit(exit_code),
        "rank": rank,
        "time": at,
        "raisedAt": raised_at(err),
    }
    return {k: v for k, v in out.items() if v is not None}


def send_now(patcher_factory: Callable[[], PatchFn], patch: Patch, timeout_s: float) -> bool:
    """Send one patch now, retrying transient failures until ``timeout_s``; True once it was accepted."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            patcher_factory()(patch)
            return True
        except Exception as err:
            code = http_status(err)
            permanent = code is not None and 400 <= code < 500 and code not in RETRY_4XX
            if permanent or time.monotonic() + delay > deadline:
                log.warning("could not report the error to the ForgeJob's status: %s", err)
                return False
            time.sleep(delay)
            delay = min(4.0, delay * 2)


def report_exit_error(cfg: TrainerConfig | None, err: BaseException, exit_code: int) -> None:
    """Write the error this rank exits with to the ForgeJob's status.trainerError (when the config names one), so
    that the cause of a failure reaches ``kubectl describe`` and the Failed condition, not only this log."""
    if cfg is None or cfg.report.forge_job is None:
        return
    ref = cfg.report.forge_job
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc = error_status(err, exit_code, int(os.environ.get("RANK", "0")), at)
    timeout = float(os.environ.get("FORGE_REPORT_FLUSH_S", "30"))
    send_now(lambda: kube_patcher(ref), status_patch(trainerError=doc), timeout)


def status_patch(**fields: Any) -> Patch:
    """{"status": {...}} with the given camelCase fields (None-valued fields are left out)."""
    return {"status": {k: v for k, v in fields.items() if v is not None}}


def merge(base: Patch, newer: Patch) -> Patch:
    """Coalesce two merge patches into one with the same effect (RFC 7386: objects merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in newer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


PatchFn = Callable[[Patch], None]

# 4xx answers worth retrying: expired credentials (the client is rebuilt), timeouts, throttling.
RETRY_4XX = (401, 408, 429)


def http_status(err: Exception) -> int | None:
    """The HTTP status of a failed API call (kubernetes ApiException.status), None for transport errors."""
    code = getattr(err, "status", None)
    return code if isinstance(code, int) else None


def kube_patcher(ref: ForgeJobRef) -> PatchFn:
    """A function that merge-patches the ForgeJob's status, with in-cluster credentials or KUBECONFIG."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    api = client.CustomObjectsApi()

    def patch(body: Patch) -> None:
        api.patch_namespaced_custom_object_status(
            ref.group,
            ref.version,
            ref.namespace,
            ref.plural,
            ref.name,
            body,
            _content_type=MERGE_PATCH,
            _request_timeout=(5, 15),
        )

    return patch


def kube_status_reader(ref: ForgeJobRef) -> Callable[[], dict[str, Any]]:
    """A function that reads the ForgeJob's status (the trainer's Role grants get on its own ForgeJob)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    api = client.CustomObjectsApi()

    def read() -> dict[str, Any]:
        obj = api.get_namespaced_custom_object(
            ref.group, ref.version, ref.namespace, ref.plural, ref.name, _request_timeout=(5, 15)
        )
        status: dict[str, Any] = obj.get("status") or {}
        return status

    return read


def chosen_uris(status: dict[str, Any]) -> list[str]:
    """The URIs the operator chose or may still choose: status.selected and status.paretoFront."""
    uris = [str(p["uri"]) for p in status.get("paretoFront") or [] if isinstance(p, dict) and p.get("uri")]
    selected = status.get("selected")
    if isinstance(selected, dict) and selected.get("uri"):
        uris.append(str(selected["uri"]))
    return uris


# A significant patch waits at most this long after the previous send (or minIntervalSeconds, when shorter).
URGENT_INTERVAL_SECONDS = 1.0
# status fields whose every report is news; status.latest is news when its held-out figures changed.
SIGNIFICANT_FIELDS = ("checkpoints", "baseline", "earlyStop", "rebalance", "lrProbe", "trainerError", "pace")
EVAL_FIELDS = ("domainLoss", "generalLoss", "forgettingPercent", "domainGainPercent")


def eval_fingerprint(patch: Patch) -> tuple[Any, ...] | None:
    """The held-out figures a patch's status.latest carries (None without any): a new one is a new evaluation."""
    latest = (patch.get("status") or {}).get("latest")
    if not isinstance(latest, dict) or not any(latest.get(key) is not None for key in EVAL_FIELDS):
        return None
    return tuple(latest.get(key) for key in EVAL_FIELDS)


def is_significant(patch: Patch, last_eval: tuple[Any, ...] | None) -> bool:
    """Whether a patch reports an evaluation (figures other than ``last_eval``), a checkpoint or another event."""
    status = patch.get("status") or {}
    if any(key in status for key in SIGNIFICANT_FIELDS):
        return True
    if (status.get("progress") or {}).get("phase") not in (None, "train"):
        return True  # a phase begins: the operator's stall limit changes with it
    fingerprint = eval_fingerprint(patch)
    return fingerprint is not None and fingerprint != last_eval


class StatusReporter:
    """Sends coalesced status patches from a background thread, at most one per ``min_interval`` seconds; a
    significant patch (``is_significant``) goes out within ``URGENT_INTERVAL_SECONDS`` of the previous send."""

    def __init__(
        self,
        make_patcher: Callable[[], PatchFn],
        min_interval: float = 30.0,
        max_backoff: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make_patcher = make_patcher
        self._patcher: PatchFn | None = None
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self._clock = clock
        self._pending: Patch | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._last_sent = -math.inf
        self._urgent = False
        self._last_eval: tuple[Any, ...] | None = None
        self._failures = 0
        self.sent = 0
        self.errors = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="forge-status", daemon=True)
        self._thread.start()

    def submit(self, patch: Patch) -> None:
        """Queue a patch; it is merged with any not yet sent. Never blocks on the API."""
        with self._cond:
            if is_significant(patch, self._last_eval):
                self._urgent = True
            self._last_eval = eval_fingerprint(patch) or self._last_eval
            self._pending = patch if self._pending is None else merge(self._pending, patch)
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> bool:
        """Try to send what is pending (ignoring the interval) for up to ``timeout`` s; True if nothing is left."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            return self._pending is None

    def _wait_for_work(self) -> Patch | None:
        with self._cond:
            while True:
                if self._pending is not None:
                    wait = self._next_send_at() - self._clock()
                    if wait <= 0 or (self._closing and self._failures == 0):
                        patch, self._pending = self._pending, None
                        self._urgent = False
                        return patch
                    if self._closing and wait > 0:
                        wait = min(wait, 1.0)
                elif self._closing:
                    return None
                else:
                    wait = None
                self._cond.wait(wait)

    def _next_send_at(self) -> float:
        backoff = min(self.max_backoff, 2.0 ** (self._failures - 1)) if self._failures else 0.0
        interval = min(self.min_interval, URGENT_INTERVAL_SECONDS) if self._urgent else self.min_interval
        return self._last_sent + max(interval, backoff)

    def _run(self) -> None:
        while True:
            patch = self._wait_for_work()
            if patch is None:
                return
            try:
                if self._patcher is None:
                    self._patcher = self._make_patcher()
                self._patcher(patch)
            except Exception as err:
                self._failed(patch, err)
            else:
                with self._cond:
                    self._failures = 0
                    self._last_sent = self._clock()
                    self.sent += 1

    def _failed(self, patch: Patch, err: Exception) -> None:
        code = http_status(err)
        if code is not None and 400 <= code < 500 and code not in RETRY_4XX:
            # The API server rejected this patch (e.g. 422: a field the CRD does not accept); sending it again
            # can only fail again, and would block every later report coalesced into it.
            with self._cond:
                self.errors += 1
                self.dropped += 1
                self._failures = 0
                self._last_sent = self._clock()
            log.error("status report rejected with HTTP %d, dropped: %s; patch: %s", code, err, patch)
            return
        with self._cond:
            self._failures += 1
            self.errors += 1
            self._last_sent = self._clock()
            self._pending = patch if self._pending is None else merge(patch, self._pending)
            if self._failures in (1, 2) or self._failures % 20 == 0:
                log.warning("status report failed (%d in a row), will retry: %s", self._failures, err)
            if self._patcher is not None and self._failures % 5 == 0:
                self._patcher = None  # rebuild the client: credentials or endpoint may have changed
