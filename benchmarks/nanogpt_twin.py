"""nanoGPT's CPU recipe in PyTorch, re-implemented, so that ``lm_recipe.py`` can time it beside ``train.py``.

    python benchmarks/nanogpt_twin.py CORPUS.txt WORKDIR [--steps 2000] [--seed 0]     # needs torch

What it reproduces (nanoGPT's ``model.py`` and ``train.py`` with ``config/train_shakespeare_char.py`` and its
README's CPU overrides ``--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``):

- data: ``prepare.py``'s character vocabulary (every character of the file), the first 90 % of the characters to
  train, the last 10 % to validate; random windows of 64 read from a memory map for every batch;
- model: GPT-2 blocks without biases, pre-LayerNorm, ``scaled_dot_product_attention`` (causal), a 4× GELU MLP,
  learned positions, the readout tied to the token table; N(0, 0.02) init, residual projections
  N(0, 0.02/√(2·layers));
- training: AdamW (β = 0.9, 0.99; weight decay 0.1 on matrices only), learning rate 1e-3 with 100 warm-up steps
  and cosine decay to 1e-4 at the last step, gradients clipped to norm 1, float32, the loss read back every step
  (log_interval 1); 2000 optimizer steps (nanoGPT's loop takes a 2001st after its last evaluation, which nothing
  evaluates: left out); seed 0 is nanoGPT's ``torch.manual_seed(1337)``;
- evaluation: every 250 steps (and at the last) the mean loss over 20 random batches of each split (nanoGPT's
  estimate), and a checkpoint written when the validation estimate improves.

Printed to stdout, one line each, with the seconds since the process started less the preparation
(``prepare.py`` in nanoGPT, a separate command): ``first-step SECONDS``, ``eval STEP TRAIN VAL SECONDS``,
``done SECONDS`` (the training command's wall time) and then, outside the timed part, ``tail LOSS``: the loss
over the whole validation tail in non-overlapping windows, as ``train.py`` scores it (not part of nanoGPT).
Not nanoGPT's code: the same recipe, written here so that both systems run on one machine in one benchmark.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

STARTED = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402  (nanoGPT's spelling)

BLOCK, BATCH, LAYERS, HEADS, WIDTH = 64, 12, 4, 4, 128
LR, MIN_LR, WARMUP, WEIGHT_DECAY, BETAS, CLIP = 1e-3, 1e-4, 100, 0.1, (0.9, 0.99), 1.0
EVAL_EVERY, EVAL_BATCHES = 250, 20


class Block(nn.Module):
    """x + attention(LN(x)), then + MLP(LN(x)); no biases anywhere (nanoGPT's ``bias=False``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, bias=False)
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.attn_proj = nn.Linear(width, width, bias=False)
        self.ln_2 = nn.LayerNorm(width, bias=False)
        self.c_fc = nn.Linear(width, 4 * width, bias=False)
        self.mlp_proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.c_attn(self.ln_1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """Token + position tables, the blocks, a final LayerNorm and the readout tied to the token table."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, WIDTH), nn.Embedding(BLOCK, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH, HEADS) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH, bias=False)
        self.lm_head = nn.Linear(WIDTH, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith("_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def prepare(corpus: Path, workdir: Path) -> tuple[int, np.dtype]:
    """nanoGPT's ``prepare.py``: the character vocabulary and the 90 / 10 split, as ``train.bin``/``val.bin``."""
    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {ch: i for i, ch in enumerate(chars)}
    dtype = np.dtype(np.uint16 if len(chars) < 65536 else np.uint32)
    split = int(len(text) * 0.9)
    np.array([index[c] for c in text[:split]], dtype).tofile(workdir / "train.bin")
    np.array([index[c] for c in text[split:]], dtype).tofile(workdir / "val.bin")
    return len(chars), dtype


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up for 100 steps, then cosine from 1e-3 to 1e-4 at ``steps``."""
    if step < WARMUP:
        return LR * (step + 1) / (WARMUP + 1)
    ratio = min(1.0, (step - WARMUP) / max(1, steps - WARMUP))
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", type=Path)
    p.add_argument("workdir", type=Path)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    prepared_from = time.perf_counter()
    vocab, dtype = prepare(args.corpus, args.workdir)
    prepared_at = time.perf_counter()

    def elapsed() -> float:
        """Seconds of the training command: since the process started, less the preparation."""
        return time.perf_counter() - STARTED - (prepared_at - prepared_from)

    torch.manual_seed(1337 + args.seed)
    model = GPT(vocab)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                   {"params": vectors, "weight_decay": 0.0}], lr=LR, betas=BETAS)

    def batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.memmap(args.workdir / f"{split}.bin", dtype=dtype, mode="r")
        starts = torch.randint(len(ids) - BLOCK, (BATCH,)).tolist()
        x = torch.stack([torch.from_numpy(ids[s:s + BLOCK].astype(np.int64)) for s in starts])
        y = torch.stack([torch.from_numpy(ids[s + 1:s + 1 + BLOCK].astype(np.int64)) for s in starts])
        return x, y

    @torch.no_grad()
    def estimate(split: str) -> float:
        model.eval()
        loss = sum(model(*batch(split)).item() for _ in range(EVAL_BATCHES)) / EVAL_BATCHES
        model.train()
        return loss

    best = math.inf
    x, y = batch("train")
    for step in range(args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps)
        if step % EVAL_EVERY == 0 or step == args.steps:  # nanoGPT: multiples of 250 (2000 is one)
            val = estimate("val")
            print(f"eval {step} {estimate('train'):.4f} {val:.4f} {elapsed():.2f}", flush=True)
            if step > 0 and val < best:
                best = val
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                           args.workdir / "ckpt.pt")
        if step == args.steps:
            break  # nanoGPT takes one more step after this evaluation, which nothing evaluates
        loss = model(x, y)
        x, y = batch("train")
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT reads the loss back every log_interval = 1 step
        if step == 0:
            print(f"first-step {elapsed():.2f}", flush=True)
    print(f"done {elapsed():.2f}", flush=True)

    val_ids = np.fromfile(args.workdir / "val.bin", dtype=dtype).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(val_ids, BLOCK + 1)[::BLOCK]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), 256):
            w = torch.from_numpy(np.ascontiguousarray(windows[i:i + 256]))
            total += model(w[:, :-1], w[:, 1:]).item() * w[:, 1:].numel()
            count += w[:, 1:].numel()
    print(f"tail {total / count:.4f}", flush=True)


if __name__ == "__main__":
    main()
