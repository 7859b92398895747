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
    p.add_argument("--arch", default="transformer", choices=("transformer", "cnn", "mlp"))
    p.add_argument("--tokenizer", default="word", choices=("word", "char", "jieba"))
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-steps", type=int, default=None, help="train for this many optimizer steps (split into equal epochs; at most #epochs-1 more when they do not divide it)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64, help="context length (lm) or max tokens per text")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-2 unit-scaled, "
                   "1e-3 with --no-unit-scaling)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.0)
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
    p.add_argument("--embeddings", default="word2vec",
                   help="'word2vec' (train on the corpus), 'none', or a vectors file (.kv, word2vec .txt/.bin)")
    p.add_argument("--min-count", type=int, default=1)
    p.add_argument("--max-vocab", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-jit", dest="jit_compile", action="store_false", help="disable XLA compilation")
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
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS",
                   help="save a resumable checkpoint every STEPS steps and at each epoch end (default 100)")
    p.add_argument("--log-every", type=int, default=0, metavar="STEPS",
                   help="print step, loss, ms/step and tokens/s every STEPS steps (default 0: every 5 seconds)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--version", action="version", version=f"llm_unitscale {__version__}")
    return p


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
                    run, s, args.generate, args.temperature, args.top_p, args.seed, stop=_unescape(args.stop)
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
                f"macro-F1 {metrics['macro_f1']:.3f}", "confusion (rows true, columns predicted):",
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
