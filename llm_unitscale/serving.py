"""Export a trained run as a TensorFlow SavedModel for TF Serving (the command: ``python -m llm_unitscale.export RUN
[OUT]``, ``cli.export_main``).

The SavedModel has one signature, ``serving_default`` (also callable as the ``serve`` function):

    input   token_ids  int32   (batch, time)   token ids from the run's vocabulary (vocab.pkl), 0 = padding
    output  logits     float32 (batch, time, vocab)  next-token logits at every position  (task "lm")
                       float32 (batch, classes)      class logits, order = config.json "labels"  (task "classify")

Softmax of the logits gives the probabilities; tokenisation stays on the client (the run's tokenizer and
vocabulary, whose config.json and vocab.pkl — and a BPE run's tokenizer.json — are copied into
``assets.extra/`` of the export). For the ``bag``
classifier the ids are its n-gram features (config.json "features": ``preprocessing.ngrams.BagOfNgrams``). Positions beyond
the run's ``seq_len`` are outside the position table: send at most ``seq_len`` tokens (time may vary per call).
The unit-scaled custom gradients play no part at inference; the export holds only the forward graph and the
weights, so loading it needs TensorFlow alone (``tf.saved_model.load``), not this package.

The export is written to a temporary folder next to ``out`` and renamed into place, so ``out`` is either the
complete SavedModel or absent. ``--overwrite`` replaces only an earlier export of ours (:func:`is_export`: its
``assets.extra/signature.json``), swapped in atomically (``files.replace_folder``); any other file or folder at
``out`` is refused. TF Serving expects numbered versions: ``python -m llm_unitscale.export
runs/default serving/llm/1``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

SIGNATURE = "serving_default"
INPUT_NAME = "token_ids"
OUTPUT_NAME = "logits"


def is_export(path: Path) -> bool:
    """Whether ``path`` is a SavedModel folder written by :func:`export_run`."""
    try:
        meta = json.loads((path / "assets.extra" / "signature.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return path.is_dir() and isinstance(meta, dict) and meta.get("signature") == SIGNATURE and "task" in meta


def export_run(run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the run's model as a SavedModel at ``out`` (default ``RUN/export``); returns the path."""
    import keras
    import tensorflow as tf

    from llm_unitscale import files
    from llm_unitscale.runs import CONFIG, TOKENIZER, VOCAB, RunError, load_run

    run = load_run(run_dir)
    target = Path(out) if out is not None else run.path / "export"
    exists = files.check_replaceable(target, is_export, "an export of llm_unitscale", "choose another output folder")
    if exists and not overwrite:
        raise RunError(f"{target}: already exists; pass --overwrite to replace it")
    model = run.model

    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(token_ids: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_NAME: tf.cast(model(token_ids, training=False), tf.float32)}

    archive.add_endpoint(
        name="serve", fn=serve, input_signature=[tf.TensorSpec((None, None), tf.int32, name=INPUT_NAME)]
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with files.writing("the export", target):
            archive.write_out(str(tmp), verbose=False)
            extra = tmp / "assets.extra"
            extra.mkdir(exist_ok=True)
            shutil.copy2(run.path / CONFIG, extra / CONFIG)
            shutil.copy2(run.path / VOCAB, extra / VOCAB)
            if (run.path / TOKENIZER).is_file():  # a BPE run's tokenizer
                shutil.copy2(run.path / TOKENIZER, extra / TOKENIZER)
            (extra / "signature.json").write_text(json.dumps({
                "signature": SIGNATURE, "inputs": {INPUT_NAME: {"dtype": "int32", "shape": [None, None]}},
                "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": [None, None, len(run.vocab)]
                                          if run.task == "lm" else [None, len(run.config["labels"])]}},
                "task": run.task, "labels": run.config.get("labels"), "max_time": run.config.get("seq_len"),
            }, indent=2))
            files.replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
