"""Nothing lost, ever: a user's file is never overwritten, one writer per run folder, a full disk or a Ctrl-C at
any moment ends in one line, and the input hygiene that goes with it (format characters, emoji, control
characters, oversized or looping files, options that do not apply).

Most cases call the commands in-process (``cli.*_main``: the same code as the scripts, without TensorFlow's
start-up per case); a subprocess is used only where the case needs a process of its own: Ctrl-C while
TensorFlow imports, a file-size limit, a second process holding the lock, a fresh interpreter for
``load_model``, stdin that stays open.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path

import pytest
from helpers import ROOT, TINY

from llm_unitscale import cli, files, prepared, run_writer, runs, training
from llm_unitscale import corpus as corpus_mod
from llm_unitscale.data import read_text
from llm_unitscale.preprocessing import Tokenizer
from llm_unitscale.preprocessing.tokenizer import normalize_text

WORD2VEC = ["--max-steps", "4", "--warmup-steps", "1", "--strategy", "none", *TINY]
SMALL = [*WORD2VEC, "--embeddings", "none"]
TEXT = "the cat sat on the mat .\nthe dog lay on the rug .\n" * 40
LABELLED = "__label__pos a fine and lovely film\n__label__neg a dull and silly film\n" * 30


def tiny_config(data: Path, out: Path, **options: object) -> training.TrainConfig:
    base = dict(data=str(data), out=str(out), max_steps=4, width=32, depth=1, heads=2, seq_len=16, batch_size=8,
                embeddings="none", jit_compile=False, warmup_steps=1, strategy="none")
    return training.TrainConfig(**{**base, **options})


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm")
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    training.train(tiny_config(folder / "text.txt", folder / "run"), log=io.StringIO())
    return folder / "run"


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cls")
    (folder / "labels.txt").write_text(LABELLED, encoding="utf-8")
    training.train(tiny_config(folder / "labels.txt", folder / "run", arch="cnn"), log=io.StringIO())
    return folder / "run"


def run_main(main: object, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Call a command in-process; (exit status, stdout, stderr)."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    return lines[-1]


def only_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(folder: Path, name: str) -> list[str]:
    """The partial folder and lock of a run named ``name`` that are still in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


# ------------------------------------------------------------------------------ 1. never write over a user's file
def test_plot_does_not_swallow_the_test_file(lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    test = tmp_path / "test.txt"
    test.write_text("the cat sat on the rug .\n", encoding="utf-8")
    before = test.read_bytes()
    status, out, _ = run_main(cli.evaluate_main, "--plot", str(test), "--model", str(lm_run), "--json",
                              capsys=capsys)
    metrics = json.loads(out)
    assert status == 0 and metrics["data"] == str(test) and metrics["tokens"] == 8
    assert test.read_bytes() == before
    assert Path(metrics["plot"]) == lm_run / "position_loss.png" and files.is_our_png(metrics["plot"])
    status, _, err = run_main(cli.evaluate_main, "--plot-file", str(test), "--model", str(lm_run), capsys=capsys)
    assert status == 2 and "test.txt: a file that is not a plot written by llm_unitscale" in only_line(err)
    assert test.read_bytes() == before
    old_plot = b"\x89PNG\r\n\x1a\n an unmarked plot of an earlier version"
    (lm_run / "position_loss.png").write_bytes(old_plot)  # in the run folder: replaced
    status, _, _ = run_main(cli.evaluate_main, "--plot", "--model", str(lm_run), capsys=capsys)
    assert status == 0 and files.is_our_png(lm_run / "position_loss.png")
    (tmp_path / "theirs.png").write_bytes(old_plot)  # anywhere else: a PNG of someone else's
    status, _, err = run_main(cli.evaluate_main, "--plot-file", str(tmp_path / "theirs.png"), "--model", str(lm_run),
                              capsys=capsys)
    assert status == 2 and "not a plot written by llm_unitscale" in only_line(err)
    png = tmp_path / "curve.png"
    for _ in range(2):  # a new file, then our own plot replaced
        status, out, _ = run_main(cli.evaluate_main, str(test), "--plot-file", str(png), "--model", str(lm_run),
                                  capsys=capsys)
        assert status == 0 and files.is_our_png(png) and f"plot: {png}" in out


def test_out_at_the_data_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    before = data.read_bytes()
    for extra in ([], ["--overwrite"]):
        status, _, err = run_main(cli.train_main, str(data), "--out", str(data), *extra, *SMALL, capsys=capsys)
        assert status == 2, err
        assert f"{data}: a file that is not a run folder; refusing to replace it" in only_line(err)
    assert data.read_bytes() == before and leftovers(tmp_path, "data.txt") == []
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine", encoding="utf-8")
    (tmp_path / "link").symlink_to(mine)
    for out, words in ((mine, "a directory that is not a run folder"), (tmp_path / "link", "is a symbolic link")):
        status, _, err = run_main(cli.train_main, str(data), "--out", str(out), "--overwrite", *SMALL, capsys=capsys)
        assert status == 2 and words in only_line(err), err
    assert (mine / "todo.txt").read_text() == "mine" and (tmp_path / "link").is_symlink()


def test_overwrite_replaces_only_a_run(lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llm_unitscale.export import main as export_main

    mine = tmp_path / "serving"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine", encoding="utf-8")
    status, _, err = run_main(export_main, str(lm_run), str(mine), "--overwrite", capsys=capsys)
    assert status == 2 and "a directory that is not an export of llm_unitscale" in only_line(err)
    assert (mine / "keep.txt").read_text() == "mine"
    assert runs.is_run_folder(lm_run) and not runs.is_run_folder(mine) and not runs.is_run_folder(tmp_path / "x")


# ------------------------------------------------------------------------------ 2. one run folder, one writer
def hold_lock(path: Path) -> subprocess.Popen:
    """A process (no TensorFlow: starts in ms) that holds ``path``'s lock the way a trainer does."""
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_trainer_fails_at_once_and_a_dead_ones_lock_is_taken_over(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    out, lock = tmp_path / "same", tmp_path / ".same.lock"
    holder = hold_lock(lock)
    try:
        started = time.perf_counter()
        status, _, err = run_main(cli.train_main, str(data), "--out", str(out), *SMALL, capsys=capsys)
        assert status == 2 and time.perf_counter() - started < 5
        assert (f"{out}: another training (pid {holder.pid}) is writing this run folder; wait for it to finish "
                "or choose another --out") == only_line(err)[len("error: "):]
        assert not out.exists() and not runs.partial_dir(out).exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock.read_text().strip() == str(holder.pid)  # a killed owner's lock file stays behind ...
    taken = run_writer.RunLock(lock, str(out)).acquire()  # ... and is taken over
    assert lock.read_text().strip() == str(os.getpid())
    taken.release()
    assert leftovers(tmp_path, "same") == []


def test_publishing_swaps_the_whole_folder(tmp_path: Path) -> None:
    old, new = tmp_path / "run", tmp_path / ".run.partial"
    for folder, tag in ((old, "old"), (new, "new")):
        folder.mkdir()
        for name in ("config.json", "vocab.pkl", "model.keras"):
            (folder / name).write_text(tag)
    files.replace_folder(new, old)
    assert {p.read_text() for p in old.iterdir()} == {"new"} and not new.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_the_lock_is_exclusive_within_a_process_too(tmp_path: Path) -> None:
    first = run_writer.RunLock(tmp_path / ".x.lock", "x").acquire()
    with pytest.raises(runs.RunError, match=f"another training \\(pid {os.getpid()}\\)"):
        run_writer.RunLock(tmp_path / ".x.lock", "x").acquire()
    first.release()
    run_writer.RunLock(tmp_path / ".x.lock", "x").acquire().release()
    assert not (tmp_path / ".x.lock").exists()


# ----------------------------------------------------------------------------- 3. a full disk, a failed write
def _file_size_limit(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.fixture(scope="module")
def children(lm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The cases that need a process of their own and no interaction, run side by side (TensorFlow's start-up
    dominates each): training under a file-size limit, and ``load_model`` in a fresh interpreter."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path_factory.mktemp("limit")
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load = ("import sys, keras, llm_unitscale\n"
            "model = keras.models.load_model(sys.argv[1])\n"
            "print(type(model.optimizer).__name__, int(model.optimizer.iterations.numpy()))\n")
    calls = {
        "limit": dict(args=[sys.executable, str(ROOT / "train.py"), str(folder / "text.txt"), "--out",
                            str(folder / "r"), "--checkpoint-every", "2", *SMALL],
                      preexec_fn=lambda: _file_size_limit(64 * 1024)),
        "load": dict(args=[sys.executable, "-c", load, str(lm_run / "model.keras")]),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(subprocess.run, **call, cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=300) for key, call in calls.items()}
        return {"folder": folder, **{key: future.result() for key, future in futures.items()}}


def test_a_file_size_limit_ends_in_one_line_not_a_crash(children: dict) -> None:
    """``ulimit -f``: the first checkpoint (≈ 150 KB) is over the limit. One line, status 1, nothing left."""
    result, folder = children["limit"], children["folder"]
    assert result.returncode == 1, result.stderr[-2000:]
    assert last_line(result.stderr) == (f"error: {folder / 'r'}: file too large (the file size limit, ulimit -f, "
                                        "was reached) while writing the checkpoint at step 2; nothing was kept")
    assert sorted(p.name for p in folder.iterdir()) == ["text.txt"]


@pytest.mark.parametrize("site", ["vocab.pkl", "model.keras", "TensorBoard"])
def test_no_space_left_anywhere_keeps_the_last_checkpoint(site: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import keras
    import tensorflow as tf

    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if site == "vocab.pkl":
        mkstemp = files.tempfile.mkstemp

        def no_space_for_the_vocabulary(*args: object, **kwargs: str) -> tuple[int, str]:
            if kwargs.get("prefix", "").startswith(".vocab.pkl."):
                raise full
            return mkstemp(*args, **kwargs)

        monkeypatch.setattr(files.tempfile, "mkstemp", no_space_for_the_vocabulary)
    elif site == "model.keras":
        original = keras.Model.save

        def save(model: keras.Model, path: object, *args: object, **kwargs: object) -> None:
            if Path(str(path)).name == ".model.tmp.keras":
                Path(str(path)).write_bytes(b"half")
                raise full
            original(model, path, *args, **kwargs)

        monkeypatch.setattr(keras.Model, "save", save)
    else:
        def no_space(*args: object, **kwargs: object) -> None:
            raise tf.errors.ResourceExhaustedError(None, None, "events.out.tfevents; No space left on device")

        monkeypatch.setattr(keras.callbacks.TensorBoard, "on_epoch_end", no_space)
    out = tmp_path / "r"
    status, _, err = run_main(cli.train_main, str(data), "--out", str(out), "--checkpoint-every", "2", *SMALL,
                              capsys=capsys)
    line = last_line(err)
    assert status == 1, err
    what = {"vocab.pkl": "vocab.pkl", "model.keras": "model.keras", "TensorBoard": "the TensorBoard logs"}[site]
    assert line.startswith(f"error: {out}: no space left on device while writing {what}; "), line
    if site == "vocab.pkl":
        assert line.endswith("; nothing was kept") and leftovers(tmp_path, "r") == []
        return
    checkpoints = runs.partial_dir(out) / "checkpoints"
    assert f"the last checkpoint (step 4) is kept in {checkpoints}" in line
    assert "free some space and resume with: " in line and line.endswith("--resume")
    assert not [p for p in runs.partial_dir(out).rglob("*") if ".tmp" in p.name]
    assert leftovers(tmp_path, "r") == [".r.partial"]  # the lock is released
    if site == "TensorBoard":
        return
    monkeypatch.undo()
    status, _, err = run_main(cli.train_main, str(data), "--out", str(out), "--checkpoint-every", "2", "--resume",
                              *SMALL, capsys=capsys)
    assert status == 0 and runs.is_run_folder(out), err


# ------------------------------------------------------------------------------------- 4. Ctrl-C at any moment
def _importing_tensorflow(process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the child has loaded TensorFlow's shared library, i.e. is inside ``import tensorflow`` (a
    Ctrl-C earlier than our code — in Python's own start-up — is Python's to report)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None
        with contextlib.suppress(OSError):
            if "libtensorflow" in Path(f"/proc/{process.pid}/maps").read_text():
                return
        time.sleep(0.01)
    raise AssertionError("TensorFlow never started loading")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see TensorFlow loading")
def test_ctrl_c_while_tensorflow_imports_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.0, 0.5):
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), str(tmp_path / "x.txt")], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _importing_tensorflow(process)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130, err[-2000:]
        assert only_line(err) == "interrupted while starting up; nothing was written"


#: Runs ``import llm_unitscale`` in a child where TensorFlow's import is hit by a Ctrl-C that an import machinery
#: turns into an ImportError (as numpy's C-extension import does when the interrupt lands inside it).
_CTRL_C_BECOMES_IMPORT_ERROR = """
import importlib.abc, os, signal, sys, time

class CtrlCInsideImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt as exc:
            raise ImportError("PyCapsule_Import could not import module 'datetime'") from exc
        raise AssertionError("no Ctrl-C arrived")

sys.meta_path.insert(0, CtrlCInsideImport())
import llm_unitscale
"""


def test_ctrl_c_turned_into_an_import_error_is_still_one_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _CTRL_C_BECOMES_IMPORT_ERROR], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr[-2000:]
    assert only_line(done.stderr) == "interrupted while starting up; nothing was written"


def test_sticky_interrupt_keeps_a_handler_it_did_not_expect() -> None:
    """A program that ignores Ctrl-C (a background job) keeps ignoring it; so does one with its own handler."""
    from llm_unitscale import interrupts

    def own(signum: int, frame: object) -> None:
        pass

    for kept in (signal.SIG_IGN, own):
        previous = signal.signal(signal.SIGINT, kept)
        try:
            with interrupts.sticky_interrupt() as check:
                assert signal.getsignal(signal.SIGINT) is kept
                check()
        finally:
            signal.signal(signal.SIGINT, previous)


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("phase", ["reading", "tokenising", "word2vec", "compiling"])
def test_ctrl_c_before_training_leaves_nothing(phase: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    from llm_unitscale import data as data_module
    from llm_unitscale.preprocessing import embeddings

    target = {"reading": (data_module, "read_text"), "tokenising": (prepared, "tokenize_lines"),
              "word2vec": (embeddings, "train_word2vec"), "compiling": (training, "compile_model")}[phase]
    monkeypatch.setattr(*target, _interrupt)
    monkeypatch.setenv("LLM_UNITSCALE_CACHE", str(tmp_path_factory.mktemp("cache")))  # tokenise, not reuse
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    options = WORD2VEC if phase == "word2vec" else SMALL
    status, _, err = run_main(cli.train_main, str(data), "--out", str(tmp_path / "r"), *options, capsys=capsys)
    assert status == 130
    assert last_line(err) == "interrupted before the first checkpoint; nothing was kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_while_predicting_keeps_the_answers_so_far(as_json: bool, lm_run: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_unitscale import inference

    original, calls = inference.next_tokens, []

    def two_then_ctrl_c(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "next_tokens", two_then_ctrl_c)
    status, out, err = run_main(cli.predict_main, "the cat", "the dog", "the mat", "--model", str(lm_run),
                                *(["--json"] if as_json else []), capsys=capsys)
    assert status == 130
    if as_json:
        document = json.loads(out)
        assert document["interrupted"] is True and [r["input"] for r in document["results"]] == ["the cat", "the dog"]
        assert only_line(err) == "interrupted after 2 answers (in the JSON document)"
    else:
        assert [line for line in out.splitlines() if not line.startswith(" ")] == ["the cat", "the dog"]
        assert only_line(err) == "interrupted after 2 answers (printed above)"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_by_a_destructor_is_raised_again_at_the_next_check() -> None:
    """Python only prints a KeyboardInterrupt raised inside ``__del__``; ``sticky_interrupt`` remembers it."""
    from llm_unitscale import interrupts

    class SignalledWhileDestroyed:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs here, inside the destructor

    with interrupts.sticky_interrupt() as check:
        check()  # nothing yet
        SignalledWhileDestroyed()  # destroyed at once: its KeyboardInterrupt goes nowhere
        with pytest.raises(KeyboardInterrupt):
            check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_predict_streams_answers_from_stdin(lm_run: Path) -> None:
    """An answer is printed while stdin is still open; Ctrl-C then keeps what was printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), "--model", str(lm_run)], cwd=ROOT, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    process.stdin.write("the cat sat on the\n")
    process.stdin.flush()
    deadline = time.monotonic() + 120
    while not any(line.startswith("  next:") for line in got) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    assert got[:1] == ["the cat sat on the\n"] and got[1].startswith("  next: "), got
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and only_line(err) == "interrupted after 1 answer (printed above)"


# ------------------------------------------------------------------------------------- 5. the Python API
def test_load_model_with_its_optimizer_in_a_fresh_process(children: dict) -> None:
    result = children["load"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["UnitAdamW", "4"]


# ------------------------------------------------------------------------------------------ 6. input hygiene
def test_format_characters_are_removed_and_text_is_nfc() -> None:
    tok = Tokenizer()
    assert tok.tokenize("hello\u200b world\ufeff wo\u2060rd\u200d cafe\u0301") == ["hello", "world", "word", "café"]
    assert Tokenizer(mode="char").tokenize("a\u200bb") == ["a", "b"]
    assert Tokenizer.from_config({"mode": "word", "cjk": "char"}).tokenize("hi\u200b") == ["hi\u200b"]  # old runs
    every_cf = "".join(chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf")
    assert len(every_cf) > 150 and normalize_text("x" + every_cf + "y") == "xy"


def test_zero_width_characters_are_the_same_word_in_training_and_prediction(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "zw.txt"
    data.write_text(TEXT.replace("cat", "cat\u200b").replace("dog", "\ufeffdog\u2060"), encoding="utf-8")
    status, _, err = run_main(cli.train_main, str(data), "--out", str(tmp_path / "r"), *SMALL, capsys=capsys)
    assert status == 0, err
    vocab = runs.load_run(tmp_path / "r").vocab
    assert "cat" in vocab and "dog" in vocab and not any(unicodedata.category(c) == "Cf" for t in vocab for c in t)
    status, out, _ = run_main(cli.predict_main, "the cat", "the\u200b dog\ufeff", "--model", str(tmp_path / "r"),
                              "--json", capsys=capsys)
    assert status == 0 and not any("notes" in r for r in json.loads(out)["results"])


def test_a_file_of_emoji_is_text(tmp_path: Path) -> None:
    """Refused before as "no words found": emoji are words people write, each a token."""
    data = tmp_path / "emoji.txt"
    text = "😀 🎉 ❤️ 😂 👍🏽\n🎉🎉 😀 🇫🇷\n" * 60
    data.write_text(text, encoding="utf-8")
    corpus = corpus_mod.prepare_lm(tiny_config(data, tmp_path / "r").with_task_defaults("lm"))
    assert corpus.task == "lm" and {"😀", "🎉", "❤️", "👍🏽", "🇫🇷"} <= set(corpus.vocab)
    assert len(corpus.train) > 17 * 8  # enough windows for --seq-len 16


def test_control_characters_in_a_prompt_are_escaped(lm_run: Path, capsys: pytest.CaptureFixture) -> None:
    status, out, _ = run_main(cli.predict_main, "\x1b[31mthe\x1b[0m cat\u202e", "--model", str(lm_run),
                              capsys=capsys)
    assert status == 0 and "\x1b" not in out and "\u202e" not in out
    assert out.splitlines()[0] == "\\x1b[31mthe\\x1b[0m cat\\u202e"


def test_oversized_vocab_and_config_are_refused_before_reading(lm_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    import shutil

    for name, size, shown in (("vocab.pkl", 1 << 30, "1.0 GB"), ("config.json", 100 << 20, "100.0 MB")):
        copy = tmp_path / name
        shutil.copytree(lm_run, copy)
        with open(copy / name, "r+b") as handle:
            handle.truncate(size)  # sparse: no disk used, a GB to read
        started = time.perf_counter()
        status, _, err = run_main(cli.predict_main, "the cat", "--model", str(copy), capsys=capsys)
        assert status == 2 and time.perf_counter() - started < 2
        assert f"{copy / name}: is {shown}, more than any " in only_line(err) and "this package writes" in err
    from llm_unitscale.preprocessing.vocabulary import Vocabulary, VocabularyError

    os.mkfifo(tmp_path / "fifo.pkl")  # would block a reader forever
    with pytest.raises(VocabularyError, match="fifo.pkl: is not a regular file \\(a pipe, device or socket\\)"):
        Vocabulary.load(tmp_path / "fifo.pkl")


def test_a_symbolic_link_loop_has_its_own_message_and_a_fifo_still_reads(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    status, _, err = run_main(cli.train_main, str(tmp_path / "a"), "--out", str(tmp_path / "r"), *SMALL,
                              capsys=capsys)
    assert status == 2 and only_line(err) == f"error: {tmp_path / 'a'}: a symbolic link loop (too many levels of " \
                                             "symbolic links)"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("through a pipe\n", encoding="utf-8"))
    writer.start()
    assert read_text(fifo) == "through a pipe\n"
    writer.join()


def test_sampling_options_are_checked_and_must_apply_to_the_task(lm_run: Path, classifier_run: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    cases = {
        (str(classifier_run), "--generate", "10"): "--generate applies only to language models, and "
                                                   f"{classifier_run} is a classifier (task classify)",
        (str(lm_run), "--generate", "3", "--temperature", "-1"): "--temperature must be > 0 (or 0 for greedy "
                                                                 "decoding), got -1.0",
        (str(lm_run), "--generate", "3", "--top-p", "2"): "--top-p must be in (0, 1], got 2.0",
        (str(lm_run), "--generate", "3", "--top-p", "0"): "--top-p must be in (0, 1], got 0.0",
        (str(lm_run), "--temperature", "0.5"): "--temperature and --top-p only apply when sampling: add --generate N",
    }
    for (model, *options), message in cases.items():
        status, _, err = run_main(cli.predict_main, "the cat", "--model", model, *options, capsys=capsys)
        assert status == 2 and only_line(err) == f"error: {message}", err


def test_evaluating_the_wrong_kind_of_file_names_it(lm_run: Path, classifier_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    plain, labelled = tmp_path / "plain.txt", tmp_path / "labelled.txt"
    plain.write_text(TEXT, encoding="utf-8")
    labelled.write_text(LABELLED, encoding="utf-8")
    status, _, err = run_main(cli.evaluate_main, str(plain), "--model", str(classifier_run), capsys=capsys)
    assert status == 2 and only_line(err).startswith(f"error: {plain}: no labelled lines")
    assert f"but {classifier_run} is a classifier" in err
    status, _, err = run_main(cli.evaluate_main, str(labelled), "--model", str(lm_run), capsys=capsys)
    assert status == 2 and only_line(err).startswith(f"error: {labelled}: labelled lines (e.g. '__label__pos")
    assert f"but {lm_run} is a language model" in err


def test_a_refused_run_leaves_no_partial_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "punct.txt"
    data.write_text("!!! ??? ... ,,,\n" * 100, encoding="utf-8")
    status, _, err = run_main(cli.train_main, str(data), "--out", str(tmp_path / "r"), *SMALL, capsys=capsys)
    assert status == 2 and "no words found" in only_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["punct.txt"]


# --------------------------------------------------------------------------------- 7. signs of life on big inputs
def test_reading_tokenising_and_word2vec_show_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    from llm_unitscale.preprocessing.embeddings import train_word2vec

    monkeypatch.setenv("LLM_UNITSCALE_PROGRESS_SECONDS", "0")
    data = tmp_path / "big.txt"
    data.write_text("the quick brown fox jumps over the lazy dog " * 20000, encoding="utf-8")  # one 880 KB line
    text = read_text(data)
    pieces, _ = prepared.tokenize_lines(Tokenizer(), text, f"tokenising {data}")
    train_word2vec([p for p in pieces if p], vector_size=8, epochs=1)
    err = capsys.readouterr().err
    assert f"reading {data}: 880,000 of 880,000 bytes (100%), " in err and " bytes/s, done in " in err
    assert f"tokenising {data}: " in err and " of 880,000 characters (" in err and "characters/s" in err
    assert "word2vec (1 epochs and a vocabulary pass): " in err and " of 360,000 words (100%)" in err


def test_progress_is_silent_for_quick_work(capsys: pytest.CaptureFixture) -> None:
    from llm_unitscale.progress import Progress

    progress = Progress("quick", 10, "items")
    for done in range(1, 11):
        progress.update(done)
    progress.close()
    assert capsys.readouterr().err == ""
