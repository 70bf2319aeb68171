"""Corpus + tokenizer -> token streams (1-D int64 tensors), one per split."""
from __future__ import annotations

import torch

from lm.corpus import Corpus
from lm.errors import DataError
from lm.tokenizer import Tokenizer


def token_stream(corpus: Corpus, split: str, tokenizer: Tokenizer) -> torch.Tensor:
    """The standard stream of one split: each line's words then one <eos>."""
    ids = torch.from_numpy(tokenizer.encode_stream(corpus.lines(split)))
    if ids.numel() == 0:
        raise DataError(f"the {split} split of {corpus.where} is empty: it has no lines")
    return ids


def corpus_stats(corpus: Corpus, tokenizer: Tokenizer) -> dict:
    """Token counts per split, vocabulary size and out-of-vocabulary rates."""
    from lm.corpus import SPLITS

    splits = {}
    for s in SPLITS:
        ids = token_stream(corpus, s, tokenizer)
        splits[s] = {"tokens": ids.numel(), "unk": int((ids == tokenizer.unk_id).sum())}
    return {"corpus": corpus.name, "where": corpus.where, "vocab": tokenizer.vocab_size,
            "tokens": {s: v["tokens"] for s, v in splits.items()},
            "unk_rate": {s: round(v["unk"] / v["tokens"], 6) for s, v in splits.items()}}
