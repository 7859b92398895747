"""End to end through the real scripts (subprocesses): train → predict → evaluate, --json contracts, errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from gensim.test.utils import datapath
from helpers import TINY, ok_json, script

LM_KEYS = {"loss", "perplexity", "accuracy", "top5_accuracy", "bits_per_char", "tokens", "unk_rate", "task",
           "model", "examples", "seconds"}
CLASSIFY_KEYS = {"accuracy", "macro_f1", "per_class", "confusion", "labels", "task", "model", "examples", "seconds"}
TRAIN_KEYS = {"run", "task", "params", "steps", "tokens_per_second", "seconds", "loss", "val_loss", "val_accuracy"}


@pytest.fixture(scope="module")
def repetitive_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rep")
    data = folder / "rep.txt"
    data.write_text("the cat sat on the mat .\nthe dog lay on the rug .\n" * 150, encoding="utf-8")
    out = folder / "run"
    summary = ok_json(script("train", str(data), "--out", str(out), "--max-steps", "200", "--lr", "3e-2", "--json", *TINY))
    assert TRAIN_KEYS | {"val_perplexity"} <= set(summary)
    assert summary["task"] == "lm" and summary["run"] == str(out)
    return out


def test_train_writes_the_run_folder(repetitive_run: Path) -> None:
    for name in ("config.json", "vocab.pkl", "model.keras", "embeddings.kv", "history.json", "metrics.json",
                 "training.png", "validation.txt", "checkpoints", "logs"):
        assert (repetitive_run / name).exists(), name
    config = json.loads((repetitive_run / "config.json").read_text())
    assert config["task"] == "lm" and config["unit_scaling"] is True and len(config["data_sha256"]) == 64
    assert not list(repetitive_run.parent.glob(".run.partial"))


def test_predict_gives_the_learned_continuation(repetitive_run: Path) -> None:
    result = ok_json(script("predict", "the cat sat on the", "--model", str(repetitive_run), "--json",
                            "--generate", "3", "--temperature", "0"))
    assert result["task"] == "lm"
    first = result["results"][0]
    assert first["next"][0]["token"] == "mat", first["next"]
    assert abs(sum(n["prob"] for n in first["next"]) - 1) < 0.2
    assert first["continuation"].startswith("mat")


def test_predict_reads_stdin_and_prints_text(repetitive_run: Path) -> None:
    result = script("predict", "--model", str(repetitive_run), stdin="the dog lay on the\n")
    assert result.returncode == 0, result.stderr
    assert "next: rug" in result.stdout


def test_evaluate_lm_metrics(repetitive_run: Path, tmp_path: Path) -> None:
    metrics = ok_json(script("evaluate", "--model", str(repetitive_run), "--json", "--plot"))
    assert set(metrics) >= LM_KEYS
    assert metrics["accuracy"] > 0.5 and metrics["perplexity"] < 5
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert Path(metrics["plot"]).is_file()
    held_out = tmp_path / "test.txt"
    held_out.write_text("the cat sat on the mat .\n", encoding="utf-8")
    metrics = ok_json(script("evaluate", str(held_out), "--model", str(repetitive_run), "--json"))
    assert metrics["tokens"] == 8 and metrics["unk_rate"] == 0.0


def test_evaluation_pass_is_the_models_call_for_any_batch_shape(repetitive_run: Path) -> None:
    """evaluate.py scores through one traced graph; it must give what calling the model gives, for the full
    batches, a smaller last batch and a last window shorter than the context."""
    import numpy as np

    from llm_unitscale.evaluation import inference_pass
    from llm_unitscale.runs import load_run

    run = load_run(repetitive_run)
    forward = inference_pass(run.model)
    rng = np.random.default_rng(0)
    for shape in ((4, run.seq_len), (3, run.seq_len), (1, run.seq_len - 5), (2, 1)):
        ids = rng.integers(0, len(run.vocab), size=shape).astype(np.int32)
        np.testing.assert_allclose(forward(ids), np.asarray(run.model(ids, training=False)), rtol=1e-5, atol=1e-5)


def test_english_and_chinese_lm(tmp_path: Path) -> None:
    english = tmp_path / "lee.txt"
    english.write_text(Path(datapath("lee_background.cor")).read_text(encoding="utf-8")[:30000], encoding="utf-8")
    ok_json(script("train", str(english), "--out", str(tmp_path / "en"), "--max-steps", "10", "--json", *TINY))
    chinese = tmp_path / "zh.txt"
    chinese.write_text("我是一个程序员。\n我喜欢编程。\n编程让我感到快乐。\n" * 80, encoding="utf-8")
    ok_json(script("train", str(chinese), "--out", str(tmp_path / "zh"), "--max-steps", "60", "--json", *TINY))
    result = ok_json(script("predict", "我喜欢", "--model", str(tmp_path / "zh"), "--json"))
    assert result["results"][0]["next"][0]["token"] == "编程"


def test_classifier_on_pang_lee_polarity(tmp_path: Path) -> None:
    out = tmp_path / "polarity"
    summary = ok_json(script("train", datapath("pang_lee_polarity.cor"), "--errors", "replace", "--arch", "cnn",
                             "--out", str(out), "--epochs", "3", "--json", *TINY))
    assert summary["task"] == "classify"
    result = ok_json(script("predict", "a tedious, silly film", "--model", str(out), "--json", "--top-k", "2"))
    first = result["results"][0]
    assert first["label"] in ("neg", "pos") and 0.0 < first["prob"] <= 1.0 and len(first["top"]) == 2
    metrics = ok_json(script("evaluate", "--model", str(out), "--json"))
    assert set(metrics) >= CLASSIFY_KEYS
    assert metrics["labels"] == ["neg", "pos"] and sum(map(sum, metrics["confusion"])) == metrics["examples"]


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The whole script, interpreter exit included (test_bad_input.py has the table of cases)."""
    result = script("train", str(tmp_path / "missing.txt"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing.txt" in result.stderr and "no such file" in result.stderr


def test_malicious_vocab_is_refused_without_running(tmp_path: Path, repetitive_run: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(repetitive_run, run)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (run / "vocab.pkl").write_bytes(pickle.dumps(Payload()))
    result = script("predict", "the cat", "--model", str(run))
    assert result.returncode == 2, result.stderr
    assert "vocab.pkl" in result.stderr and result.stderr.strip().count("\n") == 0
    assert not marker.exists()


def test_val_fraction_option_reaches_the_run_and_is_checked() -> None:
    """``--val-fraction`` sets the held-out share (a corpus of gigabytes needs far less than 10 %)."""
    from llm_unitscale.cli import train_parser
    from llm_unitscale.training import ConfigError, TrainConfig

    args = train_parser().parse_args(["corpus.txt", "--val-fraction", "0.02"])
    options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    assert options["val_fraction"] == 0.02 and train_parser().parse_args(["corpus.txt"]).val_fraction == 0.1
    with pytest.raises(ConfigError, match=r"--val-fraction must be in \(0, 0.5\), got 0.7"):
        TrainConfig(val_fraction=0.7).validate()


def test_exit_with_flushes_everything_and_keeps_the_status(tmp_path: Path) -> None:
    """The scripts end with ``cli.exit_with`` (``os._exit``, no interpreter teardown): output still written to a
    pipe in full, and the command's status is the process's."""
    import subprocess
    import sys

    program = ("import sys\nfrom llm_unitscale.cli import exit_with\n"
               "def main():\n    print('x' * 100_000)\n    print('done', file=sys.stderr)\n    return 3\n"
               "exit_with(main)\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert done.stdout == "x" * 100_000 + "\n"
    assert done.stderr.endswith("done\n")
