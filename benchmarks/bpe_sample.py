"""Does learning BPE merges from a sample of the training part cost compression on held-out text?

    python benchmarks/bpe_sample.py            # the shared English and Chinese texts, each once (~9 MB)

The corpus is ``warpeace.txt``, ``agnews-train.txt``, ``sanguo.txt``, ``chnsenticorp-train.txt`` and
``agnews-test.txt`` concatenated once (not one text repeated, where any sample holds everything), cut into
chunks of 256 KiB. A BPE of 4096 tokens is trained on the whole training part and on evenly spread samples of
4, 2 and 1 MiB (``prepared.bpe_sample``); each row prints the characters per token of the held-out tail
(the last 10 %: AG News test headlines) — fewer characters per token means a worse tokenizer.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from llm_unitscale import prepared

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ("warpeace.txt", "agnews-train.txt", "sanguo.txt", "chnsenticorp-train.txt", "agnews-test.txt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args(argv)
    config = {"mode": "bpe", "vocab_size": 4096, "lowercase": False, "normalize": True}
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        corpus.write_bytes(b"".join((args.shared / name).read_bytes() for name in TEXTS))
        prepared.CHUNK_BYTES = 256 * 1024
        for limit in (None, 4, 2, 1):
            prepared.BPE_SAMPLE_BYTES = 10**12 if limit is None else limit * 2**20
            log = io.StringIO()
            ready = prepared.prepare(str(corpus), config, cache=tempfile.mkdtemp(dir=scratch), log=log)
            line = next(text for text in log.getvalue().splitlines() if "training a byte-level BPE" in text)
            trained_on = line.split(" tokens on ", 1)[1].rsplit(" of ", 1)[0]
            val_chars = len(ready.val_path.read_text(encoding="utf-8"))
            print(f"{'all' if limit is None else f'{limit} MiB':>6}  trained on {trained_on:<62}  held-out "
                  f"chars/token {val_chars / ready.manifest['val_tokens']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
