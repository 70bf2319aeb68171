"""Self-describing checkpoints: atomic save, safe load, version checks.

A checkpoint is one plain dict: format name and version, the resolved config, model
weights, the tokenizer's serialized bytes, optimizer and loop state, last metrics. It
loads with ``torch.load(weights_only=True)``, which refuses to run code from a pickle,
and needs nothing else: no corpus re-read, no side file.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from lm import __version__
from lm.config import Config
from lm.errors import CheckpointError, ConfigError, LMError
from lm.model import LSTMLM
from lm.tokenizer import Tokenizer

FORMAT = "lm-checkpoint"
VERSION = 1


def make(cfg: Config, model: LSTMLM, tokenizer: Tokenizer, **extra) -> dict:
    return {"format": FORMAT, "version": VERSION, "lm_version": __version__,
            "config": cfg.to_dict(), "model": model.state_dict(),
            "tokenizer": tokenizer.to_dict(), **extra}


def save(ckpt: dict, path: str | Path) -> Path:
    """Write atomically: a temporary file in the same directory, fsync, then rename, so a
    crash or a full disk leaves the previous checkpoint untouched."""
    path = Path(path)
    bad = [k for k, v in ckpt.get("model", {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to write {path}: weights {bad[0]} are not finite (NaN or inf); "
                              "the previous checkpoint is kept. Lower --lr or --clip and resume from it")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                              "free some space or choose another --run directory") from None
    return path


def load(path: str | Path) -> dict:
    """Read and check a checkpoint; every failure is a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: train one first (make train, or "
                              "lm train --run DIR) and pass its best.pt")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning is noise here
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).splitlines()[0] if str(e) else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            why = "it holds Python objects that a checkpoint must not contain"
        raise CheckpointError(f"{path} is not a safe lm checkpoint ({why}); refusing to load it") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); "
                              "use another checkpoint (last.pt / best.pt) or retrain") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lm checkpoint (no '{FORMAT}' format tag)")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}, newer than this "
                              f"lm ({__version__}) reads ({VERSION}): upgrade lm")
    for key in ("config", "model", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"{path} has no {key!r} entry: it is incomplete; retrain")
    return ckpt


def restore(ckpt: dict) -> tuple[Config, LSTMLM, Tokenizer]:
    """Rebuild config, model (in eval mode) and tokenizer from a loaded checkpoint."""
    try:
        cfg = Config.from_dict(ckpt["config"])
        tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
        model = LSTMLM(cfg.model, tokenizer.vocab_size)
        model.load_state_dict(ckpt["model"])
    except (ConfigError, KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint does not fit this lm version's model: "
                              f"{str(e).splitlines()[0]}") from None
    except LMError:
        raise
    model.eval()
    return cfg, model, tokenizer


def load_model(path: str | Path) -> tuple[Config, LSTMLM, Tokenizer, dict]:
    ckpt = load(path)
    cfg, model, tokenizer = restore(ckpt)
    return cfg, model, tokenizer, ckpt
