"""Shared fixtures: tiny corpora written on the fly, tiny models, one tiny trained run."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from lm.config import Config, ModelConfig
from lm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
SUBJECTS = ["the cat", "the dog", "a bird", "the president", "my friend", "the old man"]
VERBS = ["sat on", "looked at", "ran to", "spoke with", "walked past"]
OBJECTS = ["the mat", "the house", "a tree", "the river", "the city", "the presentation"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(n)]


def write_corpus(d: Path, n_train: int = 400, n_eval: int = 40) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("valid", n_eval, 2), ("test", n_eval, 3)):
        lines = sentences(n, seed)
        lines.insert(n // 2, "")  # a blank line, which still gets its <eos>
        (d / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def mirror() -> Path | None:
    """The local corpus mirror (LM_CORPORA, else ../shared/corpora), or None."""
    for candidate in (os.environ.get("LM_CORPORA"), REPO.parent / "shared" / "corpora"):
        if candidate and (Path(candidate) / "wikitext-2" / "train.txt").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus) -> Tokenizer:
    lines = (tiny_corpus / "train.txt").read_text(encoding="utf-8").splitlines()
    return Tokenizer.train(lines)


def tiny_config(corpus: Path, **train) -> Config:
    cfg = Config()
    cfg.data.corpus = str(corpus)
    cfg.data.batch_size, cfg.data.bptt = 4, 8
    cfg.model = ModelConfig(emb_dim=16, hidden_dim=24, n_layers=2, dropout=0.0, cutoffs=[10, 20])
    cfg.train.epochs, cfg.train.max_minutes, cfg.train.lr, cfg.train.log_every = 2, 0, 5.0, 10
    cfg.train.threads = 1  # tiny matrices: a second thread only adds synchronisation
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tiny_corpus, tmp_path_factory) -> Path:
    """A trained tiny model: its run directory (best.pt, last.pt, metrics.jsonl)."""
    from lm.train import train

    run = tmp_path_factory.mktemp("run")
    train(tiny_config(tiny_corpus, epochs=3), run, progress=False, log=lambda *a: None)
    return run


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Token and tokenizer caches go to a temporary directory, never the checkout."""
    os.environ["LM_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    """Each test starts with the thread count the session started with: an in-process
    `lm eval`/`generate` sets one thread per core, and a test after it that times or
    loops over tiny products would otherwise run with that (a 2 s test took 320 s on a
    busy machine)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
