"""Command lines of train.py, predict.py and evaluate.py (DESIGN §1).

Human-readable output by default, one JSON document on stdout with ``--json`` (logs and progress go to stderr).
Exit status: 0 success, 2 bad usage or bad input (one line on stderr naming the file and the problem),
1 internal error, 130 interrupted. ``LLM_UNITSCALE_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from llm_unitscale import __version__

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
    from llm_unitscale.inference import InputError
    from llm_unitscale.preprocessing.embeddings import EmbeddingError
    from llm_unitscale.preprocessing.tokenizer import TokenizerError
    from llm_unitscale.preprocessing.vocabulary import VocabularyError
    from llm_unitscale.runs import RunError
    from llm_unitscale.training import ConfigError

    return (DataError, RunError, VocabularyError, TokenizerError, EmbeddingError, InputError, ConfigError)


def _guard(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; turn known failures into one line on stderr and an exit status."""
    debug = os.environ.get("LLM_UNITSCALE_DEBUG") == "1"
    try:
        _quiet_warnings()
        return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        from llm_unitscale.checkpoint import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            print(f"{exc}; resume with: {_resume_command()}", file=sys.stderr)
            return 130
        if isinstance(exc, _user_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, FloatingPointError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(rerun with LLM_UNITSCALE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


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
    p.add_argument("--tokenizer", default=None, choices=("word", "char", "jieba", "wordpunct"),
                   help="default: word (lm; NLTK + jieba for Chinese), wordpunct (classify with bag: words and "
                   "punctuation runs, every CJK character a token)")
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
    p.add_argument("--embeddings", default=None,
                   help="'word2vec' (train on the corpus), 'none', or a vectors file (.kv, word2vec .txt/.bin); "
                   "default word2vec, none for bag")
    p.add_argument("--min-count", type=int, default=1)
    p.add_argument("--max-vocab", type=int, default=20000)
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
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--errors", default="strict", choices=("strict", "replace", "ignore"),
                   help="what to do with undecodable bytes")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--deterministic", action="store_true",
                   help="TensorFlow's op determinism (bit-identical reruns on GPU; CPU runs already are)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="save a resumable checkpoint every STEPS steps and at each validation (default 100 lm, "
                   "0 = only at each validation for a classifier, whose epochs take seconds)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
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
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--version", action="version", version=f"llm_unitscale {__version__}")
    return p


def _predict(args: argparse.Namespace) -> int:
    from llm_unitscale import inference
    from llm_unitscale.runs import load_run

    sentences = args.sentences or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not sentences:
        raise inference.InputError("no input: give sentences as arguments or one per line on stdin")
    if args.top_k < 1 or args.generate < 0:
        raise inference.InputError("--top-k must be >= 1 and --generate >= 0")
    run = load_run(args.model)
    if run.task == "lm":
        results = []
        for s in sentences:
            result = inference.next_tokens(run, s, args.top_k)
            if args.generate:
                result["continuation"] = inference.generate(
                    run, s, args.generate, args.temperature, args.top_p, args.seed
                )
            results.append(result)
        lines = []
        for r in results:
            lines.append(f"{r['input']}")
            lines += [f"  note: {n}" for n in r.get("notes", [])]
            lines.append("  next: " + ", ".join(f"{n['token']} ({n['prob']:.3f})" for n in r["next"]))
            if "continuation" in r:
                lines.append(f"  continuation: {r['continuation']}")
    else:
        results = inference.classify(run, sentences, args.top_k)
        lines = []
        for r in results:
            lines += [f"  note: {n}" for n in r.get("notes", [])]
            others = ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"][1:])
            lines.append(f"{r['label']} ({r['prob']:.3f})\t{r['input']}" + (f"\t[{others}]" if others else ""))
    _emit(args, {"task": run.task, "model": str(run.path), "results": results}, "\n".join(lines))
    return 0


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
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--errors", default="strict", choices=("strict", "replace", "ignore"))
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="save a confusion matrix / per-position loss plot (default: in the run folder)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--version", action="version", version=f"llm_unitscale {__version__}")
    return p


def _evaluate(args: argparse.Namespace) -> int:
    import time

    from llm_unitscale import evaluation
    from llm_unitscale.data import read_text
    from llm_unitscale.runs import VALIDATION, load_run

    run = load_run(args.model)
    path = args.data or str(run.path / VALIDATION)
    text = read_text(path, args.encoding, args.errors)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        if run.task == "lm":
            metrics = evaluation.evaluate_lm(run, text)
        else:
            metrics = evaluation.evaluate_classify(run, text.split("\n"))
    metrics.update(model=str(run.path), data=path, seconds=round(time.perf_counter() - started, 3))
    if args.plot is not None:
        target = Path(args.plot) if args.plot else run.path / ("confusion.png" if run.task == "classify"
                                                                else "position_loss.png")
        evaluation.plot(metrics, target)
        metrics["plot"] = str(target)
    position = metrics.pop("position_loss", None)
    if run.task == "lm":
        text_out = (f"{path}: {metrics['tokens']} tokens, loss {metrics['loss']:.4f}, perplexity "
                    f"{metrics['perplexity']:.2f}, accuracy {metrics['accuracy']:.2%}, top-5 "
                    f"{metrics['top5_accuracy']:.2%}, bits/char {metrics['bits_per_char']:.3f}, "
                    f"unknown {metrics['unk_rate']:.2%}")
    else:
        width = max(len(label) for label in metrics["labels"])
        rows = [f"{path}: {metrics['examples']} examples, accuracy {metrics['accuracy']:.2%}, "
                f"macro-F1 {metrics['macro_f1']:.3f}, calibration error (ECE) {metrics['ece']:.3f}",
                "confusion (rows true, columns predicted):",
                " " * (width + 2) + " ".join(f"{label:>{width}}" for label in metrics["labels"])]
        for label, row in zip(metrics["labels"], metrics["confusion"], strict=True):
            rows.append(f"{label:>{width}}  " + " ".join(f"{v:>{width}}" for v in row))
        if "unseen_labels" in metrics:
            rows.append(f"labels the model has never seen (counted as errors): {metrics['unseen_labels']}")
        text_out = "\n".join(rows)
    if position is not None and args.json:
        metrics["position_loss"] = position
    _emit(args, metrics, text_out)
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    return _guard(_evaluate, evaluate_parser().parse_args(argv))
