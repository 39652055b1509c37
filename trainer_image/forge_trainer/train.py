"""Entry point: ``forge-trainer --config PATH`` (the pod command) and ``forge-trainer export ...``.

Exit codes: 0 done; permanent (not retried): 1 unexpected error, 2 config, 3 data, 4 model, 5 storage refused,
6 distributed environment, 10 stopped early on purpose by the guard; retryable: 200 storage unavailable after the
retries, 201 another rank was lost. See docs/trainer.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from forge_trainer.errors import (
    EXIT_EARLY_STOP,
    EXIT_OK,
    EXIT_UNEXPECTED,
    EarlyStopError,
    ForgeError,
    PeerLostError,
)
from forge_trainer.report import report_exit_error

if TYPE_CHECKING:
    from forge_trainer.config import TrainerConfig


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=os.environ.get("FORGE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_notices()


def _quiet_notices() -> None:
    """Keep the replica logs to what a user can act on: DeepSpeed's "no GPU detected, using the CPU" warning (on a
    CPU run, where that is the point) and a deprecation inside DeepSpeed's own collectives are not."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge-trainer", description="Forge mixed-data DeepSpeed trainer.")
    p.add_argument("--config", required=True, help="trainer config JSON (rendered by the Forge operator)")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge-trainer export", description="Export a checkpoint to a HF folder.")
    p.add_argument("--config", required=True, help="the run's trainer config (for the base model and technique)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (.../step-NNNNNNNN)")
    p.add_argument("--out", required=True, type=Path, help="destination folder (safetensors + tokenizer)")
    return p


def export_checkpoint(config_path: str, checkpoint: str, out: Path) -> None:
    """Write a Hugging Face folder from a complete checkpoint (local folder, or URI copied to a temp folder)."""
    from forge_trainer import checkpoint as ckpt
    from forge_trainer import storage
    from forge_trainer.config import load_config
    from forge_trainer.errors import StorageError
    from forge_trainer.hf_export import write_hf_folder
    from forge_trainer.model import fetch_model, load_tokenizer

    cfg = load_config(config_path)
    manifest = ckpt.read_manifest(checkpoint)
    if manifest is None:
        raise StorageError(f"{checkpoint}: not a complete checkpoint (no {ckpt.MANIFEST})")
    if not ckpt.is_resumable(manifest):
        # The output retention kept only this checkpoint's hf/ export (weights, config, tokenizer): that is the export.
        prefix = ckpt.HF_DIR + "/"
        for f in manifest["files"]:
            if f["path"].startswith(prefix):
                storage.download(storage.join(checkpoint, f["path"]), out / f["path"][len(prefix) :])
        return
    with tempfile.TemporaryDirectory(prefix="forge-export-") as tmp:
        parent = checkpoint.rstrip("/").rsplit("/", 1)[0]
        if not storage.is_s3(checkpoint) and Path(checkpoint).is_dir():
            tag_dir = Path(checkpoint)
        else:
            tag_dir = ckpt.materialise(ckpt.Places(Path(tmp), parent), manifest)
        # consolidated lazily: each tensor is gathered from the ZeRO shards (memory-mapped) as it is written
        sd = ckpt.zero_state_dict(tag_dir, int(manifest["zeroStage"]), manifest.get("technique") == "lora")
        model_dir = fetch_model(cfg.model.base, Path(tmp) / "base-model")
        write_hf_folder(sd, model_dir, cfg.model, out, load_tokenizer(model_dir))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer (or the export command); returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    log = logging.getLogger("forge_trainer")
    cfg: TrainerConfig | None = None
    try:
        if args[:1] == ["export"]:
            ea = _export_parser().parse_args(args[1:])
            export_checkpoint(ea.config, ea.checkpoint, ea.out)
            return EXIT_OK
        a = _parser().parse_args(args)
        from forge_trainer.config import load_config
        from forge_trainer.launch import from_trainer_v2, maybe_launch

        os.environ.update(from_trainer_v2(os.environ))
        cfg = load_config(a.config)
        code = maybe_launch(args)
        if code is not None:
            return code
        from forge_trainer.loop import run

        run(cfg)
        return EXIT_OK
    except ForgeError as err:
        level = logging.WARNING if err.exit_code == EXIT_EARLY_STOP else logging.ERROR
        log.log(level, "%s: %s", type(err).__name__, err)
        if not isinstance(err, EarlyStopError | PeerLostError):  # the guard reported its stop; a peer is no cause
            report_exit_error(cfg, err, err.exit_code)
        return err.exit_code
    except Exception as err:
        log.exception("unexpected error")
        report_exit_error(cfg, err, EXIT_UNEXPECTED)
        return EXIT_UNEXPECTED


def entry() -> None:
    """Console-script entry point.

    The process ends with os._exit, whatever the outcome: the run has already made durable what it could (a
    checkpoint is complete only once its manifest is written) and left the process group, and a crash in interpreter
    teardown (C++ threads of the communication libraries being destroyed, seen as SIGABRT on CPU after both a
    finished run and a data error) must not replace the run's own exit code.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
