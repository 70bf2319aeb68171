"""Self-describing checkpoints: atomic save, safe load, version checks.

A checkpoint is one plain dict: format name and version, the resolved config, model
weights, the tokenizer's serialized bytes, optimizer and loop state, last metrics. It
loads with ``torch.load(weights_only=True)``, which refuses to run code from a pickle,
and needs nothing else: no corpus re-read, no side file.
"""
from __future__ import annotations

import errno
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

import torch

from lm import __version__
from lm.config import Config
from lm.errors import CheckpointError, ConfigError, LMError
from lm.model import LSTMLM
from lm.tokenizer import Tokenizer

FORMAT = "lm-checkpoint"
VERSION = 1
TMP = ".tmp"  # temporary files are .NAME.tmpPID, next to their target


def make(cfg: Config, model: LSTMLM, tokenizer: Tokenizer, **extra) -> dict:
    return {"format": FORMAT, "version": VERSION, "lm_version": __version__,
            "config": cfg.to_dict(), "model": model.state_dict(),
            "tokenizer": tokenizer.to_dict(), **extra}


def save(ckpt: dict, path: str | Path, *, before_replace: Callable[[], None] | None = None) -> Path:
    """Write atomically: a temporary file in the same directory, fsync, then rename, so a
    crash or a full disk leaves the previous checkpoint untouched. ``before_replace``
    runs between the two (tests use it to kill the process at the worst moment)."""
    path = Path(path)
    bad = [k for k, v in ckpt.get("model", {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to write {path}: weights {bad[0]} are not finite (NaN or inf); "
                              f"the previous {path.name} is unchanged")
    return atomic_write(path, lambda f: torch.save(ckpt, f), before_replace=before_replace,
                        hint=f"the previous {path.name} is unchanged")


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *, hint: str,
                 before_replace: Callable[[], None] | None = None,
                 error: type[LMError] = CheckpointError) -> Path:
    """Write a file atomically: ``write`` fills a temporary file in the same directory,
    which is fsynced and then renamed over ``path``, so a crash or a full disk leaves the
    previous file untouched. An OSError becomes a one-line ``error`` ending in ``hint``;
    the temporary file never stays behind."""
    tmp = path.with_name(f".{path.name}{TMP}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, and also Ctrl-C: never leave the temporary file behind
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise error(f"cannot write {path}: {_reason(e)}; {hint}") from None
        raise
    _fsync_dir(path.parent)
    return path


def check_replaceable(path: str | Path, flag: str, what: str, same_kind: Callable[[Path], bool]) -> None:
    """Refuse an output ``path`` (given by ``flag``) that already holds a file lm must not
    replace: anything but an empty file or an earlier output of the same kind, which
    ``same_kind`` recognises (``what`` names it for the message). A checkpoint, the
    user's text or any other file stays as it is, with a one-line ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    if not path.is_file():  # nothing there (or a device such as /dev/stdout, written in place)
        return
    try:
        if path.stat().st_size == 0 or same_kind(path):
            return
    except OSError:
        pass
    raise ConfigError(f"{flag} {path} already exists and is {kind_of_file(path)}, not {what}: it is left as it "
                      f"is; choose another {flag}, or delete the file first if you no longer need it")


def kind_of_file(path: Path) -> str:
    """What an existing file is, in a few words, for messages that refuse to replace it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return "a file lm cannot read"
    if head.startswith(b"PK\x03\x04"):
        if _is_ngram_model(path):
            return "an n-gram model"
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("data.pkl") for n in z.namelist()):
                    return "a checkpoint"
        except (OSError, zipfile.BadZipFile):
            pass
        return "a zip archive"
    if head[:1] == b"\x80":
        return "a pickle (an older checkpoint?)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the 4 KB boundary
            return "a binary file"
    return "a text file"


def check_writable(directory: str | Path) -> None:
    """Fail now, not at the first checkpoint an hour from now, if nothing can be written
    to ``directory``: write a probe file into it or, while it does not exist yet, check
    write access to the nearest existing parent (creating it now would leave an empty
    directory behind whenever a later check fails, a misspelled corpus say)."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointError(f"cannot use {directory} as the run directory: {existing} is a file; "
                              "choose another --run directory")
    if existing != directory:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise CheckpointError(f"cannot create the run directory {directory}: {existing} is not writable; "
                                  "choose another --run directory")
        return
    probe = directory / f".write-probe{TMP}{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"lm")
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        with suppress(OSError):
            probe.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoints to {directory}: {_reason(e)}; choose another --run "
                              "directory, or free space / fix permissions there") from None


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files that a killed process left in ``directory`` (named
    ``.NAME.tmpPID`` by ``save``; only those whose process is gone). Returns them."""
    removed = []
    for tmp in Path(directory).glob(f".*{TMP}*"):
        pid = tmp.name.rpartition(TMP)[2]
        if pid.isdigit() and not _alive(int(pid)):
            with suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        pass
    return True


def _reason(e: OSError) -> str:
    """'No space left on device (ENOSPC)' from an OSError, for one-line messages."""
    name = errno.errorcode.get(e.errno or 0)
    return f"{e.strerror or e}" + (f" ({name})" if name else "")


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable: without it a power cut can bring the old file back."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories; the rename is done either way
        pass
    finally:
        os.close(fd)


def resolve(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: itself, or a run directory's best.pt (else its
    last.pt)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
    return path


def load(path: str | Path, *, resume: bool = False, advise: bool = True) -> dict:
    """Read and check a checkpoint; every failure is a one-line CheckpointError. A
    damaged file's message says what to do instead (``resume``: to go on training), naming
    the run's other checkpoint when that one loads (``advise=False`` skips looking)."""
    path = resolve(path)
    if path.exists() and not path.is_file():  # /dev/null, a fifo, a directory without a checkpoint
        what = "a directory with no best.pt or last.pt in it" if path.is_dir() else "not a regular file"
        raise CheckpointError(f"{path} is {what}: pass the best.pt or last.pt that lm train wrote")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: train one first (make train, or "
                              "lm train --run DIR) and pass its best.pt")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): {_way_on(path, resume, advise)}")
    if head != b"PK\x03\x04" and head[0] != 0x80:  # neither torch.save's zip archive nor a pickle
        raise CheckpointError(f"{path} is not a checkpoint file (neither a torch archive nor a pickle): "
                              "pass a best.pt or last.pt that lm train wrote")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning is noise here
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).splitlines()[0] if str(e) else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            why = "it holds Python objects that a checkpoint must not contain"
        raise CheckpointError(f"{path} is not a safe lm checkpoint ({why}); refusing to load it") from None
    except Exception as e:  # noqa: BLE001 - garbage bytes break the unpickler in many ways (IndexError, KeyError, ...)
        if _is_ngram_model(path):
            raise CheckpointError(f"{path} is an n-gram model, not a neural checkpoint: score it with "
                                  f"lm ngram eval {path}") from None
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); "
                              f"{_way_on(path, resume, advise)}") from None
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


def _is_ngram_model(path: Path) -> bool:
    """Whether ``path`` is what lm ngram train writes (a numpy .npz archive with a meta
    array), which shares the zip signature of torch.save's archives."""
    try:
        with zipfile.ZipFile(path) as z:
            return "meta.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


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


def load_model(path: str | Path, *, finite: bool = True) -> tuple[Config, LSTMLM, Tokenizer, dict]:
    """Config, model, tokenizer and the checkpoint dict, for use; a checkpoint whose
    weights hold a NaN or inf is refused in one line (``finite=False``: a caller that
    uses only the tokenizer takes it anyway)."""
    ckpt = load(path)
    if finite and (name := nonfinite_weight(ckpt)):
        raise CheckpointError(damaged(resolve(path), name))
    cfg, model, tokenizer = restore(ckpt)
    return cfg, model, tokenizer, ckpt


def nonfinite_weight(ckpt: dict) -> str | None:
    """The name of the first floating-point weight holding a NaN or inf, or None: one
    isfinite pass over the weights (and NT-ASGD's raw weights, which a resume loads)."""
    for key in ("model", "raw_model"):
        for name, v in (ckpt.get(key) or {}).items():
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return name
    return None


def _healthy(path: Path) -> bool:
    """Whether ``path`` loads as a checkpoint with finite weights (for advice that works)."""
    try:
        return nonfinite_weight(load(path, advise=False)) is None
    except LMError:
        return False


def _way_on(path: Path, resume: bool = False, advise: bool = True) -> str:
    """What to do about a damaged checkpoint ``path``: use (``resume``: resume from) the
    run's other checkpoint, where it has a healthy one, or retrain."""
    other = path.with_name("last.pt" if path.name == "best.pt" else "best.pt")
    if advise and other.is_file() and other.resolve() != path.resolve() and _healthy(other):
        return (f"resume from the other one with lm train --resume {other}" if resume
                else f"use another checkpoint, e.g. {other}") + ", or retrain"
    return f"retrain (lm train --run {path.parent} --overwrite starts the run over)" if resume else "retrain"


def damaged(path: Path, name: str, *, resume: bool = False) -> str:
    """The one-line message for a checkpoint with non-finite weights (``name``: the first)."""
    return f"{path} has non-finite weights (NaN/inf, first in {name}): it is damaged; {_way_on(path, resume)}"


def describe(path: str | Path) -> dict:
    """What a checkpoint holds, without a corpus: its file, the model and tokenizer (it
    is rebuilt, so a checkpoint this lm cannot run is refused here too), the training it
    had, its last validation, and whether ``lm train --resume`` can continue it."""
    from lm.train import why_stopped  # here: lm.train imports this module

    file = resolve(path)
    ckpt = load(file)
    cfg, model, tokenizer = restore(ckpt)
    metrics, state = ckpt.get("metrics") or {}, ckpt.get("state") or {}
    m = cfg.model
    resumable = bool(state) and "optimizer" in ckpt
    bad = nonfinite_weight(ckpt)
    # why resuming would train nothing, and what would let it go on (older checkpoints lack some keys)
    known = resumable and {"epoch", "step", "elapsed", "lr", "bad_evals"} <= state.keys()
    finished = (why_stopped(cfg.train, state) or None) if known else None
    return {
        "file": str(file), "bytes": file.stat().st_size, "lm_version": ckpt.get("lm_version"),
        "format_version": ckpt["version"],
        "layers": [layer.hidden_size for layer in model.layers], "emb_dim": m.emb_dim, "tied": m.tie_weights,
        "head": m.head, "cutoffs": model.head.bounds[1:-1] if m.head == "adaptive" else [],  # those below the vocabulary
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.kind, "text": tokenizer.text,
        "lowercase": tokenizer.lowercase, "corpus": cfg.data.corpus,
        "epoch": metrics.get("epoch"), "step": metrics.get("step", state.get("step")),
        "minutes": round(metrics.get("elapsed_s", state.get("elapsed", 0.0)) / 60, 2),
        "optimizer": cfg.train.optimizer, "lr": metrics.get("lr"),
        "valid_ppl": metrics.get("valid_ppl"), "train_ppl": metrics.get("train_ppl"),
        "resumable": resumable, "finished": finished,
        "finite": bad is None, "damage": damaged(file, bad) if bad else None,
        "config": ckpt["config"],
    }

