"""Throughput benchmark (not a test): training tokens/s and MFU, unit-scaled vs baseline, input pipeline, inference
latency, cached vs uncached generation and peak memory — all measured in one run, side by side.

    python benchmarks/throughput.py            # full: both shapes, every combination (~15-25 min on 2 cores)
    python benchmarks/throughput.py --quick    # under 3 minutes on 2 cores: a subset (float32 with XLA, the
                                               # default, at both shapes; peak RSS at medium), fewer steps
    python benchmarks/throughput.py --json     # one JSON document on stdout (the table goes to stderr)

What is measured (every number comes from this process or its children, on this machine, now):

* **peak**: GFLOP/s of one large square ``tf.matmul`` (2·n³ FLOPs) per dtype, run as a ``tf.function`` both
  with and without XLA; the peak of a dtype is the faster of the two (XLA's CPU matmul is not oneDNN's: for
  bfloat16 it does not use AMX). Measured at the start and (not with --quick) again at the end (noise check);
  the median of all repetitions of the faster mode is the peak.
* **training step**: ``model.fit`` on a constant synthetic batch, exactly as ``train.py`` compiles it
  (``training.make_optimizer`` / ``training.compile_model``: AdamW, accuracy metric), per-step wall time from
  a callback (median over steps). Unit-scaled and ``--no-unit-scaling`` models of the same shape, precision and
  XLA setting are measured *interleaved* (chunks of steps, alternating), so machine noise hits both; the
  ratio unit/baseline is of those medians. Shapes: small = 4 layers, 4 heads, width 128, seq 64, batch 12
  (nanoGPT's CPU recipe); medium = 6 layers, 6 heads, width 384, seq 256, batch 16. Vocabulary: the
  characters of data/dataset.txt.
* **MFU** = model FLOPs per step / step time / peak of the same dtype, with nanoGPT's count
  FLOPs per step = B·T·(6·N + 12·L·d·T): N = parameters of the matmul weights (every weight of rank ≥ 2 except
  the token and position tables, which are lookups), the second term the attention scores and mixing.
  float32 steps are divided by the float32 peak, mixed_bfloat16 steps by the bfloat16 peak.
* **input pipeline**: the unit-scaled float32 XLA model of the training measurement (the first shape; with
  ``--quick`` only the small one) fed by ``data.lm_train_batches`` (what ``train.py`` feeds, on
  data/dataset.txt) vs by the constant synthetic batch, interleaved with the training measurements.
* **inference**: a run folder is trained for one step by ``training.train`` (medium shape, so that 100 new
  tokens fit in its 256-token context; not timed, while the memory children run) and loaded with ``runs.load_run``; latency of ``inference.next_tokens``
  for one sentence (first call, which traces, and the median of warm calls); generation of 100 new tokens
  (the sampling loop of ``inference.generate``, argmax with end-of-line masked so exactly 100 tokens are made)
  with the key/value cache (``decoding.IncrementalDecoder``) vs uncached — the full forward pass per token as
  ``generate`` did before (an eager ``model(...)`` call) and, as a stronger baseline, the same full pass in a
  ``tf.function``; 3 timed rounds in alternating order: tokens/s from each method's best round, the speed-up
  as the median over rounds of that round's ratio.
* **peak RSS**: a child process per shape (all started at once, beside the untimed run-folder training of the
  inference measurement, and finished before it is timed; ``--quick``: the medium shape only) trains the
  default configuration (unit-scaled, float32, XLA) for a few steps and reports its peak resident set
  (``VmHWM`` of ``/proc/self/status``).

Host memory comes from TensorFlow's BFC allocator, as in the commands (``llm_unitscale.host_allocator``; run
with ``TF_CPU_ALLOCATOR_USE_BFC=false`` for malloc, what this benchmark used before). The load average at the
start and the end is printed: on a shared machine trust ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import llm_unitscale  # noqa: E402  (imports TensorFlow quietly)
from llm_unitscale import data as data_mod  # noqa: E402
from llm_unitscale import host_allocator, prepared, training  # noqa: E402
from llm_unitscale.models import build_model  # noqa: E402

#: Host memory as the commands allocate it (set before TensorFlow's first allocation).
HOST_ALLOCATOR = "bfc" if host_allocator.enable() else "malloc"

SHAPES = {
    "small": dict(depth=4, heads=4, width=128, seq_len=64, batch=12),
    "medium": dict(depth=6, heads=6, width=384, seq_len=256, batch=16),
}
DATA = ROOT / "data" / "dataset.txt"


_STARTED = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr, prefixed by the seconds since the benchmark started."""
    print(f"[{time.perf_counter() - _STARTED:5.0f} s] {msg}", file=sys.stderr, flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f in ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"))


# ----------------------------------------------------------------------------------------------------- peak
def matmul_gflops(dtype: str, n: int, jit: bool, reps: int) -> list[float]:
    """GFLOP/s of an (n, n)·(n, n) matmul (2·n³ FLOPs) per repetition, after two warm-up calls."""
    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    fn = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y), tf.float32)), jit_compile=jit)
    fn(a, b)
    fn(a, b)
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(a, b).numpy()
        out.append(2.0 * n**3 / (time.perf_counter() - start) / 1e9)
    return out


def measure_peaks(n: int, reps: int) -> dict:
    result = {}
    for dtype in ("float32", "bfloat16"):
        result[dtype] = {mode: matmul_gflops(dtype, n, mode == "xla", reps) for mode in ("graph", "xla")}
    return result


def summarise_peaks(first: dict, last: dict | None, n: int) -> dict:
    """Peak per dtype: the faster mode's median over the start (and, when measured, the end) repetitions."""
    peaks = {}
    for dtype in first:
        modes = {m: statistics.median(first[dtype][m] + (last[dtype][m] if last else [])) for m in first[dtype]}
        best = max(modes, key=modes.get)
        peaks[dtype] = {"gflops": round(modes[best], 1), "mode": best, "n": n,
                        "by_mode": {m: round(v, 1) for m, v in modes.items()},
                        "start_end": [round(statistics.median(first[dtype][best]), 1),
                                      round(statistics.median(last[dtype][best]), 1) if last else None]}
    return peaks


# ------------------------------------------------------------------------------------------------- training
class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step (``on_train_batch_begin`` → ``on_train_batch_end``)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter() - self._start)


def make_trainer(shape: dict, vocab: int, unit: bool, precision: str, xla: bool) -> keras.Model:
    """A model compiled exactly as ``train.py`` compiles it (optimizer, loss, metric, XLA flag, precision)."""
    cfg = training.TrainConfig(
        seq_len=shape["seq_len"], width=shape["width"], depth=shape["depth"], heads=shape["heads"],
        batch_size=shape["batch"], unit_scaling=unit, precision=precision, jit_compile=xla,
    )
    keras.mixed_precision.set_global_policy(training.PRECISIONS[precision])
    try:
        keras.utils.set_random_seed(0)
        model = build_model(
            "lm", "transformer", vocab_size=vocab, seq_len=shape["seq_len"], width=shape["width"],
            depth=shape["depth"], heads=shape["heads"], unit_scaling=unit,
        )
        training.compile_model(cfg, model, training.make_optimizer(cfg, cfg.learning_rate(), 10_000))
        training.build_training_variables(model, synthetic(shape, vocab).element_spec)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


def synthetic(shape: dict, vocab: int) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.integers(1, vocab, (shape["batch"], shape["seq_len"] + 1)).astype(np.int32)
    return tf.data.Dataset.from_tensors((x[:, :-1], x[:, 1:])).repeat()


def fit_steps(model: keras.Model, dataset: tf.data.Dataset, steps: int) -> list[float]:
    timer = StepTimer()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer], shuffle=False)
    return timer.times


def interleaved(runs: dict[Any, tuple[keras.Model, tf.data.Dataset]], warmup: int, steps: int, rounds: int) -> dict:
    """Median step seconds of each (model, data) pair, measured in alternating chunks after a warm-up."""
    times: dict[Any, list[float]] = {name: [] for name in runs}
    compile_s = {}
    for name, (model, dataset) in runs.items():
        start = time.perf_counter()
        fit_steps(model, dataset, warmup)  # traces and compiles
        compile_s[name] = round(time.perf_counter() - start, 1)
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            model, dataset = runs[name]
            times[name] += fit_steps(model, dataset, steps)
    return {name: {"step_s": statistics.median(t), "steps": len(t), "warmup_s": compile_s[name]}
            for name, t in times.items()}


def matmul_params(model: keras.Model) -> int:
    """Parameters that multiply activations: weights of rank ≥ 2, except the token and position tables."""
    tables = {id(w) for name in ("embedding", "position") for w in model.get_layer(name).weights}
    return int(sum(np.prod(w.shape) for w in model.weights if len(w.shape) >= 2 and id(w) not in tables))


def flops_per_step(model: keras.Model, shape: dict) -> float:
    """nanoGPT's estimate: B·T·(6·N + 12·L·d·T)."""
    b, t, d, depth = shape["batch"], shape["seq_len"], shape["width"], shape["depth"]
    return b * t * (6.0 * matmul_params(model) + 12.0 * depth * d * t)


def bench_training(shape_name: str, vocab: int, configs: list[tuple[str, bool]], warmup: int, steps: int,
                   rounds: int, peaks: dict, pipeline_ids: np.ndarray | None = None) -> tuple[list[dict], dict | None]:
    """Unit-scaled and baseline models for every (precision, xla) in ``configs``, all interleaved with each other.

    Each row also gives the unit-scaled model's speed-up over the group's float32 configuration (same XLA
    setting when the group has it, else the float32 one there is), measured in the same interleaving.
    With ``pipeline_ids`` (and float32 XLA in ``configs``) the unit-scaled float32 XLA model is also fed by the
    training pipeline (``data.lm_train_batches`` on those ids, what ``train.py`` feeds) in the same
    interleaving: the input-pipeline check,
    without compiling another model. Returns (rows, pipeline result or None)."""
    shape = SHAPES[shape_name]
    names = ", ".join(f"{p}{' xla' if x else ''}" for p, x in configs)
    log(f"training {shape_name}: unit-scaled and baseline, {names}")
    keys = [(p, x, unit) for p, x in configs for unit in (True, False)]
    models = {k: make_trainer(shape, vocab, k[2], k[0], k[1]) for k in keys}
    data = synthetic(shape, vocab)
    runs: dict = {}
    fed_model = ("float32", True, True)  # the unit-scaled float32 XLA model
    for key, model in models.items():
        runs[key] = (model, data)
        if key == fed_model and pipeline_ids is not None:  # right after it: the same model, no switch between
            real = data_mod.lm_train_batches(pipeline_ids, shape["seq_len"], shape["batch"], 0, 0, 1 << 40)
            runs["real data"] = (model, real)
    res = interleaved(runs, warmup, steps, rounds)
    tokens = shape["batch"] * shape["seq_len"]
    rows = []
    for precision, xla in configs:
        peak = peaks["bfloat16" if precision == "bfloat16" else "float32"]["gflops"] * 1e9
        row: dict[str, Any] = {"shape": shape_name, "precision": precision, "xla": xla}
        for key, unit in (("unit", True), ("baseline", False)):
            step = res[(precision, xla, unit)]["step_s"]
            flops = flops_per_step(models[(precision, xla, unit)], shape)
            row[key] = {"ms_per_step": round(step * 1e3, 2), "tokens_per_s": round(tokens / step, 1),
                        "mfu": round(flops / step / peak, 4), "gflop_per_step": round(flops / 1e9, 3),
                        "steps_measured": res[(precision, xla, unit)]["steps"],
                        "warmup_s": res[(precision, xla, unit)]["warmup_s"]}
        reference = ("float32", xla) if ("float32", xla) in configs else next(
            (c for c in configs if c[0] == "float32"), None)
        if reference is not None and reference != (precision, xla):
            row["unit_speedup_over"] = {"precision": "float32", "xla": reference[1], "ratio": round(
                res[(*reference, True)]["step_s"] / res[(precision, xla, True)]["step_s"], 3)}
        row["unit_over_baseline"] = round(res[(precision, xla, True)]["step_s"] / res[(precision, xla, False)]["step_s"],
                                          3)
        log(f"  {precision} {'xla' if xla else 'no xla'}: unit {row['unit']['ms_per_step']} ms, baseline "
            f"{row['baseline']['ms_per_step']} ms, ratio {row['unit_over_baseline']}, MFU unit {row['unit']['mfu']:.1%}"
            f", warm-up (trace, compile) unit {row['unit']['warmup_s']} s")
        rows.append(row)
    pipeline = None
    if "real data" in res:
        real_s, synthetic_s = res["real data"]["step_s"], res[fed_model]["step_s"]
        pipeline = {"shape": shape_name, "real_ms": round(real_s * 1e3, 2), "synthetic_ms": round(synthetic_s * 1e3, 2),
                    "real_over_synthetic": round(real_s / synthetic_s, 3)}
        log(f"  input pipeline: real {pipeline['real_ms']} ms, synthetic {pipeline['synthetic_ms']} ms, "
            f"ratio {pipeline['real_over_synthetic']}")
    del models, runs
    keras.backend.clear_session()
    return rows, pipeline


def corpus_ids() -> tuple[np.ndarray, int]:
    """data/dataset.txt as character ids, with the training pipeline's tokenizer/vocabulary/eos handling."""
    from llm_unitscale.preprocessing import Tokenizer, Vocabulary

    text = DATA.read_text(encoding="utf-8")
    tokenizer = Tokenizer(mode="char")
    vocab = Vocabulary.build([t for t in (tokenizer.tokenize(line) for line in text.split("\n")) if t])
    return prepared.lm_ids(tokenizer, vocab, text), len(vocab)


# ------------------------------------------------------------------------------------------------ inference
def inference_run_folder(shape_name: str, workdir: Path) -> Path:
    """A run folder of the given shape made by ``training.train`` (1 step on data/dataset.txt; not timed)."""
    import io

    shape = SHAPES[shape_name]
    log(f"inference {shape_name}: training a 1-step run folder")
    cfg = training.TrainConfig(
        data=str(DATA), out=str(workdir / f"run_{shape_name}"), tokenizer="char", max_steps=1, epochs=1,
        seq_len=shape["seq_len"], width=shape["width"], depth=shape["depth"], heads=shape["heads"],
        batch_size=shape["batch"], embeddings="none", jit_compile=False, overwrite=True,
    )
    training.train(cfg, log=io.StringIO())
    return Path(cfg.out)


def bench_inference(shape_name: str, run_dir: Path, new_tokens: int, baselines: list[str], rounds: int = 2) -> dict:
    from llm_unitscale import inference, runs
    from llm_unitscale.decoding import IncrementalDecoder

    log(f"inference {shape_name}: predict latency and generation")
    start = time.perf_counter()
    run = runs.load_run(run_dir)
    load_s = time.perf_counter() - start
    sentence = "In the morning I had a cup of"
    start = time.perf_counter()
    inference.next_tokens(run, sentence)
    first_s = time.perf_counter() - start
    warm = []
    for _ in range(5):
        start = time.perf_counter()
        inference.next_tokens(run, sentence)
        warm.append(time.perf_counter() - start)
    out: dict[str, Any] = {"shape": shape_name, "load_s": round(load_s, 3), "predict_first_ms": round(first_s * 1e3, 1),
                           "predict_warm_ms": round(statistics.median(warm) * 1e3, 1), "new_tokens": new_tokens}
    prompt, _ = inference.encode_prompt(run, "The")
    banned = [run.vocab.pad_id, run.vocab.bos_id, run.vocab.unk_id, run.vocab.eos_id]

    def pick(logits: np.ndarray) -> int:
        logits = np.array(logits, dtype=np.float64)
        logits[banned] = -np.inf
        return int(np.argmax(logits))

    decoder = IncrementalDecoder(run.model)  # one decoder: its step graph is traced and compiled once

    def cached() -> list[int]:
        new = [pick(decoder.start(prompt)[0])]
        while len(new) < new_tokens:
            new.append(pick(decoder.append(new[-1])[0]))
        return new

    compiled = tf.function(lambda x: run.model(x, training=False)[:, -1], reduce_retracing=True)

    def uncached(kind: str) -> list[int]:
        new: list[int] = []
        while len(new) < new_tokens:
            ids = (prompt + new)[-run.seq_len:]
            if kind == "eager":
                logits = inference._last_logits(run, ids)  # what generate did per token before the cache
            else:
                logits = compiled(np.asarray([ids], np.int32)).numpy()[0]
            new.append(pick(logits))
        return new

    methods = {"cached": cached, **{f"uncached_{k}": (lambda k=k: uncached(k)) for k in baselines}}
    first = {}
    for name, fn in methods.items():  # warm-up: traces and compiles, and every method must agree
        start = time.perf_counter()
        first[name] = fn()
        out[f"{name}_first_s"] = round(time.perf_counter() - start, 2)
    out["same_tokens"] = all(v == first["cached"] for v in first.values())
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(rounds):  # timed after the warm-up, alternating the order
        for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            start = time.perf_counter()
            methods[name]()
            seconds[name].append(time.perf_counter() - start)
    for name, s in seconds.items():  # tokens/s: the best round of each
        out[f"{name}_tokens_per_s"] = round(new_tokens / min(s), 1)
    for k in baselines:  # the speed-up: the median over rounds of that round's ratio (load drifts between rounds)
        ratios = [u / c for u, c in zip(seconds[f"uncached_{k}"], seconds["cached"], strict=True)]
        out[f"cached_over_uncached_{k}"] = round(statistics.median(ratios), 2)
    log("  " + ", ".join(f"{k} {v}" for k, v in out.items() if k.endswith(("tokens_per_s", "_ms")) or "over" in k))
    return out


# ------------------------------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM of /proc/self/status), in MiB.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux keeps that maximum across fork and exec, so a child of a
    large parent reports the parent's peak (measured: 6646 MiB for both shapes, vs 1245 MiB alone for small).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: KiB on Linux, bytes on macOS


def memory_child(shape_name: str, steps: int) -> None:
    """(child process) Train the default configuration for a few steps; print the peak RSS as JSON."""
    shape = SHAPES[shape_name]
    _, vocab = corpus_ids()
    model = make_trainer(shape, vocab, True, "float32", True)
    fit_steps(model, synthetic(shape, vocab), steps)
    rss_mb = peak_rss_mb()
    print(json.dumps({"shape": shape_name, "peak_rss_mb": round(rss_mb, 1), "steps": steps}))


def start_memory_children(shape_names: list[str], steps: int) -> dict[str, subprocess.Popen]:
    """Peak RSS per shape: one child process each, all started at once (a peak does not depend on sharing the
    cores, so they run beside each other and beside untimed work; collect them before timing anything)."""
    log(f"peak RSS {', '.join(shape_names)}: a child process each, unit-scaled float32 xla, {steps} steps")
    return {name: subprocess.Popen([sys.executable, __file__, "--memory-child", name, "--steps", str(steps)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in shape_names}


def collect_memory(children: dict[str, subprocess.Popen]) -> list[dict]:
    """Wait for :func:`start_memory_children`'s children; their peak RSS (or the error each reported)."""
    results = []
    for name, child in children.items():
        out, err = child.communicate()
        if child.returncode:
            results.append({"shape": name, "error": (err.strip().splitlines() or ["?"])[-1]})
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# ---------------------------------------------------------------------------------------------------- report
def table(result: dict) -> str:
    lines = [f"llm_unitscale throughput — TF {result['env']['tensorflow']}, Keras {result['env']['keras']}, "
             f"{result['env']['cpus']} CPUs {' '.join(result['env']['cpu_flags'])}, load average "
             f"{result['env']['load_start']} → {result['env']['load_end']}, {result['env']['mode']} mode, "
             f"{result['seconds']:.0f} s, host allocator {result['env']['host_allocator']}"]
    lines.append("\nmatmul peak (n×n tf.matmul, median GFLOP/s; graph = oneDNN, xla = XLA's own kernel)")
    for dtype, p in result["peaks"].items():
        lines.append(f"  {dtype:9s} n={p['n']}: graph {p['by_mode']['graph']:7.1f}  xla {p['by_mode']['xla']:7.1f}"
                     f"  → peak {p['gflops']:.1f} ({p['mode']})" + (f"; start/end {p['start_end'][0]} / {p['start_end'][1]}"
                                                                  if p["start_end"][1] is not None else ""))
    lines.append("\ntraining step (median ms/step, tokens/s, MFU vs the peak of the same dtype); ratio = unit/baseline")
    header = f"  {'shape':7s} {'precision':9s} {'xla':5s} | {'unit ms':>9s} {'tok/s':>8s} {'MFU':>6s} | " \
             f"{'base ms':>9s} {'tok/s':>8s} {'MFU':>6s} | {'ratio':>6s} | unit vs float32"
    lines += [header, "  " + "-" * (len(header) - 2)]
    for r in result["training"]:
        u, b = r["unit"], r["baseline"]
        lines.append(f"  {r['shape']:7s} {r['precision']:9s} {'yes' if r['xla'] else 'no':5s} | "
                     f"{u['ms_per_step']:9.1f} {u['tokens_per_s']:8.0f} {u['mfu']:6.1%} | "
                     f"{b['ms_per_step']:9.1f} {b['tokens_per_s']:8.0f} {b['mfu']:6.1%} | {r['unit_over_baseline']:6.3f} | "
                     + (f"{r['unit_speedup_over']['ratio']:.2f}× faster than float32"
                        f"{' xla' if r['unit_speedup_over']['xla'] else ''}" if "unit_speedup_over" in r else ""))
    if result["training"]:
        r = result["training"][0]
        lines.append("  (GFLOP/step: " + ", ".join(sorted({f"{x['shape']} {x['unit']['gflop_per_step']}"
                                                          for x in result['training']})) + ")")
    if result["pipeline"]:
        lines.append("\ninput pipeline (unit-scaled, float32, xla): data.lm_train_batches vs constant synthetic batch")
        for p in result["pipeline"]:
            lines.append(f"  {p['shape']:7s} real {p['real_ms']:.1f} ms  synthetic {p['synthetic_ms']:.1f} ms  "
                         f"ratio {p['real_over_synthetic']:.3f}")
    for inf in result["inference"]:
        lines.append(f"\ninference ({inf['shape']} run folder; unit-scaled, float32)")
        lines.append(f"  load_run {inf['load_s']:.2f} s; next_tokens for one sentence: first call "
                     f"{inf['predict_first_ms']:.0f} ms, warm {inf['predict_warm_ms']:.1f} ms")
        gen = [f"cached {inf['cached_tokens_per_s']:.1f} tok/s"]
        for key in inf:
            if key.startswith("uncached_") and key.endswith("_tokens_per_s"):
                kind = key[len("uncached_"):-len("_tokens_per_s")]
                gen.append(f"uncached ({kind}) {inf[key]:.1f} tok/s → cached is "
                           f"{inf['cached_over_uncached_' + kind]:.1f}×")
        lines.append(f"  generate {inf['new_tokens']} new tokens: " + "; ".join(gen)
                     + f"; same tokens: {inf['same_tokens']}")
    if result["memory"]:
        lines.append("\npeak RSS of a training run (child process, unit-scaled float32 xla)")
        for m in result["memory"]:
            lines.append(f"  {m['shape']:7s} " + (f"{m['peak_rss_mb']:.0f} MiB" if "peak_rss_mb" in m
                                                 else f"failed: {m['error']}"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset with few steps: under 3 minutes on 2 cores")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout (table to stderr)")
    parser.add_argument("--shapes", default=None, help="comma-separated subset of small,medium")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: "
                                                   "training,pipeline,inference,memory")
    parser.add_argument("--steps", type=int, default=None, help="steps per measured chunk")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.steps or 3)
        return 0

    started = time.perf_counter()
    skip = {s for s in args.skip.split(",") if s}
    shapes = args.shapes.split(",") if args.shapes else list(SHAPES)
    load_start = load_average()
    ids, vocab = corpus_ids()
    n = 2048 if args.quick else 4096
    reps = 4 if args.quick else 6
    log(f"matmul peak, n={n}")
    first_peaks = measure_peaks(n, reps)
    peaks = summarise_peaks(first_peaks, None, n)

    plan = []  # (shape, [(precision, xla), ...] measured interleaved, warmup, steps per chunk, rounds)
    every = [(p, x) for x in (True, False) for p in ("float32", "bfloat16")]
    for shape in shapes:
        small = shape == "small"
        if args.quick:  # float32 XLA, train.py's default, at both shapes (bfloat16 and no-XLA: full mode)
            if small:
                plan.append((shape, [("float32", True)], 2, args.steps or 8, 3))  # 50-ms steps: take 24 each
            else:
                plan.append((shape, [("float32", True)], 1, args.steps or 1, 2))
        else:
            plan.append((shape, every, 2, args.steps or (10 if small else 2), 3))
    training_rows, pipeline, inference_rows, memory = [], [], [], []
    if "training" not in skip:
        for shape, configs, warmup, steps, rounds in plan:
            # the input-pipeline check runs in the first group (quick: small only), on its float32 XLA model
            feed = ids if "pipeline" not in skip and (not pipeline or not args.quick) else None
            rows, checked = bench_training(shape, vocab, configs, warmup, steps, rounds, peaks, feed)
            training_rows += rows
            pipeline += [checked] if checked else []
    # the memory children run beside the untimed run-folder training, and finish before inference is timed;
    # --quick: the largest shape only (the 3-minute budget)
    memory_shapes = shapes[-1:] if args.quick else shapes
    children = start_memory_children(memory_shapes, 1 if args.quick else 5) if "memory" not in skip else {}
    with tempfile.TemporaryDirectory() as tmp:
        inf_shapes = [] if "inference" in skip else ["medium"] if "medium" in shapes else shapes
        run_dirs = {shape: inference_run_folder(shape, Path(tmp)) for shape in inf_shapes}
        memory = collect_memory(children)
        for shape, run_dir in run_dirs.items():
            baselines = ["compiled"] if args.quick else ["compiled", "eager"]
            inference_rows.append(bench_inference(shape, run_dir, 100, baselines, 3))
    if args.quick:  # the start's peak only (saves a few seconds of the 3-minute budget)
        peaks = summarise_peaks(first_peaks, None, n)
    else:
        log("matmul peak again (noise check)")
        peaks = summarise_peaks(first_peaks, measure_peaks(n, reps), n)
    for row in training_rows:  # MFU against the peak from both measurements
        peak = peaks["bfloat16" if row["precision"] == "bfloat16" else "float32"]["gflops"] * 1e9
        for key in ("unit", "baseline"):
            row[key]["mfu"] = round(row[key]["gflop_per_step"] * 1e9 / (row[key]["ms_per_step"] / 1e3) / peak, 4)

    result = {
        "env": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
                "llm_unitscale": llm_unitscale.__version__, "cpus": os.cpu_count(), "cpu_flags": cpu_flags(),
                "load_start": load_start, "load_end": load_average(), "mode": "quick" if args.quick else "full",
                "vocab": vocab, "host_allocator": HOST_ALLOCATOR},
        "peaks": peaks, "training": training_rows, "pipeline": pipeline, "inference": inference_rows,
        "memory": memory, "seconds": round(time.perf_counter() - started, 1),
    }
    text = table(result)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
