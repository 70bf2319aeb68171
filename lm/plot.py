"""``lm plot RUN``: loss and perplexity curves from a run's metrics.jsonl (matplotlib)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from lm.errors import ConfigError, LMError

# The numbers each kind of metrics.jsonl record must have to be drawn.
STEP_KEYS = ("step", "loss")
EPOCH_KEYS = ("step", "valid_loss", "valid_ppl", "train_loss")


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(per-logging-step records, per-epoch records) of a run. A line that is not a
    record of either kind with numbers where the plot reads them (a torn last line, a
    line edited by hand, another tool's JSON) is skipped, as a run's other lines still
    make a plot."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise LMError(f"{path} not found: is {run} a run directory (lm train --run DIR)?")
    steps, epochs = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(r, dict):
            continue
        if "valid_loss" in r:
            if _numbers(r, EPOCH_KEYS):
                epochs.append(r)
        elif "loss" in r and _numbers(r, STEP_KEYS):
            steps.append(r)
    if not steps and not epochs:
        raise LMError(f"{path} has no records yet: train for at least --log-every steps")
    return steps, epochs


def _numbers(record: dict, keys: tuple[str, ...]) -> bool:
    return all(isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool) for k in keys)


def plot_run(run: Path, out: Path | None = None) -> Path:
    """Draw the run's curves to ``out`` (default RUN/curves.png) and return the path
    written. A name without a suffix gets .png, as matplotlib would add it anyway: the
    returned path is then the file's real name."""
    out = out or run / "curves.png"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'curves.png'}")
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LMError("lm plot needs matplotlib: pip install 'lm[plot]' (or pip install matplotlib)") from None
    steps, epochs = read_metrics(run)
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train (per log step)")
    if epochs:
        ax_loss.plot([r["step"] for r in epochs], [r["valid_loss"] for r in epochs], "o-", label="valid")
        ax_ppl.plot([r["step"] for r in epochs], [r["valid_ppl"] for r in epochs], "o-", label="valid")
        ax_ppl.plot([r["step"] for r in epochs], [math.exp(min(r["train_loss"], 50)) for r in epochs], "s--",
                    label="train")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=f"{run.name}: loss")
    ax_ppl.set(xlabel="step", ylabel="perplexity", yscale="log", title=f"{run.name}: perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise LMError(f"cannot write {out}: {e.strerror or e}; choose another --out") from None
    except ValueError as e:  # an --out suffix matplotlib has no writer for
        raise LMError(f"cannot write {out}: {e}; use a .png, .pdf or .svg --out") from None
    finally:
        plt.close(fig)
    return out
