"""End-of-run candidates: which are planned, and the weights they hold (real safetensors folders, a real Llama)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from forge_trainer.candidates import (
    CandidatePlan,
    WeightFolder,
    average_weights,
    interpolate_weights,
    plan_candidates,
    write_folder,
)
from forge_trainer.config import CandidateSettings
from forge_trainer.errors import ModelError


def folder_with(path: Path, tensors: dict[str, torch.Tensor]) -> WeightFolder:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text("{}")
    return WeightFolder(path)


def test_plans_average_the_last_k_and_interpolate_the_last_checkpoint() -> None:
    settings = CandidateSettings(average_last=3, interpolation_alphas=[0.75, 0.25])
    plans = plan_candidates([40, 10, 20, 30], settings)
    assert plans == [
        CandidatePlan("average", 40, average_of=(20, 30, 40)),
        CandidatePlan("interpolation", 40, alpha=0.25),
        CandidatePlan("interpolation", 40, alpha=0.75),
    ]
    assert [p.name for p in plans] == [
        "average-last3-step-00000040",
        "interpolation-2500-step-00000040",
        "interpolation-7500-step-00000040",
    ]
    assert plans[0].status_fields() == {"kind": "average", "averageOf": [20, 30, 40]}
    assert plans[1].status_fields() == {"kind": "interpolation", "alpha": 0.25}


@pytest.mark.parametrize(
    ("steps", "average_last", "alphas", "expected"),
    [
        ([], 3, [0.5], []),  # nothing saved: nothing to build
        ([10], 3, [0.5], [("interpolation", 10, ())]),  # one checkpoint: no average
        ([10, 20], 5, [], [("average", 20, (10, 20))]),  # fewer than k: all of them
        ([10, 20, 30], 1, [], []),  # k = 1 is off (the checkpoint itself)
        ([10, 20, 30], 0, [0.5], [("interpolation", 30, ())]),
    ],
)
def test_plans_at_the_edges(
    steps: list[int], average_last: int, alphas: list[float], expected: list[tuple[str, int, tuple[int, ...]]]
) -> None:
    plans = plan_candidates(steps, CandidateSettings(average_last=average_last, interpolation_alphas=alphas))
    assert [(p.kind, p.step, p.average_of) for p in plans] == expected


def test_average_and_interpolation_values_and_dtypes(tmp_path: Path) -> None:
    a = folder_with(
        tmp_path / "a",
        {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.bfloat16), "n": torch.tensor([1])},
    )
    b = folder_with(
        tmp_path / "b",
        {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.bfloat16), "n": torch.tensor([2])},
    )
    c = folder_with(
        tmp_path / "c",
        {"w": torch.tensor([5.0, 1.0]), "h": torch.tensor([3.0], dtype=torch.bfloat16), "n": torch.tensor([3])},
    )
    avg = average_weights([a, b, c])
    assert torch.equal(avg["w"], torch.tensor([3.0, 3.0]))
    assert avg["h"].dtype == torch.bfloat16 and float(avg["h"]) == 2.0
    assert torch.equal(avg["n"], torch.tensor([3]))  # integer tensors: the last folder's
    mid = interpolate_weights(a, b, 0.25)
    assert torch.allclose(mid["w"], torch.tensor([1.5, 3.0]))
    assert torch.equal(interpolate_weights(a, b, 1.0)["w"], torch.tensor([3.0, 6.0]))
    assert torch.equal(interpolate_weights(a, b, 0.0)["w"], torch.tensor([1.0, 2.0]))


def test_folders_with_different_tensors_are_refused_by_name(tmp_path: Path) -> None:
    a = folder_with(tmp_path / "a", {"w": torch.zeros(2), "x": torch.zeros(1)})
    b = folder_with(tmp_path / "b", {"w": torch.zeros(2)})
    with pytest.raises(ModelError, match=r"hold different tensors, e\.g\. \['x'\]"):
        average_weights([a, b])
    with pytest.raises(ModelError, match=r"no model\.safetensors"):
        WeightFolder(tmp_path)


def test_interpolated_folder_loads_and_holds_the_blend(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    moved = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    torch.manual_seed(3)
    with torch.no_grad():
        for param in moved.parameters():
            param.add_(0.1 * torch.randn_like(param))
    moved.save_pretrained(str(tmp_path / "moved"), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_model / name).is_file():
            (tmp_path / "moved" / name).write_bytes((tiny_model / name).read_bytes())

    weights = interpolate_weights(WeightFolder(tiny_model), WeightFolder(tmp_path / "moved"), 0.5)
    write_folder(weights, tmp_path / "moved", tmp_path / "blend")
    assert (tmp_path / "blend" / "tokenizer.json").is_file()
    blend = AutoModelForCausalLM.from_pretrained(str(tmp_path / "blend"))
    base_sd, moved_sd = base.state_dict(), moved.state_dict()
    for key, value in blend.state_dict().items():
        assert torch.allclose(value, (base_sd[key] + moved_sd[key]) / 2, atol=1e-6), key
