"""End-to-end training on CPU: ranks as local processes with the Kubeflow environment, gloo, DeepSpeed, moto S3.

One reference run (2 ranks, ZeRO-2, fp32, checkpoints to S3) is shared by several tests; the resume test kills
a rank of a second, identical run and checks that the rerun reproduces the reference's per-step losses.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from forge_trainer import checkpoint as ckpt
from forge_trainer import storage
from forge_trainer.errors import EXIT_DATA, EXIT_PEER_LOST, EXIT_STORAGE_UNAVAILABLE
from tests.faults import TcpProxy
from tests.trainer.conftest import Corpora, make_base_config
from tests.trainer.harness import (
    RankResult,
    Ranks,
    S3Server,
    assert_ok,
    merged,
    run_export,
    run_ranks,
    start_ranks,
    step_losses,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]

STEPS = 12
EVERY = 4
# fp32 on CPU with one thread per rank: a resumed run must reproduce the uninterrupted one bit for bit.
RESUME_TOLERANCE = 0.0


def reference_config(base: dict[str, Any], bucket: str, prefix: str, local: Path) -> dict[str, Any]:
    return merged(
        base,
        training={"maxSteps": STEPS},
        eval={"everySteps": EVERY},
        checkpoints={"everySteps": EVERY, "output": f"s3://{bucket}/{prefix}/", "localDir": str(local), "keep": 2},
    )


@dataclass
class Reference:
    config: Path
    cfg: dict[str, Any]
    results: list[RankResult]
    metrics_scrapes: list[str]
    workdir: Path

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.results[0].events

    @property
    def losses(self) -> dict[int, float]:
        return step_losses(self.events)


def scrape_while_running(ranks: Ranks, rank: int, timeout: float) -> list[str]:
    """Scrape a rank's /metrics until the ranks end; returns every successful scrape."""
    deadline = time.monotonic() + timeout
    port = None
    scrapes: list[str] = []
    err_log = ranks.logs[rank].with_suffix(".err")
    while time.monotonic() < deadline and any(p.poll() is None for p in ranks.procs):
        if port is None and err_log.exists():
            m = re.search(r"metrics on :(\d+)/metrics", err_log.read_text())
            port = int(m.group(1)) if m else None
        if port is not None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
                    body = resp.read().decode()
                if body:  # a scrape cut short by the process exiting reads as an empty body
                    scrapes.append(body)
            except OSError:
                pass
        time.sleep(0.1)
    return scrapes


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, corpora: Corpora, s3: S3Server) -> Reference:
    work = tmp_path_factory.mktemp("reference")
    storage.s3_client().create_bucket(Bucket="train")
    base = make_base_config(tiny_model, corpora, work)
    cfg = reference_config(base, "train", "reference", work / "local")
    config = write_config(work / "config.json", cfg)
    ranks = start_ranks(config, 2, work, env=s3.env)
    scrapes = scrape_while_running(ranks, 1, timeout=300)
    results = ranks.wait(timeout=60)
    assert_ok(results)
    return Reference(config, cfg, results, scrapes, work)


def test_loss_decreases(reference: Reference) -> None:
    losses = reference.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.8, losses
    evals = [e for e in reference.events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 4, 8, 12]
    assert evals[-1]["domain_loss"] < evals[0]["domain_loss"] - 0.5
    assert evals[-1]["domain_gain_percent"] > 10


def prepare_event(events: list[dict[str, Any]]) -> dict[str, Any]:
    found = [e for e in events if e["event"] == "prepare"]
    assert len(found) == 1, found
    return found[0]


def test_the_prepare_phase_tokenised_every_file_once_over_both_ranks(reference: Reference) -> None:
    prep = prepare_event(reference.events)
    # 3 training files (2 domain, 1 general), split over the 2 ranks: each tokenised by one rank only.
    assert (prep["files"], prep["built"], prep["reused"]) == (3, 3, 0) and prep["tokens"] > 0
    for r in reference.results:
        assert re.search(r"prepare phase: 3 file\(s\), 3 tokenised .* by 2 rank\(s\)", r.stderr), r.stderr[-3000:]
    entries = storage.list_folders("s3://train/reference/token-cache/")
    assert len(entries) == 3
    for key in entries:
        assert storage.read_bytes(f"s3://train/reference/token-cache/{key}/manifest.json") is not None


@pytest.mark.timeout(300)
def test_a_second_run_on_the_same_data_tokenises_nothing_and_trains_the_same(
    reference: Reference, tmp_path: Path, s3: S3Server
) -> None:
    cfg = reference_config(reference.cfg, "train", "second-run", tmp_path / "local")
    cfg = merged(cfg, data={"tokenCache": "s3://train/reference/token-cache/"})
    results = run_ranks(write_config(tmp_path / "config.json", cfg), 2, tmp_path / "run", env=s3.env, timeout=240)
    assert_ok(results)
    prep = prepare_event(results[0].events)
    assert (prep["files"], prep["built"], prep["reused"], prep["records"], prep["tokens"]) == (3, 0, 3, 0, 0)
    assert step_losses(results[0].events) == reference.losses


def test_realised_mix_within_one_percent(reference: Reference) -> None:
    finished = next(e for e in reference.events if e["event"] == "finished")
    mix = finished["mix"]
    assert mix["sequences"] == STEPS * 2 * 4 * 2  # steps x world x micro x accumulation: nothing lost or repeated
    assert abs(mix["realisedDomainPercent"] - 70) <= 1.0
    assert mix["domainTokens"] + mix["generalTokens"] == mix["tokens"] == mix["sequences"] * 64


def test_both_ranks_trained_on_their_own_slice(reference: Reference) -> None:
    # Rank 1 printed no events (rank 0 reports) but took part in every step: a shorter run would have hung rank 0.
    assert reference.results[1].returncode == 0
    assert reference.results[1].events == []
    manifest = ckpt.read_manifest(f"s3://train/reference/{ckpt.tag_for(STEPS)}")
    assert manifest is not None
    paths = [f["path"] for f in manifest["files"]]
    assert f"global_step{STEPS}/zero_pp_rank_1_mp_rank_00_optim_states.pt" in paths
    assert "forge/rng_rank_1.pt" in paths and "hf/model.safetensors" in paths


def test_checkpoints_in_s3_with_manifests_and_local_pruned(reference: Reference) -> None:
    found = ckpt.complete_checkpoints("s3://train/reference/")
    assert [m["step"] for m in found] == [4, 8, 12]
    for m in found:
        keys = {u: s for u, s in storage.list_files(f"s3://train/reference/{m['tag']}")}
        for f in m["files"]:
            assert keys[f"s3://train/reference/{m['tag']}/{f['path']}"] == f["size"]
        assert m["metrics"]["domainLoss"] is not None and m["metrics"]["complete"] is True
    local = Path(reference.cfg["checkpoints"]["localDir"])
    assert ckpt.list_tags(str(local)) == ["step-00000008", "step-00000012"]  # keep: 2
    state = json.loads((local / "step-00000012" / "forge" / "state.json").read_text())
    assert state["step"] == 12 and [c["step"] for c in state["checkpoints"]] == [4, 8, 12]


def test_metrics_endpoint_on_every_rank(reference: Reference) -> None:
    assert reference.metrics_scrapes, "rank 1's /metrics was never reachable"
    text = reference.metrics_scrapes[-1]
    for name in (
        "forge_trainer_step",
        "forge_trainer_tokens_total",
        "forge_trainer_tokens_per_second",
        "forge_trainer_loss",
        "forge_trainer_learning_rate",
        "forge_trainer_grad_norm",
        "forge_trainer_checkpoints_saved_total",
        "forge_trainer_total_steps",
    ):
        assert re.search(rf"^{name}\{{[^}}]*rank=\"1\"[^}}]*\}} ", text, re.M), name
    assert not re.search(r"[{,]job=", text)
    steps = [
        float(m) for s in reference.metrics_scrapes for m in re.findall(r"^forge_trainer_step\{.*\} (\S+)$", s, re.M)
    ]
    assert max(steps) >= 1


@pytest.mark.timeout(300)
def test_killed_rank_resumes_and_matches_the_uninterrupted_run(
    reference: Reference, tmp_path: Path, s3: S3Server
) -> None:
    cfg = reference_config(reference.cfg, "train", "resume", tmp_path / "local")
    config = write_config(tmp_path / "config.json", cfg)
    ranks = start_ranks(config, 2, tmp_path / "first", env=s3.env)
    ranks.wait_for_event(lambda e: e["event"] == "checkpoint" and e["step"] == EVERY, timeout=240)
    ranks.procs[1].kill()  # SIGKILL one rank right after a checkpoint
    try:
        ranks.procs[0].wait(60)  # its peer is gone: rank 0 fails (it must not hang)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 hung after its peer was killed")
    first = ranks.collect()
    assert first[0].returncode == EXIT_PEER_LOST, first[0].describe()  # collateral: retried, and says so
    lost = [line for line in first[0].stderr.splitlines() if "PeerLostError" in line]
    assert len(lost) == 1 and "lost contact with another rank" in lost[0] and "Traceback" not in first[0].stderr
    done = [m["step"] for m in ckpt.complete_checkpoints("s3://train/resume/")]
    assert done and done[-1] < STEPS, done
    last = done[-1]
    # A half-written later checkpoint: every file of a real one, but no manifest. It must be ignored.
    half = ckpt.tag_for(last + EVERY)
    for uri, _ in storage.list_files(f"s3://train/reference/{ckpt.tag_for(last + EVERY)}"):
        rel = uri.split(f"{ckpt.tag_for(last + EVERY)}/", 1)[1]
        if rel != ckpt.MANIFEST:
            data = storage.read_bytes(uri)
            assert data is not None
            storage.write_bytes(f"s3://train/resume/{half}/{rel}", data)

    # The rerun lands on "another node": an empty local disk, so the checkpoint comes back from S3; and S3 is
    # unreachable for its first seconds: the manifest reads fail, are retried, and must not send it back to step 0.
    cfg2 = merged(cfg, checkpoints={"localDir": str(tmp_path / "local-after-restart")})
    config2 = write_config(tmp_path / "config2.json", cfg2)
    with s3_relay(s3) as (relay, env):
        relay.down()
        threading.Timer(6.0, relay.up).start()
        second = run_ranks(config2, 2, tmp_path / "second", env=env, timeout=240)
    assert_ok(second)
    assert "retrying" in second[0].stderr, "the outage was not met: the test would prove nothing"
    events = second[0].events
    # The restart found the token shards the first attempt prepared (through the outage) and tokenised nothing.
    assert prepare_event(first[0].events)["built"] == 3
    assert (prepare_event(events)["built"], prepare_event(events)["reused"]) == (0, 3)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert [e["step"] for e in resumed] == [last]
    losses = step_losses(events)
    assert sorted(losses) == list(range(last + 1, STEPS + 1))
    for step, loss in losses.items():
        assert abs(loss - reference.losses[step]) <= RESUME_TOLERANCE, (step, loss, reference.losses[step])
    ref_final = [e for e in reference.events if e["event"] == "eval"][-1]
    new_final = [e for e in events if e["event"] == "eval"][-1]
    assert new_final == ref_final
    assert [m["step"] for m in ckpt.complete_checkpoints("s3://train/resume/")] == list(range(EVERY, STEPS + 1, EVERY))


@contextmanager
def s3_relay(s3: S3Server, retry_seconds: float = 60) -> Iterator[tuple[TcpProxy, dict[str, str]]]:
    """A relay to the S3 server the test can take down, and the trainer env that goes through it."""
    host, port = s3.endpoint.removeprefix("http://").split(":")
    relay = TcpProxy((host, int(port)))
    relay.up()
    env = {
        **s3.env,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}",
        storage.RETRY_SECONDS_ENV: str(retry_seconds),
    }
    try:
        yield relay, env
    finally:
        relay.down()


@pytest.mark.timeout(300)
def test_s3_down_during_a_save_costs_no_step(reference: Reference, tmp_path: Path, s3: S3Server) -> None:
    """S3 refuses connections for a few seconds while a checkpoint uploads: the upload is retried in the background,
    the run finishes, trains every step once with the reference's losses, and every checkpoint is complete."""
    cfg = reference_config(reference.cfg, "train", "outage-save", tmp_path / "local")
    config = write_config(tmp_path / "config.json", cfg)
    with s3_relay(s3) as (relay, env):
        ranks = start_ranks(config, 2, tmp_path / "run", env=env)
        ranks.wait_for_event(lambda e: e["event"] == "step" and e["step"] == EVERY - 1, timeout=240)
        with relay.outage(5.0):
            time.sleep(0.1)
        results = ranks.wait(timeout=240)
    assert_ok(results)
    assert "retrying" in results[0].stderr + results[1].stderr, "the outage was not met: the test would prove nothing"
    losses = step_losses(results[0].events)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(abs(losses[s] - reference.losses[s]) <= RESUME_TOLERANCE for s in losses)
    assert not [e for e in results[0].events if e["event"] == "resumed"]
    done = [e["step"] for e in results[0].events if e["event"] == "checkpoint"]
    assert done == [4, 8, 12] == [m["step"] for m in ckpt.complete_checkpoints("s3://train/outage-save/")]


@pytest.mark.timeout(300)
def test_a_failed_upload_on_one_rank_ends_the_save_on_every_rank(
    reference: Reference, tmp_path: Path, s3: S3Server
) -> None:
    """Rank 1's route to S3 goes down for good after it started: its upload fails after the retries and every rank
    ends within seconds with the retryable storage code, rank 0 naming rank 1; the checkpoint stays incomplete."""
    cfg = reference_config(reference.cfg, "train", "rank1-upload", tmp_path / "local")
    config = write_config(tmp_path / "config.json", cfg)
    with s3_relay(s3, retry_seconds=4) as (relay, env):
        ranks = start_ranks(
            config, 2, tmp_path / "run", env={**s3.env, storage.RETRY_SECONDS_ENV: "4"}, env_of_pod={1: env}
        )
        ranks.wait_for_event(lambda e: e["event"] == "step" and e["step"] == 2, timeout=240)
        relay.down()
        ranks.wait_for_event(lambda e: e["event"] == "step" and e["step"] == EVERY, timeout=120)
        saved_at = time.monotonic()
        results = ranks.wait(timeout=120)
        ended_after = time.monotonic() - saved_at
    assert [r.returncode for r in results] == [EXIT_STORAGE_UNAVAILABLE] * 2, [r.describe() for r in results]
    assert "upload failed on rank 1" in results[0].stderr and "upload failed on rank 1" in results[1].stderr
    assert ended_after < 100, f"the ranks took {ended_after:.0f}s: they waited for the distributed timeout (120 s)"
    assert ckpt.complete_checkpoints("s3://train/rank1-upload/") == []
    assert not [e for e in results[0].events if e["event"] == "checkpoint"]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.timeout(180)
def test_export_loads_with_from_pretrained(
    reference: Reference, tmp_path: Path, tiny_model: Path, s3: S3Server
) -> None:
    from transformers import AutoTokenizer

    uri = f"s3://train/reference/{ckpt.tag_for(STEPS)}"
    out = tmp_path / "export"
    proc = run_export(reference.config, uri, out, s3.env, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    exported = load_weights(out)
    live = load_weights(Path(reference.cfg["checkpoints"]["localDir"]) / ckpt.tag_for(STEPS) / "hf")
    base = load_weights(tiny_model)
    assert exported.keys() == live.keys() == base.keys()
    for k in exported:
        assert torch.equal(exported[k], live[k]), k
    assert any(not torch.equal(exported[k], base[k]) for k in exported)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("ticket 1")["input_ids"]


def test_incomplete_checkpoint_cannot_be_exported(reference: Reference, tmp_path: Path, s3: S3Server) -> None:
    proc = run_export(reference.config, "s3://train/reference/step-00000099", tmp_path / "x", s3.env, timeout=120)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "not a complete checkpoint" in proc.stderr


@pytest.mark.timeout(240)
def test_bad_data_fails_every_rank_with_file_and_line(base_config: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad" / "tickets.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "ticket 1: fine."}\n{"text": 5}\n' + '{"text": "ticket 2: fine."}\n' * 50)
    cfg = merged(base_config, data={"domain": [{"uri": str(bad)}], "maxBadLines": 0})
    results = run_ranks(write_config(tmp_path / "c.json", cfg), 2, tmp_path / "run", timeout=200)
    for r in results:
        assert r.returncode == EXIT_DATA, r.describe()
        assert f"DataError: {bad}:2: 'text' must be a non-empty string" in r.stderr


CANDIDATES = [
    "average-last3-step-00000012",
    "interpolation-2500-step-00000012",
    "interpolation-5000-step-00000012",
    "interpolation-7500-step-00000012",
]


def download_folder(uri: str, dest: Path) -> Path:
    for key, _ in storage.list_files(uri):
        storage.download(key, dest / key[len(uri.rstrip("/")) + 1 :])
    return dest


@pytest.mark.timeout(300)
def test_end_of_run_candidates_are_built_evaluated_and_published(
    reference: Reference, tmp_path: Path, tiny_model: Path, s3: S3Server
) -> None:
    from forge_trainer.config import load_config
    from forge_trainer.data.encode import DocEncoder
    from forge_trainer.heldout import eval_sequences, evaluate_set
    from forge_trainer.model import load_tokenizer, pad_token_id

    events = {e["name"]: e for e in reference.events if e["event"] == "candidate"}
    assert sorted(events) == CANDIDATES
    assert events["average-last3-step-00000012"]["averageOf"] == [4, 8, 12]
    assert [events[n]["alpha"] for n in CANDIDATES[1:]] == [0.25, 0.5, 0.75]

    # The weights are what they claim: step 4 was pruned locally (keep 2), so its hf/ export came from S3.
    hf = {
        s: load_weights(download_folder(f"s3://train/reference/{ckpt.tag_for(s)}/hf", tmp_path / f"s{s}"))
        for s in (4, 8, 12)
    }
    base = load_weights(tiny_model)
    folders = {n: download_folder(f"s3://train/reference/candidates/{n}", tmp_path / n) for n in CANDIDATES}
    average = load_weights(folders["average-last3-step-00000012"])
    half = load_weights(folders["interpolation-5000-step-00000012"])
    for key, value in average.items():
        assert torch.allclose(value, (hf[4][key] + hf[8][key] + hf[12][key]) / 3, atol=1e-6), key
        assert torch.allclose(half[key], (base[key] + hf[12][key]) / 2, atol=1e-6), key

    # The reported losses are reproduced by evaluating each published folder independently, on one process.
    cfg = load_config(reference.config)
    tokenizer = load_tokenizer(tiny_model)
    encoder, pad = DocEncoder(tokenizer, False), pad_token_id(tokenizer)
    domain = eval_sequences(cfg.eval.domain, cfg.eval.max_tokens, cfg, encoder, pad)
    general = eval_sequences(cfg.eval.general, cfg.eval.max_tokens, cfg, encoder, pad)
    from transformers import AutoModelForCausalLM

    for name in CANDIDATES:
        manifest = json.loads((folders[name] / "forge-manifest.json").read_text())
        assert manifest["entry"]["uri"] == f"s3://train/reference/candidates/{name}"
        model = AutoModelForCausalLM.from_pretrained(str(folders[name]))
        d, _ = evaluate_set(model, torch.device("cpu"), domain, 1, 4, 0, 1)
        g, _ = evaluate_set(model, torch.device("cpu"), general, 1, 4, 0, 1)
        assert events[name]["domainLoss"] == pytest.approx(d.mean, abs=2e-4), name
        assert events[name]["generalLoss"] == pytest.approx(g.mean, abs=2e-4), name
    # Interpolating towards the base walks the domain loss back towards the base's, monotonically here.
    baseline = next(e for e in reference.events if e["event"] == "eval" and e["step"] == 0)
    last = next(e for e in reference.events if e["event"] == "eval" and e["step"] == STEPS)
    domain_losses = [events[n]["domainLoss"] for n in reversed(CANDIDATES[1:])]  # alpha 0.75, 0.5, 0.25
    assert last["domain_loss"] < domain_losses[0] < domain_losses[1] < domain_losses[2] < baseline["domain_loss"]


@pytest.mark.timeout(300)
def test_a_rerun_after_the_end_reuses_the_candidates(reference: Reference, s3: S3Server) -> None:
    before = {n: storage.read_bytes(f"s3://train/reference/candidates/{n}/forge-manifest.json") for n in CANDIDATES}
    results = run_ranks(reference.config, 2, reference.workdir / "rerun", env=s3.env)
    assert_ok(results)
    kinds = [e["event"] for e in results[0].events]
    assert "step" not in kinds and "candidate" not in kinds
    assert prepare_event(results[0].events)["built"] == 0
    assert sorted(e["name"] for e in results[0].events if e["event"] == "candidateReused") == CANDIDATES
    after = {n: storage.read_bytes(f"s3://train/reference/candidates/{n}/forge-manifest.json") for n in CANDIDATES}
    assert after == before
