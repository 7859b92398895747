"""Text keeps its lines: a line break is the <eos> token, generation writes across lines, --stop ends it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm_unitscale import inference, prepared, runs, training
from llm_unitscale.preprocessing import Tokenizer, Vocabulary

POEM = "roses are red\nviolets are blue\n\n"


def _char_vocab(text: str) -> tuple[Tokenizer, Vocabulary]:
    tokenizer = Tokenizer(mode="char")
    return tokenizer, Vocabulary.build([tokenizer.tokenize(line) for line in text.split("\n") if line])


def test_char_mode_keeps_every_line_break_word_mode_skips_empty_lines() -> None:
    tokenizer, vocab = _char_vocab(POEM)
    ids = prepared.lm_ids(tokenizer, vocab, "ab\n\ncd\n")
    eos = vocab.eos_id
    assert list(ids) == [*vocab.encode(["a", "b"]), eos, eos, *vocab.encode(["c", "d"]), eos]
    words = Tokenizer(mode="word")
    word_vocab = Vocabulary.build([["ab", "cd"]])
    assert list(prepared.lm_ids(words, word_vocab, "ab\n\ncd\n")) == [
        word_vocab.encode(["ab"])[0], eos, word_vocab.encode(["cd"])[0], eos]


@pytest.fixture(scope="module")
def poem_run(tmp_path_factory: pytest.TempPathFactory) -> runs.Run:
    folder = tmp_path_factory.mktemp("poem")
    data = folder / "poem.txt"
    data.write_text(POEM * 120, encoding="utf-8")
    cfg = training.TrainConfig(
        data=str(data), out=str(folder / "run"), tokenizer="char", width=32, depth=1, heads=2, seq_len=32,
        batch_size=8, max_steps=150, lr=3e-2, embeddings="none", jit_compile=False, log_every=1000,
    )
    with open(folder / "log.txt", "w", encoding="utf-8") as log:
        training.train(cfg, log=log)
    return runs.load_run(folder / "run")


def test_a_prompt_may_hold_line_breaks(poem_run: runs.Run) -> None:
    ids, _ = inference.encode_prompt(poem_run, "roses are red\n")
    eos = poem_run.vocab.eos_id
    assert ids[0] == eos and ids[-1] == eos and ids.count(eos) == 2
    ids, _ = inference.encode_prompt(poem_run, "roses are red\nvio")
    assert ids[-1] != eos and ids.count(eos) == 2


def test_generation_writes_across_lines_and_stops_at_the_stop_string(poem_run: runs.Run) -> None:
    continuation = inference.generate(poem_run, "roses are red\n", 40, temperature=0)
    assert continuation.startswith("violets are blue\n\nroses"), repr(continuation)
    assert inference.generate(poem_run, "roses are red\n", 40, temperature=0, stop="\n\n") == "violets are blue"
    assert inference.generate(poem_run, "roses are red\n", 40, temperature=0, stop="\n") == "violets are blue"


def test_evaluation_scores_the_line_breaks(poem_run: runs.Run) -> None:
    from llm_unitscale import evaluation

    metrics = evaluation.evaluate_lm(poem_run, POEM * 4)
    assert metrics["tokens"] == len(POEM * 4)  # every character and every line break is a target once
    assert np.isfinite(metrics["loss"]) and metrics["accuracy"] > 0.8


def test_stop_option_understands_backslash_escapes() -> None:
    from llm_unitscale.cli import _unescape

    assert _unescape(r"\n\n") == "\n\n"
    assert _unescape(r"a\\nb") == "a\\nb"
    assert _unescape(None) is None


def test_predict_prints_a_multi_line_continuation(poem_run: runs.Run, tmp_path: Path) -> None:
    from helpers import ok_json, script

    result = ok_json(script("predict", "roses are red\n", "--model", str(poem_run.path), "--generate", "40",
                            "--temperature", "0", "--stop", r"\n\n", "--json"))
    assert result["results"][0]["continuation"] == "violets are blue"
