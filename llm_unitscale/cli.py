"""Command lines of train.py, predict.py, evaluate.py and the export (DESIGN §1).

Human-readable output by default, one JSON document on stdout with ``--json`` (logs and progress go to stderr).
Exit status: 0 success, 2 bad usage or bad input (one line on stderr naming the file and the problem),
1 internal error or a failed write (full disk: ``files.WriteError``), 130 interrupted (Ctrl-C at any moment,
TensorFlow's import included: ``interrupts``). ``LLM_UNITSCALE_DEBUG=1`` shows tracebacks.

Text from the user or the data (prompts, tokens, labels, file names in messages) is printed through
:func:`printable`, so control characters (an ANSI escape in a prompt) reach the terminal escaped, not obeyed.
``predict.py`` prints each answer as soon as it has it; with ``--json`` it still prints one document (at the
end, or — interrupted — with the answers so far and ``"interrupted": true``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from llm_unitscale import __version__, interrupts

DEFAULT_DATA = "data/dataset.txt"
DEFAULT_RUN = "runs/default"


def _quiet_warnings() -> None:
    """Keep stderr for our own messages: Python warnings and absl logs from TF/Keras are hidden."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


def _user_errors() -> tuple[type[BaseException], ...]:
    from llm_unitscale.data import DataError
    from llm_unitscale.files import OutputError
    from llm_unitscale.inference import InputError
    from llm_unitscale.preprocessing.embeddings import EmbeddingError
    from llm_unitscale.preprocessing.tokenizer import TokenizerError
    from llm_unitscale.preprocessing.vocabulary import VocabularyError
    from llm_unitscale.runs import RunError
    from llm_unitscale.training import ConfigError

    return (DataError, RunError, VocabularyError, TokenizerError, EmbeddingError, InputError, ConfigError,
            OutputError)


#: Characters shown escaped: controls (ESC, CR, TAB...), format characters (bidirectional overrides, zero
#: widths), surrogates, and the line/paragraph separators.
_UNPRINTABLE = ("Cc", "Cf", "Cs", "Zl", "Zp")


def printable(text: str) -> str:
    """``text`` with every control or format character written as a Python escape (``\\x1b``, ``\\u202e``),
    so that printing it cannot move the cursor, recolour the terminal or reorder what follows."""
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _UNPRINTABLE
                   else ch for ch in text)


def _say(message: str) -> None:
    print(printable(message), file=sys.stderr, flush=True)


def exit_with(main: Callable[[], int]) -> NoReturn:
    """Run a command's ``main`` and end the process with its status, without the interpreter's teardown.

    When a command returns, everything it writes is complete: a run folder is published by a rename, its
    TensorBoard writers are closed, and stdout/stderr are flushed here. What a normal exit would still do is
    TensorFlow's native teardown, which does nothing a finished command needs and takes time measured on
    2 cores: 1.2 s after a trivial TensorFlow program, 2.2 s after a training run. ``os._exit`` skips it.
    An exception that escapes ``main`` (``SystemExit`` from ``--help``, a usage error) exits the normal way.
    """
    status = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (``| head``) or a closed stream
            stream.flush()
    os._exit(status)


def _guard(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; turn known failures into one line on stderr and an exit status."""
    debug = os.environ.get("LLM_UNITSCALE_DEBUG") == "1"
    interrupts.report_uncaught("interrupted")
    from llm_unitscale import files, host_allocator

    files.ignore_file_size_signal()
    try:
        _quiet_warnings()
        host_allocator.enable()
        _keep_compiled_programs(args)
        return main(args)
    except KeyboardInterrupt as exc:
        _say(f"interrupted {exc}" if str(exc) else "interrupted")
        return 130
    except Exception as exc:
        if debug:
            raise
        from llm_unitscale.checkpoint import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            _say(f"{exc}; resume with: {_resume_command()}" if exc.resumable else str(exc))
            return 130
        if isinstance(exc, _user_errors()):
            _say(f"error: {exc}")
            return 2
        if isinstance(exc, files.WriteError):
            _say(f"error: {exc}" + (f"; free some space and resume with: {_resume_command()}"
                                    if exc.resumable else ""))
            return 1
        if isinstance(exc, FloatingPointError):
            _say(f"error: {exc}")
            return 1
        reason = files.write_failure(exc)
        if reason is not None:
            where = getattr(exc, "filename", None)
            _say(f"error: {where + ': ' if where else ''}{reason}")
            return 1
        _say(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
             f"(rerun with LLM_UNITSCALE_DEBUG=1 for the traceback{_compile_cache_hint(exc)})")
        return 1


def _keep_compiled_programs(args: argparse.Namespace) -> None:
    """XLA's compiled programs kept between runs, in the cache folder (``--cache``): :mod:`compile_cache`."""
    import tensorflow as tf

    from llm_unitscale import compile_cache, prepared

    compile_cache.enable(prepared.cache_dir(getattr(args, "cache", None)), tf.version.VERSION)


def _compile_cache_hint(exc: BaseException) -> str:
    """For a TensorFlow error with a compile cache on: how to rule out a damaged cache entry."""
    import tensorflow as tf

    from llm_unitscale import compile_cache

    folder = compile_cache.folder_in_use()
    if folder is None or not isinstance(exc, tf.errors.OpError):
        return ""
    return f"; if it happens again, delete {folder} or set {compile_cache.ENV}=0"


def _resume_command() -> str:
    """This command line with ``--resume`` (and without ``--overwrite``), quoted for a POSIX shell."""
    import shlex

    args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    return shlex.join([Path(sys.argv[0]).name if sys.argv[0].endswith(".py") else "train.py", *args, "--resume"])


def _emit(args: argparse.Namespace, document: dict, text: str) -> None:
    print(json.dumps(document, ensure_ascii=False, indent=None) if args.json else text, flush=True)


# --------------------------------------------------------------------------------------------------- train
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a unit-scaled language model (plain text) or text classifier (labelled lines).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python train.py                       # shipped data/dataset.txt -> runs/default\n"
        "  python train.py corpus.txt --out runs/shakespeare --epochs 5\n"
        "  python train.py reviews.txt --task classify --arch cnn --out runs/reviews\n"
        "  python train.py corpus.txt --strategy mirrored      # every local GPU (tf.distribute)\n"
        "  TF_CONFIG='{...}' python train.py corpus.txt --strategy multiworker   # one process per machine\n"
        "  python train.py corpus.txt --lr-rule umup --lr 0.3  # u-muP per-parameter learning rates\n"
        "  tensorboard --logdir runs/                          # the runs' logs/ folders",
    )
    p.add_argument("data", nargs="?", default=DEFAULT_DATA, help=f"UTF-8 text file (default {DEFAULT_DATA})")
    p.add_argument("--out", default=None, help=f"run folder (default {DEFAULT_RUN} for the shipped data, "
                   "else runs/<file name>)")
    p.add_argument("--task", default="auto", choices=("auto", "lm", "classify"))
    p.add_argument("--arch", default=None, choices=("transformer", "cnn", "mlp", "bag"),
                   help="default: transformer (lm), bag = fastText-style bag of word and character n-grams (classify)")
    p.add_argument("--tokenizer", default=None, choices=("word", "char", "jieba", "wordpunct", "bpe"),
                   help="default: word (lm; NLTK + jieba for Chinese), wordpunct (classify with bag: words and "
                   "punctuation runs, every CJK character a token); bpe = byte-level BPE trained on the corpus "
                   "(lm)")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="bpe: vocabulary size, the 4 special tokens included (default 4096)")
    p.add_argument("--lowercase", default=None, action=argparse.BooleanOptionalAction,
                   help="fold case (default: on for a classifier, off for a language model)")
    p.add_argument("--epochs", type=int, default=None,
                   help="at most this many epochs (default 30 lm, 10 classify); validation may stop earlier")
    p.add_argument("--max-steps", type=int, default=None, help="train for this many optimizer steps (split into equal epochs; at most #epochs-1 more when they do not divide it)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (lm), 64 (classify; 32 for a --arch other than bag)")
    p.add_argument("--seq-len", type=int, default=None, help="context length (lm, default 64) or tokens kept "
                   "per text (classify: default 1000 with bag, 64 otherwise)")
    p.add_argument("--width", type=int, default=None, help="default 128 (64 for bag)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-2 unit-scaled, "
                   "1e-3 with --no-unit-scaling)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--dropout", type=float, default=None, help="default 0")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (default 0)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="also validate every N steps (always at each epoch end)")
    p.add_argument("--patience", type=int, default=None, metavar="N",
                   help="stop after N validations without a lower validation loss and keep the best weights "
                   "(default 5 lm, 2 classify; 0 = never stop early, still keep the best)")
    p.add_argument("--buckets", type=int, default=100_000,
                   help="bag: hashed rows for word and character n-grams (default 100000)")
    p.add_argument("--word-ngrams", type=int, default=2, help="bag: longest word n-gram (default 2)")
    p.add_argument("--char-ngrams", type=_char_range, default=(3, 5), metavar="MIN-MAX",
                   help="bag: character n-gram lengths of each word (default 3-5; 0 = none)")
    p.add_argument("--no-calibration", dest="calibrate", action="store_false",
                   help="classify: skip temperature scaling on the validation split")
    p.add_argument("--precision", default="float32",
                   choices=("float32", "bfloat16", "float16", "fp8"),
                   help="compute format: bfloat16/float16 = Keras mixed policies (float32 weights), no loss "
                   "scaling; fp8 = simulated FP8 (E4M3 matmul inputs, E5M2 gradients, no scale factors)")
    p.add_argument("--loss-scaling", action="store_true",
                   help="wrap the optimizer in Keras's LossScaleOptimizer (how stock Keras runs float16)")
    p.add_argument("--track-scales", type=int, default=0, metavar="N",
                   help="every N steps record per-layer RMS and float16/FP8 under/overflow shares "
                   "(scales.json, scales.png, TensorBoard); 0 = off (default)")
    p.add_argument("--no-unit-scaling", dest="unit_scaling", action="store_false",
                   help="the stock-Keras baseline of the same shape")
    p.add_argument("--constraint", default="rms", choices=("rms", "l2", "none"),
                   help="UnitScaling weight constraint after each step (default rms)")
    p.add_argument("--tau", type=float, default=None, metavar="T",
                   help="one residual branch weight for every block (default: from the depth, "
                   "tau_k = 1/sqrt(depth + k), ops.residual_taus)")
    p.add_argument("--embeddings", default=None,
                   help="'word2vec' (train on the corpus), 'none', or a vectors file (.kv, word2vec .txt/.bin); "
                   "default word2vec, none for bag")
    p.add_argument("--min-count", type=int, default=1)
    p.add_argument("--max-vocab", type=int, default=20000)
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="held out for validation: a language model's last F of the characters, a classifier's "
                   "stratified F of the lines (default 0.1; a corpus of gigabytes can spare far less)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-jit", dest="jit_compile", action="store_false", default=None,
                   help="disable XLA compilation (a classifier never uses it: its batches vary in length)")
    p.add_argument("--strategy", default="auto", choices=("auto", "none", "mirrored", "multiworker"),
                   help="tf.distribute: mirrored = all local GPUs, multiworker = machines named by TF_CONFIG, "
                   "auto = multiworker if TF_CONFIG names >1 worker, else mirrored if >1 GPU, else none")
    p.add_argument("--batch-rule", default="global", choices=("global", "per-replica"),
                   help="global: --batch-size is the global batch, lr unchanged (default); per-replica: "
                   "global batch = replicas x --batch-size and lr x sqrt(replicas)")
    p.add_argument("--lr-rule", default="uniform", choices=("uniform", "umup"),
                   help="umup: u-muP per-parameter multipliers on the base --lr (hidden weights fan_in^-1/2 "
                   "x depth^-1/2, embeddings width^-1/2, norms/biases 1); unit-scaled models only")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="where a language model's corpus is kept tokenised for the next run (default "
                   "$LLM_UNITSCALE_CACHE, else ~/.cache/llm_unitscale)")
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--errors", default="strict", choices=("strict", "replace", "ignore"),
                   help="what to do with undecodable bytes")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--deterministic", action="store_true",
                   help="TensorFlow's op determinism (bit-identical reruns on GPU; CPU runs already are)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also save a resumable checkpoint every STEPS steps (default 0: by time only, "
                   "--checkpoint-seconds)")
    p.add_argument("--checkpoint-seconds", type=float, default=60.0, metavar="S",
                   help="save one at the first step or validation S seconds after the last save (default 60; "
                   "0 = at every validation and never by time between them); Ctrl-C always saves")
    p.add_argument("--log-every", type=int, default=0, metavar="STEPS",
                   help="print step, loss, ms/step and tokens/s every STEPS steps (default 0: every 5 seconds)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run at --out (never anything else), or an interrupted one")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--version", action="version", version=f"llm_unitscale {__version__}")
    return p


def _char_range(text: str) -> tuple[int, int]:
    """--char-ngrams: "MIN-MAX", "N" (= N-N) or "0" (none)."""
    try:
        low, _, high = text.partition("-")
        low, high = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX such as 3-5, or 0; got {text!r}") from None
    return (0, 0) if low == 0 else (low, high)


def _train(args: argparse.Namespace) -> int:
    from llm_unitscale.training import TrainConfig, summary_text, train

    out = args.out or (DEFAULT_RUN if args.data == DEFAULT_DATA else f"runs/{Path(args.data).stem or 'run'}")
    options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    options.update(out=out, constraint=None if args.constraint == "none" else args.constraint)
    summary = train(TrainConfig(**options))
    _emit(args, summary, summary_text(summary))
    return 0


def train_main(argv: list[str] | None = None) -> int:
    return _guard(_train, train_parser().parse_args(argv))


# ------------------------------------------------------------------------------------------------- predict
def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py",
        description="Predict with a trained run: next words (language model) or a label (classifier).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='examples:\n  python predict.py "我喜欢"\n'
        '  python predict.py "To be, or not to" --model runs/shakespeare --top-k 5 --generate 30\n'
        '  echo "a tedious, silly film" | python predict.py --model runs/reviews --json',
    )
    p.add_argument("sentences", nargs="*", help="input sentences (default: one per line from stdin)")
    p.add_argument("--model", default=DEFAULT_RUN, help=f"run folder (default {DEFAULT_RUN})")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--generate", type=int, default=0, metavar="N", help="also sample N tokens (lm)")
    p.add_argument("--stop", default=None, metavar="TEXT",
                   help='end a continuation before TEXT, e.g. "\\n" (one line) or "\\n\\n" (one paragraph); '
                   "backslash escapes \\n and \\t are understood (default: write all N tokens, across lines)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"sampling temperature for --generate, > 0; 0 = greedy (default {TEMPERATURE})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"nucleus sampling for --generate: keep the smallest set of tokens whose probabilities "
                   f"reach P, 0 < P <= 1 (default {TOP_P})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout (at the end; answers are otherwise printed as they come)")
    p.add_argument("--version", action="version", version=f"llm_unitscale {__version__}")
    return p


#: Defaults of the sampling options (argparse's default is None, to tell "not given" from "given").
TEMPERATURE, TOP_P = 0.8, 0.95
#: Classifier inputs are scored this many at a time (arguments, or lines piped in; one at a time from a terminal).
CLASSIFY_CHUNK = 64


def check_predict_options(args: argparse.Namespace, task: str, model: str) -> tuple[float, float]:
    """Refuse options that do not apply to the run's task or are out of range; return (temperature, top_p)."""
    from llm_unitscale.inference import InputError

    if args.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {args.top_k}")
    if args.generate < 0:
        raise InputError(f"--generate must be >= 0, got {args.generate}")
    given = [name for name, value in (("--generate", args.generate or None), ("--temperature", args.temperature),
                                      ("--top-p", args.top_p)) if value is not None]
    if task != "lm" and given:
        raise InputError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to language "
                         f"models, and {model} is a classifier (task {task})")
    temperature = TEMPERATURE if args.temperature is None else args.temperature
    top_p = TOP_P if args.top_p is None else args.top_p
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"--temperature must be > 0 (or 0 for greedy decoding), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InputError(f"--top-p must be in (0, 1], got {top_p}")
    if not args.generate and (args.temperature is not None or args.top_p is not None):
        raise InputError("--temperature and --top-p only apply when sampling: add --generate N")
    return temperature, top_p


def _input_sentences(args: argparse.Namespace) -> Iterator[str]:
    """The arguments, or the non-blank lines of stdin as they arrive (the first is read before anything else)."""
    from llm_unitscale.inference import InputError

    for sentence in args.sentences:
        if not sentence.strip():
            raise InputError(f"empty input sentence {sentence!r}: nothing to predict from")
    lines = iter(args.sentences) if args.sentences else (line.rstrip("\n") for line in sys.stdin if line.strip())
    first = next(lines, None)
    if first is None:
        raise InputError("no input: give sentences as arguments or one per line on stdin")
    return itertools.chain([first], lines)


def _lm_lines(r: dict) -> list[str]:
    lines = [printable(r["input"])]
    lines += [f"  note: {printable(n)}" for n in r.get("notes", [])]
    lines.append("  next: " + ", ".join(f"{printable(n['token'])} ({n['prob']:.3f})" for n in r["next"]))
    if "continuation" in r:
        lines.append(f"  continuation: {printable(r['continuation'])}")
    return lines


def _classify_lines(r: dict) -> list[str]:
    lines = [f"  note: {printable(n)}" for n in r.get("notes", [])]
    others = ", ".join(f"{printable(t['label'])} {t['prob']:.3f}" for t in r["top"][1:])
    lines.append(f"{printable(r['label'])} ({r['prob']:.3f})\t{printable(r['input'])}"
                 + (f"\t[{others}]" if others else ""))
    return lines


def _predict(args: argparse.Namespace) -> int:
    from llm_unitscale import inference
    from llm_unitscale.runs import load_config, load_run

    task = load_config(args.model)["task"]  # cheap: options are checked before the model loads
    temperature, top_p = check_predict_options(args, task, args.model)
    sentences = _input_sentences(args)
    run = load_run(args.model)
    results: list[dict] = []

    def answers() -> Iterator[dict]:
        if run.task == "lm":
            for s in sentences:
                result = inference.next_tokens(run, s, args.top_k)
                if args.generate:
                    result["continuation"] = inference.generate(
                        run, s, args.generate, temperature, top_p, args.seed, stop=_unescape(args.stop)
                    )
                yield result
            return
        chunk = 1 if not args.sentences and sys.stdin.isatty() else CLASSIFY_CHUNK
        while batch := list(itertools.islice(sentences, chunk)):
            yield from inference.classify(run, batch, args.top_k)

    render = _lm_lines if run.task == "lm" else _classify_lines
    try:
        with interrupts.sticky_interrupt() as check_interrupted:
            for result in answers():
                results.append(result)
                if not args.json:
                    print("\n".join(render(result)), flush=True)
                check_interrupted()
    except KeyboardInterrupt:
        if args.json:
            _emit(args, {"task": run.task, "model": str(run.path), "results": results, "interrupted": True}, "")
        raise KeyboardInterrupt(f"after {len(results)} answer{'s' * (len(results) != 1)} "
                                f"({'in the JSON document' if args.json else 'printed above'})") from None
    if args.json:
        _emit(args, {"task": run.task, "model": str(run.path), "results": results}, "")
    return 0


def _unescape(text: str | None) -> str | None:
    """``--stop`` as typed in a shell: the two characters backslash-n are a line break (and \\t a tab)."""
    if text is None:
        return None
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in escapes:
            out.append(escapes[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out) or None


def predict_main(argv: list[str] | None = None) -> int:
    return _guard(_predict, predict_parser().parse_args(argv))


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a trained run on a test file (default: the run's own validation split).",
        epilog="example: python evaluate.py heldout.txt --model runs/shakespeare --plot",
    )
    p.add_argument("data", nargs="?", default=None, help="test file (default: the run's validation.txt)")
    p.add_argument("--model", default=DEFAULT_RUN, help=f"run folder (default {DEFAULT_RUN})")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="where a language model's corpus is kept tokenised for the next run (default "
                   "$LLM_UNITSCALE_CACHE, else ~/.cache/llm_unitscale)")
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--errors", default="strict", choices=("strict", "replace", "ignore"))
    p.add_argument("--plot", action="store_true",
                   help="save a confusion matrix / per-position loss plot in the run folder")
    p.add_argument("--plot-file", metavar="PNG", default=None,
                   help="save the plot here instead (a new file, or a plot written by this package)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--version", action="version", version=f"llm_unitscale {__version__}")
    return p


def plot_target(args: argparse.Namespace, run_path: Path, task: str) -> Path | None:
    """Where ``--plot`` / ``--plot-file`` write, checked before any work: a new file or a plot of ours."""
    from llm_unitscale import files

    if args.plot_file is None and not args.plot:
        return None
    target = Path(args.plot_file) if args.plot_file else run_path / (
        "confusion.png" if task == "classify" else "position_loss.png")
    # In the run folder any PNG of that name is an earlier plot (versions before the mark wrote none).
    ours = files.is_our_png if args.plot_file else files.is_png
    files.check_replaceable(target, ours, "a plot written by llm_unitscale", "remove it or pass another --plot-file")
    if not target.parent.is_dir():
        raise files.OutputError(f"{target}: cannot write the plot, {target.parent} is not a folder")
    return target


def check_test_file(path: str, text: str, task: str, model: str) -> None:
    """Refuse a test file whose kind does not match the run: labelled lines for a language model, plain text
    (or a mix) for a classifier. ``data.detect_task`` decides, as it does for training."""
    from llm_unitscale import data

    lines = text.split("\n")
    if task == "classify":
        if data.detect_task(lines, path) == "lm":
            raise data.DataError(path, f"no labelled lines ('__label__NAME text' or 'NAME<TAB>text'), but {model} "
                                       "is a classifier; evaluate it on labelled lines, or a language-model run on "
                                       "this text")
        return
    try:
        kind = data.detect_task(lines, path)
    except data.DataError:
        return  # a few label-like lines in plain text: a language model reads them as text
    if kind == "classify":
        example = next(line for line in lines if data.parse_labelled_line(line) is not None)
        raise data.DataError(path, f"labelled lines (e.g. {printable(example[:40])!r}), but {model} is a language "
                                   "model; evaluate it on plain text, or a classifier run on this file")


def _evaluate(args: argparse.Namespace) -> int:
    import time

    from llm_unitscale import evaluation
    from llm_unitscale.data import read_text
    from llm_unitscale.runs import VALIDATION, load_config, load_run

    task = load_config(args.model)["task"]
    target = plot_target(args, Path(args.model), task)
    path = args.data or str(Path(args.model) / VALIDATION)
    text = read_text(path, args.encoding, args.errors)
    check_test_file(path, text, task, args.model)
    run = load_run(args.model)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        if run.task == "lm":
            metrics = evaluation.evaluate_lm(run, text)
        else:
            metrics = evaluation.evaluate_classify(run, text.split("\n"))
    metrics.update(model=str(run.path), data=path, seconds=round(time.perf_counter() - started, 3))
    if target is not None:
        evaluation.plot(metrics, target)
        metrics["plot"] = str(target)
    position = metrics.pop("position_loss", None)
    if run.task == "lm":
        text_out = (f"{printable(path)}: {metrics['tokens']} tokens, loss {metrics['loss']:.4f}, perplexity "
                    f"{metrics['perplexity']:.2f}, accuracy {metrics['accuracy']:.2%}, top-5 "
                    f"{metrics['top5_accuracy']:.2%}, bits/char {metrics['bits_per_char']:.3f}, "
                    f"unknown {metrics['unk_rate']:.2%}")
    else:
        names = [printable(label) for label in metrics["labels"]]
        width = max(len(label) for label in names)
        rows = [f"{printable(path)}: {metrics['examples']} examples, accuracy {metrics['accuracy']:.2%}, "
                f"macro-F1 {metrics['macro_f1']:.3f}, calibration error (ECE) {metrics['ece']:.3f}",
                "confusion (rows true, columns predicted):",
                " " * (width + 2) + " ".join(f"{label:>{width}}" for label in names)]
        for label, row in zip(names, metrics["confusion"], strict=True):
            rows.append(f"{label:>{width}}  " + " ".join(f"{v:>{width}}" for v in row))
        if "unseen_labels" in metrics:
            rows.append(f"labels the model has never seen (counted as errors): "
                        f"{printable(str(metrics['unseen_labels']))}")
        text_out = "\n".join(rows)
    if "plot" in metrics:
        text_out += f"\nplot: {printable(metrics['plot'])}"
    if position is not None and args.json:
        metrics["position_loss"] = position
    _emit(args, metrics, text_out)
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    return _guard(_evaluate, evaluate_parser().parse_args(argv))


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-unitscale-export",
        description="Export a trained run as a TensorFlow SavedModel (signature serving_default: "
        "int32 token_ids (batch, time) -> float32 logits) for TF Serving or tf.saved_model.load.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m llm_unitscale.export runs/default            # -> runs/default/export\n"
        "  llm-unitscale-export runs/default serving/llm/1      # a TF Serving version folder\n"
        "  saved_model_cli show --dir runs/default/export --all",
    )
    p.add_argument("run", help="run folder (from train.py)")
    p.add_argument("out", nargs="?", default=None, help="SavedModel folder (default RUN/export)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--version", action="version", version=f"llm_unitscale {__version__}")
    return p


def _export(args: argparse.Namespace) -> int:
    from llm_unitscale.serving import INPUT_NAME, OUTPUT_NAME, SIGNATURE, export_run

    path = export_run(args.run, args.out, overwrite=args.overwrite)
    document = {"export": str(path), "signature": SIGNATURE, "input": INPUT_NAME, "output": OUTPUT_NAME}
    print(json.dumps(document) if args.json else f"exported {args.run} to {path} (signature {SIGNATURE}: "
          f"int32 {INPUT_NAME} (batch, time) -> float32 {OUTPUT_NAME})", flush=True)
    return 0


def export_main(argv: list[str] | None = None) -> int:
    return _guard(_export, export_parser().parse_args(argv))
