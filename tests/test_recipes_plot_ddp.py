import json
import os
import subprocess
import sys

from lm.cli import main
from lm.recipes import RECIPES, recipe
from lm.train import build_config

from conftest import REPO


def test_recipes_listed_and_flags_override_them(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("wt2-cpu", "ptb-cpu", "awd-wt2", "awd-ptb"))
    cfg = build_config(recipe("awd-wt2"), {}, {"train": {"epochs": 2}})
    assert (cfg.model.hidden_dim, cfg.model.weight_drop, cfg.train.optimizer) == (1150, 0.5, "ntasgd")
    assert cfg.train.epochs == 2 and cfg.data.corpus == "wikitext-2" and cfg.tokenizer.text == "tokenized"
    assert main(["recipes", "ptb-cpu"]) == 0
    assert "[model]" in capsys.readouterr().out
    assert set(RECIPES) == {"wt2-cpu", "ptb-cpu", "awd-wt2", "awd-ptb"}


def test_plot_draws_a_png(tiny_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(tiny_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_process_data_parallel_on_cpu(tiny_corpus, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "lm", "train", "--corpus", str(tiny_corpus), "--run-dir", str(run), "--emb-dim", "16",
           "--hidden-dim", "16", "--batch-size", "4", "--epochs", "1", "--max-minutes", "0", "--threads", "1",
           "--log-every", "5", "--quiet", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(summaries) == 2 and summaries[0]["steps"] == summaries[1]["steps"] > 0
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("summary" in r for r in records) == 1  # one writer
    assert any("valid_ppl" in r for r in records)
