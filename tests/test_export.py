"""SavedModel export: reloads with tf.saved_model.load alone and gives the Keras model's logits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llm_unitscale.training import TrainConfig, train

    out = tmp_path_factory.mktemp("export") / "run"
    cfg = TrainConfig(data=str(ROOT / "data" / "dataset.txt"), out=str(out), max_steps=2, width=16, depth=1, heads=2,
                      seq_len=16, batch_size=8, embeddings="none", strategy="none", warmup_steps=1)
    train(cfg, log=io.StringIO())
    return out


def test_export_reloads_and_matches_keras_logits(tiny_run: Path, tmp_path: Path) -> None:
    import tensorflow as tf

    from llm_unitscale.runs import load_run
    from llm_unitscale.serving import INPUT_NAME, OUTPUT_NAME, SIGNATURE, export_run

    path = export_run(tiny_run, tmp_path / "serving" / "1")
    assert (path / "saved_model.pb").exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    run = load_run(tiny_run)
    ids = np.random.default_rng(0).integers(1, len(run.vocab), size=(3, 11)).astype("int32")
    expected = run.model(ids, training=False).numpy()

    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures[SIGNATURE]
    assert list(signature.structured_input_signature[1]) == [INPUT_NAME]
    got = signature(**{INPUT_NAME: tf.constant(ids)})[OUTPUT_NAME].numpy()
    assert got.shape == (3, 11, len(run.vocab))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loaded.serve(tf.constant(ids[:1, :5]))[OUTPUT_NAME].numpy(),
                               run.model(ids[:1, :5], training=False).numpy(), rtol=1e-5, atol=1e-5)
    meta = json.loads((path / "assets.extra" / "signature.json").read_text())
    assert meta["task"] == "lm" and meta["outputs"][OUTPUT_NAME]["shape"][-1] == len(run.vocab)


def test_export_command(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llm_unitscale.export import main

    target = tmp_path / "exported"
    assert main([str(tiny_run), str(target), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["export"] == str(target) and (target / "saved_model.pb").exists()
    assert main([str(tiny_run), str(target)]) == 2  # exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([str(tiny_run), str(target), "--overwrite"]) == 0
    assert main([str(tmp_path / "no_such_run"), str(tmp_path / "x")]) == 2
