"""Stall detection: the pure verdict and status change (forge_operator.liveness)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from forge_operator import conditions as cond
from forge_operator.api import ForgeJobStatus, MonitoringSpec, PodRef
from forge_operator.liveness import Limits, judge, liveness_change, training_limit_seconds

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
LIMITS = Limits(stall_floor_seconds=600)
PODS = [PodRef(name="j-master-0", uid="u0"), PodRef(name="j-worker-0", uid="u1")]


def ts(moment: datetime) -> str:
    return cond.timestamp(moment)


def status(
    *,
    state: str = "Running",
    step: int | None = 40,
    phase: str | None = "train",
    reported: datetime | None = T0,
    interval: float | None = 30.0,
    **extra: Any,
) -> ForgeJobStatus:
    progress: dict[str, Any] = {}
    if step is not None:
        progress["step"] = step
    if phase is not None:
        progress["phase"] = phase
    if reported is not None:
        progress["time"] = ts(reported)
    if interval is not None:
        progress["reportIntervalSeconds"] = interval
    running = {"type": "Running", "status": "True", "reason": "R", "lastTransitionTime": ts(T0 - timedelta(hours=1))}
    doc = {"state": state, "pytorchJob": "j", "conditions": [running], "progress": progress or None, **extra}
    return ForgeJobStatus.model_validate(doc)


def change(st: ForgeJobStatus, monitoring: MonitoringSpec, now: datetime) -> Any:
    return liveness_change(st, monitoring, LIMITS, now, pods=PODS, logs_hint="kubectl logs ...", generation=1)


def test_the_derived_limit_is_three_report_gaps_never_below_the_floor() -> None:
    spec = MonitoringSpec()
    assert training_limit_seconds(status(interval=30), spec, LIMITS)[0] == 600  # 90 s < floor
    assert training_limit_seconds(status(interval=400), spec, LIMITS)[0] == 1200
    assert training_limit_seconds(status(interval=None), spec, LIMITS)[0] == 600
    assert training_limit_seconds(status(interval=400), MonitoringSpec(stallMinutes=2), LIMITS)[0] == 120


def test_a_training_run_without_a_new_step_past_its_limit_is_stalled() -> None:
    spec = MonitoringSpec()
    assert not judge(status(), spec, LIMITS, T0 + timedelta(seconds=599)).stalled
    verdict = judge(status(), spec, LIMITS, T0 + timedelta(seconds=601))
    assert verdict.stalled and verdict.phase == "train" and verdict.action == "restart"


def test_other_phases_have_the_startup_limit() -> None:
    spec = MonitoringSpec(startupMinutes=60)
    for phase in ("setup", "evaluate", "compile", "candidates", None):
        assert not judge(status(phase=phase), spec, LIMITS, T0 + timedelta(minutes=59)).stalled, phase
        assert judge(status(phase=phase), spec, LIMITS, T0 + timedelta(minutes=61)).stalled, phase


def test_a_run_that_is_not_running_is_never_judged() -> None:
    late = T0 + timedelta(days=1)
    for state in ("Queued", "Suspended", "Restarting", "Pending", "Succeeded", "Failed"):
        verdict = judge(status(state=state), MonitoringSpec(), LIMITS, late)
        assert not verdict.judged and not verdict.stalled, state


def test_the_clock_restarts_when_the_run_starts_running_again() -> None:
    st = status()
    resumed = T0 + timedelta(hours=2)  # e.g. Kueue re-admitted it: Running flipped again
    st.conditions[0] = st.conditions[0].model_copy(update={"last_transition_time": ts(resumed)})
    assert not judge(st, MonitoringSpec(), LIMITS, resumed + timedelta(seconds=300)).stalled
    assert judge(st, MonitoringSpec(), LIMITS, resumed + timedelta(seconds=700)).stalled


def test_restart_is_recorded_with_the_pods_and_counted_once() -> None:
    spec = MonitoringSpec(maxStallRestarts=2)
    now = T0 + timedelta(minutes=11)
    first = change(status(), spec, now)
    patch = first.change.patch["status"]
    assert patch["stallRestarts"] == 1
    assert patch["lastStallRestart"]["pods"] == [
        {"name": "j-master-0", "uid": "u0"},
        {"name": "j-worker-0", "uid": "u1"},
    ]
    assert first.delete_pods == PODS and not first.stop_child
    progressing = next(c for c in patch["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "False" and progressing["reason"] == "Stalled"
    assert "last step 40" in progressing["message"] and "kubectl logs" in progressing["message"]
    assert any(t.reason == "Stalled" and t.warning for t in first.change.transitions)

    # The operator restarts before deleting every pod: the next check finishes the restart without counting again.
    after = ForgeJobStatus.model_validate({**status().model_dump(by_alias=True, exclude_none=True), **patch})
    again = change(after, spec, now + timedelta(seconds=30))
    assert not again.verdict.stalled and again.verdict.action == "finish-restart"
    assert "stallRestarts" not in (again.change.patch.get("status") or {})
    assert again.delete_pods == PODS
    # ...only the pods of that restart: the re-created ones (new uids) stay.
    fresh = liveness_change(
        after,
        spec,
        LIMITS,
        now + timedelta(seconds=30),
        pods=[PodRef(name="j-master-0", uid="new")],
        logs_hint="",
        generation=1,
    )
    assert fresh.delete_pods == []
    # While the re-created pods start up the startup limit applies, not the training one.
    assert judge(after, spec, LIMITS, now + timedelta(minutes=30)).phase == "setup"
    assert not judge(after, spec, LIMITS, now + timedelta(minutes=30)).stalled


def test_after_the_last_restart_a_stall_fails_the_run() -> None:
    spec = MonitoringSpec(maxStallRestarts=1)
    st = status(stallRestarts=1)
    failed = change(st, spec, T0 + timedelta(minutes=11))
    assert failed.verdict.action == "fail" and failed.stop_child and failed.delete_pods == []
    patch = failed.change.patch["status"]
    assert patch["state"] == "Failed"
    fail = next(c for c in patch["conditions"] if c["type"] == "Failed")
    assert fail["status"] == "True" and fail["reason"] == "Stalled"
    assert "stall restart(s) allowed are used" in fail["message"]


def test_on_stall_fail_and_warn() -> None:
    now = T0 + timedelta(minutes=11)
    assert change(status(), MonitoringSpec(onStall="fail"), now).stop_child
    warned = change(status(), MonitoringSpec(onStall="warn"), now)
    assert warned.verdict.action == "warn" and not warned.stop_child and not warned.delete_pods
    assert "state" not in warned.change.patch["status"]
    # Said once: the next check writes nothing while the stall lasts.
    after = ForgeJobStatus.model_validate(
        {**status().model_dump(by_alias=True, exclude_none=True), **warned.change.patch["status"]}
    )
    assert change(after, MonitoringSpec(onStall="warn"), now + timedelta(minutes=5)).change.empty


def test_progressing_turns_true_again_at_the_first_step_after_the_stall() -> None:
    spec = MonitoringSpec(onStall="warn")
    stalled_at = T0 + timedelta(minutes=11)
    warned = change(status(), spec, stalled_at).change.patch["status"]
    base = status().model_dump(by_alias=True, exclude_none=True)
    later = ForgeJobStatus.model_validate(
        {**base, **warned, "progress": {"step": 41, "phase": "train", "time": ts(stalled_at + timedelta(seconds=5))}}
    )
    recovered = change(later, spec, stalled_at + timedelta(seconds=10))
    progressing = next(c for c in recovered.change.patch["status"]["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "True"
    assert any(t.reason == "Recovered" for t in recovered.change.transitions)


def test_a_healthy_run_writes_progressing_once() -> None:
    first = change(status(), MonitoringSpec(), T0 + timedelta(seconds=20))
    assert first.change.patch["status"]["conditions"][-1]["status"] == "True"
    after = ForgeJobStatus.model_validate(
        {**status().model_dump(by_alias=True, exclude_none=True), **first.change.patch["status"]}
    )
    assert change(after, MonitoringSpec(), T0 + timedelta(seconds=50)).change.empty
