"""Forgetting on never-replayed general text (eval.unseenGeneral): the worse of it and the replayed general set's
forgetting is what everything judges, with the standard error of the set it came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forge_trainer import tiny
from forge_trainer.config import parse_config
from forge_trainer.errors import ConfigError
from forge_trainer.evaluate import EvalResult, worst_forgetting
from forge_trainer.report import checkpoint_entry, latest_status
from tests.trainer.conftest import Corpora
from tests.trainer.harness import assert_ok, merged, run_ranks, write_config

BASE = EvalResult(0, 2.0, 4.0, None, None, unseen_loss=5.0)


def test_worst_of_takes_the_larger_forgetting_with_its_own_stderr() -> None:
    assert worst_forgetting((1.0, 0.1), (2.5, 0.7)) == (2.5, 0.7)
    assert worst_forgetting((3.0, 0.2), (-9.6, 0.4)) == (3.0, 0.2)
    assert worst_forgetting((-9.6, 0.3), (2.5, None)) == (2.5, None)


def test_worst_of_uses_whichever_set_was_measured() -> None:
    assert worst_forgetting((None, None), (1.5, 0.2)) == (1.5, 0.2)
    assert worst_forgetting((-0.5, 0.1), (None, None)) == (-0.5, 0.1)
    assert worst_forgetting((None, 0.1), (None, None)) == (None, None)


def test_eval_result_judges_the_unseen_set_when_replay_hides_its_forgetting() -> None:
    # replayed general loss fell 10%, unseen rose 2%: the run forgot, and the figure everything judges says so
    ev = EvalResult.against(10, 1.5, 3.6, BASE, general_paired_stderr=0.04, unseen=5.1, unseen_paired_stderr=0.05)
    assert ev.general_forgetting_percent == pytest.approx(-10.0)
    assert ev.general_stderr_percent == pytest.approx(1.0)
    assert ev.unseen_forgetting_percent == pytest.approx(2.0)
    assert ev.unseen_stderr_percent == pytest.approx(1.0)
    assert ev.forgetting_percent == pytest.approx(2.0)
    assert ev.forgetting_stderr_percent == pytest.approx(1.0)
    # the other way round, the replayed set's figure and stderr are chosen
    ev = EvalResult.against(10, 1.5, 4.4, BASE, general_paired_stderr=0.08, unseen=4.5, unseen_paired_stderr=0.05)
    assert ev.forgetting_percent == pytest.approx(10.0)
    assert ev.forgetting_stderr_percent == pytest.approx(2.0)


def test_without_unseen_sets_forgetting_is_the_general_sets() -> None:
    base = EvalResult(0, 2.0, 4.0, None, None)
    ev = EvalResult.against(10, 1.5, 4.2, base, general_paired_stderr=0.04)
    assert ev.forgetting_percent == pytest.approx(5.0) == ev.general_forgetting_percent
    assert ev.forgetting_stderr_percent == pytest.approx(1.0)
    assert ev.unseen_loss is None and ev.unseen_forgetting_percent is None
    assert not {k for k in latest_status(ev, None, None, None, None) if k.startswith("unseen")}
    assert "unseenForgettingPercent" not in checkpoint_entry(10, "s3://b/x/", ev)
    # no baseline for the unseen set (a resumed run from before it existed): the loss is shown, not judged
    ev = EvalResult.against(10, 1.5, 4.2, base, unseen=9.0)
    assert ev.unseen_loss == 9.0 and ev.unseen_forgetting_percent is None and ev.forgetting_percent == pytest.approx(5)


def test_status_reports_the_unseen_figures_on_latest_and_checkpoints() -> None:
    ev = EvalResult.against(10, 1.5, 3.6, BASE, general_paired_stderr=0.04, unseen=5.1, unseen_paired_stderr=0.05)
    for shown in (latest_status(ev, None, None, None, None), checkpoint_entry(10, "s3://b/x/", ev)):
        assert shown["forgettingPercent"] == shown["unseenForgettingPercent"] == 2.0
        assert shown["generalForgettingPercent"] == -10.0
        assert shown["unseenLoss"] == 5.1 and shown["unseenStderrPercent"] == 1.0


def test_a_training_source_is_refused_as_unseen(base_config: dict[str, Any]) -> None:
    general = base_config["data"]["general"][0]["uri"]
    cfg = merged(base_config, eval={"unseenGeneral": [{"uri": "/elsewhere.jsonl"}, {"uri": general}]})
    with pytest.raises(ConfigError, match=r"eval\.unseenGeneral\[1\]\.uri"):
        parse_config(cfg)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_judges_the_worse_of_replayed_and_unseen_forgetting(
    base_config: dict[str, Any], pretrained: Path, corpora: Corpora, tmp_path: Path
) -> None:
    # The model was pretrained on general text, which it forgets; the chat text it never saw gets better. Measured
    # as "general" the chat set alone would report no forgetting; the pretraining text as an unseen set exposes it.
    chat = tiny.write_corpus(tmp_path / "eval" / "chat.jsonl", "chat", 100, 555)
    cfg = merged(
        base_config,
        eval={"everySteps": 2, "general": [{"uri": str(chat)}], "unseenGeneral": [{"uri": str(corpora.eval_general)}]},
        training={"maxSteps": 10, "learningRate": 1e-2},
    )
    cfg["model"]["base"] = str(pretrained)
    results = run_ranks(write_config(tmp_path / "config.json", cfg), 2, tmp_path / "run", timeout=240)
    assert_ok(results)
    evals = [e for e in results[0].events if e["event"] == "eval"]
    assert evals[0]["step"] == 0 and {2, 4, 6, 8, 10} <= {e["step"] for e in evals}, evals
    assert evals[0]["unseen_loss"] is not None and evals[0]["forgetting_percent"] is None
    for e in evals[1:]:
        general, unseen = e["general_forgetting_percent"], e["unseen_forgetting_percent"]
        assert general is not None and unseen is not None, e
        worst = max((general, e["general_stderr_percent"]), (unseen, e["unseen_stderr_percent"]), key=lambda p: p[0])
        assert (e["forgetting_percent"], e["forgetting_stderr_percent"]) == worst, e
        assert e["unseen_stderr_percent"] is not None and e["unseen_stderr_percent"] >= 0, e
    assert any(
        e["forgetting_percent"] == e["unseen_forgetting_percent"] > e["general_forgetting_percent"] for e in evals[1:]
    )
    state = json.loads((Path(cfg["checkpoints"]["localDir"]) / "step-00000010" / "forge" / "state.json").read_text())
    for entry in state["checkpoints"]:
        e = [x for x in evals if x["step"] == entry["step"]][-1]
        assert entry["unseenForgettingPercent"] == round(e["unseen_forgetting_percent"], 4), entry
        assert entry["forgettingPercent"] == round(e["forgetting_percent"], 4), entry
