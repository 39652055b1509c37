"""Held-out documents split off the training sources by a hash: disjoint from training, the same everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forge_trainer.config import DOMAIN_GROUP, GENERAL_GROUP, TrainerConfig
from forge_trainer.data.encode import Doc, DocEncoder
from forge_trainer.data.holdout import HoldOut, document_bucket, is_held_out
from forge_trainer.data.loader import Layout, build_mixer, limits, plan_mix, prepare_shards, step_batches
from forge_trainer.data.pack import PackedSource, SourceExhaustedError
from forge_trainer.data.records import TextRecord
from forge_trainer.data.sources import resolve_source
from forge_trainer.errors import DataError
from forge_trainer.evaluation import eval_set
from forge_trainer.model import load_tokenizer
from tests.trainer.harness import merged

PER_MILLE = 100


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)


def split_cfg(base: dict[str, Any], per_mille: int = PER_MILLE) -> TrainerConfig:
    """The base config with no eval sets: both groups are held out of the training sources."""
    return TrainerConfig.model_validate(merged(base, eval={"domain": [], "general": [], "holdOutPerMille": per_mille}))


def documents(uri: str, encoder: DocEncoder, cfg: TrainerConfig, hold_out: HoldOut | None) -> list[bytes]:
    """One pass over a source's documents (as token bytes) on one side of the split."""
    src = PackedSource(resolve_source(uri), "probe", encoder, 64, cfg.training.seed, limits(cfg.data, True), None,
                       hold_out=hold_out)  # fmt: skip
    out = []
    while True:
        try:
            out.append(src.next_document().ids.tobytes())
        except SourceExhaustedError:
            return out


def test_bucket_is_a_pure_function_of_the_tokens() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 2048, size=int(rng.integers(5, 200)), dtype=np.int32) for _ in range(20_000)]
    held = sum(is_held_out(d, 20) for d in docs)
    assert 300 < held < 500  # 20 per mille of 20,000 is 400
    assert document_bucket(docs[0]) == document_bucket(docs[0].astype(np.int64).copy())
    assert all(is_held_out(d, 1000) for d in docs[:10]) and not any(is_held_out(d, 0) for d in docs[:10])
    with pytest.raises(ValueError, match="per_mille"):
        is_held_out(docs[0], 1001)


def test_config_holds_out_only_groups_without_eval_sets(base_config: dict[str, Any]) -> None:
    cfg = split_cfg(base_config)
    assert cfg.hold_out() == (PER_MILLE, PER_MILLE)
    assert cfg.eval_group(GENERAL_GROUP) == (cfg.data.general, PER_MILLE)
    given = TrainerConfig.model_validate(merged(base_config, eval={"domain": []}))
    assert given.hold_out() == (20, 0) and given.eval_group(GENERAL_GROUP)[0] == given.eval.general
    with pytest.raises(ValueError, match="holdOutPerMille"):
        split_cfg(base_config, per_mille=600)


def test_held_out_and_training_documents_are_disjoint(base_config: dict[str, Any], tokenizer: Any) -> None:
    cfg = split_cfg(base_config)
    enc = DocEncoder(tokenizer, assistant_only=False)
    plan = plan_mix(cfg.data, hold_out=cfg.hold_out())
    for i, src in enumerate(plan.sources):
        everything = documents(src.uri, enc, cfg, None)
        training = documents(src.uri, enc, cfg, plan.source_hold_out(i))
        held = documents(src.uri, enc, cfg, HoldOut(PER_MILLE, held_out=True))
        assert not set(training) & set(held)
        assert sorted(training + held) == sorted(everything)
        assert 0.05 < len(held) / len(everything) < 0.15, (src.uri, len(held), len(everything))
    # The evaluation set is made of held-out documents only, and the same when built again.
    domain = eval_set(cfg, DOMAIN_GROUP, 10**7, enc, pad=0)
    again = eval_set(cfg, DOMAIN_GROUP, 10**7, enc, pad=0)
    assert [s.ids.tobytes() for s in domain] == [s.ids.tobytes() for s in again]
    held = documents(cfg.data.domain[0].uri, enc, cfg, HoldOut(PER_MILLE, True))
    scored = np.concatenate([s.ids[s.mask] for s in domain if s.mask is not None])
    bodies = np.concatenate([np.frombuffer(d, dtype=np.int32)[1:-1] for d in held])  # without BOS/EOS
    assert len(scored) > 0 and sorted(scored.tolist()) == sorted(bodies.tolist())


def test_training_stream_skips_held_out_documents_with_and_without_shards(
    base_config: dict[str, Any], tokenizer: Any
) -> None:
    cfg = split_cfg(base_config)
    enc = DocEncoder(tokenizer, assistant_only=False)
    plan = plan_mix(cfg.data, hold_out=cfg.hold_out())
    index, _ = prepare_shards(plan, cfg, enc, 0, 1, lambda obj: [obj])
    sharded = plan_mix(cfg.data, index, cfg.hold_out())
    layout = Layout(1, 0, 4, 2)
    streamed = step_batches(build_mixer(plan, cfg, enc), plan, cfg, layout, 0)
    from_shards = step_batches(build_mixer(sharded, cfg, enc), sharded, cfg, layout, 0)
    first = [next(streamed) for _ in range(6)]
    assert all(
        all(torch_equal(a, b) for a, b in zip(x.micro, y.micro, strict=True))
        for x, y in zip(first, [next(from_shards) for _ in range(6)], strict=True)
    )
    # Resuming from a step's data state continues the same stream (a restart).
    resumed = step_batches(build_mixer(plan, cfg, enc, first[2].state), plan, cfg, layout, 3)
    assert all(torch_equal(a, b) for a, b in zip(next(resumed).micro, first[3].micro, strict=True))
    # A data state of the stream without the split does not resume this one.
    whole = plan_mix(cfg.data)
    assert whole.fingerprint(7, 64) != plan.fingerprint(7, 64)
    with pytest.raises(DataError, match="changed since the checkpoint"):
        build_mixer(plan, cfg, enc, next(step_batches(build_mixer(whole, cfg, enc), whole, cfg, layout, 0)).state)
    # No held-out document appears whole in the training stream.
    tokens = np.concatenate([mb.ids.numpy().ravel() for b in first for mb in b.micro]).astype(np.int32).tobytes()
    held = documents(cfg.data.domain[0].uri, enc, cfg, HoldOut(PER_MILLE, True))
    assert held and not any(doc in tokens for doc in held)


def torch_equal(a: Any, b: Any) -> bool:
    return bool((a[0] == b[0]).all() and (a[1] == b[1]).all())


def test_split_is_the_same_in_another_process(base_config: dict[str, Any], tokenizer: Any, tiny_model: Path) -> None:
    """Another rank (a process with another hash seed) holds out exactly the same documents."""
    cfg = split_cfg(base_config)
    enc = DocEncoder(tokenizer, assistant_only=False)
    here = [s.ids.tolist() for s in eval_set(cfg, GENERAL_GROUP, 2048, enc, pad=0)]
    code = (
        "import json, sys\n"
        "from forge_trainer.config import GENERAL_GROUP, TrainerConfig\n"
        "from forge_trainer.data.encode import DocEncoder\n"
        "from forge_trainer.evaluation import eval_set\n"
        "from forge_trainer.model import load_tokenizer\n"
        "cfg = TrainerConfig.model_validate(json.loads(sys.argv[1]))\n"
        "enc = DocEncoder(load_tokenizer(sys.argv[2]), assistant_only=False)\n"
        "print(json.dumps([s.ids.tolist() for s in eval_set(cfg, GENERAL_GROUP, 2048, enc, pad=0)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    args = [sys.executable, "-c", code, json.dumps(cfg.model_dump(by_alias=True, mode="json")), str(tiny_model)]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    assert here and json.loads(out.strip().splitlines()[-1]) == here


def test_a_source_with_nothing_held_out_is_named(base_config: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a single short document"}) + "\n")
    cfg = split_cfg(base_config)
    enc = DocEncoder(tokenizer, assistant_only=False)
    doc = enc.encode([TextRecord("a single short document")])[0]
    assert isinstance(doc, Doc)
    side = HoldOut(PER_MILLE, held_out=not is_held_out(doc.ids, PER_MILLE))
    with pytest.raises(DataError, match=r"one\.jsonl.*eval\.holdOutPerMille=100"):
        documents(str(one), enc, cfg, side)
