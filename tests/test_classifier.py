"""The text classifier's pieces: n-gram features, the wordpunct tokenizer, calibration (ECE, temperature
scaling), and a default run end to end (bag model, per-batch padding, calibrated probabilities, ECE)."""

from __future__ import annotations

import io
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from llm_unitscale import calibration, training
from llm_unitscale.preprocessing import Tokenizer, Vocabulary
from llm_unitscale.preprocessing.ngrams import BagOfNgrams


def naive_features(tokens: list[str], vocab: Vocabulary, bag: BagOfNgrams) -> list[int]:
    """The bag of a text written out directly from the module docstring's definition."""
    out = [vocab.token_to_id(t) for t in tokens if vocab.token_to_id(t) >= 4]
    hashes = [zlib.crc32(t.encode()) for t in tokens]
    for n in range(2, bag.word_ngrams + 1):
        for i in range(len(tokens) - n + 1):
            h = hashes[i]
            for j in range(1, n):
                h = (h * 116049371 + hashes[i + j]) % 2**64
            out.append(bag.vocab_size + h % bag.buckets)
    for t in tokens:
        marked = f"<{t}>"
        if len(t) > 1:
            out += [bag.vocab_size + zlib.crc32(marked[i : i + n].encode()) % bag.buckets
                    for n in range(bag.char_min, min(bag.char_max, len(marked) - 1) + 1)
                    for i in range(len(marked) - n + 1)]
    return out


def test_bag_of_ngrams_matches_its_definition() -> None:
    lines = [["the", "cat", "sat"], [], ["a", "cat", "!", "ate", "the", "unknownword"], ["我", "喜", "欢"]]
    vocab = Vocabulary.build([["the", "cat", "sat", "a", "!", "ate", "我", "喜", "欢"]])
    bag = BagOfNgrams(len(vocab), buckets=97, word_ngrams=3, char_min=2, char_max=4)
    encoded = bag.encode(lines, vocab)
    assert [row.dtype for row in encoded] == [np.int32] * 4 and len(encoded[1]) == 0
    for tokens, row in zip(lines, encoded, strict=True):
        assert sorted(row.tolist()) == sorted(naive_features(tokens, vocab, bag))
        assert row.min(initial=bag.num_features) >= 4 and row.max(initial=0) < bag.num_features
    words = encoded[0][:3].tolist()
    assert words == vocab.encode(["the", "cat", "sat"])  # words first, in text order
    assert bag.encode([["unknownword"]], vocab)[0].min() >= bag.vocab_size  # unknown word: only its n-grams
    assert BagOfNgrams.from_config(bag.get_config()) == bag


def test_bag_of_ngrams_caps_the_features_of_a_text() -> None:
    vocab = Vocabulary.build([["word"]])
    bag = BagOfNgrams(len(vocab), buckets=10, max_features=7)
    assert len(bag.encode([["word"] * 50], vocab)[0]) == 7


def test_wordpunct_tokenizer_splits_cjk_characters_and_keeps_words() -> None:
    tokenizer = Tokenizer("wordpunct", lowercase=True)
    assert tokenizer.tokenize("Don't stop!!! 我喜欢CBD酒店，338元。") == [
        "don", "'", "t", "stop", "!!!", "我", "喜", "欢", "cbd", "酒", "店", "，", "338", "元", "。"]
    assert Tokenizer.from_config(tokenizer.get_config()) == tokenizer


def test_expected_calibration_error_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # bins: {0.9, 0.9} accuracy 1/2 → |0.5 − 0.9| · 2/4; {0.6} right → 0.4 · 1/4; {0.7} right → 0.3 · 1/4
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(0.2 + 0.1 + 0.075)
    assert calibration.expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0


def test_temperature_scaling_fixes_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 4000)
    logits = rng.normal(size=(4000, 3))
    logits[np.arange(4000), labels] += 1.0  # right 60-70 % of the time
    sharp = 5.0 * logits  # the same predictions, far too sure
    temperature = calibration.fit_temperature(sharp, labels)
    assert temperature == pytest.approx(5.0, rel=0.15)
    before = calibration.expected_calibration_error(np.exp(calibration.log_softmax(sharp)), labels)
    after = calibration.expected_calibration_error(np.exp(calibration.log_softmax(sharp / temperature)), labels)
    assert before > 0.2 and after < 0.03
    assert calibration.nll(sharp / temperature, labels) < calibration.nll(sharp, labels)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default classifier (bag, unit-scaled) on 600 lines of two easy topics, English and Chinese."""
    folder = tmp_path_factory.mktemp("bag")
    rng = np.random.default_rng(0)
    sport = ["match", "goal", "team", "coach", "season", "比赛", "球队"]
    money = ["market", "shares", "profit", "bank", "price", "股市", "银行"]
    filler = ["the", "a", "of", "and", "today", "new", "这个", "今天"]
    lines = []
    for i in range(600):
        topic, words = ("sport", sport) if i % 2 else ("money", money)
        text = " ".join(rng.choice(words, 3).tolist() + rng.choice(filler, int(rng.integers(2, 30))).tolist())
        lines.append(f"__label__{topic} {text.capitalize()}")
    data = folder / "topics.txt"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = training.train(training.TrainConfig(data=str(data), out=str(folder / "run"), epochs=3,
                                                  buckets=2000, width=16), log=io.StringIO())
    return folder / "run", summary


def test_default_classifier_learns_and_says_where_its_weights_come_from(classifier_run: tuple[Path, dict]) -> None:
    run, summary = classifier_run
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "bag" and config["tokenizer"]["mode"] == "wordpunct" and config["lowercase"]
    assert config["features"]["buckets"] == 2000 and config["jit_compile"] is False
    assert summary["val_accuracy"] > 0.95
    assert {"best_step", "best_epoch", "stopped", "stop_reason", "temperature", "val_ece"} <= set(summary)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_step"] == summary["best_step"] and 0.0 < metrics["temperature"] < 20.0


def test_classifier_evaluation_reports_the_calibration_error(classifier_run: tuple[Path, dict]) -> None:
    from llm_unitscale import evaluation
    from llm_unitscale.inference import classify
    from llm_unitscale.runs import load_run

    run = load_run(classifier_run[0])
    metrics = evaluation.evaluate_classify(run, (run.path / "validation.txt").read_text().split("\n"))
    assert metrics["accuracy"] > 0.95 and 0.0 <= metrics["ece"] < 0.2
    assert metrics["ece"] == pytest.approx(classifier_run[1]["val_ece"], abs=1e-6)  # the same split, same model
    (result,) = classify(run, ["The TEAM won the match"], top_k=2)
    assert result["label"] == "sport" and math.isclose(sum(t["prob"] for t in result["top"]), 1.0, rel_tol=1e-6)
    (unknown,) = classify(run, ["zzzz qqqq"])  # nothing known: close to the class prior, not certain
    assert unknown["prob"] < 0.9
