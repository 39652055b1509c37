"""The trainer config: typed, validated, unknown or invalid fields fail at start naming the file and field."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from forge_trainer.config import TrainerConfig, load_config, parse_config
from forge_trainer.errors import EXIT_CONFIG, ConfigError
from tests.trainer.harness import VENV_BIN, base_env, merged, write_config


def test_valid_config_round_trips(base_config: dict[str, Any], tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.json", base_config))
    assert cfg.data.domain_percent == 70
    assert cfg.training.micro_batch_size == 4
    assert cfg.report.forge_job is None
    again = parse_config(cfg.to_json_dict())
    assert again == cfg
    assert "microBatchSize" in cfg.to_json_dict()["training"]


@pytest.mark.parametrize(
    ("override", "field", "message"),
    [
        ({"training": {"learningRat": 1}}, "training.learningRat", "unknown field"),
        ({"data": {"domainPercent": 0}}, "data.domainPercent", "greater than or equal to 1"),
        ({"data": {"domainPercent": 101}}, "data.domainPercent", "less than or equal to 100"),
        ({"data": {"domain": [{"uri": "x", "weight": 0}]}}, "data.domain[0].weight", "greater than or equal"),
        ({"data": {"general": []}}, "data", "general sources are required when domainPercent is 70"),
        ({"training": {"zeroStage": 4}}, "training.zeroStage", "less than or equal to 3"),
        ({"training": {"precision": "fp16"}}, "training.precision", "'fp32' or 'bf16'"),
        ({"training": {"schedule": "linear"}}, "training.schedule", "'cosine', 'constant' or 'wsd'"),
        ({"training": {"warmupSteps": 11}}, "training", "warmupSteps (11) exceeds maxSteps (10)"),
        ({"model": {"technique": "lora"}}, "model", "technique 'lora' needs a 'lora' block"),
        ({"model": {"lora": {"rank": 4}}}, "model", "only allowed with technique 'lora'"),
        ({"version": 2}, "version", "Input should be 1"),
        ({"checkpoints": {"keep": 0}}, "checkpoints.keep", "greater than or equal to 1"),
        ({"report": {"metricsPort": 70000}}, "report.metricsPort", "less than or equal to 65535"),
        ({"training": {"probe": {"steps": 11}}}, "training.probe.steps", "11 exceeds maxSteps (10)"),
        ({"training": {"probe": {"steps": 5, "multipliers": [1, 1]}}}, "training.probe", "must be distinct"),
        ({"training": {"probe": {"steps": 5, "evaluations": 6}}}, "training.probe", "evaluations (6) exceeds steps"),
        (
            {"training": {"probe": {"steps": 5, "multipliers": [400]}}},
            "training.probe.multipliers[0]",
            "or equal to 100",
        ),
        (
            {"training": {"learningRate": 0.5, "probe": {"steps": 5, "multipliers": [4]}}},
            "training.probe.multipliers",
            "learningRate 0.5 x 4 = 2 exceeds 1",
        ),
        (
            {
                "data": {"domainPercent": 100, "general": []},
                "eval": {"general": []},
                "training": {"probe": {"steps": 5}},
            },
            "training.probe",
            "needs general sources (eval.general or data.general)",
        ),
    ],
)
def test_invalid_field_is_named(
    base_config: dict[str, Any], tmp_path: Path, override: dict[str, Any], field: str, message: str
) -> None:
    path = write_config(tmp_path / "c.json", merged(base_config, **override))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert f"{path}: {field}: " in text
    assert message in text


def test_missing_required_field(base_config: dict[str, Any], tmp_path: Path) -> None:
    doc = merged(base_config)
    del doc["training"]["maxSteps"]
    with pytest.raises(ConfigError, match=r"c\.json: training\.maxSteps: Field required"):
        load_config(write_config(tmp_path / "c.json", doc))


def test_bad_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"version": 1,\n  "jobName": }')
    with pytest.raises(ConfigError, match=r"c\.json: invalid JSON at line 2 column"):
        load_config(path)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read config"):
        load_config(tmp_path / "missing.json")


def test_global_batch_tokens_checked_against_world(base_config: dict[str, Any]) -> None:
    doc = merged(base_config, training={"globalBatchTokens": 4 * 2 * 2 * 64})
    cfg = TrainerConfig.model_validate(doc)
    cfg.check_world(2)
    with pytest.raises(ConfigError, match=r"training\.globalBatchTokens: 1024 != .* worldSize 3"):
        cfg.check_world(3)


def test_every_field_has_a_description() -> None:
    def walk(model: type[Any], path: str) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(f"{path}.{name}")
            ann = info.annotation
            for candidate in getattr(ann, "__args__", (ann,)):
                inner = getattr(candidate, "__args__", (candidate,))
                for c in inner:
                    if isinstance(c, type) and hasattr(c, "model_fields"):
                        missing += walk(c, f"{path}.{name}")
        return missing

    assert walk(TrainerConfig, "config") == []


def test_cli_exits_with_config_code(base_config: dict[str, Any], tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.json", merged(base_config, data={"seqLenght": 5}))
    proc = subprocess.run(
        [str(VENV_BIN / "forge-trainer"), "--config", str(path)],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "data.seqLenght: unknown field" in proc.stderr


def test_config_schema_is_json_serialisable() -> None:
    schema = TrainerConfig.model_json_schema(by_alias=True)
    assert "microBatchSize" in json.dumps(schema)


def test_the_environment_overrides_the_local_checkpoint_folder(base_config: dict[str, Any], tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", merged(base_config, checkpoints={"localDir": "/tmp/forge/ckpt"}))
    assert load_config(path, {}).checkpoints.local_dir == "/tmp/forge/ckpt"
    assert load_config(path, {"FORGE_CHECKPOINT_LOCAL_DIR": " "}).checkpoints.local_dir == "/tmp/forge/ckpt"
    cfg = load_config(path, {"FORGE_CHECKPOINT_LOCAL_DIR": "/work/pod-a/scratch/checkpoints"})
    assert cfg.checkpoints.local_dir == "/work/pod-a/scratch/checkpoints"
    assert cfg.checkpoints.output == load_config(path, {}).checkpoints.output  # nothing else changes
