"""The training loop: optimisers, regularisation, budgets, checkpoints and exact resume.

``train(cfg, run_dir)`` reads top to bottom: data, model, optimiser, then epochs of
truncated-BPTT steps with an evaluation on the validation split at each epoch's end.
Everything a step depends on (weights, optimiser and averaging state, learning rate,
RNG states, the position in the data and the LSTM state carried across windows) is in
``last.pt``, so ``--resume`` continues bit for bit where a run stopped, even after a
SIGKILL between two periodic saves. The same state, kept in memory at each save, is
where a NaN or infinite loss rolls back to, with half the learning rate.

Data parallel: started by ``torchrun --nproc_per_node=N -m lm train ...``, each rank
trains on its own contiguous slice of the token stream and gradients are averaged with
one all-reduce per step (gloo on CPU, nccl on GPU); rank 0 alone writes files.
"""
from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from lm import checkpoint
from lm.batching import batchify, bptt_windows
from lm.config import Config, DataConfig, check_threads, merge
from lm.corpus import open_corpus, registry
from lm.data import load_tokenizer, token_stream
from lm.errors import CheckpointError, ConfigError, DataError, LMError
from lm.evaluate import evaluate, fmt_ppl, perplexity
from lm.model import LSTMLM, TiedGradient, detach
from lm.regularizers import activation_reg, temporal_activation_reg
from lm.tokenizer import Tokenizer

# Fault injection for tests, read from the environment once per run:
FAIL_AT_STEP = "LM_FAIL_AT_STEP"  # SIGKILL this process right after that step (and its periodic save)
FAIL_IN_SAVE = "LM_FAIL_IN_SAVE"  # SIGKILL it inside the save at that step: temporary file written, not yet renamed
STOP_AT_STEP = "LM_STOP_AT_STEP"  # STEP or STEP@RANK: a stop request (as Ctrl-C makes) at that step, on that rank only
NAN_AT_STEP = "LM_NAN_AT_STEP"  # comma-separated steps whose loss becomes NaN; a step listed n times, its first n runs
ROLLBACK_LR_FACTOR = 0.5  # each rollback after a non-finite loss multiplies the learning rate by this
RESUMABLE = {"epochs", "max_steps", "max_minutes", "max_rollbacks", "save_every", "patience", "min_lr", "log_every",
             "threads", "device", "bf16"}
MIN_LR_RATIO = 5e-4  # the default --min-lr's ratio to SGD's default --lr (0.01 / 20)


def build_config(*layers: dict) -> Config:
    """The run's config: dataclass defaults, then the corpus's registry defaults (e.g.
    its text convention), then ``layers`` in order (a recipe, a config file, flags)."""
    merged = merge(*layers)
    entry = registry().get(merged.get("data", {}).get("corpus", DataConfig().corpus), {})
    return Config.from_dict(merge(entry.get("defaults", {}), merged)).validate()


def resume_source(run_dir: Path, resume: bool | str | Path) -> Path:
    """The checkpoint a resume starts from: the file ``resume`` names (best.pt, say), or,
    for ``True``, the run's last.pt."""
    return Path(resume) if isinstance(resume, (str, Path)) else run_dir / "last.pt"


def resume_config(run_dir: Path, overrides: dict, source: Path | None = None) -> Config:
    """The config of the run in ``run_dir``, resumed from ``source`` (default: its
    last.pt); only budgets and logistics may change."""
    source = source or run_dir / "last.pt"
    if not source.exists():
        if source != run_dir / "last.pt":
            raise ConfigError(f"{source} not found: nothing to resume from. Pass a checkpoint a run wrote "
                              f"(its last.pt or best.pt), or its folder")
        where = "does not exist" if not run_dir.exists() else "holds no last.pt"
        raise ConfigError(f"{run_dir} {where}: nothing to resume there. Pass the folder a run trained "
                          f"into (its --run), or start a new run with lm train --run {run_dir}")
    saved = checkpoint.load(source, resume=True)["config"]
    for section, values in overrides.items():
        fixed = {k: v for k, v in values.items() if not (section == "train" and k in RESUMABLE)}
        changed = [k for k, v in fixed.items() if saved.get(section, {}).get(k) != v]
        if changed:
            raise ConfigError(f"--{changed[0].replace('_', '-')} cannot change when resuming; only "
                              "budgets (--epochs, --max-steps, --max-minutes), stopping rules (--min-lr, --patience, "
                              "--max-rollbacks) and logistics (--threads, --device, --bf16, --save-every, --log-every) can")
    return Config.from_dict(merge(saved, overrides)).validate()


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux:
    a container's or taskset's limit), else every core (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """Use one intra-op thread per available core unless told otherwise, and keep freed
    memory in the process (see ``keep_freed_memory``). ``threads`` out of range (see
    ``check_threads``) is a one-line ConfigError, not a crash in torch's thread pool."""
    check_threads(threads)
    n = threads or available_cores()
    torch.set_num_threads(n)
    keep_freed_memory()
    return n


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic runs in hardware here: a CUDA device that has it, or a CPU
    with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return device.type == "cpu" and any(check is not None and check() for check in checks)


def bf16_autocast(device: torch.device) -> torch.autocast | None:
    """The bf16 autocast context training uses on ``device``, or None where bf16 is not
    native there (weights, gradients and optimiser state stay fp32 either way)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if native_bf16(device) else None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and never return freed
    memory to the system. By default each batch's large buffers (activations, logits,
    gradients) are mmapped, unmapped when freed and page-faulted in again next batch;
    on a 2-core CPU that costs about a third of a training step. Same numbers, less
    work. Returns whether the settings took (False off glibc)."""
    global _malloc_tuned
    if _malloc_tuned is None:
        try:
            libc = ctypes.CDLL(None)
            M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
            _malloc_tuned = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):
            _malloc_tuned = False
    return _malloc_tuned


_malloc_tuned: bool | None = None


def pick_device(name: str, rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    return torch.device(f"cuda:{rank % torch.cuda.device_count()}" if name == "cuda" else "cpu")


def budget_used(tc, epochs_done: float, step: int, seconds: float) -> float:
    """Fraction of the training budget spent: the largest of the epoch, step and time
    fractions, since whichever budget runs out first ends the run."""
    used = epochs_done / tc.epochs
    if tc.max_steps:
        used = max(used, step / tc.max_steps)
    if tc.max_minutes:
        used = max(used, seconds / (tc.max_minutes * 60))
    return min(used, 1.0)


def anneal_factor(anneal: float, used: float) -> float:
    """1 until the last ``anneal`` of the budget, then linearly down to 0 at its end."""
    return 1.0 if anneal <= 0 else min(1.0, (1.0 - used) / anneal)


def default_run_dir(cfg: Config) -> Path:
    spec = cfg.data.corpus
    if "/" in spec or "." in spec:  # a path: its file or folder name; a glob's folder before its wildcard
        parts = Path(spec).parts
        wild = next((i for i, part in enumerate(parts) if set(part) & set("*?[")), None)
        spec = Path(spec).stem if wild is None else (parts[wild - 1] if wild else "")
    return Path("checkpoints") / (spec.strip("./\\ ") or "run")


def min_lr(tc) -> float:
    """The rate below which a plateau's decay ends the run: --min-lr, unless the run
    starts at or below it (AdamW's rates, say), where it would end at the first plateau;
    then --lr times the defaults' ratio."""
    return tc.min_lr if tc.min_lr < tc.lr else tc.lr * MIN_LR_RATIO


def why_stopped(tc, state: dict) -> str:
    """Why a saved run that stopped early stays stopped under ``tc``, with what would
    let it go on; "" if it may train. (Without this a resume would take a step before
    the loop's own checks: one more step past --max-steps on every resume.)"""
    if state["epoch"] > tc.epochs:
        return f"all {tc.epochs} epochs done: resume with a larger --epochs to train on"
    if tc.max_steps and state["step"] >= tc.max_steps:
        return f"--max-steps {tc.max_steps} is reached: resume with a larger --max-steps (or 0) to train on"
    if tc.max_minutes and state["elapsed"] >= tc.max_minutes * 60:
        return (f"--max-minutes {tc.max_minutes:g} is reached: resume with a larger --max-minutes (or 0) "
                "to train on")
    if tc.optimizer != "ntasgd" and state["lr"] < min_lr(tc):
        return (f"its learning rate {state['lr']:.3g} is below --min-lr {min_lr(tc):.3g}: resume with a lower "
                "--min-lr to train on")
    if tc.patience and state["bad_evals"] >= tc.patience:
        return (f"no improvement in its last {state['bad_evals']} evaluations (--patience {tc.patience}): resume "
                "with a larger --patience, or 0, to train on")
    return ""


def make_optimizer(tc, model: torch.nn.Module, lr: float, averaging: bool) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=tc.weight_decay)
    if averaging:  # NT-ASGD's second phase: SGD steps, plus a running average of the weights
        return torch.optim.ASGD(params, lr=lr, t0=0, lambd=0.0, weight_decay=tc.weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=tc.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Make ``lr`` the learning rate of the optimiser's next step. torch's ASGD steps with
    the rate it stored after its previous step (its ``eta``), so that is set as well;
    otherwise each step of NT-ASGD's averaging phase would take the rate set for the one
    before it (the anneal a step late, a variable-BPTT window's scale on the next window,
    and the first step after a rollback at the rate that diverged)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not isinstance(optimizer, torch.optim.ASGD):
            continue
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and "eta" in st:  # ASGD's own formula, at the steps taken so far
                st["eta"].fill_(lr / (1 + group["lambd"] * lr * float(st["step"])) ** group["alpha"])


def clipped_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], clip: float,
                 tied: TiedGradient | None = None) -> None:
    """Clip the global gradient norm of ``params`` to ``clip`` (0 = no clipping), then step.

    For plain SGD on the CPU (no weight decay, the usual case) the clip's scale goes into
    the step's learning rate instead of into the gradients: the same update, one pass
    over every gradient less (+6% and +7.5% tokens/s on the 2x200 and wt2-cpu models,
    measured side by side); and a tied matrix's gradient collected as factors (``tied``,
    see ``LSTMLM.defer_tied_gradient``) is never written out: its norm comes from the
    factors and the update goes straight into the weight. Elsewhere the factors are
    written into the weight's ``.grad``, then ``clip_grad_norm_`` and the optimiser's own
    step (on a GPU, a float learning rate would cost a sync)."""
    group = optimizer.param_groups[0]
    folds = (type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
             and not group["weight_decay"] and not group["momentum"] and not group.get("maximize")
             and params and params[0].device.type == "cpu")
    if tied is not None and tied.pending() and (not folds or tied.weight.grad is not None):
        tied.materialize()  # the optimiser's own step takes it (or it adds to a gradient already there)
    if not folds:
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        return
    deferred = tied is not None and tied.pending()
    scale = 1.0
    if clip:
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if deferred:
            norm = math.sqrt(norm ** 2 + float(tied.norm_sq()))
        scale = min(1.0, clip / (norm + 1e-6))  # clip_grad_norm_'s coefficient, clamped the same way
    lr = group["lr"]
    group["lr"] = lr * scale
    try:
        optimizer.step()
    finally:
        group["lr"] = lr
    if deferred:
        tied.apply(-lr * scale)


@contextmanager
def averaged_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer, on: bool):
    """Swap the averaged weights of ASGD in (for evaluation and checkpoints), then back."""
    if not on:
        yield
        return
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            if "ax" in optimizer.state.get(p, {}):
                p.copy_(optimizer.state[p]["ax"])
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)


def train(cfg: Config, run_dir: Path | None = None, *, resume: bool | str | Path = False, overwrite: bool = False,
          progress: bool = True, log=print) -> dict:
    """Train as ``cfg`` says, writing best.pt, last.pt and metrics.jsonl into ``run_dir``
    (with ``resume``, continue the run there: from its last.pt, or from the checkpoint
    file ``resume`` names, such as its best.pt). Returns the summary.

    Every save also keeps the saved state in memory as the last good one. A NaN or
    infinite loss (or weights) sends the run back to it with half the learning rate, at
    most ``--max-rollbacks`` times; then the run stops with an LMError, and nothing
    non-finite is ever written."""
    cfg.validate()
    tc = cfg.train
    run_dir = Path(run_dir or default_run_dir(cfg))
    if not resume and not overwrite and (run_dir / "last.pt").exists():
        raise ConfigError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                          "choose another --run, or pass --overwrite to replace it")
    rank, world = _init_distributed(tc)
    try:
        return _train(cfg, run_dir, rank, world, resume=resume, progress=progress, log=log)
    except torch.distributed.DistError as e:  # a collective broke off: a rank stopped, or the network
        why = (str(e).strip().splitlines() or ["no reason given"])[0][:200]
        raise LMError(f"rank {rank} lost the other ranks ({why}): another rank's error above says why, or the "
                      f"network failed; fix that and train again (lm train --resume {run_dir} continues from "
                      "its last save)") from None
    except (MemoryError, RuntimeError) as e:  # after DistError, also one; so is torch.OutOfMemoryError (a GPU's)
        if not isinstance(e, MemoryError) and not _out_of_memory(e):
            raise
        kept = (f"; {run_dir / 'last.pt'} is intact (lm train --resume {run_dir} continues from it)"
                if (run_dir / "last.pt").exists() else "")
        raise LMError(f"out of memory: the model ({cfg.model.n_layers} x {cfg.model.hidden_dim} LSTM, "
                      f"{cfg.model.emb_dim}-wide embeddings) or its batch ({cfg.data.batch_size} x {cfg.data.bptt}) "
                      f"is too large for this machine: lower --hidden-dim, --emb-dim or --batch-size{kept}") from None
    finally:  # on every way out, errors included: a rank that exits with its process group
        # alive can abort (SIGABRT) in the interpreter's teardown, its one-line error lost
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: Config, run_dir: Path, rank: int, world: int, *, resume: bool | str | Path, progress: bool,
           log) -> dict:
    """The body of ``train`` on one rank of ``world``."""
    tc, dc = cfg.train, cfg.data
    lead = rank == 0
    if lead:  # nowhere to save is an error now, not at the first checkpoint an hour from now
        checkpoint.check_writable(run_dir)
        checkpoint.remove_stale_temporaries(run_dir)
    source = resume_source(run_dir, resume)  # what a resume starts from: last.pt, or the file it names
    ckpt = checkpoint.load(source, resume=True) if resume else None
    if ckpt and (bad := checkpoint.nonfinite_weight(ckpt)):  # it would only roll back to itself, again and again
        raise CheckpointError(checkpoint.damaged(source, bad, resume=True))
    if ckpt and ("rng" not in ckpt.get("state", {}) or "optimizer" not in ckpt):
        raise ConfigError(f"{source} has no loop state to resume from (an older format): start a new run")
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    threads = set_threads(tc.threads or max(1, available_cores() // world))
    device = pick_device(tc.device, rank)
    autocast = bf16_autocast(device) if tc.bf16 else None

    corpus = open_corpus(dc.corpus, strict=dc.strict, held_out=dc.held_out)
    if not lead:  # rank 0 trains the tokenizer and tokenizes first; the others then read its cache
        _barrier("before its data was ready")
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"]) if ckpt else load_tokenizer(corpus, cfg.tokenizer)
    train_all = token_stream(corpus, "train", tokenizer, progress=progress and lead)
    valid_all = token_stream(corpus, "valid", tokenizer, progress=progress and lead)
    data_print = data_fingerprint(train_all, valid_all)
    train_ids, valid_ids = _shard(train_all, rank, world), _shard(valid_all, rank, world)
    if lead and world > 1:
        _barrier("while reading the data")
    if ckpt and ckpt.get("data") and (changed := _data_change(ckpt["data"], data_print)):  # (older: no record)
        raise DataError(f"the training data changed since {source} was saved ({changed}): resuming would not "
                        f"continue the same run. Restore the text it was trained on ({dc.corpus}) (for raw text, a "
                        f"newer lm may also split it differently: then resume with the version that trained it), "
                        f"or train on the text as a new run: lm train --run NEW_DIR (or --run {run_dir} --overwrite to replace "
                        "this one)")
    if train_ids.numel() < 2 * dc.batch_size:
        raise DataError(f"the training split has {train_ids.numel()} tokens, fewer than two per "
                        f"lane of --batch-size {dc.batch_size}: lower --batch-size or add text")
    data = batchify(train_ids, dc.batch_size).to(device)  # (B, N / B)
    columns = data.size(1) - 1  # input positions per lane and epoch

    model = LSTMLM(cfg.model, tokenizer.vocab_size).to(device)
    # A tied adaptive head's shared gradient as factors, applied by clipped_step (CPU, one process)
    tied = model.defer_tied_gradient(world == 1 and device.type == "cpu")
    state = {"epoch": 1, "pos": 0, "step": 0, "lr": tc.lr, "best_val_loss": math.inf, "bad_evals": 0,
             "val_history": [], "averaging": False, "elapsed": 0.0, "epoch_loss": 0.0, "epoch_tokens": 0,
             "log_loss": 0.0, "log_tokens": 0, "hidden": None, "rollbacks": 0, "world": world, "columns": columns}
    bptt_rng = torch.Generator().manual_seed(tc.seed)
    torch.manual_seed(tc.seed + 1000 * rank)  # dropout masks differ across ranks
    optimizer = make_optimizer(tc, model, state["lr"], state["averaging"])
    hidden = None

    def restore(snapshot: dict) -> None:
        """Put the run in the state ``snapshot`` holds: a checkpoint to resume from, or the
        in-memory last good state to roll back to (which must stay reusable, hence copies:
        loading an optimizer state keeps references to its tensors)."""
        nonlocal state, optimizer, hidden
        state = copy.deepcopy(snapshot["state"])
        state.setdefault("rollbacks", 0)  # checkpoints written before rollbacks existed
        model.load_state_dict(snapshot.get("raw_model") or snapshot["model"])
        optimizer = make_optimizer(tc, model, state["lr"], state["averaging"])
        optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:  # where dropout masks come from there
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        bptt_rng.set_state(state["bptt_rng"])
        hidden = [(h.to(device), c.to(device)) for h, c in state["hidden"]] if state["hidden"] else None

    def capture(metrics: dict | None) -> dict:
        """Everything the next step depends on, as a checkpoint dict of copies (later steps
        leave it alone); the weights are the averaged ones while NT-ASGD averages."""
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        carried = [tuple(t.detach().to("cpu", copy=True) for t in hc) for hc in hidden] if hidden else None
        extra = {"optimizer": copy.deepcopy(optimizer.state_dict()), "metrics": metrics or {}, "data": data_print,
                 "state": copy.deepcopy(state) | {"rng": torch.get_rng_state(), "bptt_rng": bptt_rng.get_state(),
                                                  "hidden": carried, "cuda_rng": cuda_rng}}
        if state["averaging"]:
            extra["raw_model"] = {k: v.clone() for k, v in model.state_dict().items()}
        with averaged_weights(model, optimizer, state["averaging"]):
            snapshot = checkpoint.make(cfg, model, tokenizer, **extra)
            snapshot["model"] = {k: v.clone() for k, v in snapshot["model"].items()}
        return snapshot

    adjusted = False  # whether this rank's state differs from the checkpoint's
    if ckpt:
        restore(ckpt)
        saved_world, saved_columns = state.get("world", world), state.get("columns", columns)
        if saved_columns and saved_columns != columns:  # other lanes now: the same fraction of the epoch
            state["pos"] = min(round(state["pos"] * columns / saved_columns), columns)
            hidden, adjusted = None, True
            if lead and saved_world != world:
                log(f"resuming a run of {saved_world} process(es) on {world}: the epoch goes on from the "
                    f"same fraction ({state['pos'] / max(columns, 1):.0%})")
        if rank:  # rank 0 saved its own hidden state and random numbers: these ranks start their own
            hidden, adjusted = None, True
            torch.manual_seed(tc.seed + 1000 * rank + state["step"])
        state.update(world=world, columns=columns)
    # the last good state: what a non-finite loss rolls back to
    good = ckpt if ckpt and not adjusted else capture(None)
    saved_step = state["step"] if ckpt else None  # the step last.pt holds, for messages
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    metrics_path = run_dir / "metrics.jsonl"
    if lead:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create {run_dir}: {e.strerror or e}; "
                                  "choose another --run directory") from None
        _truncate_metrics(metrics_path, state["step"], state["rollbacks"])
        if not ckpt:  # a new run where --overwrite allowed one: the old run's checkpoints go with its log,
            for name in ("best.pt", "last.pt"):  # or an early stop would leave its best.pt as this run's
                (run_dir / name).unlink(missing_ok=True)
        log(f"corpus {corpus.name} ({corpus.where}): {train_ids.numel() * world:,} train / "
            f"{valid_ids.numel() * world:,} valid tokens, vocabulary {tokenizer.vocab_size:,}; model "
            f"{n_params / 1e6:.2f}M parameters, {cfg.model.head} head, {tc.optimizer}, {device.type} x{threads} "
            f"threads{f' x{world} ranks' if world > 1 else ''}{', bf16 autocast' if autocast else ''}" + (f"; resuming at step {state['step']:,}" if ckpt else "")
            + (f" from {source.name} (the next save replaces {run_dir / 'last.pt'}; the log drops later steps)"
               if ckpt and source.resolve() != (run_dir / "last.pt").resolve() else ""))

    def disk_full_hint() -> str:
        return ("free some space or fix the permissions, then " +
                (f"continue from step {saved_step:,} with lm train --resume {run_dir}" if saved_step is not None
                 else "train again"))

    def commit(metrics: dict | None, best: bool = False) -> None:
        """Make the current state the last good one, and write it (rank 0) as last.pt,
        and as best.pt too when it is the ``best``."""
        nonlocal good, saved_step
        good = capture(metrics)
        if not lead:
            return
        fault = _kill_self if state["step"] == fail_in_save else None
        for name in ("best.pt", "last.pt") if best else ("last.pt",):
            try:
                checkpoint.save(good, run_dir / name, before_replace=fault)
            except CheckpointError as e:
                raise CheckpointError(f"{e}; {disk_full_hint()}") from None
        saved_step = state["step"]

    def log_metrics(record: dict) -> None:
        if lead:
            try:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise LMError(f"cannot write {metrics_path}: {e.strerror or e}; {disk_full_hint()}") from None

    def roll_back(why: str) -> None:
        """Go back to the last good state with half the learning rate, or give up."""
        bad_step, lr, count = state["step"], state["lr"] * ROLLBACK_LR_FACTOR, state["rollbacks"] + 1
        if count > tc.max_rollbacks:
            tried = (f"after {tc.max_rollbacks} rollback(s), each to a lower learning rate (now {state['lr']:.3g})"
                     if tc.max_rollbacks else "with --max-rollbacks 0")
            if saved_step is None:
                more, kept = "--max-rollbacks N", "nothing was saved yet"
            else:
                more = f"lm train --resume {run_dir} --max-rollbacks N"
                kept = f"{run_dir / 'last.pt'} (step {saved_step:,}) is intact"
            raise LMError(f"{why} at step {bad_step:,} {tried}: train again with a lower --lr or --clip, or "
                          f"allow more rollbacks ({more}); {kept}")
        restore(good)
        state.update(lr=lr, rollbacks=count, elapsed=time.monotonic() - start)
        if lead:
            _truncate_metrics(metrics_path, state["step"], count - 1)  # the undone steps leave the log
            log_metrics({"event": "rollback", "step": state["step"], "from_step": bad_step, "why": why,
                         "lr": lr, "rollbacks": count})
            log(f"{why} at step {bad_step:,}: rolled back to step {state['step']:,}, learning rate now {lr:.3g} "
                f"(rollback {count} of at most {tc.max_rollbacks})")

    stop, fail_at = "", int(os.environ.get(FAIL_AT_STEP, "0"))
    if ckpt and (ended := why_stopped(tc, state)):  # it stopped, and would again at once
        stop = f"nothing trained: the run had stopped, {ended}"
    fail_in_save = int(os.environ.get(FAIL_IN_SAVE, "0"))
    nan_at = Counter(int(s) for s in os.environ.get(NAN_AT_STEP, "").split(",") if s.strip())
    start = time.monotonic() - state["elapsed"]
    limit_s = tc.max_minutes * 60 if tc.max_minutes else math.inf
    stop_at = _stop_request_step(rank)
    log_s = 0.0  # training seconds (evaluations left out) since the last log record, before t0
    with _stop_requests() as requested:
        while state["epoch"] <= tc.epochs and not stop:
            epoch = state["epoch"]
            model.train()
            t0 = time.monotonic()
            trouble = ""  # why the steps since the last good state cannot be kept
            bar = tqdm(total=columns * dc.batch_size, initial=state["pos"] * dc.batch_size, unit="tok",
                       unit_scale=True, desc=f"epoch {epoch}/{tc.epochs}", disable=None if progress and lead else True,
                       dynamic_ncols=True, leave=False)
            windows = bptt_windows(data, dc.bptt, state["pos"], bptt_rng if tc.variable_bptt else None)
            for pos, x, y in windows:
                with autocast or nullcontext():
                    features, hidden, raw = model(x, detach(hidden) if hidden else None, return_raw=True)
                    nll = model.nll(features, y).float().mean()
                if nan_at[state["step"] + 1]:  # fault injection (LM_NAN_AT_STEP)
                    nan_at[state["step"] + 1] -= 1
                    nll = nll * math.nan
                loss = nll + activation_reg(features, tc.alpha) + temporal_activation_reg(raw, tc.beta)
                optimizer.zero_grad(set_to_none=True)
                if tied:
                    tied.clear()
                loss.backward()
                seconds = time.monotonic() - start
                asked = requested() or state["step"] + 1 == stop_at
                if world > 1:  # one all-reduce; the ranks' losses, clocks and stop requests ride along,
                    # so that all of them see a NaN, follow one clock and stop after the same step
                    nll_everywhere, seconds, asked = _average_gradients(model, world, nll.detach(), seconds, asked)
                used = budget_used(tc, epoch - 1 + pos / columns, state["step"], seconds)
                lr = state["lr"] * anneal_factor(tc.anneal, used)
                if tc.variable_bptt:  # a longer window sums more terms: keep the step per token
                    lr *= x.size(1) / dc.bptt
                set_lr(optimizer, lr)
                clipped_step(optimizer, params, tc.clip, tied)
                state["step"] += 1
                state["pos"] = pos + x.size(1)
                value = nll.item()  # the step's one host sync, which the log needs anyway
                if not math.isfinite(value if world == 1 else nll_everywhere.item()):
                    trouble = f"the training loss was {value}" if not math.isfinite(value) else \
                        "another rank's training loss was not finite"
                    break
                state["epoch_loss"] += value * y.numel()
                state["epoch_tokens"] += y.numel()
                state["log_loss"] += value * y.numel()
                state["log_tokens"] += y.numel()
                bar.update(y.numel())
                if state["step"] % tc.log_every == 0:
                    avg = state["log_loss"] / state["log_tokens"]
                    rate = state["log_tokens"] * world / (log_s + time.monotonic() - t0)
                    log_metrics({"step": state["step"], "epoch": epoch, "loss": avg, "lr": lr, "tokens_per_s": rate})
                    bar.set_postfix(loss=f"{avg:.3f}", ppl=f"{math.exp(min(avg, 50)):.1f}", lr=f"{lr:.3g}",
                                    tok_s=f"{rate:,.0f}")
                    state["log_loss"], state["log_tokens"], t0, log_s = 0.0, 0, time.monotonic(), 0.0
                state["elapsed"] = time.monotonic() - start
                if tc.save_every and state["step"] % tc.save_every == 0:
                    if not _all_finite(model, optimizer, world):
                        trouble = "the weights became non-finite"
                        break
                    commit(None)
                if state["step"] == fail_at:
                    _kill_self()
                if tc.max_steps and state["step"] >= tc.max_steps:
                    stop = f"--max-steps {tc.max_steps} reached"
                elif seconds > limit_s:
                    stop = f"--max-minutes {tc.max_minutes:g} reached"
                elif asked:
                    stop = "interrupted"
                if stop:
                    break
            bar.close()
            log_s += time.monotonic() - t0
            if not trouble and not _all_finite(model, optimizer, world):  # a finite loss can still break them
                trouble = "the weights became non-finite"
            if trouble:
                roll_back(trouble)
                stop = ""  # budgets and a stop request are checked again on the next step
                continue
            if stop == "interrupted":
                commit(None)
                break
            epoch_done = state["pos"] >= columns
            with averaged_weights(model, optimizer, state["averaging"]):
                val = _evaluate(model, valid_ids.to(device), tokenizer, dc, world, progress and lead)
            train_loss = state["epoch_loss"] / max(state["epoch_tokens"], 1)
            state["elapsed"] = time.monotonic() - start
            record = {"epoch": epoch, "step": state["step"], "lr": optimizer.param_groups[0]["lr"],
                      "train_loss": train_loss, "train_ppl": math.exp(min(train_loss, 700)),
                      "valid_loss": val["loss"], "valid_ppl": val["ppl"], "averaging": state["averaging"],
                      "elapsed_s": state["elapsed"]}
            log_metrics(record)
            improved = val["loss"] < state["best_val_loss"]
            note = _after_evaluation(tc, state, val["loss"], improved)
            if note == "average":
                optimizer = make_optimizer(tc, model, state["lr"], averaging=True)
            elif note:
                stop = stop or note
            if epoch_done:
                state.update(epoch=epoch + 1, pos=0, epoch_loss=0.0, epoch_tokens=0)
                hidden = None
            commit(record, best=improved)
            if lead:
                log(f"epoch {epoch}{'' if epoch_done else ' (partial)'}: train ppl {fmt_ppl(record['train_ppl'])}, "
                    f"valid ppl {fmt_ppl(val['ppl'])}{' (best)' if improved else ''}, lr {record['lr']:.3g}"
                    f"{', averaging' if state['averaging'] else ''}, {state['elapsed'] / 60:.1f} min"
                    + ("; started averaging (NT-ASGD)" if note == "average" else ""))
    if stop == "interrupted" and lead:
        log(f"interrupted at step {state['step']:,}: saved {run_dir / 'last.pt'}; continue with "
            f"lm train --resume {run_dir}")
    epochs = min(state["epoch"] - 1 + state["pos"] / max(columns, 1), tc.epochs)  # a partial one counts its share
    summary = {"run": str(run_dir), "epochs": round(epochs, 2), "steps": state["step"],
               "best_valid_ppl": perplexity(state["best_val_loss"], 1) if math.isfinite(state["best_val_loss"]) else None,
               "minutes": round(state["elapsed"] / 60, 2), "stopped": stop or "all epochs done",
               "checkpoint": str(run_dir / "best.pt") if math.isfinite(state["best_val_loss"])  # this run's
               else str(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else None,  # none validated yet
               "rollbacks": state["rollbacks"]} | ({"rank": rank, "world": world} if world > 1 else {})
    log_metrics({"summary": summary})
    return summary


def data_fingerprint(train_ids: torch.Tensor, valid_ids: torch.Tensor) -> dict:
    """What identifies a run's data, saved in its checkpoints: each split's token count and
    a hash of its tokens (one pass at memory speed: 0.04 s for WikiText-2's train split).
    The tokens are what the run reads, so a change to the text, to how it is split or to
    the rules that tokenize it shows, and a copy of the same text elsewhere does not."""
    def digest(ids: torch.Tensor) -> str:
        return hashlib.sha256(ids.contiguous().numpy().view("u1")).hexdigest()[:16]

    return {split: {"tokens": ids.numel(), "sha256": digest(ids)} for split, ids in
            (("train", train_ids), ("valid", valid_ids))}


def _data_change(saved: dict, now: dict) -> str:
    """How the data ``now`` differs from the data a checkpoint ``saved`` (both from
    ``data_fingerprint``), in a few words; "" if it does not."""
    for split in ("train", "valid"):
        was, is_ = saved.get(split) or {}, now[split]
        if was.get("tokens") != is_["tokens"]:
            return f"its {split} split had {was.get('tokens', 0):,} tokens, and has {is_['tokens']:,} now"
        if was.get("sha256") != is_["sha256"]:
            return f"its {split} split has as many tokens as before ({is_['tokens']:,}), but other ones"
    return ""


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether ``e`` is an allocator's failure (the CPU's has no exception type of its own)."""
    return isinstance(e, torch.OutOfMemoryError) or any(
        m in str(e) for m in ("can't allocate memory", "DefaultCPUAllocator", "out of memory"))


def _all_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int) -> bool:
    """Whether the weights and the optimizer's state (momenta, NT-ASGD's average) are all
    finite, on every rank. One host sync: called at saves, not at every step."""
    tensors = [*model.parameters(), *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
    ok = torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all()
    if world > 1:
        ok = ok.to(torch.int32)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)


def _kill_self() -> None:
    """Fault injection: die as a power cut or the OOM killer would, with no clean-up."""
    os.kill(os.getpid(), signal.SIGKILL)


def _after_evaluation(tc, state: dict, val_loss: float, improved: bool) -> str:
    """Update best / plateau / averaging state after an evaluation. Returns "average"
    when NT-ASGD should start averaging, a stop reason, or ""."""
    history = state["val_history"]
    note = ""
    if improved:
        state["best_val_loss"], state["bad_evals"] = val_loss, 0
    else:
        state["bad_evals"] += 1
        if tc.patience and state["bad_evals"] >= tc.patience:
            note = f"no improvement in {tc.patience} evaluations (--patience)"
    if tc.optimizer == "ntasgd":
        if not state["averaging"] and len(history) > tc.nonmono and val_loss > min(history[: -tc.nonmono]):
            state["averaging"] = True
            note = note or "average"
    elif not improved:
        state["lr"] *= tc.lr_decay
        if state["lr"] < min_lr(tc):
            note = note or f"learning rate fell below --min-lr {min_lr(tc):.3g}"
    history.append(val_loss)
    return note


def _evaluate(model, valid_ids, tokenizer, dc, world: int, progress: bool) -> dict:
    val = evaluate(model, valid_ids, bos_id=tokenizer.eos_id, batch_size=dc.eval_batch_size,
                   progress=progress, desc="valid")
    if world > 1:  # each rank scored its own slice: add up the likelihoods
        sums = torch.tensor([val["loss"] * val["tokens"], float(val["tokens"])], dtype=torch.float64)
        torch.distributed.all_reduce(sums)
        val = val | {"loss": (sums[0] / sums[1]).item(), "tokens": int(sums[1])}
        val["ppl"] = perplexity(val["loss"], 1)
    return val


def _init_distributed(tc) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if tc.device != "cpu" and torch.cuda.is_available() else "gloo"
        init_process_group(backend)
    return dist.get_rank(), world


def init_process_group(backend: str) -> None:
    """``torch.distributed.init_process_group``, with torch._dynamo imported first. The
    first optimizer imports it anyway, and its modules (torch.distributed.nn.functional
    and others) take the world group as a default argument when imported. Imported after
    the group exists, they hold it for good: ``destroy_process_group`` cannot free it,
    gloo's threads outlive it, and one that drops a tensor while the interpreter shuts
    down aborts the rank (SIGABRT, "terminate called without an active exception")."""
    import torch._dynamo  # noqa: F401
    import torch.distributed as dist

    dist.init_process_group(backend)


def _barrier(when: str) -> None:
    """Wait for every rank. A rank that failed meanwhile (its own one-line error says why)
    makes this one stop with a one-line error too, not a traceback."""
    try:
        torch.distributed.barrier()
    except RuntimeError:  # torch.distributed.DistError included
        raise LMError(f"another rank of this distributed run stopped {when}: its error above says why") from None


def _stop_request_step(rank: int) -> int:
    """The step at which fault injection (LM_STOP_AT_STEP) asks this rank to stop; 0: never."""
    step, _, only = os.environ.get(STOP_AT_STEP, "").partition("@")
    return int(step) if step and (not only or int(only) == rank) else 0


def _shard(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice; every rank gets the same length (same step count)."""
    n = ids.numel() // world
    return ids[rank * n : (rank + 1) * n] if world > 1 else ids


def _average_gradients(model: torch.nn.Module, world: int, loss: torch.Tensor, seconds: float,
                       asked: bool) -> tuple[torch.Tensor, float, bool]:
    """One all-reduce over all gradients, flattened (a missing gradient counts as 0), with
    this rank's ``loss``, clock (``seconds`` into the run) and stop request riding along.
    Returns what every rank then agrees on: the mean loss (NaN if any rank's is), the mean
    clock, and whether any rank asked to stop. Deciding a time budget or a Ctrl-C on each
    rank's own clock would let one rank stop a step before another, which then waits in a
    collective the first never joins."""
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    dtype = params[0].grad.dtype
    extra = torch.tensor([seconds, float(asked)], dtype=dtype, device=params[0].grad.device)  # NCCL: on the GPU
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.reshape(1).to(dtype), extra])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat[-3], flat[-2].item(), flat[-1].item() > 0


def _truncate_metrics(path: Path, step: int, rollbacks: int) -> None:
    """Drop the records of work the weights no longer hold: after a resume or rollback,
    the steps after ``step`` and the rollbacks after the first ``rollbacks``, so that the
    log reads as the history of the weights (a fresh run, at 0 and 0, starts it empty).
    Rewritten atomically: a kill during the rewrite must not empty the log."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "event" in record:
            if record.get("rollbacks", 0) <= rollbacks:
                keep.append(line)
        elif "summary" not in record and record.get("step", 0) <= step:
            keep.append(line)
    text = "".join(l + "\n" for l in keep).encode("utf-8")
    checkpoint.atomic_write(path, lambda f: f.write(text), hint="free some space or fix the permissions and run again")


def _detach(fds: list[int]) -> None:
    """Point the given descriptors (a terminal that hung up) at /dev/null: a write to the
    dead terminal fails, and would end the run before it saves."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(null, fd)
    os.close(null)


@contextmanager
def _stop_requests():
    """Ctrl-C, SIGTERM and SIGHUP (the terminal went away: a dropped SSH session) ask the
    loop to stop after the current step (then it saves and exits cleanly) instead of
    killing it mid-update. Yields a function telling whether a stop was asked for."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return
    hangup = getattr(signal, "SIGHUP", None)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, hangup) if s is not None}
    if previous.get(hangup) == signal.SIG_IGN:  # under nohup: keep running
        del previous[hangup]
    terminals = [fd for fd in (1, 2) if os.isatty(fd)]  # known now: a hung-up terminal may not say

    def handler(signum, frame):
        if signum == hangup:
            _detach(terminals)
        if flag.is_set():  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag.is_set
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
