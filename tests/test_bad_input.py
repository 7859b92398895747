"""Bad input through the real scripts: one clear line on stderr naming the file and the problem, exit status 2,
and earlier results left intact. The table's cases run one after the other in one child process, each through
the function the root script calls (``helpers.scripts_in_one_process``); test_cli.py runs whole scripts."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import TINY, ok_json, one_line_error, script, scripts_in_one_process, scripts_in_parallel


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm")
    data = folder / "rep.txt"
    data.write_text("the cat sat on the mat .\nthe dog lay on the rug .\n" * 60, encoding="utf-8")
    ok_json(script("train", str(data), "--out", str(folder / "run"), "--max-steps", "5", "--json", *TINY))
    return folder / "run"


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cls")
    data = folder / "labels.txt"
    data.write_text("__label__pos a fine and lovely film\n__label__neg a dull and silly film\n" * 40, encoding="utf-8")
    ok_json(script("train", str(data), "--out", str(folder / "run"), "--arch", "cnn", "--epochs", "1", "--json",
                   *TINY))
    return folder / "run"


def broken_copy(run: Path, folder: Path, name: str, damage: str) -> Path:
    """A copy of ``run`` with one file removed, truncated, replaced by garbage or by a wrong-version vocab."""
    copy = folder / f"{name}-{damage}"
    shutil.copytree(run, copy)
    target = copy / name
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "garbage":
        target.write_bytes(b"this is not a zip file\n" * 10)
    elif damage == "version":
        document = pickle.loads(target.read_bytes())  # our own trusted file, written by this test's fixture
        target.write_bytes(pickle.dumps({**document, "version": 99}))
    return copy


# (case, expected words in the one-line error); the calls are built in `results` below.
TRAIN_CASES = {
    "missing file": ["missing.txt", "no such file"],
    "directory": ["is a directory"],
    "empty file": ["empty.txt", "empty"],
    "whitespace only": ["blank.txt", "only whitespace"],
    "binary file": ["binary.bin", "binary", "NUL byte at line 2"],
    "invalid utf-8": ["latin1.txt", "invalid utf-8 at line 3", "--errors replace"],
    "shorter than one window": ["short.txt", "too short", "--seq-len"],
    "only punctuation": ["punct.txt", "no words"],
    "one class": ["oneclass.txt", "at least 2 labels"],
    "labelled and plain lines mixed": ["mixed.txt", "cannot tell the task", "--task"],
    "seq-len 0": ["--seq-len must be a positive integer, got 0"],
    "negative width": ["--width must be a positive integer, got -3"],
    "absurd seq-len": ["--seq-len 100000000 is too large"],
    "existing run without --resume": ["a run already exists here", "--overwrite"],
    "--resume of a finished run": ["nothing to resume"],
    "unwritable --out": ["cannot write the run folder", "a-file is a file, not a folder"],
}
PREDICT_CASES = {
    "no such run": ["no-such-run", "no such run folder"],
    "run missing vocab.pkl": ["vocab.pkl", "missing"],
    "corrupt model.keras": ["model.keras", "not a Keras model file"],
    "truncated vocab.pkl": ["vocab.pkl"],
    "vocab from another format version": ["vocab.pkl", "incompatible version 99"],
    "empty sentence": ["empty input sentence"],
    "evaluate: missing test file": ["nothere.txt", "no such file"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, lm_run: Path) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("bad")

    def file(name: str, content: str | bytes) -> str:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    count = iter(range(100))

    def out() -> tuple[str, str]:  # a separate run folder per case: the cases run at the same time
        return "--out", str(tmp / f"out{next(count)}")

    blocker = file("a-file", "x")  # a regular file where the run folder's parent should be
    calls: dict[str, tuple[str, ...]] = {
        "missing file": ("train", str(tmp / "missing.txt"), *out()),
        "directory": ("train", str(tmp), *out()),
        "empty file": ("train", file("empty.txt", ""), *out()),
        "whitespace only": ("train", file("blank.txt", "  \n\t\n\n"), *out()),
        "binary file": ("train", file("binary.bin", b"header\n\x00\x01\x02\x03" * 20), *out()),
        "invalid utf-8": ("train", file("latin1.txt", "one\ntwo\ncaf\xe9 au lait\n".encode("latin-1")), *out()),
        "shorter than one window": ("train", file("short.txt", "a few words only\n"), *out()),
        "only punctuation": ("train", file("punct.txt", "!!! ??? ... --- ,,,\n" * 200), *out()),
        "one class": ("train", file("oneclass.txt", "__label__pos good film\n" * 50), *out()),
        "labelled and plain lines mixed": ("train", file("mixed.txt", "__label__pos good\nplain text here\n" * 30),
                                           *out()),
        "seq-len 0": ("train", file("ok.txt", "the cat sat on the mat .\n" * 100), "--seq-len", "0", *out()),
        "negative width": ("train", str(tmp / "ok.txt"), "--width", "-3", *out()),
        "absurd seq-len": ("train", str(tmp / "ok.txt"), "--seq-len", "100000000", *out()),
        "existing run without --resume": ("train", str(tmp / "ok.txt"), "--out", str(lm_run)),
        "--resume of a finished run": ("train", str(tmp / "ok.txt"), "--out", str(lm_run), "--resume", *TINY),
        "unwritable --out": ("train", str(tmp / "ok.txt"), "--out", f"{blocker}/run"),
        "no such run": ("predict", "the cat", "--model", str(tmp / "no-such-run")),
        "run missing vocab.pkl": ("predict", "the cat", "--model", str(broken_copy(lm_run, tmp, "vocab.pkl",
                                                                                   "missing"))),
        "corrupt model.keras": ("predict", "the cat", "--model", str(broken_copy(lm_run, tmp, "model.keras",
                                                                                 "garbage"))),
        "truncated vocab.pkl": ("evaluate", "--model", str(broken_copy(lm_run, tmp, "vocab.pkl", "truncated"))),
        "vocab from another format version": ("predict", "the cat", "--model",
                                              str(broken_copy(lm_run, tmp, "vocab.pkl", "version"))),
        "empty sentence": ("predict", "", "--model", str(lm_run)),
        "evaluate: missing test file": ("evaluate", str(tmp / "nothere.txt"), "--model", str(lm_run)),
    }
    return scripts_in_one_process(calls)


@pytest.mark.parametrize("case", list(TRAIN_CASES) + list(PREDICT_CASES))
def test_bad_input_gives_one_line_and_status_2(case: str, results: dict[str, subprocess.CompletedProcess]) -> None:
    line = one_line_error(results[case])
    assert line.startswith("error: ")
    for words in {**TRAIN_CASES, **PREDICT_CASES}[case]:
        assert words in line, (words, line)


def test_a_refused_run_leaves_the_earlier_run_intact(results: dict, lm_run: Path) -> None:
    assert results["existing run without --resume"].returncode == 2
    assert json.loads((lm_run / "metrics.json").read_text())["task"] == "lm"
    assert (lm_run / "model.keras").stat().st_size > 0 and (lm_run / "vocab.pkl").stat().st_size > 0


def test_odd_but_valid_input_is_answered_with_a_note(lm_run: Path, classifier_run: Path, tmp_path: Path) -> None:
    unknown, long_input = "zzzz qqqq", "the cat sat on the mat . " * 20
    test = tmp_path / "test.txt"
    test.write_text("__label__pos a fine film\n__label__neutral a film\n__label__meh a film\n", encoding="utf-8")
    calls = {
        "unknown": ("predict", unknown, "--model", str(lm_run), "--json"),
        "long": ("predict", long_input, "--model", str(lm_run), "--json"),
        "unseen labels": ("evaluate", str(test), "--model", str(classifier_run), "--json"),
    }
    got = scripts_in_parallel(calls)
    notes = ok_json(got["unknown"])["results"][0]["notes"]
    assert any("every word of the input is unknown" in note for note in notes), notes
    result = ok_json(got["long"])["results"][0]
    assert any("kept the last 16" in note for note in result["notes"]), result
    assert result["next"][0]["token"]
    metrics = ok_json(got["unseen labels"])
    assert set(metrics["unseen_labels"]) == {"meh", "neutral"} and metrics["examples"] == 3


def test_bom_crlf_and_one_huge_line_just_work(tmp_path: Path) -> None:
    """A UTF-8 BOM and CRLF line ends are invisible; a 3 MB file with no newline trains (read and tokenised in
    pieces, so neither the tokenizer nor Word2Vec sees one giant string)."""
    crlf = tmp_path / "windows.txt"
    crlf.write_bytes(b"\xef\xbb\xbf" + b"the cat sat on the mat .\r\nthe dog lay on the rug .\r\n" * 60)
    sentence = "the quick brown fox jumps over the lazy dog and runs far away . "
    huge = tmp_path / "huge.txt"
    huge.write_text(sentence * (3_000_000 // len(sentence)), encoding="utf-8")
    got = scripts_in_parallel({
        "crlf": ("train", str(crlf), "--out", str(tmp_path / "crlf"), "--max-steps", "2", "--json", *TINY),
        "huge": ("train", str(huge), "--out", str(tmp_path / "huge"), "--max-steps", "2", "--json", *TINY),
    })
    ok_json(got["crlf"])
    tokens = json.loads((tmp_path / "crlf" / "config.json").read_text())["vocab_size"]
    assert tokens == 4 + 9  # specials + the 9 words; no "\ufeff" or "\r" tokens
    ok_json(got["huge"])
    assert json.loads((tmp_path / "huge" / "config.json").read_text())["vocab_size"] == 4 + 13
