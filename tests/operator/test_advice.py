"""What the operator suggests when forgetting exceeds the budget (pure)."""

from __future__ import annotations

import pytest

from forge_operator.advice import Advice, advise, suggest_domain_percent, suggest_learning_rate
from forge_operator.api import Suggestion


@pytest.mark.parametrize(
    ("forgetting", "budget", "rate", "expected"),
    [
        (6.1, 2, 2e-5, "6.5e-6"),  # x 0.328, rounded down
        (3.0, 2, 2e-5, "1e-5"),  # x 0.667 -> capped at 0.5: at least halve
        (100.0, 2, 2e-5, "2e-6"),  # x 0.02 -> floored at 0.1: at most divide by ten
        (1.0, 0, 2e-4, "2e-5"),  # a zero budget: divide by ten
        (4.0, 2, 3.6e-5, "1.8e-5"),
    ],
)
def test_learning_rate_scales_with_budget_over_forgetting(
    forgetting: float, budget: float, rate: float, expected: str
) -> None:
    assert suggest_learning_rate(forgetting, budget, rate) == expected
    assert float(expected) < rate


@pytest.mark.parametrize(
    ("domain_percent", "expected"),
    [(100, 75), (95, 70), (90, 65), (75, 50), (70, 50), (60, 50), (50, None), (30, None)],
)
def test_general_share_grows_to_at_most_half(domain_percent: int, expected: int | None) -> None:
    # general share: max(2 x, x + 25), capped at 50: 0 -> 25, 5 -> 30, 10 -> 35, 25 -> 50, 30 -> 50 (not 60)
    suggested = suggest_domain_percent(domain_percent)
    assert suggested == expected
    if suggested is not None:
        assert suggested < domain_percent and suggested % 5 == 0


def test_the_sentence_names_both_changes() -> None:
    assert (
        Advice("1e-5", 50).sentence()
        == "lower learningRate to 1e-5 or raise the general share to 50% (domainPercent 50)"
    )
    assert Advice("1e-5", None).sentence() == "lower learningRate to 1e-5"
    assert Advice(None, None).sentence() == ""


def test_the_trainers_suggestion_wins_part_by_part() -> None:
    both = advise(6.1, 2, "2e-5", 75, Suggestion(learning_rate="7e-6", domain_percent=60))
    assert both == Advice("7e-6", 60)
    rate_only = advise(6.1, 2, "2e-5", 75, Suggestion(learning_rate="7e-6"))
    assert rate_only == Advice("7e-6", 50)
    assert advise(6.1, 2, "2e-5", 75) == Advice("6.5e-6", 50)
    assert advise(6.1, 2, None, 75) == Advice(None, 50), "no resolved rate: only the mix"
