"""The Python API (``llm_unitscale.hub``): build → fit on raw strings → generate / predict → save_to_run → from_run in
a fresh process → the same outputs; and the run folders it writes are the scripts' run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gensim.test.utils import datapath
from helpers import ROOT, TINY, ok_json, script

pytest.importorskip("keras_hub")

#: Builds and fits a small character model on raw lines of lee_background, generates with two samplers, saves
#: the run; prints the generations as JSON.
_LM_BUILD = """
import json, sys
import keras, keras_hub
import llm_unitscale as lu
from llm_unitscale.preprocessing import Tokenizer, Vocabulary
keras.utils.set_random_seed(0)
lines = [l for l in open(sys.argv[1], encoding="utf-8").read().splitlines() if l.strip()][:300]
tokenizer = Tokenizer("char")
vocab = Vocabulary.build([tokenizer.tokenize(line) for line in lines])
preprocessor = lu.CausalLMPreprocessor(lu.UnitTokenizer.of(tokenizer, vocab), sequence_length=32)
backbone = lu.UnitBackbone(vocabulary_size=len(vocab), sequence_length=32, hidden_dim=32, num_layers=1, num_heads=2)
lm = lu.CausalLM(backbone, preprocessor)
lm.compile(sampler="greedy")
history = lm.fit(lines, batch_size=16, epochs=2, verbose=0)
greedy = lm.generate(["The ", "A man said"], max_length=28)
lm.compile(sampler=keras_hub.samplers.TopPSampler(p=0.9, seed=7))
top_p = lm.generate(["The "], max_length=28)
lm.save_to_run(sys.argv[2])
print(json.dumps({"loss": history.history["loss"], "greedy": greedy, "top_p": top_p}))
"""

#: Loads the run in a new process and generates again.
_LM_LOAD = """
import json, sys
import keras_hub
import llm_unitscale as lu
lm = lu.CausalLM.from_run(sys.argv[1])
lm.compile(sampler="greedy")
greedy = lm.generate(["The ", "A man said"], max_length=28)
lm.compile(sampler=keras_hub.samplers.TopPSampler(p=0.9, seed=7))
top_p = lm.generate(["The "], max_length=28)
lm.save_to_preset(sys.argv[2])  # and through a KerasHub preset folder
from_preset = lu.CausalLM.from_preset(sys.argv[2])
from_preset.compile(sampler="greedy")
print(json.dumps({"greedy": greedy, "top_p": top_p, "preset": from_preset.generate(["The ", "A man said"], max_length=28)}))
"""

_CLASSIFIER_BUILD = """
import json, sys
import keras, numpy as np
import llm_unitscale as lu
from llm_unitscale.preprocessing import Tokenizer, Vocabulary
from llm_unitscale.preprocessing.ngrams import BagOfNgrams
keras.utils.set_random_seed(0)
rows = [l.split(" ", 1) for l in open(sys.argv[1], encoding="latin-1").read().splitlines() if l.strip()]
labels = sorted({label for label, _ in rows})
texts, y = [text for _, text in rows], np.array([labels.index(label) for label, _ in rows])
tokenizer = Tokenizer("wordpunct", lowercase=True)
vocab = Vocabulary.build([tokenizer.tokenize(t) for t in texts])
features = BagOfNgrams(len(vocab), buckets=2000)
preprocessor = lu.TextClassifierPreprocessor(lu.UnitTokenizer.of(tokenizer, vocab), labels, sequence_length=200,
                                             features=features.get_config())
backbone = lu.UnitBackbone(vocabulary_size=features.num_features, task="classify", arch="bag", hidden_dim=16,
                           num_classes=len(labels))
classifier = lu.TextClassifier(backbone, preprocessor=preprocessor)
classifier.compile()
history = classifier.fit(texts, y, batch_size=32, epochs=15, verbose=0)
probs = classifier.predict(texts[:8], verbose=0)
classifier.save_to_run(sys.argv[2])
print(json.dumps({"loss": history.history["loss"], "probs": probs.tolist(), "texts": texts[:8],
                  "labels": classifier.labels, "accuracy": float(np.mean(
                      classifier.predict(texts, verbose=0).argmax(-1) == y))}))
"""

_CLASSIFIER_LOAD = """
import json, sys
import llm_unitscale as lu
classifier = lu.TextClassifier.from_run(sys.argv[1])
texts = json.loads(sys.argv[2])
classifier.save_to_preset(sys.argv[3])  # and through a KerasHub preset folder
from_preset = lu.TextClassifier.from_preset(sys.argv[3])
print(json.dumps({"probs": classifier.predict(texts, verbose=0).tolist(), "labels": classifier.labels,
                  "preset_probs": from_preset.predict(texts, verbose=0).tolist(), "preset_labels": from_preset.labels}))
"""


def _python(program: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", program, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_causal_lm_fits_generates_and_round_trips_through_a_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "lm"
    built = _python(_LM_BUILD, datapath("lee_background.cor"), str(run))
    assert built["loss"][1] < built["loss"][0]  # fit on raw strings learns
    assert len(built["greedy"]) == 2 and built["greedy"][0].startswith("The ")
    assert built["greedy"][1].startswith("A man said")
    assert len(built["greedy"][0]) > len("The ")  # something was generated
    loaded = _python(_LM_LOAD, str(run), str(tmp_path / "lm_preset"))
    assert loaded == {"greedy": built["greedy"], "top_p": built["top_p"], "preset": built["greedy"]}
    assert (tmp_path / "lm_preset" / "tokenizer.json").is_file()

    # the folder is a run of the scripts: predict.py's greedy continuation is the API's greedy generation
    out = ok_json(script("predict", "The ", "--model", str(run), "--generate", "23", "--temperature", "0", "--json"))
    assert "The " + out["results"][0]["continuation"] == built["greedy"][0]


def test_text_classifier_fits_predicts_probabilities_and_round_trips(tmp_path: Path) -> None:
    run = tmp_path / "classifier"
    built = _python(_CLASSIFIER_BUILD, datapath("pang_lee_polarity.cor"), str(run))
    assert built["loss"][-1] < built["loss"][0]
    probs = np.array(built["probs"])
    assert probs.shape == (8, len(built["labels"])) and np.allclose(probs.sum(-1), 1.0) and (probs >= 0).all()
    assert built["accuracy"] > 0.8  # fits its own training lines
    loaded = _python(_CLASSIFIER_LOAD, str(run), json.dumps(built["texts"]), str(tmp_path / "classifier_preset"))
    assert loaded["labels"] == loaded["preset_labels"] == built["labels"]
    np.testing.assert_allclose(loaded["probs"], probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded["preset_probs"], probs, rtol=1e-5, atol=1e-6)

    out = ok_json(script("predict", built["texts"][0], "--model", str(run), "--json"))
    best = int(np.argmax(probs[0]))
    assert out["results"][0]["label"] == built["labels"][best]
    assert out["results"][0]["prob"] == pytest.approx(probs[0, best], rel=1e-4)


def test_from_run_loads_a_train_py_run_and_generates_what_predict_py_does(tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text("the cat sat on the mat .\nthe dog lay on the rug .\n" * 60, encoding="utf-8")
    run = tmp_path / "run"
    ok_json(script("train", str(data), "--out", str(run), "--max-steps", "60", "--json", *TINY))
    program = ("import json, sys\nimport llm_unitscale as lu\nlm = lu.CausalLM.from_run(sys.argv[1])\n"
               "lm.compile(sampler='greedy')\nprint(json.dumps(lm.generate(['the cat'], max_length=12)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", program, str(run)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    generated = json.loads(done.stdout.strip().splitlines()[-1])[0]
    # <eos> + "the cat" = 3 tokens, 9 more: predict.py's greedy continuation of 9 words
    out = ok_json(script("predict", "the cat", "--model", str(run), "--generate", "9", "--temperature", "0", "--json"))
    from llm_unitscale.preprocessing import Tokenizer

    words = Tokenizer("word")
    assert words.tokenize(generated) == words.tokenize("the cat " + out["results"][0]["continuation"])


def test_backbone_config_round_trip_keeps_the_network() -> None:
    import keras

    import llm_unitscale as lu

    backbone = lu.UnitBackbone(vocabulary_size=50, sequence_length=16, hidden_dim=16, num_layers=2, num_heads=2,
                               model_options={"attention_rule": "norm"})
    again = lu.UnitBackbone.from_config(backbone.get_config())
    rules = {layer.attention.attention_rule for layer in again.layers if hasattr(layer, "attention")}
    assert rules == {"norm"}
    assert [w.shape for w in again.weights] == [w.shape for w in backbone.weights]
    ids = keras.ops.convert_to_tensor(np.array([[3, 5, 6, 0]], np.int32))
    out = backbone({"token_ids": ids, "padding_mask": ids != 0})
    assert tuple(out.shape) == (1, 4, 16)


def test_stock_twin_backbone_generates_with_the_cache(tmp_path: Path) -> None:
    import keras

    import llm_unitscale as lu
    from llm_unitscale.prepared import lm_text
    from llm_unitscale.preprocessing import Tokenizer, Vocabulary

    keras.utils.set_random_seed(0)
    tokenizer = Tokenizer("char")
    vocab = Vocabulary.build([list("hello world")])
    preprocessor = lu.CausalLMPreprocessor(lu.UnitTokenizer.of(tokenizer, vocab), sequence_length=16)
    backbone = lu.UnitBackbone(vocabulary_size=len(vocab), sequence_length=16, hidden_dim=16, num_layers=1,
                               num_heads=2, unit_scaling=False)
    lm = lu.CausalLM(backbone, preprocessor)
    lm.compile(sampler="greedy")
    out = lm.generate("hel", max_length=10)
    assert out.startswith("hel") and len(out) == len("hel") + 10 - 4  # max_length counts <eos> + "hel"
    # the generated ids are the uncached greedy continuation of the same network
    ids = [vocab.eos_id, *vocab.encode(list("hel"))]
    for _ in range(10 - 4):
        logits = np.array(lm.network(np.array([ids], np.int32)))[0, -1]
        logits[[0, 1, 2]] = -np.inf
        ids.append(int(np.argmax(logits)))
    assert out == lm_text(tokenizer, vocab, ids[1:])
