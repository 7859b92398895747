"""Preparing big corpora: seconds, MB/s, peak memory and token-file size per tokenizer, and the second run.

    python benchmarks/prepare.py                 # 10 MB and 100 MB corpora, tokenizers word, char and bpe
    python benchmarks/prepare.py --sizes 10      # only 10 MB
    python benchmarks/prepare.py --big --json    # also 1 GB; one JSON document on stdout
    python benchmarks/prepare.py --sizes --big --texts warpeace.txt   # 1 GB of English only

Each corpus is ``warpeace.txt`` and ``sanguo.txt`` (English and Chinese, from ``--shared``; ``--texts``
chooses others) repeated in turn until it reaches the size, cut at a line break. Each measurement runs
``prepared.prepare`` in a fresh process with an empty cache (as ``train.py`` does before its first step) and
reports its wall seconds, MB/s, the peak resident memory of that process and of its largest tokenising worker,
the size of ``tokens.bin``, characters per token, and then the wall seconds of a second fresh process that
finds the corpus in the cache (the start of a second ``train.py`` on the same data: importing the package,
TensorFlow included, and the cache hit; the model's build aside). Peak memory includes importing the package
(TensorFlow, Keras), as in ``train.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
#: The shared texts a corpus repeats by default: English and Chinese.
TEXTS = ("warpeace.txt", "sanguo.txt")
#: Run in a fresh process: prepare, then print what was measured as JSON.
_CHILD = """
import json, resource, sys, time
from llm_unitscale import prepared
from llm_unitscale.preprocessing import Tokenizer
data, mode, cache = sys.argv[1:4]
config = ({"mode": "bpe", "vocab_size": 4096, "lowercase": False, "normalize": True} if mode == "bpe"
          else Tokenizer(mode).get_config())
started = time.perf_counter()
ready = prepared.prepare(data, config, cache=cache, log=sys.stderr)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "reused": ready.reused, "manifest": ready.manifest,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def build_corpus(path: Path, size: int, shared: Path, names: tuple[str, ...] = TEXTS) -> None:
    """``size`` bytes of the shared texts ``names`` in turn, ending at a line break."""
    texts = [(shared / name).read_bytes() for name in names]
    written = 0
    with open(path, "wb") as handle:
        while written < size:
            for text in texts:
                piece = text[: size - written]
                if len(piece) < len(text):
                    piece = piece[: piece.rfind(b"\n") + 1] or piece
                handle.write(piece)
                written += len(piece)
                if written >= size or len(piece) < len(text):
                    return


def run_child(data: Path, mode: str, cache: Path) -> tuple[dict, float]:
    """(what the child measured, the child's wall seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _CHILD, str(data), mode, str(cache)], capture_output=True,
                            text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"prepare failed for {data} ({mode}): {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), wall


def measure(data: Path, mode: str, work: Path) -> dict:
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{mode}-", dir=work))
    first, _ = run_child(data, mode, cache)
    second, second_wall = run_child(data, mode, cache)
    assert second["reused"], "the second run did not find the prepared corpus"
    manifest = first["manifest"]
    tokens = manifest["train_tokens"] + manifest["val_tokens"]
    size = data.stat().st_size
    token_file = list(cache.glob("prepared-*/tokens.bin"))
    return {
        "corpus_mb": round(size / MB, 1), "tokenizer": mode, "seconds": round(first["seconds"], 2),
        "mb_per_second": round(size / MB / first["seconds"], 2),
        "peak_rss_mb": round(first["peak_rss_mb"]), "worker_peak_rss_mb": round(first["worker_peak_rss_mb"]),
        "tokens": tokens, "chars_per_token": round(manifest["characters"] / tokens, 3),
        "vocab_size": manifest["vocab_size"], "dtype": manifest["dtype"],
        "token_file_mb": round(sum(p.stat().st_size for p in token_file) / MB, 1),
        "second_run_seconds": round(second_wall, 2), "second_run_prepare_seconds": round(second["seconds"], 2),
        "workers": manifest["workers"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 100], metavar="MB")
    parser.add_argument("--big", action="store_true", help="also 1 GB (1000 MB)")
    parser.add_argument("--tokenizers", nargs="+", default=["word", "char", "bpe"])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder with warpeace.txt and sanguo.txt (default ../shared/data)")
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), metavar="NAME",
                        help="shared texts repeated in turn to make each corpus (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = args.sizes + ([1000] if args.big else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="prepare-bench-", dir=args.work) as scratch:
        work = Path(scratch)
        for size in sizes:
            data = work / f"corpus-{size}mb.txt"
            build_corpus(data, size * MB, args.shared, tuple(args.texts))
            for mode in args.tokenizers:
                row = measure(data, mode, work)
                rows.append(row)
                if not args.json:
                    print(f"{row['corpus_mb']:>7.1f} MB  {mode:<5} {row['seconds']:>8.1f} s  "
                          f"{row['mb_per_second']:>6.2f} MB/s  peak {row['peak_rss_mb']:>5} MB "
                          f"(worker {row['worker_peak_rss_mb']} MB)  tokens.bin {row['token_file_mb']:>7.1f} MB  "
                          f"{row['chars_per_token']:.2f} chars/token  second run {row['second_run_seconds']:.1f} s",
                          flush=True)
            data.unlink()
    if args.json:
        print(json.dumps({"cpus": os.cpu_count(), "texts": args.texts, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
