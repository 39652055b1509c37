"""The guard's rules as pure functions: grace periods, reasons, actions, suggestions."""

from __future__ import annotations

import math
from typing import Any

from forge_trainer import guard as g
from forge_trainer.config import ForgettingSettings
from forge_trainer.evaluate import EvalResult


def make(max_steps: int = 100, lr: float = 1e-4, dp: int = 90, **kw: Any) -> g.Guard:
    return g.Guard(ForgettingSettings(**kw), max_steps, lr, dp)


def ev(step: int, forgetting: float | None, gain: float | None = 10.0) -> EvalResult:
    return EvalResult(step, 1.0, 1.0, forgetting, gain)


def feed_steps(gd: g.Guard, first: int, last: int, lr: float = 1e-4, loss: float = 2.0) -> None:
    for s in range(first, last + 1):
        assert gd.observe_step(s, loss, lr, 1.0) is None


def test_non_finite_loss_stops_at_once_whatever_the_action() -> None:
    gd = make(action="warn")
    v = gd.observe_step(1, math.nan, 1e-4)
    assert v is not None and v.reason == g.NON_FINITE and v.action == "stop" and v.step == 1
    assert v.learning_rate == "1e-05"
    inf = make().observe_step(2, 1.0, 1e-4, math.inf)
    assert inf is not None and inf.reason == g.NON_FINITE


def test_a_non_finite_held_out_loss_stops_at_once_even_in_the_grace_period() -> None:
    gd = make(action="warn", max_steps=1000)
    feed_steps(gd, 1, 5)
    v = gd.observe_eval(EvalResult(5, 1.2, math.nan, None, 12.0))
    assert v is not None and v.reason == g.NON_FINITE and v.action == "stop" and v.step == 5
    assert "general held-out loss nan" in v.message
    assert make().observe_eval(EvalResult(5, 1.2, 1.3, 0.5, 12.0)) is None


def test_divergence_waits_for_the_grace_period() -> None:
    gd = make(max_steps=100)  # grace 10 steps
    feed_steps(gd, 1, 5)
    assert gd.observe_step(6, 50.0, 1e-4) is None  # inside the grace period
    feed_steps(gd, 7, 11)
    v = gd.observe_step(12, 50.0, 1e-4)
    assert v is not None and v.reason == g.DIVERGED and v.rule == "loss-divergence" and v.action == "stop"
    assert "lower learningRate to 5e-05" in v.message
    assert v.status()["suggestion"] == {"learningRate": "5e-05"}


def test_grad_norm_spikes_need_consecutive_steps() -> None:
    gd = make(max_steps=20, grace_steps=0, grad_spike_steps=3, grad_spike_factor=10)
    for s in range(1, 6):
        assert gd.observe_step(s, 2.0, 1e-4, 1.0) is None
    assert gd.observe_step(6, 2.0, 1e-4, 50.0) is None
    assert gd.observe_step(7, 2.0, 1e-4, 1.0) is None  # run broken
    assert gd.observe_step(8, 2.0, 1e-4, 50.0) is None
    assert gd.observe_step(9, 2.0, 1e-4, 50.0) is None
    v = gd.observe_step(10, 2.0, 1e-4, 50.0)
    assert v is not None and v.reason == g.GRAD_SPIKES


def test_forgetting_over_budget_and_rising_after_the_stability_gap() -> None:
    gd = make(max_steps=100, budget_percent=2.0, grace_evals=2)
    feed_steps(gd, 1, 10)
    assert gd.observe_eval(ev(10, 8.0)) is None  # inside grace steps (step <= 10) and grace evals
    feed_steps(gd, 11, 20)
    assert gd.observe_eval(ev(20, 9.0)) is None  # second evaluation: still in the grace evals
    feed_steps(gd, 21, 30)
    v = gd.observe_eval(ev(30, 10.0))
    assert v is not None and v.rule == "forgetting-budget" and v.step == 30
    # slope 1 point per 1e-3 of LR sum; 70 steps x 1e-4 to go -> +7 points -> 17% > 3 x 2%: the LR is too high
    assert v.reason == g.LR_TOO_HIGH
    assert v.learning_rate == "2e-05" and v.domain_percent == 70
    assert "lower learningRate to 2e-05 or raise the general share to 30% (domainPercent 70)" in v.message


def test_forgetting_over_budget_by_less_than_its_noise_does_not_fire() -> None:
    def run(confidence: int, stderr: float) -> g.Verdict | None:
        gd = make(max_steps=100, budget_percent=2.0, grace_evals=2, confidence_percent=confidence)
        verdict = None
        for i, f in enumerate([1.0, 1.8, 2.6], start=1):  # rising, 0.6 points over the budget at the end
            feed_steps(gd, (i - 1) * 10 + 1, i * 10)
            noisy = EvalResult(i * 10, 1.0, 1.0, f, 10.0, forgetting_stderr_percent=stderr)
            verdict = gd.observe_eval(noisy)
        return verdict

    assert run(80, 0.5) is not None  # 2.6 - 0.84 x 0.5 = 2.18 > 2: over by more than the noise...
    assert run(95, 0.5) is None  # ...but not at 95%: 2.6 - 1.64 x 0.5 = 1.78 <= 2
    assert run(80, 0.8) is None  # 2.6 - 0.84 x 0.8 = 1.93 <= 2
    fired = run(50, 0.8)  # 50%: the measured value decides
    assert fired is not None and fired.rule == "forgetting-budget" and "2.60% +- 0.80" in fired.message


def test_forgetting_that_recovers_does_not_fire() -> None:
    gd = make(max_steps=100, budget_percent=2.0)
    feed_steps(gd, 1, 10)
    gd.observe_eval(ev(10, 6.0))
    feed_steps(gd, 11, 20)
    gd.observe_eval(ev(20, 5.0))
    feed_steps(gd, 21, 30)
    assert gd.observe_eval(ev(30, 4.0)) is None  # over budget but falling: the stability gap closing


def test_forgetting_falling_too_slowly_fires() -> None:
    gd = make(max_steps=100, budget_percent=2.0)
    for i, f in enumerate([30.0, 29.0, 28.0], start=1):
        feed_steps(gd, (i - 1) * 10 + 1, i * 10)
        v = gd.observe_eval(ev(i * 10, f))
    assert v is not None and v.reason == g.LR_TOO_HIGH and "not falling fast enough" in v.message


def test_mild_rise_is_budget_exceeded_not_lr() -> None:
    gd = make(max_steps=40, budget_percent=2.0, grace_steps=0, grace_evals=0)
    gd.lr_sum = 0.0
    feed_steps(gd, 1, 10)
    gd.observe_eval(ev(10, 2.5))
    feed_steps(gd, 11, 20)
    v = gd.observe_eval(ev(20, 2.6))
    assert v is not None and v.reason == g.OVER_BUDGET


def test_warn_fires_once_per_reason_and_stop_always() -> None:
    gd = make(max_steps=100, budget_percent=1.0, action="warn", grace_steps=0, grace_evals=0)
    feed_steps(gd, 1, 5)
    gd.observe_eval(ev(5, 2.0))
    feed_steps(gd, 6, 10)
    v = gd.observe_eval(ev(10, 3.0))
    assert v is not None and v.action == "warn"
    feed_steps(gd, 11, 15)
    assert gd.observe_eval(ev(15, 4.0)) is None


def test_rebalance_action_and_its_bounds() -> None:
    gd = make(max_steps=100, dp=100, budget_percent=1.0, action="rebalance", grace_steps=0, grace_evals=0)
    feed_steps(gd, 1, 5)
    gd.observe_eval(ev(5, 2.0))
    feed_steps(gd, 6, 10)
    v = gd.observe_eval(ev(10, 3.0))
    assert v is not None and v.action == "rebalance" and v.domain_percent == 75
    gd.rebalanced(75)
    assert g.rebalanced_percent(75) == 62
    assert g.rebalanced_percent(52) == 50
    assert g.rebalanced_percent(50) is None
    # at the floor, rebalance degrades to a warning
    low = make(max_steps=100, dp=50, budget_percent=1.0, action="rebalance", grace_steps=0, grace_evals=0)
    low.observe_eval(ev(5, 2.0))
    feed_steps(low, 6, 10)
    w = low.observe_eval(ev(10, 3.0))
    assert w is not None and w.action == "warn" and w.domain_percent is None


def test_no_domain_progress() -> None:
    gd = make(max_steps=100, grace_steps=0, grace_evals=0, no_progress_evals=3, budget_percent=50)
    gains = [5.0, 8.0, 9.0, 9.0, 9.02, 8.9]
    verdicts = []
    for i, gain in enumerate(gains, start=1):
        feed_steps(gd, (i - 1) * 5 + 1, i * 5)
        verdicts.append(gd.observe_eval(ev(i * 5, 0.0, gain)))
    assert verdicts[:5] == [None] * 5
    last = verdicts[5]
    assert last is not None and last.reason == g.NO_PROGRESS and last.action == "stop"


def test_state_round_trip() -> None:
    gd = make(max_steps=100, grace_steps=0, grace_evals=0)
    feed_steps(gd, 1, 4)
    gd.observe_eval(ev(4, 1.0))
    again = make(max_steps=100, grace_steps=0, grace_evals=0)
    again.load_json(gd.to_json())
    assert again.to_json() == gd.to_json()


def test_round_down() -> None:
    assert g.round_down(1.18e-5) == "1.1e-05"
    assert g.round_down(3e-4) == "0.0003"
    assert g.suggest_learning_rate(1e-4, 4.0, 2.0) == "5e-05"
    assert g.suggest_learning_rate(1e-4, 100.0, 2.0) == "1e-05"


def test_projection_follows_the_schedule() -> None:
    gd = make(max_steps=100, lr=1e-3)
    assert gd.remaining_lr_sum(40) == 60 * 1e-3
    gd.lr_of = lambda i: 1e-3 * (1 - i / 100)  # linear decay
    assert abs(gd.remaining_lr_sum(40) - sum(1e-3 * (1 - i / 100) for i in range(40, 100))) < 1e-12
    assert gd.remaining_lr_sum(100) == 0
