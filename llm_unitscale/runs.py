"""Run folders: atomic writes while training, and loading a finished run for predict/evaluate (DESIGN §5).

A run is trained inside ``runs/.NAME.partial/`` (checkpoints and logs live there, so ``--resume`` can pick it
up after a crash) and renamed to ``runs/NAME`` only when every artifact is written: a reader sees either the
old run or the complete new one, never half of one (``run_writer.RunWriter`` claims, locks and publishes it).
Single files are written to a temporary name in the same folder and renamed (``files.atomic_write_bytes``;
``os.replace`` is atomic on POSIX); a write that fails for lack of space becomes a one-line
``files.WriteError`` naming the file.

Every run folder carries :data:`MARKER`, by which :func:`is_run_folder` tells our runs — which ``--overwrite``
may replace — from anything else. ``config.json`` and ``vocab.pkl`` larger than :data:`MAX_CONFIG_BYTES` /
``vocabulary.MAX_VOCAB_BYTES`` are refused before they are read.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_unitscale import files

CONFIG, VOCAB, MODEL, EMBEDDINGS = "config.json", "vocab.pkl", "model.keras", "embeddings.kv"
HISTORY, METRICS, PLOT, VALIDATION = "history.json", "metrics.json", "training.png", "validation.txt"
#: A BPE run's tokenizer (the ``tokenizers`` library's JSON; ``preprocessing.bpe``).
TOKENIZER = "tokenizer.json"
REQUIRED = (CONFIG, VOCAB, MODEL)
#: The file that marks a folder as a run of ours (also in ``.NAME.partial/`` from its first moment).
MARKER = ".llm_unitscale"
#: A config.json holds options, labels and versions: kilobytes. Larger is not ours (refused unread).
MAX_CONFIG_BYTES = 16 * 1024 * 1024


class RunError(ValueError):
    """A problem with a run folder or one of its files: ``"PATH: problem"``."""


def atomic_save_model(model: Any, path: str | os.PathLike) -> None:
    """``model.save`` to a temporary ``.keras`` name, then rename.

    For a local path Keras writes the zip through Python's own file object and builds the archive's HDF5
    weights in memory (unless they exceed half the free memory), so a full disk fails in Python's I/O — one
    ``OSError``, then nothing more — not inside h5py, whose failed files write again when they are collected
    (that crashed the process once a disk was full)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    with files.writing(path.name, path):
        try:
            model.save(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically (marked as ours: ``files.png_metadata``) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        with files.writing(path.name, path):
            fig.savefig(tmp, dpi=100, format="png", metadata=files.png_metadata())
            os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a run named ``out`` is trained before it is complete."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def write_marker(folder: Path) -> None:
    """Mark ``folder`` as a run of ours (:func:`is_run_folder`)."""
    from llm_unitscale import __version__

    files.atomic_write_bytes(folder / MARKER, f"a run folder of llm_unitscale {__version__}; train.py --overwrite may "
                       "replace it\n".encode())


def _config_is_ours(path: Path) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return False
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("task") in ("lm", "classify")
            and isinstance(config.get("versions"), dict) and "llm_unitscale" in config["versions"])


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run folder (finished or interrupted) written by train.py: a real folder (not a
    link) holding :data:`MARKER`, or — runs from before the marker — a config.json with our task and versions,
    or an interrupted run's checkpoint state."""
    folder = Path(path)
    if folder.is_symlink() or not folder.is_dir():
        return False
    return ((folder / MARKER).is_file() or _config_is_ours(folder / CONFIG)
            or (folder / "checkpoints" / "state.json").is_file())


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
    """The run's config.json (stat first: a link loop, a huge or a foreign file is refused unread)."""
    folder = Path(path)
    if os.path.islink(folder) and not folder.exists():
        raise RunError(f"{folder}: {files.input_problem(folder)}")
    if not folder.exists():
        raise RunError(f"{folder}: no such run folder (train one with train.py --out {folder})")
    if not folder.is_dir():
        raise RunError(f"{folder}: not a run folder")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise RunError(f"{folder}: incomplete run folder, missing {', '.join(missing)}")
    problem = files.input_problem(folder / CONFIG, MAX_CONFIG_BYTES, "run config")
    if problem:
        raise RunError(f"{folder / CONFIG}: {problem}")
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
    if isinstance(config.get("tokenizer"), dict) and config["tokenizer"].get("mode") == "bpe":
        from llm_unitscale.preprocessing.bpe import BpeTokenizer

        tokenizer = BpeTokenizer.load(folder / TOKENIZER, config["tokenizer"])
    else:
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
    if config.get("precision") == "fp8":
        _restore_fp8_policy(model)
    return Run(folder, config, tokenizer, vocab, model)


def _restore_fp8_policy(model: Any) -> None:
    """A run trained in fp8 computes in simulated FP8 when loaded: its layers carry
    :class:`~llm_unitscale.precision.SimulatedFP8Policy` in ``model.keras``; runs saved before that policy
    existed get it here from their ``config.json``."""
    from llm_unitscale import precision

    if not precision.model_uses_fp8(model):
        for layer in model._flatten_layers(include_self=True):
            layer.dtype_policy = precision.SimulatedFP8Policy()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
