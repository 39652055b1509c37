"""The written contract between operator and trainer: configs rendered by the operator parse in the trainer.

This is the one place where both packages meet; production code of either never imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forge_operator.api import ForgeJobSpec
from forge_operator.defaults import resolve
from forge_operator.render import CONFIG_KEY, Owner, RenderOptions, build_config_map, build_pytorchjob
from forge_trainer.config import (
    CandidateSettings,
    EvalSettings,
    ForgettingSettings,
    ProbeSettings,
    TrainerConfig,
    load_config,
)
from forge_trainer.guard import Guard
from forge_trainer.probe import probe_training, scaled_training

OPTIONS = RenderOptions(
    trainer_image="registry/forge-trainer:1", trainer_metrics_port=9400, report_min_interval_seconds=5
)
BASE: dict[str, Any] = {
    "model": {"base": "s3://models/llama-3.2-1b/"},
    "data": {
        "domainPercent": 75,
        "domain": [{"uri": "s3://acme/tickets/", "weight": 2}, {"uri": "/data/manuals/"}],
        "general": [{"uri": "s3://curated/chat/"}, {"uri": "s3://curated/reasoning/", "weight": 3}],
        "seqLength": 2048,
    },
    "checkpoints": {"everySteps": 200, "output": "s3://acme/forge/out/"},
    "resources": {"nodes": 2, "gpusPerNode": 8},
}

FORGEJOBS: dict[str, dict[str, Any]] = {
    "cpt-defaults": {"technique": "cpt"},
    "sft-tuned": {
        "technique": "sft",
        "eval": {"everySteps": 50, "domain": [{"uri": "s3://held/d/"}], "general": [{"uri": "s3://held/g/"}]},
        "training": {
            "learningRate": "1.5e-5",
            "minLearningRatePercent": 10,
            "schedule": "wsd",
            "decayPercent": 25,
            "warmupPercent": 5,
            "globalBatchTokens": 1_048_576,
            "microBatchSize": 2,
            "maxSteps": 3000,
            "precision": "fp32",
            "zeroStage": 3,
            "seed": 7,
            "gradientClipping": "0.5",
            "weightDecay": "0.1",
            "activationCheckpointing": True,
        },
        "forgetting": {"budgetPercent": 5, "action": "rebalance"},
    },
    "lora-defaults": {"technique": "lora"},
    "lora-block": {
        "technique": "lora",
        "lora": {"rank": 64, "alpha": 128, "dropoutPercent": 0, "targetModules": ["q_proj"]},
    },
    "guard-and-candidates": {
        "technique": "sft",
        "eval": {"klTopK": 0},
        "training": {"maxSteps": 3000},
        "forgetting": {
            "budgetPercent": 3,
            "action": "warn",
            "gracePercent": 20,
            "graceEvals": 4,
            "noProgressEvals": 8,
            "divergenceFactor": 5,
            "gradSpikeFactor": 20,
            "gradSpikeSteps": 7,
            "slopeWindowEvals": 6,
            "lrTooHighFactor": 4,
        },
        "checkpoints": {
            "everySteps": 500,
            "output": "s3://acme/forge/out/",
            "candidates": {"averageLast": 5, "interpolationAlphaPercents": [10, 90]},
        },
    },
    "learning-rate-probe": {
        "technique": "sft",
        "eval": {"maxTokens": 16384},
        "training": {
            "learningRate": "2e-5",
            "minLearningRatePercent": 10,
            "maxSteps": 500,
            "learningRateProbe": {"multiplierPercents": [400, 50, 100], "steps": 25, "evaluations": 5},
        },
        "forgetting": {"budgetPercent": 3},
    },
    "domain-only-cpu": {
        "technique": "sft",
        "data": {"domainPercent": 100, "domain": [{"uri": "/data/d.jsonl"}], "seqLength": 512},
        "eval": {"general": [{"uri": "/data/general-eval.jsonl"}], "maxTokens": 4096, "everySteps": 10},
        "training": {"maxSteps": 20, "microBatchSize": 8, "globalBatchTokens": 16384},
        "resources": {"nodes": 2, "gpusPerNode": 0},
    },
}


def mismatches(rendered: Any, parsed: Any, path: str = "") -> list[str]:
    """Paths where the trainer's parsed config differs from the operator's document."""
    if isinstance(rendered, dict):
        if not isinstance(parsed, dict):
            return [path]
        return [m for key, value in rendered.items() for m in mismatches(value, parsed.get(key), f"{path}.{key}")]
    if isinstance(rendered, list):
        if not isinstance(parsed, list) or len(parsed) != len(rendered):
            return [path]
        return [
            m for i, (r, p) in enumerate(zip(rendered, parsed, strict=True)) for m in mismatches(r, p, f"{path}[{i}]")
        ]
    return [] if rendered == parsed and type(rendered) is type(parsed) else [f"{path}: {rendered!r} != {parsed!r}"]


def render(name: str, overrides: dict[str, Any]) -> tuple[ForgeJobSpec, dict[str, Any], int]:
    spec = ForgeJobSpec.model_validate({**BASE, **overrides})
    resolved = resolve(spec)
    config_map = build_config_map(Owner(name, "team", "uid-1"), spec, resolved, OPTIONS)
    return spec, config_map, resolved.world_size


@pytest.mark.parametrize("name", list(FORGEJOBS))
def test_rendered_config_parses_in_the_trainer(name: str, tmp_path: Path) -> None:
    spec, config_map, world_size = render(name, FORGEJOBS[name])
    path = tmp_path / CONFIG_KEY
    path.write_text(config_map["data"][CONFIG_KEY])
    config = load_config(path)  # raises ConfigError naming any field the trainer does not accept

    assert isinstance(config, TrainerConfig)
    config.check_world(world_size)  # globalBatchTokens == micro * accumulation * world * seqLength
    assert (config.job_name, config.namespace) == (name, "team")
    assert config.model.technique == spec.technique
    assert (config.model.lora is not None) == (spec.technique == "lora")
    assert config.data.domain_percent == spec.data.domain_percent
    assert [(s.uri, s.weight) for s in config.data.domain] == [(s.uri, s.weight) for s in spec.data.domain]
    assert config.data.seq_length == spec.data.seq_length
    general, per_mille = config.eval_group("general")
    assert general, "forgetting needs general eval data"
    assert config.eval.hold_out_per_mille == spec.eval.hold_out_per_mille
    assert per_mille == (0 if spec.eval.general else spec.eval.hold_out_per_mille)
    assert config.training.max_steps == spec.training.max_steps
    assert config.training.precision == spec.training.precision
    assert config.forgetting.budget_percent == spec.forgetting.budget_percent
    assert config.forgetting.action == spec.forgetting.action
    assert config.checkpoints.output == spec.checkpoints.output
    assert config.checkpoints.keep_resumable == spec.checkpoints.keep_resumable
    assert config.checkpoints.output_retention == spec.checkpoints.output_retention
    assert config.watchdog.floor_seconds == spec.monitoring.hang_floor_seconds
    assert config.watchdog.multiple == spec.monitoring.hang_multiple
    assert config.pace.straggler_percent == spec.monitoring.straggler_percent
    assert config.pace.drop_percent == spec.monitoring.throughput_drop_percent
    assert config.pace.read_backs == spec.monitoring.slow_read_backs
    assert config.report.forge_job is not None
    assert (config.report.forge_job.namespace, config.report.forge_job.name) == ("team", name)
    # Every value the operator rendered is read back unchanged (no coercion, nothing ignored).
    assert mismatches(json.loads(path.read_text()), config.to_json_dict()) == []


def test_resolved_training_values_reach_the_trainer() -> None:
    spec, config_map, _ = render("sft-tuned", FORGEJOBS["sft-tuned"])
    config = TrainerConfig.model_validate_json(config_map["data"][CONFIG_KEY])
    resolved = resolve(spec)
    assert config.training.learning_rate == pytest.approx(1.5e-5)
    assert config.training.min_learning_rate == pytest.approx(1.5e-6)
    assert config.training.warmup_steps == resolved.warmup_steps == 150
    assert config.training.gradient_accumulation_steps == resolved.gradient_accumulation_steps == 16
    assert (config.training.schedule, config.training.decay_percent) == ("wsd", 25)
    assert (config.training.gradient_clipping, config.training.weight_decay) == (0.5, 0.1)
    assert config.training.zero_stage == 3 and config.training.activation_checkpointing is True
    _, lora_map, _ = render("lora-block", FORGEJOBS["lora-block"])
    lora = TrainerConfig.model_validate_json(lora_map["data"][CONFIG_KEY]).model.lora
    assert lora is not None and (lora.rank, lora.alpha, lora.dropout, lora.target_modules) == (64, 128, 0.0, ["q_proj"])


def test_guard_kl_and_candidate_settings_reach_the_trainer() -> None:
    _, config_map, _ = render("guard-and-candidates", FORGEJOBS["guard-and-candidates"])
    config = TrainerConfig.model_validate_json(config_map["data"][CONFIG_KEY])
    forgetting = config.forgetting
    assert (forgetting.budget_percent, forgetting.action) == (3.0, "warn")
    assert forgetting.grace_steps == 600, "20% of maxSteps 3000"
    assert (forgetting.grace_evals, forgetting.no_progress_evals) == (4, 8)
    assert (forgetting.divergence_factor, forgetting.grad_spike_factor, forgetting.lr_too_high_factor) == (
        5.0,
        20.0,
        4.0,
    )
    assert (forgetting.grad_spike_steps, forgetting.slope_window_evals) == (7, 6)
    assert forgetting.min_domain_gain_percent == ForgettingSettings().min_domain_gain_percent, "not in the spec"
    assert config.eval.kl_top_k == 0
    assert config.checkpoints.candidates.average_last == 5
    assert config.checkpoints.candidates.interpolation_alphas == [0.1, 0.9]


@pytest.mark.parametrize("max_steps", [1, 7, 15, 25, 30, 999, 1000, 1001, 3000, 12345])
def test_a_spec_without_the_guard_settings_gets_the_trainers_defaults(max_steps: int) -> None:
    _, config_map, _ = render("cpt-defaults", {"technique": "cpt", "training": {"maxSteps": max_steps}})
    config = TrainerConfig.model_validate_json(config_map["data"][CONFIG_KEY])
    defaults = ForgettingSettings()
    assert config.forgetting.model_dump(exclude={"grace_steps"}) == defaults.model_dump(exclude={"grace_steps"})
    # The trainer's default grace period (graceSteps null) is 10% of maxSteps, rounded up: the operator renders it.
    own = Guard(defaults, max_steps=max_steps, learning_rate=1e-5, domain_percent=75).grace_steps
    assert config.forgetting.grace_steps == own
    assert config.eval.kl_top_k == EvalSettings().kl_top_k
    assert config.checkpoints.candidates == CandidateSettings()


def test_unseen_general_sets_reach_the_trainer() -> None:
    unseen = [{"uri": "s3://other/wiki/", "weight": 3}, {"uri": "/data/books.jsonl"}]
    _, config_map, _ = render("unseen-general", {"technique": "cpt", "eval": {"unseenGeneral": unseen}})
    config = TrainerConfig.model_validate_json(config_map["data"][CONFIG_KEY])
    assert [(s.uri, s.weight) for s in config.eval.unseen_general] == [
        ("s3://other/wiki/", 3),
        ("/data/books.jsonl", 1),
    ]
    _, default_map, _ = render("no-unseen-general", {"technique": "cpt"})
    assert TrainerConfig.model_validate_json(default_map["data"][CONFIG_KEY]).eval.unseen_general == []


def test_domain_only_with_only_unseen_general_text_parses_in_the_trainer() -> None:
    data = {**BASE["data"], "domainPercent": 100, "general": []}
    spec = {"technique": "cpt", "data": data, "eval": {"unseenGeneral": [{"uri": "s3://other/wiki/"}]}}
    _, config_map, _ = render("domain-only-unseen", spec)
    config = TrainerConfig.model_validate_json(config_map["data"][CONFIG_KEY])
    assert config.eval.general == [] and [s.uri for s in config.eval.unseen_general] == ["s3://other/wiki/"]


@pytest.mark.parametrize("mix_by", ["tokens", "lossTokens"])
def test_the_mix_unit_reaches_the_trainer(mix_by: str) -> None:
    spec = {"technique": "sft", "data": {**BASE["data"], "mixBy": mix_by}}
    _, config_map, _ = render("sft-mix", spec)
    assert TrainerConfig.model_validate_json(config_map["data"][CONFIG_KEY]).data.mix_by == mix_by
    for technique, default in (("cpt", "tokens"), ("sft", "lossTokens"), ("lora", "lossTokens")):
        _, default_map, _ = render(f"{technique}-default-mix", {"technique": technique})
        assert TrainerConfig.model_validate_json(default_map["data"][CONFIG_KEY]).data.mix_by == default, technique


def test_learning_rate_probe_settings_reach_the_trainer() -> None:
    _, config_map, _ = render("learning-rate-probe", FORGEJOBS["learning-rate-probe"])
    config = TrainerConfig.model_validate_json(config_map["data"][CONFIG_KEY])
    probe = config.training.probe
    assert probe is not None
    assert (probe.multipliers, probe.steps, probe.evaluations) == ([4.0, 0.5, 1.0], 25, 5)
    assert probe.eval_max_tokens == 16384, "at most eval.maxTokens"
    # the trainer derives its probe runs and the scaled run from the rendered settings
    assert probe_training(config.training, 4.0).learning_rate == pytest.approx(8e-5)
    scaled = scaled_training(config.training, 0.5)
    assert (scaled.learning_rate, scaled.min_learning_rate) == pytest.approx((1e-5, 1e-6))
    # an empty block in the spec gets the trainer's own defaults; no block, no probe
    _, empty_map, _ = render("cpt-defaults", {"technique": "cpt", "training": {"learningRateProbe": {}}})
    assert TrainerConfig.model_validate_json(empty_map["data"][CONFIG_KEY]).training.probe == ProbeSettings()
    _, off_map, _ = render("cpt-defaults", FORGEJOBS["cpt-defaults"])
    assert TrainerConfig.model_validate_json(off_map["data"][CONFIG_KEY]).training.probe is None


def test_the_pytorchjob_runs_the_trainer_on_the_mounted_config() -> None:
    spec, config_map, _ = render("cpt-defaults", FORGEJOBS["cpt-defaults"])
    job = build_pytorchjob(Owner("cpt-defaults", "team", "uid-1"), spec, OPTIONS)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "forge-config")
    volume = next(v for v in pod["volumes"] if v["name"] == "forge-config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert container["command"] == ["forge-trainer", "--config", f"{mount['mountPath']}/{CONFIG_KEY}"]
    config = TrainerConfig.model_validate_json(config_map["data"][CONFIG_KEY])
    assert config.checkpoints.local_dir.startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "scratch")
    )
    metrics_port = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
    assert metrics_port == config.report.metrics_port


def test_an_unknown_field_would_fail_the_contract(tmp_path: Path) -> None:
    """The trainer rejects what it does not know, so drift in the operator's renderer cannot go unnoticed."""
    _, config_map, _ = render("cpt-defaults", FORGEJOBS["cpt-defaults"])
    document = json.loads(config_map["data"][CONFIG_KEY])
    document["training"]["learningRateScale"] = 2
    path = tmp_path / CONFIG_KEY
    path.write_text(json.dumps(document))
    with pytest.raises(Exception, match=r"training\.learningRateScale"):
        load_config(path)
