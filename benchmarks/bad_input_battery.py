"""The "nothing lost" battery: every case of a user's bad day, run through the real scripts, timed.

    python benchmarks/bad_input_battery.py [--big-mb 50] [--workers 2] [--only TEXT] [--json]

Each case runs ``train.py`` / ``predict.py`` / ``evaluate.py`` in a child process, as a user would, and reports
its exit status (and the one expected), the last line it wrote on stderr, its wall time, its peak memory
(``wait4``'s ru_maxrss) and whether what the case guards held: the user's file unchanged, nothing left behind,
the answers printed before a Ctrl-C... A small tmpfs (``mount -t tmpfs``, root only) gives a real full disk;
without the permission that case is skipped and ``ulimit -f`` stands in. Cases run ``--workers`` at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "8", "--no-jit",
        "--embeddings", "none", "--max-steps", "4", "--warmup-steps", "1"]
TEXT = "the cat sat on the mat .\nthe dog lay on the rug .\n" * 40
LABELLED = "__label__pos a fine and lovely film\n__label__neg a dull and silly film\n" * 30
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _new_file(folder: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)


class Child:
    """A script in a child process: stdout/stderr to files (read after), rusage from ``wait4``."""

    def __init__(self, script: str, *args: str, stdin: int | None = None, preexec: Callable | None = None,
                 folder: Path) -> None:
        self.out, self.err = (_new_file(folder, suffix) for suffix in (".out", ".err"))
        command = [sys.executable, str(ROOT / f"{script}.py"), *args] if script != "-c" else [sys.executable, *args]
        self.started = time.perf_counter()
        with open(self.out, "w") as out, open(self.err, "w") as err:  # the child keeps its own copies
            self.process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdin=stdin, stdout=out, stderr=err,
                                            text=True, preexec_fn=preexec)

    def wait(self, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.process.kill()
            time.sleep(0.02)
        seconds = time.perf_counter() - self.started
        self.process.returncode = os.waitstatus_to_exitcode(status)
        out, err = self.out.read_text(), self.err.read_text()
        lines = [line for line in err.splitlines() if line.strip()]
        return {"status": self.process.returncode, "stdout": out, "stderr": err, "seconds": round(seconds, 2),
                "rss_mb": round(usage.ru_maxrss / 1024), "message": lines[-1] if lines else "",
                "stderr_lines": len(lines), "traceback": "Traceback" in err}


def run(script: str, *args: str, folder: Path, **kwargs: object) -> dict:
    return Child(script, *args, folder=folder, **kwargs).wait()


def train(data: Path, out: Path, folder: Path, *extra: str) -> dict:
    return run("train", str(data), "--out", str(out), *TINY, *extra, folder=folder)


# --------------------------------------------------------------------------------------------------- the cases
def case_plot_takes_no_file(ctx: dict) -> dict:
    test = ctx["dir"] / "plot-test.txt"
    test.write_text("the cat sat on the rug .\n")
    before = test.read_bytes()
    result = run("evaluate", "--plot", str(test), "--model", str(ctx["lm"]), "--json", folder=ctx["dir"])
    data = json.loads(result["stdout"]).get("data") if result["status"] == 0 else None
    return {**result, "expected": 0, "held": test.read_bytes() == before and data == str(test),
            "message": f"evaluated {data}; test file unchanged: {test.read_bytes() == before}"}


def case_out_is_the_data_file(ctx: dict) -> dict:
    data = ctx["dir"] / "data.txt"
    data.write_text(TEXT)
    result = train(data, data, ctx["dir"], "--overwrite")
    left = [p.name for p in ctx["dir"].iterdir() if p.name.startswith(".data.txt")]
    return {**result, "expected": 2, "held": data.read_text() == TEXT and not left}


def case_two_trainers_at_once(ctx: dict) -> dict:
    data = ctx["dir"] / "same.txt"
    data.write_text(TEXT)
    other = ctx["dir"] / "same-other.txt"
    other.write_text(TEXT.replace("cat", "bird"))
    out = ctx["dir"] / "same"
    children = [Child("train", str(d), "--out", str(out), *TINY, "--max-steps", "40", folder=ctx["dir"])
                for d in (data, other)]
    first, second = (child.wait() for child in children)
    check = run("predict", "the", "--model", str(out), "--json", folder=ctx["dir"])
    statuses = sorted([first["status"], second["status"]])
    refused = first if first["status"] else second
    return {**refused, "status": statuses, "expected": [0, 2], "held": statuses == [0, 2] and check["status"] == 0,
            "seconds": max(first["seconds"], second["seconds"]),
            "message": refused["message"] + f" | the published run predicts: {check['status'] == 0}"}


def case_file_size_limit(ctx: dict) -> dict:
    data = ctx["dir"] / "limit.txt"
    data.write_text(TEXT)
    limit = 100 * 1024  # ulimit -f 100

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run("train", str(data), "--out", str(ctx["dir"] / "limit"), *TINY, "--checkpoint-every", "2",
                 "--width", "64", folder=ctx["dir"], preexec=preexec)
    left = [p.name for p in ctx["dir"].iterdir() if p.name.startswith(".limit.")]
    return {**result, "expected": 1, "held": not left and not result["traceback"] and result["status"] == 1}


def case_full_disk(ctx: dict) -> dict | None:
    mount = ctx["dir"] / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        return None
    try:
        data = ctx["dir"] / "disk.txt"
        data.write_text(TEXT * 20)
        result = run("train", str(data), "--out", str(mount / "r"), *TINY, "--checkpoint-every", "2",
                     "--width", "96", "--heads", "2", folder=ctx["dir"])
        left = sorted(p.name for p in mount.iterdir())
        return {**result, "expected": 1, "held": not result["traceback"] and result["status"] == 1,
                "message": result["message"] + f" | left on the disk: {left}"}
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def case_ctrl_c_while_importing(ctx: dict) -> dict:
    data = ctx["dir"] / "x.txt"  # a real file: a missing one is refused at once, before the Ctrl-C comes
    data.write_text(TEXT)
    child = Child("train", str(data), "--out", str(ctx["dir"] / "x"), *TINY, folder=ctx["dir"])
    time.sleep(1.0)
    child.process.send_signal(signal.SIGINT)
    result = child.wait()
    return {**result, "expected": 130, "held": result["stderr_lines"] == 1 and not result["traceback"]}


def case_predict_streams_then_ctrl_c(ctx: dict) -> dict:
    """3,000 lines on stdin; Ctrl-C 5 s after the first answer appears (start-up time varies with the load)."""
    sentences = "".join(f"the {w} sat on the\n" for w in ("cat", "dog", "mat", "rug") * 750)
    child = Child("predict", "--model", str(ctx["lm"]), stdin=subprocess.PIPE, folder=ctx["dir"])
    threading.Thread(target=lambda: (child.process.stdin.write(sentences), child.process.stdin.close()),
                     daemon=True).start()
    deadline = time.monotonic() + 600
    while "  next:" not in child.out.read_text() and time.monotonic() < deadline and child.process.poll() is None:
        time.sleep(0.05)
    first = time.perf_counter() - child.started
    time.sleep(5)
    child.process.send_signal(signal.SIGINT)
    result = child.wait()
    answers = sum(1 for line in result["stdout"].splitlines() if line.startswith("  next:"))
    return {**result, "expected": 130, "held": answers > 0 and result["stderr_lines"] == 1,
            "message": f"first answer at {first:.1f} s, {answers} answers printed when Ctrl-C came 5 s later; "
                       + result["message"]}


def case_load_model_with_optimizer(ctx: dict) -> dict:
    code = ("import sys, keras, llm_unitscale\nm = keras.models.load_model(sys.argv[1])\n"
            "print(type(m.optimizer).__name__, int(m.optimizer.iterations.numpy()))")
    result = run("-c", "-c", code, str(ctx["lm"] / "model.keras"), folder=ctx["dir"])
    return {**result, "expected": 0, "held": result["stdout"].split() == ["UnitAdamW", "4"],
            "message": f"optimizer: {result['stdout'].strip() or result['message']}"}


def case_huge_vocab(ctx: dict) -> dict:
    copy = ctx["dir"] / "huge-vocab"
    shutil.copytree(ctx["lm"], copy)
    with open(copy / "vocab.pkl", "r+b") as handle:
        handle.truncate(1 << 30)
    result = run("predict", "the cat", "--model", str(copy), folder=ctx["dir"])
    return {**result, "expected": 2, "held": result["stderr_lines"] == 1 and result["status"] == 2}


def case_symlink_loop(ctx: dict) -> dict:
    a, b = ctx["dir"] / "loop-a", ctx["dir"] / "loop-b"
    a.symlink_to(b)
    b.symlink_to(a)
    result = train(a, ctx["dir"] / "loop", ctx["dir"])
    return {**result, "expected": 2, "held": "symbolic link loop" in result["message"]}


def case_zero_width(ctx: dict) -> dict:
    data = ctx["dir"] / "zw.txt"
    data.write_text(TEXT.replace("cat", "cat\u200b").replace("dog", "\ufeffdog\u2060"))
    trained = train(data, ctx["dir"] / "zw", ctx["dir"])
    result = run("predict", "the cat\u200b", "--model", str(ctx["dir"] / "zw"), "--json", folder=ctx["dir"])
    notes = json.loads(result["stdout"])["results"][0].get("notes") if result["status"] == 0 else ["failed"]
    return {**result, "status": [trained["status"], result["status"]], "expected": [0, 0], "held": not notes,
            "seconds": trained["seconds"] + result["seconds"],
            "message": f"'the cat\\u200b' is known to the model: {not notes}"}


def case_emoji_only(ctx: dict) -> dict:
    data = ctx["dir"] / "emoji.txt"
    data.write_text("😀 🎉 ❤️ 😂 👍🏽\n🎉🎉 😀 🇫🇷\n" * 60)
    result = train(data, ctx["dir"] / "emoji", ctx["dir"], "--json")
    if result["status"]:
        return {**result, "expected": 0, "held": False}
    vocab = json.loads((ctx["dir"] / "emoji" / "config.json").read_text())["vocab_size"]
    return {**result, "expected": 0, "held": True, "message": f"trained; vocabulary of {vocab} (4 special tokens)"}


def case_options(ctx: dict, options: tuple[str, ...], model: str) -> dict:
    result = run("predict", "the cat", "--model", str(ctx[model]), *options, folder=ctx["dir"])
    return {**result, "expected": 2, "held": result["stderr_lines"] == 1}


def case_evaluate_mismatch(ctx: dict, content: str, model: str) -> dict:
    path = ctx["dir"] / ("plain.txt" if content == TEXT else "labelled.txt")
    path.write_text(content)
    result = run("evaluate", str(path), "--model", str(ctx[model]), folder=ctx["dir"])
    return {**result, "expected": 2, "held": result["stderr_lines"] == 1 and path.name in result["message"]}


def case_refused_run_leaves_nothing(ctx: dict) -> dict:
    data = ctx["dir"] / "punct.txt"
    data.write_text("!!! ??? ... ,,,\n" * 100)
    result = train(data, ctx["dir"] / "punct", ctx["dir"])
    left = [p.name for p in ctx["dir"].iterdir() if p.name.startswith(".punct.")]
    return {**result, "expected": 2, "held": not left, "message": result["message"] + f" | left behind: {left}"}


def case_ansi_prompt(ctx: dict) -> dict:
    result = run("predict", "\x1b[31mthe\x1b[0m cat", "--model", str(ctx["lm"]), folder=ctx["dir"])
    first = result["stdout"].splitlines()[0] if result["stdout"] else ""
    return {**result, "expected": 0, "held": "\x1b" not in result["stdout"], "message": f"echoed as {first}"}


def case_one_huge_line(ctx: dict, megabytes: int) -> dict:
    data = ctx["dir"] / "huge-line.txt"
    sentence = "the quick brown fox jumps over the lazy dog and runs far away . "
    data.write_text(sentence * (megabytes * 1_000_000 // len(sentence)))
    child = Child("train", str(data), "--out", str(ctx["dir"] / "huge"), *TINY[:-4], "--max-steps", "1",
                  "--embeddings", "none", folder=ctx["dir"])
    result = child.wait()
    progress = [line for line in result["stderr"].splitlines() if "/s" in line and ("reading" in line
                                                                                 or "tokenising" in line)]
    return {**result, "expected": 0, "held": bool(progress),
            "message": f"{len(progress)} progress lines, e.g. {progress[0] if progress else '-'}"}


def cases(big_mb: int) -> list[tuple[str, Callable[[dict], dict | None]]]:
    return [
        ("evaluate.py --plot test.txt --model RUN", case_plot_takes_no_file),
        ("train.py data.txt --out data.txt --overwrite", case_out_is_the_data_file),
        ("two train.py --out runs/same at once", case_two_trainers_at_once),
        ("a file-size limit (ulimit -f 100), then train", case_file_size_limit),
        ("a full disk (1 MB tmpfs), then train", case_full_disk),
        ("Ctrl-C 1 s after start (TensorFlow importing)", case_ctrl_c_while_importing),
        ("predict.py, 3,000 lines on stdin, Ctrl-C", case_predict_streams_then_ctrl_c),
        ("import llm_unitscale; keras.models.load_model(...)", case_load_model_with_optimizer),
        ("vocab.pkl replaced by a 1 GB sparse file", case_huge_vocab),
        ("a symlink loop as data", case_symlink_loop),
        ("zero-width characters in training and prompt", case_zero_width),
        ("a file of emoji only", case_emoji_only),
        ("classifier run with --generate 10", lambda c: case_options(c, ("--generate", "10"), "cls")),
        ("--generate 5 --temperature -1", lambda c: case_options(c, ("--generate", "5", "--temperature", "-1"), "lm")),
        ("--generate 5 --top-p 2", lambda c: case_options(c, ("--generate", "5", "--top-p", "2"), "lm")),
        ("evaluate.py plain.txt on a classifier run", lambda c: case_evaluate_mismatch(c, TEXT, "cls")),
        ("evaluate.py labelled.txt on a language-model run", lambda c: case_evaluate_mismatch(c, LABELLED, "lm")),
        ("a refused run (only punctuation)", case_refused_run_leaves_nothing),
        ("ANSI escape codes inside a prompt", case_ansi_prompt),
        (f"one {big_mb} MB line of text (--max-steps 1)", lambda c: case_one_huge_line(c, big_mb)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=int, default=50, help="size of the one-line file (default 50 MB)")
    parser.add_argument("--workers", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="battery-") as tmp:
        folder = Path(tmp)
        for name, content, extra in (("lm", TEXT, []), ("cls", LABELLED, ["--arch", "cnn"])):
            (folder / f"{name}.txt").write_text(content)
            setup = train(folder / f"{name}.txt", folder / name, folder, *extra)
            assert setup["status"] == 0, setup["stderr"][-2000:]
        ctx = {"dir": folder, "lm": folder / "lm", "cls": folder / "cls"}

        def one(item: tuple[str, Callable]) -> dict | None:
            name, case = item
            sub = folder / f"case{abs(hash(name)) % 10**8}"
            sub.mkdir()
            with contextlib.suppress(Exception):
                result = case({**ctx, "dir": sub})
                return None if result is None else {"case": name, **result}
            return {"case": name, "status": "?", "expected": "?", "held": False, "message": "the case itself failed",
                    "seconds": 0, "rss_mb": 0}

        with ThreadPoolExecutor(args.workers) as pool:
            chosen = [case for case in cases(args.big_mb) if args.only in case[0]]
            rows = [row for row in pool.map(one, chosen) if row is not None]
    if args.json:
        print(json.dumps([{k: v for k, v in row.items() if k not in ("stdout", "stderr")} for row in rows], indent=1))
        return 0
    print("| what the user did | exit (expected) | held | seconds | peak MB | last line on stderr |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        message = row["message"].replace("|", "\\|")
        print(f"| {row['case']} | {row['status']} ({row['expected']}) | {'yes' if row['held'] else 'NO'} | "
              f"{row['seconds']} | {row['rss_mb']} | `{message}` |")
    print(f"\n{len(rows)} cases, {sum(bool(r['held']) for r in rows)} held; {time.perf_counter() - started:.0f} s "
          f"with {args.workers} at a time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
