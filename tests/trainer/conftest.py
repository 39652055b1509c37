"""Fixtures of the trainer tests: a tiny local model, synthetic corpora, a moto S3 server, a base config."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from forge_trainer import storage, tiny
from forge_trainer.sharded import TensorSource
from tests.trainer.harness import TORCH_EXTENSIONS_DIR, S3Server, moto_server

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Corpora:
    """Synthetic data folders and held-out files."""

    domain: Path
    general: Path
    chat: Path
    eval_domain: Path
    eval_general: Path
    eval_chat: Path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-64 Llama with a locally trained byte-level BPE tokenizer and a chat template."""
    return tiny.make_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_no_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shape without a chat template (SFT uses the documented fallback format)."""
    return tiny.make_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama-plain", chat_template=None)


@pytest.fixture(scope="session")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> Corpora:
    root = tmp_path_factory.mktemp("corpora")
    tiny.write_corpus(root / "domain" / "tickets-a.jsonl", "domain", 600, 1)
    tiny.write_corpus(root / "domain" / "tickets-b.jsonl", "domain", 600, 2)
    tiny.write_corpus(root / "general" / "general.jsonl", "general", 1500, 3)
    tiny.write_corpus(root / "chat" / "chat.jsonl", "chat", 800, 4)
    return Corpora(
        domain=root / "domain",
        general=root / "general",
        chat=root / "chat",
        eval_domain=tiny.write_corpus(root / "heldout" / "domain.jsonl", "domain", 100, 101),
        eval_general=tiny.write_corpus(root / "heldout" / "general.jsonl", "general", 100, 102),
        eval_chat=tiny.write_corpus(root / "heldout" / "chat.jsonl", "chat", 60, 103),
    )


@pytest.fixture(scope="session")
def pretrained(tiny_model: Path, corpora: Corpora, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model pretrained on the general corpus (plain torch, a few seconds): something to forget."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    ids: list[int] = []
    for path in sorted(corpora.general.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id or 0]
    seq = 64
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    torch.set_num_threads(2)
    for _ in range(60):
        batch = data[torch.randint(0, len(data), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("models") / "pretrained"
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server on loopback; this process's boto3 points at it too."""
    with moto_server() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        storage.s3_client.cache_clear()
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage.s3_client.cache_clear()


@pytest.fixture
def bucket(s3: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket for one test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    client = storage.s3_client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if name not in existing:
        client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def base_config(tiny_model: Path, corpora: Corpora, tmp_path: Path) -> dict[str, Any]:
    """A small, fast CPT config: 2 layers, seq 64, fp32, ZeRO-2, held-out sets of 1024 tokens."""
    return make_base_config(tiny_model, corpora, tmp_path)


def make_base_config(tiny_model: Path, corpora: Corpora, tmp_path: Path) -> dict[str, Any]:
    """The base config with outputs under ``tmp_path``."""
    return {
        "version": 1,
        "jobName": "test-job",
        "namespace": "default",
        "model": {"base": str(tiny_model), "technique": "cpt"},
        "data": {
            "domainPercent": 70,
            "domain": [{"uri": str(corpora.domain) + "/", "weight": 1}],
            "general": [{"uri": str(corpora.general) + "/", "weight": 1}],
            "seqLength": 64,
            "maxRepetition": 4,
            "maxBadLines": 0,
        },
        "eval": {
            "everySteps": 5,
            "domain": [{"uri": str(corpora.eval_domain)}],
            "general": [{"uri": str(corpora.eval_general)}],
            "maxTokens": 1024,
        },
        "training": {
            "learningRate": 3e-3,
            "schedule": "cosine",
            "warmupSteps": 2,
            "microBatchSize": 4,
            "gradientAccumulationSteps": 2,
            "maxSteps": 10,
            "precision": "fp32",
            "zeroStage": 2,
            "seed": 7,
            "gradientClipping": 1.0,
            "weightDecay": 0.01,
        },
        "forgetting": {"budgetPercent": 5, "action": "warn"},
        "checkpoints": {
            "everySteps": 5,
            "output": str(tmp_path / "output"),
            "keep": 2,
            "localDir": str(tmp_path / "local"),
        },
        "report": {"forgeJob": None, "minIntervalSeconds": 5, "metricsPort": 0},
    }


def tied_copy(model: Path, folder: Path) -> Path:
    """``model`` with its output head tied to the embedding, saved as transformers saves tied models (no
    lm_head.weight in the file)."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    source = TensorSource(model)
    tensors = {k: source.get(k) for k in source.file_of if k != "lm_head.weight"}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
