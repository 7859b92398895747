"""Run folders: atomic writes while training, and loading a finished run for predict/evaluate (DESIGN §5).

A run is trained inside ``runs/.NAME.partial/`` (checkpoints and logs live there, so ``--resume`` can pick it
up after a crash) and renamed to ``runs/NAME`` only when every artifact is written: a reader sees either the
old run or the complete new one, never half of one. Single files are written to a temporary name in the same
folder and renamed (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG, VOCAB, MODEL, EMBEDDINGS = "config.json", "vocab.pkl", "model.keras", "embeddings.kv"
HISTORY, METRICS, PLOT, VALIDATION = "history.json", "metrics.json", "training.png", "validation.txt"
REQUIRED = (CONFIG, VOCAB, MODEL)


class RunError(ValueError):
    """A problem with a run folder or one of its files: ``"PATH: problem"``."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def atomic_save_model(model: Any, path: str | os.PathLike) -> None:
    """``model.save`` to a temporary ``.keras`` name, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a run named ``out`` is trained before it is complete."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def publish(work: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``work`` folder to ``out``, replacing an earlier run only when ``overwrite``."""
    if out.exists():
        if not overwrite:
            raise RunError(f"{out}: a run already exists here; pass --overwrite to replace it or --resume")
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)


@dataclass
class Run:
    """A loaded run: its folder, config, tokenizer, vocabulary and Keras model."""

    path: Path
    config: dict
    tokenizer: Any
    vocab: Any
    model: Any

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def labels(self) -> list[str]:
        return list(self.config.get("labels") or [])

    @property
    def seq_len(self) -> int:
        return int(self.config["seq_len"])


def load_config(path: str | os.PathLike) -> dict:
    folder = Path(path)
    if not folder.exists():
        raise RunError(f"{folder}: no such run folder (train one with train.py --out {folder})")
    if not folder.is_dir():
        raise RunError(f"{folder}: not a run folder")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise RunError(f"{folder}: incomplete run folder, missing {', '.join(missing)}")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{folder / CONFIG}: unreadable config ({exc})") from exc
    if not isinstance(config, dict) or config.get("task") not in ("lm", "classify"):
        raise RunError(f"{folder / CONFIG}: not a llm_unitscale run config (no valid 'task')")
    return config


def load_run(path: str | os.PathLike) -> Run:
    """Load a run folder; every problem is a one-line :class:`RunError` naming the file."""
    import keras

    import llm_unitscale  # noqa: F401  (registers the custom layers before load_model)
    from llm_unitscale.preprocessing import Tokenizer, Vocabulary

    folder = Path(path)
    config = load_config(folder)
    tokenizer = Tokenizer.from_config(config["tokenizer"])
    vocab = Vocabulary.load(folder / VOCAB)
    if not zipfile.is_zipfile(folder / MODEL):
        raise RunError(f"{folder / MODEL}: not a Keras model file (not a zip archive: truncated or corrupt?)")
    try:
        model = keras.models.load_model(folder / MODEL, compile=False)
    except Exception as exc:  # a corrupt zip, a wrong file, missing layer classes: all say the same to a user
        raise RunError(f"{folder / MODEL}: cannot load the model ({type(exc).__name__}: {_first_line(exc)})") from exc
    if int(model.outputs[0].shape[-1]) != (len(vocab) if config["task"] == "lm" else len(config["labels"])):
        raise RunError(f"{folder / MODEL}: the model's output size does not match {VOCAB} / the labels")
    return Run(folder, config, tokenizer, vocab, model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
