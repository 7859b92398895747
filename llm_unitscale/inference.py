"""Inference on a loaded run: next-token distributions, sampled continuations, and class labels."""

from __future__ import annotations

import numpy as np

from llm_unitscale.preprocessing.vocabulary import SPECIAL_TOKENS
from llm_unitscale.runs import Run


class InputError(ValueError):
    """Unusable input text (e.g. an empty sentence)."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax in float64 over the last axis."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def encode_prompt(run: Run, text: str) -> tuple[list[int], list[str]]:
    """Prompt ids for a language model — ``<eos>`` (the line start it was trained with) then the tokens —
    truncated from the left to the model's context; plus notes to show the user."""
    tokens = run.tokenizer.tokenize(text)
    if not text.strip() or not tokens:
        raise InputError(f"empty input sentence {text!r}: nothing to predict from")
    if run.task == "lm":  # line breaks become <eos>, as in training
        from llm_unitscale.prepared import prompt_ids

        ids = prompt_ids(run.tokenizer, run.vocab, text)
    else:
        ids = run.vocab.encode(tokens)
    notes = []
    words = [i for i in ids if i != run.vocab.eos_id]
    unknown = sum(i == run.vocab.unk_id for i in words)
    if unknown == len(words):
        notes.append("every word of the input is unknown to the model; the prediction is a guess from context alone")
    elif unknown:
        notes.append(f"{unknown} of {len(words)} input tokens are unknown to the model")
    if len(ids) > run.seq_len:
        notes.append(f"input has {len(ids)} tokens, longer than the context of {run.seq_len}: kept the last {run.seq_len}"
                     if run.task == "lm" else
                     f"input has {len(ids)} tokens, longer than {run.seq_len}: kept the first {run.seq_len}")
        ids = ids[-run.seq_len:] if run.task == "lm" else ids[: run.seq_len]
    return ids, notes


def _last_logits(run: Run, ids: list[int]) -> np.ndarray:
    logits = run.model(np.asarray([ids[-run.seq_len:]], dtype=np.int32), training=False)
    return np.asarray(logits, dtype=np.float64)[0, -1]


def next_tokens(run: Run, text: str, top_k: int = 5) -> dict:
    """The ``top_k`` most likely next tokens after ``text`` with their probabilities."""
    ids, notes = encode_prompt(run, text)
    probs = softmax(_last_logits(run, ids))
    probs[[run.vocab.pad_id, run.vocab.bos_id]] = 0.0  # never targets in training
    order = np.argsort(-probs)[:top_k]
    result = {"input": text, "next": [{"token": shown_token(run, int(i)), "prob": float(probs[i])} for i in order]}
    if notes:
        result["notes"] = notes
    return result


def sample(probs: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_p: float = 1.0) -> int:
    """Draw a token id from ``probs`` with temperature (0 = greedy) and nucleus (top-p) filtering.

    predict.py's sampler, in numpy, one token at a time: its continuations go past the model's context (a
    sliding window), which KerasHub's samplers — run by ``CausalLM.generate`` inside one compiled loop over a
    buffer no longer than the context — do not, and the scripts do not import KerasHub (≈ 1 s)."""
    if temperature <= 0:
        return int(np.argmax(probs))
    logp = np.log(np.maximum(probs, 1e-300)) / temperature
    p = softmax(logp)
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = 1.0
        p = p * mask / np.sum(p * mask)
    return int(rng.choice(len(p), p=p))


def generate(
    run: Run,
    text: str,
    steps: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    cached: bool | None = None,
    stop: str | None = None,
) -> str:
    """Sample ``steps`` tokens after ``text``; returns the continuation text, ``<eos>`` written as a line break.

    stop: end the continuation just before the first occurrence of this string (e.g. ``"\\n"`` for one line,
    ``"\\n\\n"`` for one paragraph); None = always ``steps`` tokens.

    cached: decode transformer language models incrementally with a key/value cache
    (:class:`llm_unitscale.decoding.IncrementalDecoder`: same logits as the full pass over the last seq_len
    tokens, one token's work per step); False recomputes the full forward pass per token (the only path for the
    cnn and mlp models). None (default) = cached wherever the model supports it.
    """
    from llm_unitscale import decoding

    ids, _ = encode_prompt(run, text)
    rng = np.random.default_rng(seed)
    new: list[int] = []
    if cached is None:
        cached = decoding.supports(run.model)
    decoder = decoding.decoder_for(run.model) if cached and steps > 0 else None
    for step in range(steps):
        if decoder is None:
            logits = _last_logits(run, ids + new)
        else:
            logits = decoder.start(ids)[0] if step == 0 else decoder.append(new[-1])[0]
        probs = softmax(logits)
        probs[[run.vocab.pad_id, run.vocab.bos_id, run.vocab.unk_id]] = 0.0
        token = sample(probs / probs.sum(), rng, temperature, top_p)
        new.append(token)
        if stop and stop in decode_lines(run, new):
            break
    text_out = decode_lines(run, new)
    return text_out[: text_out.index(stop)] if stop and stop in text_out else text_out


def shown_token(run: Run, i: int) -> str:
    """Token ``i`` as a user reads it: a BPE piece decoded from its byte letters (``"Ġthe"`` → ``" the"``), the
    special tokens and every other tokenizer's tokens as they are."""
    token = run.vocab.id_to_token(i)
    if getattr(run.tokenizer, "mode", None) == "bpe" and i >= len(SPECIAL_TOKENS):
        return run.tokenizer.detokenize([token])
    return token


def decode_lines(run: Run, ids: list[int]) -> str:
    """Text of generated ids: each ``<eos>`` is a line break, the pieces between them are detokenized."""
    from llm_unitscale.prepared import lm_text

    return lm_text(run.tokenizer, run.vocab, ids)


def classifier_probabilities(run: Run, texts: list[str]) -> np.ndarray:
    """Class probabilities (n, C), in the order of ``run.labels``, of a classifier run for ``texts`` (one batch
    padded to its longest input; the bag model's n-gram features as in training)."""
    from llm_unitscale.data import classify_ids
    from llm_unitscale.preprocessing.ngrams import BagOfNgrams

    features = run.config.get("features")
    ids = classify_ids(run.tokenizer, run.vocab, texts, run.seq_len,
                       BagOfNgrams.from_config(features) if features else None)
    batch = np.zeros((len(ids), max((len(row) for row in ids), default=0)), dtype=np.int32)
    for row, sequence in enumerate(ids):
        batch[row, : len(sequence)] = sequence
    return softmax(np.asarray(run.model(batch, training=False)))


def classify(run: Run, texts: list[str], top_k: int = 1) -> list[dict]:
    """Label and probability for each text (and the ``top_k`` best labels)."""
    encoded = [encode_prompt(run, t) for t in texts]  # input checks and notes
    probs = classifier_probabilities(run, texts)
    results = []
    for text, (_, notes), p in zip(texts, encoded, probs, strict=True):
        order = np.argsort(-p)
        result = {
            "input": text,
            "label": run.labels[order[0]],
            "prob": float(p[order[0]]),
            "top": [{"label": run.labels[i], "prob": float(p[i])} for i in order[: max(top_k, 1)]],
        }
        if notes:
            result["notes"] = notes
        results.append(result)
    return results
