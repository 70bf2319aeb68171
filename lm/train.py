"""The training loop: SGD, gradient clipping, learning-rate decay on a plateau."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lm import checkpoint
from lm.batching import batchify, n_windows, windows
from lm.config import Config, DataConfig, merge
from lm.corpus import open_corpus, registry
from lm.data import load_tokenizer, token_stream
from lm.errors import DataError
from lm.evaluate import evaluate, perplexity
from lm.model import LSTMLM, detach


def set_threads(threads: int) -> int:
    """Use one intra-op thread per available core unless told otherwise."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    return torch.device(name)


def build_config(*layers: dict) -> Config:
    """The run's config: dataclass defaults, then the corpus's registry defaults (e.g.
    its text convention), then ``layers`` in order (a config file, then flags)."""
    merged = merge(*layers)
    entry = registry().get(merged.get("data", {}).get("corpus", DataConfig().corpus), {})
    return Config.from_dict(merge(entry.get("defaults", {}), merged)).validate()


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
    name = Path(cfg.data.corpus).stem if ("/" in cfg.data.corpus or "." in cfg.data.corpus) else cfg.data.corpus
    return Path("checkpoints") / (name or "run")


def train(cfg: Config, run_dir: Path | None = None, *, progress: bool = True, log=print) -> dict:
    """Train a model as ``cfg`` says, writing best.pt, last.pt and metrics.jsonl into
    ``run_dir``. Returns the summary (also the last line of metrics.jsonl)."""
    cfg.validate()
    tc, dc = cfg.train, cfg.data
    run_dir = Path(run_dir or default_run_dir(cfg))
    torch.manual_seed(tc.seed)
    threads = set_threads(tc.threads)
    device = pick_device(tc.device)

    corpus = open_corpus(dc.corpus, strict=dc.strict, held_out=dc.held_out)
    tokenizer = load_tokenizer(corpus, cfg.tokenizer)
    train_ids = token_stream(corpus, "train", tokenizer, progress=progress)
    valid_ids = token_stream(corpus, "valid", tokenizer, progress=progress)
    if train_ids.numel() < 2 * dc.batch_size:
        raise DataError(f"the training split has {train_ids.numel()} tokens, fewer than two per "
                        f"lane of --batch-size {dc.batch_size}: lower --batch-size or add text")
    data = batchify(train_ids, dc.batch_size).to(device)  # (B, N / B)
    per_epoch = n_windows(data, dc.bptt)

    model = LSTMLM(cfg.model, tokenizer.vocab_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=tc.lr)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"corpus {corpus.name} ({corpus.where}): {train_ids.numel():,} train / {valid_ids.numel():,} "
        f"valid tokens, vocabulary {tokenizer.vocab_size:,}; model {n_params / 1e6:.2f}M parameters, "
        f"{cfg.model.head} head, {device.type} x{threads} threads")

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    state = {"epoch": 0, "step": 0, "best_val_loss": math.inf, "lr": tc.lr, "elapsed": 0.0}
    start = time.monotonic()
    deadline = start + tc.max_minutes * 60 if tc.max_minutes else math.inf
    stop = ""

    def save(name: str, val: dict | None) -> Path:
        return checkpoint.save(checkpoint.make(cfg, model, tokenizer, optimizer=optimizer.state_dict(),
                                               state=dict(state), metrics=val or {}), run_dir / name)

    def log_metrics(record: dict) -> None:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    try:
        for epoch in range(1, tc.epochs + 1):
            state["epoch"] = epoch
            model.train()
            hidden = None
            run_loss, run_tokens, t0 = 0.0, 0, time.monotonic()
            bar = tqdm(windows(data, dc.bptt), total=per_epoch, desc=f"epoch {epoch}/{tc.epochs}",
                       unit="step", disable=None if progress else True, dynamic_ncols=True)
            for i, (x, y) in enumerate(bar):
                used = budget_used(tc, epoch - 1 + i / per_epoch, state["step"], time.monotonic() - start)
                lr = state["lr"] * anneal_factor(tc.anneal, used)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                features, hidden = model(x, detach(hidden) if hidden else None)  # (B, T, D)
                loss = model.nll(features, y).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
                optimizer.step()
                state["step"] += 1
                run_loss += loss.item() * y.numel()
                run_tokens += y.numel()
                if state["step"] % tc.log_every == 0:
                    avg = run_loss / run_tokens
                    bar.set_postfix(loss=f"{avg:.3f}", ppl=f"{math.exp(min(avg, 50)):.1f}",
                                    lr=f"{lr:.3g}", tok_s=f"{run_tokens / (time.monotonic() - t0):,.0f}")
                    if not math.isfinite(avg):
                        raise DataError(f"the training loss became {avg} at step {state['step']}: "
                                        "lower --lr or --clip and train again")
                if tc.max_steps and state["step"] >= tc.max_steps:
                    stop = f"--max-steps {tc.max_steps} reached"
                elif time.monotonic() > deadline:
                    stop = f"--max-minutes {tc.max_minutes:g} reached"
                if stop:
                    break
            bar.close()
            train_loss = run_loss / max(run_tokens, 1)
            val = evaluate(model, valid_ids.to(device), bos_id=tokenizer.eos_id,
                           batch_size=dc.eval_batch_size, progress=progress, desc="valid")
            state["elapsed"] = time.monotonic() - start
            improved = val["loss"] < state["best_val_loss"]
            record = {"epoch": epoch, "step": state["step"], "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
                      "train_ppl": perplexity(train_loss * run_tokens, run_tokens),
                      "valid_loss": val["loss"], "valid_ppl": val["ppl"],
                      "train_tokens_per_s": run_tokens / max(time.monotonic() - t0 - val["seconds"], 1e-9),
                      "elapsed_s": state["elapsed"]}
            log_metrics(record)
            if improved:
                state["best_val_loss"] = val["loss"]
                save("best.pt", record)
            else:
                state["lr"] *= tc.lr_decay
                if state["lr"] < tc.min_lr:
                    stop = stop or f"learning rate fell below --min-lr {tc.min_lr:g}"
            save("last.pt", record)
            log(f"epoch {epoch}: train ppl {record['train_ppl']:.2f}, valid ppl {val['ppl']:.2f}"
                f"{' (best)' if improved else ''}, lr {record['lr']:.3g}, "
                f"{record['train_tokens_per_s']:,.0f} tok/s, {state['elapsed'] / 60:.1f} min")
            if stop:
                break
    except KeyboardInterrupt:
        save("last.pt", None)
        log(f"interrupted at step {state['step']}: saved {run_dir / 'last.pt'}")
        stop = "interrupted"

    summary = {"run": str(run_dir), "epochs": state["epoch"], "steps": state["step"],
               "best_valid_ppl": perplexity(state["best_val_loss"], 1) if math.isfinite(state["best_val_loss"]) else None,
               "minutes": round((time.monotonic() - start) / 60, 2), "stopped": stop or "all epochs done",
               "checkpoint": str(run_dir / "best.pt")}
    log_metrics({"summary": summary})
    return summary
