"""Training: text file → tokenizer, vocabulary, Word2Vec-initialised model → ``model.fit`` → run folder.

Optimiser: AdamW with linear warm-up and cosine decay (``keras.optimizers.schedules.CosineDecay``). Unit-scaled
gradients differ from the true gradient by one constant per tensor, which Adam ignores, and unit-scaled models
want a larger learning rate than stock Keras ones. ``DEFAULT_LR`` comes from ``benchmarks/lr_sweep.py``
(default transformer, lee_background.cor, 600 steps): unit-scaled best at 1e-2 (val loss 6.104), baseline best
at 1e-3 (6.131).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import keras
import numpy as np

from llm_unitscale import checkpoint, files, runs
from llm_unitscale import data as data_mod
from llm_unitscale import precision as precision_mod
from llm_unitscale.corpus import Corpus, prepare_classifier, prepare_lm, read_for_task
from llm_unitscale.step_log import StepLog

#: Default peak learning rate: unit-scaled vs stock Keras baseline (from the sweep; see the module docstring).
DEFAULT_LR = {True: 1e-2, False: 1e-3}
#: Character-level language models (``--tokenizer char``): from the sweep of README "What makes the unit-scaled
#: language model learn" (warpeace, nanoGPT's CPU recipe); word-level ones keep ``DEFAULT_LR``, which the same
#: rule change left best on word-level news (lee_background, 600 steps: 6.09 at 1e-2, 6.78 at 3e-2).
CHAR_LM_LR = {True: 3e-2, False: 2e-3}
#: The bag-of-n-grams classifier's default peak learning rates (README, "Choosing the classifier's defaults").
BAG_LR = {True: 3e-2, False: 3e-3}
#: Options whose default depends on the task: ``None`` in :class:`TrainConfig` means "the task's default".
#: Language model: the values of every earlier version. Classifier: the bag-of-n-grams model and the
#: settings chosen by measurement (README, "Choosing the classifier's defaults").
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "lm": dict(arch="transformer", tokenizer="word", lowercase=False, epochs=30, batch_size=16, seq_len=64,
               width=128, dropout=0.0, embeddings="word2vec", patience=5, jit_compile=True),
    "classify": dict(arch="bag", tokenizer="wordpunct", lowercase=True, epochs=10, batch_size=64, seq_len=1000,
                     width=64, dropout=0.0, embeddings="none", patience=2, jit_compile=False),
}
#: A classifier other than ``bag`` (a sequence model over token ids) keeps the earlier classifier defaults.
SEQUENCE_CLASSIFIER_DEFAULTS = dict(tokenizer="word", seq_len=64, width=128, embeddings="word2vec", patience=3,
                                    batch_size=32)
#: What must match between an interrupted run and its --resume (other options, e.g. --lr, may change).
RESUME_KEYS = ("data_sha256", "task", "arch", "vocab_size", "width", "depth", "heads", "seq_len", "batch_size",
               "epochs", "max_steps", "unit_scaling", "seed", "tokenizer", "eval_every", "patience", "features",
               "val_fraction")
#: --precision → the model's Keras dtype policy (mixed policies, simulated fp8, keras-float8: see precision.py).
PRECISIONS = precision_mod.POLICIES


class ConfigError(ValueError):
    """An impossible option value (exit status 2)."""


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run; saved as config.json (with tokenizer, labels, versions, data hash)."""

    data: str = "data/dataset.txt"
    out: str = "runs/default"
    task: str = "auto"
    arch: str | None = None  # None = the task's default (TASK_DEFAULTS), likewise for every None below
    tokenizer: str | None = None
    lowercase: bool | None = None
    epochs: int | None = None  # a ceiling: validation may stop the run earlier (patience)
    max_steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    width: int | None = None
    depth: int = 4
    heads: int = 4
    lr: float | None = None
    warmup_steps: int = 50
    weight_decay: float = 0.0
    dropout: float | None = None
    tau: float | None = None  # residual branch weight; None: from the depth (ops.residual_taus)
    constraint: str | None = "rms"
    precision: str = "float32"
    loss_scaling: bool = False  # wrap the optimizer in keras.optimizers.LossScaleOptimizer (float16 baseline)
    track_scales: int = 0  # record per-layer scales every N steps (scale_tracker.ScaleTracker); 0 = off
    unit_scaling: bool = True
    embeddings: str | None = None
    min_count: int = 1
    max_vocab: int | None = 20000
    vocab_size: int | None = None  # bpe: the vocabulary, special tokens included (bpe.DEFAULT_VOCAB_SIZE)
    cache: str | None = None  # prepared corpora (prepared.cache_dir)
    val_fraction: float = 0.1
    seed: int = 0
    jit_compile: bool | None = None
    eval_every: int | None = None  # also validate every N steps (always at each epoch end)
    patience: int | None = None  # stop after this many validations without a new best val loss; 0 = never
    buckets: int = 100_000  # bag: hashed rows for word and character n-grams (preprocessing.ngrams)
    word_ngrams: int = 2  # bag: longest word n-gram
    char_ngrams: tuple[int, int] = (3, 5)  # bag: character n-gram lengths; (0, 0) = none
    calibrate: bool = True  # classify: temperature scaling on the validation split (calibration.py)
    encoding: str = "utf-8"
    errors: str = "strict"
    resume: bool = False
    checkpoint_every: int = 0  # also save a checkpoint every N steps (0: not by step count)
    checkpoint_seconds: float = 60.0  # save at the first step or validation this long after the last save
    log_every: int = 0  # print a progress line every N steps; 0 = every few seconds (step_log.StepLog)
    deterministic: bool = False
    overwrite: bool = False
    strategy: str = "auto"  # auto | none | mirrored | multiworker (llm_unitscale.distribute)
    batch_rule: str = "global"  # global | per-replica (llm_unitscale.distribute.scaled_batch_and_lr)
    lr_rule: str = "uniform"  # uniform | umup: per-parameter lr multipliers (llm_unitscale.optimizers)

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.arch == "bag":
            return BAG_LR[self.unit_scaling]
        if self.task == "lm" and self.tokenizer == "char":
            return CHAR_LM_LR[self.unit_scaling]
        return DEFAULT_LR[self.unit_scaling]

    def with_task_defaults(self, task: str) -> TrainConfig:
        """This config for ``task`` ("lm" or "classify") with every option left at None set to the task's
        default (:data:`TASK_DEFAULTS`; a classifier other than ``bag`` takes
        :data:`SEQUENCE_CLASSIFIER_DEFAULTS`)."""
        defaults = dict(TASK_DEFAULTS[task])
        if task == "classify" and self.arch not in (None, "bag"):
            defaults.update(SEQUENCE_CLASSIFIER_DEFAULTS)
        chosen = {name: value if (value := getattr(self, name)) is not None else default
                  for name, default in defaults.items()}
        if task == "classify":  # batches of varying length: XLA would compile every new shape again
            chosen["jit_compile"] = False
        return dataclasses.replace(self, task=task, **chosen)

    def validate(self) -> None:
        """Reject impossible sizes with a one-line ValueError before any work is done (options still at
        None, the task's defaults, are checked once :meth:`with_task_defaults` has set them)."""
        for name in ("epochs", "batch_size", "seq_len", "width", "depth", "heads", "min_count", "buckets",
                     "word_ngrams"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        limits = {"seq_len": 8192, "width": 8192, "depth": 128, "batch_size": 65536, "buckets": 10_000_000}
        for name, top in limits.items():
            if (getattr(self, name) or 0) > top:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} is too large (at most {top})")
        if not isinstance(self.log_every, int) or self.log_every < 0:
            raise ConfigError(f"--log-every must be a number of steps >= 0 (0 = every few seconds), got {self.log_every}")
        for name in ("max_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 0):
            raise ConfigError(f"--patience must be a number of validations >= 0 (0 = never stop early), "
                              f"got {self.patience}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be a number of steps >= 0 (0 = only at each validation), "
                              f"got {self.checkpoint_every}")
        if not isinstance(self.checkpoint_seconds, int | float) or not 0 <= self.checkpoint_seconds < math.inf:
            raise ConfigError(f"--checkpoint-seconds must be a number of seconds >= 0, got {self.checkpoint_seconds}")
        low, high = self.char_ngrams
        if (low, high) != (0, 0) and not 1 <= low <= high <= 20:
            raise ConfigError(f"--char-ngrams must be MIN-MAX with 1 <= MIN <= MAX <= 20, or 0, got {low}-{high}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        from llm_unitscale.models import ARCHS, TASK_ARCHS

        if self.arch is not None and self.arch not in ARCHS:
            raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch}")
        if self.task in TASK_ARCHS and self.arch is not None and self.arch not in TASK_ARCHS[self.task]:
            raise ConfigError(f"--arch {self.arch} cannot train a {'language model' if self.task == 'lm' else self.task}"
                              f"; choose one of {', '.join(TASK_ARCHS[self.task])}")
        if self.arch == "transformer" and self.width is not None and self.width % self.heads:
            raise ConfigError(f"--width {self.width} must be divisible by --heads {self.heads}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.lr is not None and not (0.0 < self.lr < 10.0):
            raise ConfigError(f"--lr must be in (0, 10), got {self.lr}")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"--tau must be a positive number, got {self.tau}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision}")
        from llm_unitscale import distribute, optimizers

        for name, allowed in (("strategy", distribute.STRATEGIES), ("batch_rule", distribute.BATCH_RULES),
                              ("lr_rule", optimizers.LR_RULES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)}")
        try:
            distribute.resolve_strategy(self.strategy)  # e.g. multiworker without TF_CONFIG
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if self.precision == "keras-float8" and self.unit_scaling:
            raise ConfigError("--precision keras-float8 (Keras's own float8 layers) needs --no-unit-scaling; "
                              "unit-scaled models use --precision fp8")
        if self.tokenizer == "bpe" and self.task == "classify":
            raise ConfigError("--tokenizer bpe trains language models; a classifier takes word, char, jieba or "
                              "wordpunct")
        from llm_unitscale.preprocessing.bpe import MIN_VOCAB_SIZE

        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or not
                                            MIN_VOCAB_SIZE <= self.vocab_size <= 1 << 24):
            raise ConfigError(f"--vocab-size must be an integer from {MIN_VOCAB_SIZE} (the 256 bytes and 4 special "
                              f"tokens) to {1 << 24}, got {self.vocab_size}")
        if self.vocab_size is not None and self.tokenizer not in (None, "bpe"):
            raise ConfigError("--vocab-size sets the size of a BPE vocabulary (--tokenizer bpe); the other "
                              "tokenizers take --max-vocab")
        if not isinstance(self.track_scales, int) or self.track_scales < 0:
            raise ConfigError(f"--track-scales must be a number of steps >= 0 (0 = off), got {self.track_scales}")


def datasets(cfg: TrainConfig, corpus: Corpus) -> tuple[Callable[[int, int], Any], Any, int]:
    """(train batches ``(start_step, stop_step) → dataset``, validation dataset, steps per epoch), batched by the
    *global* batch size. Training batch k is a pure function of k, so a resumed run sees the same batches.

    The global batch is ``cfg.batch_size``, or replicas × it under ``--batch-rule per-replica``
    (``distribute.scaled_batch_and_lr``); Keras splits each batch over the replicas.
    """
    from llm_unitscale import distribute

    replicas = int(distribute.get_strategy(cfg.strategy).num_replicas_in_sync)
    batch, _ = distribute.scaled_batch_and_lr(cfg.batch_size, 0.0, replicas, cfg.batch_rule)
    if corpus.task == "lm":
        def train(start: int, stop: int) -> Any:
            return data_mod.lm_train_batches(corpus.train, cfg.seq_len, batch, cfg.seed, start, stop)

        val = data_mod.lm_eval_batches(corpus.val, cfg.seq_len, validation_batch(batch, cfg.seq_len))
        return train, val, data_mod.lm_steps_per_epoch(len(corpus.train), cfg.seq_len, batch)

    longest = corpus.features.max_features if corpus.features is not None else cfg.seq_len

    def train(start: int, stop: int) -> Any:  # noqa: F811 (one of the two per task)
        return data_mod.classify_train_batches(*corpus.train, batch, longest, cfg.seed, start, stop)

    val = data_mod.classify_dataset(*corpus.val, batch, longest, shuffle=False)
    return train, val, data_mod.classify_steps_per_epoch(len(corpus.train[1]), batch)


#: Tokens per validation batch of a language model (at least one training batch).
VALIDATION_TOKENS = 8192


def validation_batch(batch: int, seq_len: int) -> int:
    """Windows per validation batch of a language model: a whole multiple of the training batch holding about
    ``VALIDATION_TOKENS`` tokens. The validation loss is a mean over every window whatever the batch, but a
    forward pass over 12 windows of 64 characters leaves the matrix units idle: the whole 320k-character tail of
    warpeace took 6.7 s in batches of 12 and 4.2 s in batches of 64 (recipe model, 2 cores)."""
    return batch * max(1, VALIDATION_TOKENS // (batch * seq_len))


def epoch_plan(steps_per_epoch: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(epochs, steps per epoch) to run. Without ``max_steps``: as given. With it: the fewest equal epochs
    (Keras runs epochs of one length) of at most ``steps_per_epoch`` steps that cover ``max_steps``, i.e.
    E = ⌈max_steps / steps_per_epoch⌉ epochs of ⌈max_steps / E⌉ steps: exactly max_steps when E divides it,
    fewer than E steps more otherwise (never a whole extra epoch)."""
    if max_steps is None:
        return epochs, steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    return epochs, math.ceil(max_steps / epochs)


def init_embeddings(cfg: TrainConfig, corpus: Corpus, model: Any, work: Path, log: TextIO) -> dict:
    """Initialise the token embedding table from Word2Vec (:func:`word2vec_vectors`) or the user's vectors."""
    if cfg.embeddings == "none":  # gensim is imported only to train or read vectors (≈ 1 s)
        return {"embeddings": "none"}
    from llm_unitscale.preprocessing import embeddings as emb

    if cfg.embeddings == "word2vec":
        kv, write = word2vec_vectors(cfg, corpus, log)
    else:
        kv = emb.load_keyed_vectors(cfg.embeddings)
        if kv.vector_size != cfg.width:
            raise emb.EmbeddingError(
                f"{cfg.embeddings}: vectors have {kv.vector_size} dimensions but the model width is "
                f"{cfg.width}; pass --width {kv.vector_size}"
            )
        write = functools.partial(emb.save_keyed_vectors, kv)
    matrix, coverage = emb.embedding_matrix(corpus.vocab, kv, seed=cfg.seed)
    table = model.get_layer("embedding").embeddings
    if not cfg.unit_scaling:  # keep the stock model's init scale: rows at the RMS of its initial table
        matrix = matrix * float(np.sqrt(np.mean(np.square(table.numpy()))))
    if matrix.shape[0] < table.shape[0]:  # bag: the vocabulary's rows come first, then the n-gram buckets
        matrix = np.concatenate([matrix, table.numpy()[matrix.shape[0]:]])
    table.assign(matrix.astype(table.dtype))
    write(work / runs.EMBEDDINGS)
    print(f"embeddings: {cfg.embeddings}, coverage {coverage:.1%} of the vocabulary", file=log)
    return {"embeddings": cfg.embeddings, "embedding_coverage": round(float(coverage), 4)}


def word2vec_vectors(cfg: TrainConfig, corpus: Corpus, log: TextIO) -> tuple[Any, Callable[[Path], None]]:
    """(vectors, write): the corpus's Word2Vec vectors and how to write the run's ``embeddings.kv`` to a path.

    A language model reads the vectors an earlier run on the same prepared corpus kept (``embedding_cache``;
    no gensim import) and copies that run's file; otherwise they are trained now, and writing the run's file
    also keeps them for the next run."""
    from llm_unitscale import embedding_cache
    from llm_unitscale.preprocessing import embeddings as emb

    settings = embedding_cache.settings(cfg.width, cfg.seed)
    entry = None
    if corpus.prepared_path is not None and embedding_cache.enabled():
        entry = embedding_cache.entry_path(corpus.prepared_path, settings)
        found = embedding_cache.load(entry, settings)
        if found is not None:
            print(f"Word2Vec ({cfg.width} dims, {found.manifest['epochs']} epochs on {found.manifest['tokens']:,} "
                  f"tokens): reusing {entry}", file=log)
            return found, functools.partial(files.atomic_copy, found.keyed_vectors_file)
    lines, epochs, every = corpus.word2vec_lines()
    sample = "" if len(lines) == every else f" (a sample of {every:,})"
    tokens = sum(map(len, lines))
    print(f"training Word2Vec ({cfg.width} dims, {epochs} epoch{'s' * (epochs > 1)}) on {len(lines):,} "
          f"lines{sample}, {tokens:,} tokens", file=log)
    kv = emb.train_word2vec(lines, vector_size=cfg.width, seed=cfg.seed, epochs=epochs, progress=True)

    def write(path: Path) -> None:
        emb.save_keyed_vectors(kv, path)
        if entry is not None:
            embedding_cache.store(entry, settings, kv, path, {"lines": len(lines), "tokens": tokens,
                                                              "epochs": epochs}, log)

    return kv, write


class Throughput(keras.callbacks.Callback):
    """Measures training tokens per second (time inside training batches only; validation excluded)."""

    def __init__(self, tokens_per_step: int) -> None:
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.seconds = 0.0
        self.steps = 0
        self._start = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.seconds += time.perf_counter() - self._start
        self.steps += 1

    @property
    def tokens_per_second(self) -> float:
        return self.steps * self.tokens_per_step / self.seconds if self.seconds else 0.0


def plot_history(history: dict, path: Path, steps_per_epoch: int) -> None:
    """training.png: loss and accuracy at each validation (x: epochs, fractional with ``--eval-every``),
    train and validation; a dotted line marks the validation whose weights were kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    at = [step / steps_per_epoch for step in history.get("step", [])]
    best = int(np.argmin(history["val_loss"])) if history.get("val_loss") else None
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key)
            if values:
                ax.plot(at or range(1, len(values) + 1), values, style, label=(prefix or "train_") + key)
        if best is not None and at:
            ax.axvline(at[best], color="grey", linestyle=":", label="kept")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    runs.save_figure(fig, path)


def distribution_scope(cfg: TrainConfig) -> Any:
    """The context in which the model and optimizer are created (a ``tf.distribute`` strategy scope).

    ``cfg.strategy`` picks it (``llm_unitscale.distribute``); under more than one replica it sets
    ``cfg.jit_compile = False`` with a note on stderr.
    """
    from llm_unitscale import distribute

    return distribute.strategy_scope(cfg)


def make_optimizer(cfg: TrainConfig, lr: float, total_steps: int) -> keras.optimizers.Optimizer:
    """AdamW, linear warm-up to ``lr`` then cosine decay to lr/10 (``optimizers.WarmupCosineDecay``: the peak
    and the lengths are inputs of the compiled step, so another ``--lr`` or ``--max-steps`` reuses it).

    ``optimizers.UnitAdamW``: for unit-scaled models ``cfg.lr_rule`` ("umup": u-μP per-parameter multipliers,
    "uniform": none) and the √replicas gradient correction under tf.distribute; the stock baseline always gets
    one learning rate and no correction (it only shares the dense all-reduce of embedding gradients). ``lr`` is
    the single-replica rate; under ``cfg.batch_rule`` "per-replica" it is rescaled for the replica count
    (``distribute.scaled_batch_and_lr``).
    """
    from llm_unitscale import distribute, optimizers

    _, lr = distribute.scaled_batch_and_lr(cfg.batch_size, lr, distribute.num_replicas(), cfg.batch_rule)
    warmup = min(cfg.warmup_steps, max(total_steps // 10, 1))
    schedule = optimizers.WarmupCosineDecay(
        0.0, decay_steps=max(total_steps - warmup, 1), alpha=0.1, warmup_target=lr, warmup_steps=warmup
    )
    return optimizers.UnitAdamW(
        schedule, weight_decay=cfg.weight_decay, beta_2=0.99, lr_rule=cfg.lr_rule if cfg.unit_scaling else "uniform",
        replica_correction=cfg.unit_scaling, sparse_updates=cfg.arch == "bag",
        position_lr=optimizers.position_lr(cfg.unit_scaling),
    )


def compile_model(cfg: TrainConfig, model: Any, optimizer: keras.optimizers.Optimizer) -> None:
    """Compile with the model's loss, accuracy, XLA as configured and no automatic loss scaling.

    ``cfg.loss_scaling`` wraps the optimizer in Keras's dynamic ``LossScaleOptimizer`` (how stock Keras runs
    float16); ``--precision keras-float8`` quantizes the model's Dense/EinsumDense layers with
    ``model.quantize("float8")`` first (Keras's delayed-scaling float8 training).
    """
    from llm_unitscale.models import loss_for

    if cfg.precision == "keras-float8":
        model.quantize("float8")
    if cfg.loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer, loss=loss_for(cfg.unit_scaling), metrics=["accuracy"],
        jit_compile=cfg.jit_compile, auto_scale_loss=False,
    )


#: Fewest validations in a run for which its forward pass is worth compiling with XLA. Measured by
#: ``python benchmarks/validation_xla.py --repeats 3`` (the recipe model on warpeace's tail, 4994 windows of 64
#: characters, fresh processes, 2 cores; medians): the first validation takes 8.15 s with XLA (two compilations:
#: the full batches and the partial last one) and 6.00 s without, each later one 3.37 s with XLA and 4.45 s
#: without — XLA is ahead from the third validation on (earlier measurements: 7.05 vs 4.88 s and 2.29 vs
#: 3.43 s on a faster machine state; 7.3 vs 6.6 s and 3.0–3.6 vs 4.4–5.0 s in a first script).
XLA_VALIDATIONS = 3


def compile_validation(model: Any, validations: int) -> None:
    """Build the model's validation function now, with XLA only when the run validates at least
    ``XLA_VALIDATIONS`` times (``model.jit_compile`` and the training step are unchanged). Keras compiles
    ``evaluate`` like ``fit``; a run that validates once or twice spends more on compiling the forward pass
    for each batch shape than XLA saves."""
    if not model.jit_compile or validations >= XLA_VALIDATIONS:
        return
    model.jit_compile = False
    try:
        model.make_test_function(force=True)
    finally:
        model.jit_compile = True


def build_training_variables(model: Any, batch_spec: Any) -> None:
    """Create the optimizer's slots and the compiled loss's and metrics' variables before the first step.

    Keras does this itself only under a distribution strategy; otherwise they are created inside the first
    traced step, and a ``tf.function`` that creates variables is traced twice (measured: the second trace
    costs 3–4 s per run on 2 cores). ``batch_spec``: the (inputs, targets) ``element_spec`` of a dataset.
    """
    symbolic_build = getattr(model, "_symbolic_build", None)  # what Keras's fit calls under tf.distribute
    if symbolic_build is not None:
        symbolic_build(data_batch=batch_spec)
    elif not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def check_same_run(path: Path, config: dict) -> None:
    """Refuse to resume an interrupted run with different data or a different model or schedule."""
    import json

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # interrupted before its config was written: nothing to compare with
    for key in RESUME_KEYS:
        if key in saved and saved[key] != config.get(key):
            raise runs.RunError(f"{path}: the interrupted run has {key} = {saved[key]!r}, not {config.get(key)!r}; "
                                "resume with the same data and options, or pass --overwrite to start afresh")


def make_callbacks(
    cfg: TrainConfig, work: Path, throughput: Throughput, probe_data: Any = None
) -> list[keras.callbacks.Callback]:
    """NaN stop, TensorBoard logs, throughput (the resumable checkpoint is made in :func:`train`).

    With ``cfg.track_scales`` N > 0, also a ``ScaleTracker`` on the first batch of ``probe_data`` (the
    validation set: fixed, unshuffled) every N steps → scales.json, scales.png and TensorBoard ``logs/scales``.
    It comes after ``throughput``, so its probe passes are not counted as training time. Off by default: each
    probe is an eager float32 forward/backward pass, worth several compiled steps.
    """
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        checkpoint.TensorBoardLogs(str(work / "logs"), write_graph=False),
        throughput,
    ]
    if cfg.track_scales and probe_data is not None:
        from llm_unitscale.scale_tracker import ScaleTracker

        ids, targets = (part[: cfg.batch_size] for part in next(iter(probe_data))[:2])  # one training batch
        callbacks.append(ScaleTracker(ids, targets, cfg.track_scales, out_dir=work, log_dir=work / "logs"))
    return callbacks


def train(cfg: TrainConfig, log: TextIO = sys.stderr) -> dict:
    """Train a model as ``cfg`` says and publish the run folder; returns the summary (train.py --json).

    ``run_writer.RunWriter`` claims ``cfg.out`` first (never a user's file, one writer per folder), and keeps
    the partial folder of a stopped run only when it holds a checkpoint to ``--resume`` from.
    """
    from llm_unitscale import distribute, run_writer

    cfg.validate()
    worker = distribute.writer_index() if distribute.resolve_strategy(cfg.strategy) == "multiworker" else 0
    with run_writer.RunWriter(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, log=log,
                              worker=worker) as writer:
        return _train_into(cfg, writer, log)


def _train_into(cfg: TrainConfig, writer: Any, log: TextIO) -> dict:
    """:func:`train` inside its claimed partial folder ``writer.work``; publishes it when complete."""
    started = time.perf_counter()
    cfg, corpus = _seeded_corpus(cfg, writer.work, log)
    with precision_mod.applied(cfg.precision):  # Keras global dtype policy + the fp8 switch, for this run only
        plan = _plan(cfg, corpus)
        model, lr, extra = _build(cfg, corpus, plan, writer.work, log)
        config = _run_config(cfg, corpus, model, lr, plan, extra)
        state = _write_inputs(cfg, corpus, config, writer.work)
        saver, stopping, throughput = _fit(cfg, corpus, model, plan, state, config, writer.work, log)
        metrics = _results(cfg, corpus, model, plan, saver, stopping, writer.work)
    writer.publish()
    return {
        "run": str(writer.out),
        "task": corpus.task,
        "params": config["params"],
        "steps": saver.state.step,
        "max_steps": plan.total_steps,
        "tokens_per_second": round(throughput.tokens_per_second, 1),
        "seconds": round(time.perf_counter() - started, 2),
        **{k: v for k, v in metrics.items() if k != "task"},
    }


def _seeded_corpus(cfg: TrainConfig, work: Path, log: TextIO) -> tuple[TrainConfig, Corpus]:
    """Step 1: the task (given or detected) and its defaults, the seeds, and the tokenised corpus."""
    import tensorflow as tf

    task, text = read_for_task(cfg)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:  # CPU kernels already are; on GPU this picks deterministic (slower) ones
        tf.config.experimental.enable_op_determinism()
    given_task = cfg.task
    cfg = cfg.with_task_defaults(task)
    cfg.validate()
    if task == "classify":
        corpus = prepare_classifier(cfg, text)
    elif text is None:
        corpus = prepare_lm(cfg, log)
    else:  # not a regular file (a pipe): prepared from a copy, removed once the ids are made
        source = work / ".input.txt"
        files.atomic_write_bytes(source, text.encode("utf-8"))
        try:
            corpus = prepare_lm(dataclasses.replace(cfg, data=str(source), encoding="utf-8"), log)
        finally:
            source.unlink(missing_ok=True)
    print(f"task: {corpus.task} ({'auto-detected' if given_task == 'auto' else 'given'}), "
          f"vocabulary {len(corpus.vocab)}" + (f", labels {corpus.labels}" if corpus.labels else ""), file=log)
    return cfg, corpus


@dataclass
class _Plan:
    """The batches and the schedule of a run: what :func:`_plan` decides before the model exists."""

    train_batches: Callable[[int, int], Any]
    val_ds: Any
    epochs: int
    steps_per_epoch: int
    total_steps: int
    periods: Any
    typical_count: float  # n̄ of the bag model's mean (:func:`typical_count`)


def _plan(cfg: TrainConfig, corpus: Corpus) -> _Plan:
    """Step 2: the datasets, the epochs, the validation periods and the bag model's typical count."""
    train_batches, val_ds, steps_per_epoch = datasets(cfg, corpus)
    epochs, steps_per_epoch = epoch_plan(steps_per_epoch, cfg.epochs, cfg.max_steps)
    total_steps = epochs * steps_per_epoch
    periods = checkpoint.evaluation_periods(total_steps, steps_per_epoch, cfg.eval_every)
    return _Plan(train_batches, val_ds, epochs, steps_per_epoch, total_steps, periods, typical_count(corpus))


def _build(cfg: TrainConfig, corpus: Corpus, plan: _Plan, work: Path, log: TextIO) -> tuple[Any, float, dict]:
    """Step 3: (the compiled model, its peak learning rate, what the embedding initialisation adds to the
    config), built under the distribution strategy (and the run's precision, applied by the caller)."""
    from llm_unitscale.models import build_model

    with distribution_scope(cfg):
        model = build_model(
            task=corpus.task, arch=cfg.arch,
            vocab_size=corpus.features.num_features if corpus.features else len(corpus.vocab),
            seq_len=cfg.seq_len, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
            num_classes=len(corpus.labels) if corpus.labels else None, unit_scaling=cfg.unit_scaling,
            dropout=cfg.dropout, tau=cfg.tau, constraint=cfg.constraint, typical_count=plan.typical_count,
        )
        extra = init_embeddings(cfg, corpus, model, work, log)
        lr = cfg.learning_rate()
        compile_model(cfg, model, make_optimizer(cfg, lr, plan.total_steps))
        build_training_variables(model, plan.val_ds.element_spec)
        compile_validation(model, len(plan.periods))
    return model, lr, extra


def _run_config(cfg: TrainConfig, corpus: Corpus, model: Any, lr: float, plan: _Plan, extra: dict) -> dict:
    """Step 4: ``config.json``: the options, the data's hash, the model's size and the versions."""
    import tensorflow as tf

    import llm_unitscale

    return {
        **dataclasses.asdict(cfg),
        "task": corpus.task,
        "learning_rate": lr,
        "tokenizer": corpus.tokenizer.get_config(),
        "tokenizer_mode": cfg.tokenizer,
        "labels": corpus.labels,
        "vocab_size": len(corpus.vocab),
        "features": corpus.features.get_config() if corpus.features else None,
        "typical_count": plan.typical_count,
        "params": int(model.count_params()),
        "data_sha256": corpus.data_sha256,
        "steps": plan.total_steps,
        "versions": {
            "llm_unitscale": llm_unitscale.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(),
        },
        **extra,
    }
def _write_inputs(cfg: TrainConfig, corpus: Corpus, config: dict, work: Path) -> checkpoint.TrainingState | None:
    """Step 5: the state to resume from (``--resume``; its run must be this one) and the run's inputs:
    vocabulary, tokenizer, validation text, config."""
    state = checkpoint.load_state(work / "checkpoints") if cfg.resume else None
    if state is not None:
        check_same_run(work / runs.CONFIG, config)
    corpus.vocab.save(work / runs.VOCAB)
    if corpus.tokenizer.mode == "bpe":
        corpus.tokenizer.save(work / runs.TOKENIZER)
    if isinstance(corpus.val_text, Path):
        files.atomic_copy(corpus.val_text, work / runs.VALIDATION)
    else:
        files.atomic_write_bytes(work / runs.VALIDATION, corpus.val_text.encode("utf-8"))
    files.atomic_write_json(work / runs.CONFIG, config)
    return state


def _fit(cfg: TrainConfig, corpus: Corpus, model: Any, plan: _Plan, state: checkpoint.TrainingState | None,
         config: dict, work: Path, log: TextIO) -> tuple[Any, Any, Throughput]:
    """Step 6: ``model.fit`` from the checkpoint (or step 0) in segments between validations, with the
    checkpoint, early-stopping and logging callbacks; a NaN loss or an interruption raises here."""
    checkpoints = work / "checkpoints"
    throughput = Throughput(tokens_per_step(cfg, corpus))
    checkpoints.mkdir(exist_ok=True)
    state = state or checkpoint.TrainingState()
    checkpoint.restore(model, checkpoints, state)
    saver = checkpoint.ResumableCheckpoint(checkpoints, plan.periods, cfg.checkpoint_every, state,
                                           cfg.checkpoint_seconds)
    stopping = checkpoint.ValidationStopping(saver, cfg.patience)
    step_log = StepLog(plan.total_steps, throughput.tokens_per_step, log, every=cfg.log_every,
                       log_dir=work / "logs", first_step=state.step)
    callbacks = [stopping, saver, *make_callbacks(cfg, work, throughput, plan.val_ds), step_log]
    every = f", validating every {cfg.eval_every} steps and each epoch" if cfg.eval_every else ""
    print(f"training {config['params']:,} parameters for at most {plan.total_steps} steps "
          f"({plan.epochs} epochs × {plan.steps_per_epoch}{every}), lr {config['learning_rate']:g}, {cfg.precision}"
          + (f", patience {cfg.patience}" if cfg.patience else "")
          + (f"; resuming at step {state.step}" if state.step else ""), file=log)
    done = state.step
    with contextlib.redirect_stdout(log), checkpoint.stop_on_sigint(saver):  # progress bars → stderr
        for initial_epoch, end_epoch, steps in checkpoint.segments(state, plan.periods):
            stop = done + steps * (end_epoch - initial_epoch)
            model.fit(
                plan.train_batches(done, stop), validation_data=plan.val_ds, initial_epoch=initial_epoch,
                epochs=end_epoch, steps_per_epoch=steps, callbacks=callbacks, verbose=2,  # step lines: StepLog
                shuffle=False,  # batches are already drawn per step (data.lm_train_batches); Keras would warn
            )
            done = saver.state.step
            if saver.stopped or saver.state.stopped_early:
                break
    if saver.nan_step is not None:
        last = (f"the last good checkpoint is step {saver.saved_step} in {checkpoints}" if saver.saved_step
                else "no checkpoint was saved before it")
        raise FloatingPointError(f"training diverged: the loss became NaN/inf at step {saver.nan_step}; {last}; "
                                 "try a smaller --lr")
    if saver.interrupted and saver.state.step < plan.total_steps and not saver.state.stopped_early:
        raise checkpoint.TrainingInterrupted(f"interrupted at step {saver.state.step} of {plan.total_steps}; "
                                             f"checkpoint saved in {checkpoints}")
    return saver, stopping, throughput


def _results(cfg: TrainConfig, corpus: Corpus, model: Any, plan: _Plan, saver: Any, stopping: Any,
             work: Path) -> dict:
    """Step 7: the best weights restored (and calibrated), the model, history, metrics and plot written;
    returns the metrics."""
    history = saver.state.history
    stopping.restore_best()
    outcome = stop_outcome(saver.state, plan.total_steps, plan.steps_per_epoch, cfg.patience)
    best = outcome["best_index"]
    metrics = {
        "task": corpus.task,
        "loss": history["loss"][best],
        "val_loss": history["val_loss"][best],
        "val_accuracy": history["val_accuracy"][best],
        **({"val_perplexity": math.exp(min(history["val_loss"][best], 700.0))} if corpus.task == "lm" else {}),
        **{k: v for k, v in outcome.items() if k != "best_index"},
    }
    if corpus.task == "classify" and cfg.calibrate:
        metrics.update(calibrate(model, plan.val_ds))
    runs.atomic_save_model(model, work / runs.MODEL)
    files.atomic_write_json(work / runs.HISTORY, history)
    files.atomic_write_json(work / runs.METRICS, metrics)
    plot_history(history, work / runs.PLOT, plan.steps_per_epoch)
    return metrics


def typical_count(corpus: Corpus) -> float:
    """n̄ of the bag model's mean (``ops.bag_mean``): the median number of features of a training text."""
    if corpus.features is None:
        return 64.0
    return float(max(np.median([len(ids) for ids in corpus.train[0]]), 1.0))


def tokens_per_step(cfg: TrainConfig, corpus: Corpus) -> float:
    """Tokens (language model) or input ids (classifier: the mean per text × the batch) of a training step."""
    if corpus.task == "lm":
        return cfg.batch_size * cfg.seq_len
    return cfg.batch_size * float(np.mean([len(ids) for ids in corpus.train[0]]))


def stop_outcome(state: checkpoint.TrainingState, total_steps: int, steps_per_epoch: int, patience: int) -> dict:
    """Where the kept weights come from and why training stopped, for metrics.json and the summary.

    ``stopped``: "early" (``patience`` validations without a new best) or "budget" (all ``total_steps`` ran);
    ``val_loss_rising``: the validations since the best one (3 or more and the run was not stopped early: the
    model was overfitting and a smaller ``--epochs`` would have done), ``stop_reason``: the same in words.
    """
    history = state.history
    best_index = int(np.argmin(history["val_loss"]))
    best_step = int(history["step"][best_index])
    evaluations = len(history["val_loss"])
    since = evaluations - 1 - best_index
    where = f"step {best_step} (epoch {best_step / steps_per_epoch:.3g})"
    if state.stopped_early:
        stopped = "early"
        reason = (f"stopped early at step {state.step} of {total_steps}: the validation loss has not improved for "
                  f"{since} validations; kept the weights of {where}")
    else:
        stopped = "budget"
        reason = f"ran all {total_steps} steps; "
        if since >= 3:
            reason += (f"the validation loss rose for the last {since} validations (overfitting): kept the weights "
                       f"of {where}; fewer --epochs would do")
        elif since:
            reason += f"kept the weights of {where}, the best of {evaluations} validations"
        else:
            reason += "the last validation was the best"
    return {"best_index": best_index, "best_step": best_step, "best_epoch": round(best_step / steps_per_epoch, 3),
            "evaluations": evaluations, "stopped": stopped, "val_loss_rising": since, "stop_reason": reason,
            "last_val_loss": history["val_loss"][-1]}


def calibrate(model: Any, val_ds: Any) -> dict:
    """Temperature scaling on the validation split (``calibration``): fit T, fold it into the readout, and
    return T with the validation loss and expected calibration error before and after."""
    from llm_unitscale import calibration

    logits, labels = [], []
    for x, y in val_ds:
        logits.append(np.asarray(model(x, training=False), dtype=np.float64))
        labels.append(np.asarray(y))
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    temperature = calibration.fit_temperature(logits, labels)
    calibration.fold_temperature(model, temperature)
    probs = np.exp(calibration.log_softmax(logits / temperature))
    return {
        "temperature": round(temperature, 4),
        "val_loss_uncalibrated": calibration.nll(logits, labels),
        "val_loss": calibration.nll(logits / temperature, labels),
        "val_ece_uncalibrated": calibration.expected_calibration_error(np.exp(calibration.log_softmax(logits)),
                                                                       labels),
        "val_ece": calibration.expected_calibration_error(probs, labels),
    }


def summary_text(summary: dict) -> str:
    """The human-readable end-of-training summary."""
    calibrated = (f" (calibrated: temperature {summary['temperature']:.2f}, ECE {summary['val_ece']:.3f})"
                  if "temperature" in summary else "")
    lines = [
        f"trained a {summary['task']} model: {summary['params']:,} parameters, {summary['steps']} steps, "
        f"{summary['tokens_per_second']:,.0f} tokens/s, {summary['seconds']:.1f} s",
        summary["stop_reason"],
        f"val loss {summary['val_loss']:.4f}, val accuracy {summary['val_accuracy']:.2%}"
        + (f", val perplexity {summary['val_perplexity']:.2f}" if "val_perplexity" in summary else "")
        + calibrated,
        f"saved to {summary['run']}",
    ]
    return "\n".join(lines)
