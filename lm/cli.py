"""The ``lm`` command: one subcommand per job, each handler a few lines over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from lm import __version__
from lm.config import (DataConfig, ModelConfig, SampleConfig, TokenizerConfig, TrainConfig, add_flags,
                       load_config_file, overrides_from_args)
from lm.errors import ConfigError, LMError


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (plus exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None))


# -- train -------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from lm.recipes import recipe
    from lm.train import build_config, default_run_dir, resume_config, train

    flags = overrides_from_args(args)
    if args.resume:
        run = Path(args.resume)
        cfg = resume_config(run, flags)
    else:
        layers = [recipe(args.recipe)] if args.recipe else []
        layers.append(load_config_file(args.config) if args.config else {})
        cfg = build_config(*layers, flags)
        run = Path(args.run) if args.run else default_run_dir(cfg)
    summary = train(cfg, run, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet,
                    log=(lambda *a: None) if args.json else print)
    if args.json:
        _print_json(summary)
    else:
        best = summary["best_valid_ppl"]
        print(f"done: {summary['epochs']} epoch(s), {summary['steps']:,} steps in {summary['minutes']:.1f} min "
              f"({summary['stopped']}); best valid ppl {best:.2f} -> {summary['checkpoint']}"
              if best is not None else f"stopped before the first evaluation ({summary['stopped']})")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from lm.recipes import RECIPES, to_toml

    names = [args.name] if args.name else list(RECIPES)
    print("\n\n".join(to_toml(n) for n in names) if args.name or args.verbose else
          "\n".join(f"{n:<10} {RECIPES[n]['description']}" for n in names))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from lm.plot import plot_run

    out = plot_run(Path(args.run), Path(args.out) if args.out else None)
    print(f"wrote {out}")
    return 0


# -- eval --------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    from lm.checkpoint import load_model
    from lm.corpus import open_corpus
    from lm.data import token_stream, word_count
    from lm.evaluate import add_word_level, evaluate
    from lm.train import set_threads

    set_threads(args.threads)
    cfg, model, tokenizer, _ = load_model(args.checkpoint)
    corpus = open_corpus(args.corpus or cfg.data.corpus, strict=args.strict, held_out=cfg.data.held_out)
    stream = token_stream(corpus, args.split, tokenizer, progress=not args.json)
    result = evaluate(model, stream, bos_id=tokenizer.eos_id, batch_size=args.batch_size,
                      progress=not args.json, desc=args.split)
    result |= {"split": args.split, "corpus": corpus.name, "checkpoint": str(args.checkpoint),
               "batch_size": args.batch_size}
    if tokenizer.subword:
        result = add_word_level(result, word_count(corpus, args.split))
    if args.json:
        _print_json(result)
    else:
        per_word = f"  word ppl {result['word_ppl']:.2f}" if "word_ppl" in result else ""
        print(f"{corpus.name} {args.split}: ppl {result['ppl']:.2f}{per_word}  loss {result['loss']:.4f}  "
              f"tokens {result['tokens']:,}  ({result['tokens_per_s']:,.0f} tok/s, {result['seconds']:.1f} s)")
    return 0


# -- generate ----------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from lm.checkpoint import load_model
    from lm.sample import TextStream, generate

    sc = _sample_config(args)
    _, model, tok, _ = load_model(args.checkpoint)
    prompt = [tok.eos_id] + tok.encode_typed(args.prompt)
    last_line = prompt[len(prompt) - prompt[::-1].index(tok.eos_id):]
    out = TextStream(tok, last_line)
    sys.stdout.write(tok.render(prompt[1:]))
    t0, n = time.perf_counter(), 0
    for token in generate(model, prompt, args.max_words, temperature=sc.temperature, top_k=sc.top_k,
                          top_p=sc.top_p, seed=sc.seed, banned=[tok.unk_id]):
        sys.stdout.write(out.add(token))
        sys.stdout.flush()
        n += 1
    seconds = time.perf_counter() - t0
    print(file=sys.stdout, flush=True)
    print(f"generated {n} words in {seconds:.2f} s ({n / max(seconds, 1e-9):.0f} words/s, seed {sc.seed})",
          file=sys.stderr)
    return 0


def _sample_config(args: argparse.Namespace) -> SampleConfig:
    layer = overrides_from_args(args).get("sample", {})
    sc = SampleConfig(**layer)
    sc.validate()
    if not 1 <= args.max_words <= 1_000_000:
        raise ConfigError(f"--max-words must be between 1 and 1000000, got {args.max_words}")
    return sc


# -- complete / repl -----------------------------------------------------------------------

def _predictor(checkpoint: str, threads: int):
    from lm.checkpoint import load_model
    from lm.predict import Predictor
    from lm.train import set_threads

    set_threads(threads)
    _, model, tok, _ = load_model(checkpoint)
    if tok.subword:
        raise LMError(f"autocomplete needs a word-level model, and {checkpoint} uses {tok.kind} "
                      "subwords: train one with --kind word")
    return Predictor(model, tok)


def _check_k(k: int) -> None:
    if not 1 <= k <= 1000:
        raise ConfigError(f"--k must be between 1 and 1000, got {k}")


def cmd_complete(args: argparse.Namespace) -> int:
    _check_k(args.k)
    s = _predictor(args.checkpoint, args.threads).complete_text(args.text, args.k)
    if args.json:
        _print_json(s.to_json())
    else:
        from lm.repl import format_suggestions
        print(format_suggestions(s))
    return 0


def cmd_repl(args: argparse.Namespace) -> int:
    from lm.repl import run

    _check_k(args.k)
    return run(_predictor(args.checkpoint, args.threads), k=args.k)


# -- corpus ------------------------------------------------------------------------------

def cmd_corpus(args: argparse.Namespace) -> int:
    from lm.corpus import open_corpus, registry

    if args.action == "list":
        entries = registry()
        rows = [{"name": n, "description": e.get("description", ""), "file": e["_file"]} for n, e in entries.items()]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['name']:<16} {r['description']}")
        return 0
    if not args.name:
        raise ConfigError(f"lm corpus {args.action} needs a corpus name or path")
    from lm.data import cache_dir, corpus_stats, load_tokenizer
    from lm.train import build_config

    cfg = build_config({"data": {"corpus": args.name}}, overrides_from_args(args))
    corpus = open_corpus(args.name, strict=args.strict, held_out=cfg.data.held_out)
    tokenizer = load_tokenizer(corpus, cfg.tokenizer)
    stats = corpus_stats(corpus, tokenizer, progress=not args.json)
    if args.action == "prepare":
        stats["cache"] = str(cache_dir())
    if args.json:
        _print_json(stats)
    else:
        t = stats["tokens"]
        print(f"{stats['corpus']} ({stats['where']}): train {t['train']:,} / valid {t['valid']:,} / "
              f"test {t['test']:,} tokens, vocabulary {stats['vocab']:,}"
              + (f"; token cache in {stats['cache']}" if "cache" in stats else ""))
    return 0


# -- bench -------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from lm.bench import run

    results = run(args.only)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0


# -- parser ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lm", description="Word-level LSTM language models: train, evaluate, generate, autocomplete.")
    p.add_argument("--version", action="version", version=f"lm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    t = sub.add_parser("train", help="train a model on a corpus")
    t.add_argument("--run", "--run-dir", metavar="DIR", dest="run",
                   help="run directory for checkpoints (default: checkpoints/CORPUS); under torchrun "
                        "write --run-dir, since torchrun reads --run as its own --run-path")
    t.add_argument("--recipe", metavar="NAME", help="start from a named recipe (lm recipes); flags override it")
    t.add_argument("--resume", metavar="RUN", help="continue the run in RUN exactly where it stopped")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in --run")
    t.add_argument("--config", metavar="FILE", help="TOML file with [tokenizer] [data] [model] [train] tables")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, cls in (("tokenizer", TokenizerConfig), ("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
        add_flags(t, cls, name)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="perplexity of a checkpoint on a split")
    e.add_argument("checkpoint", help="a checkpoint file (best.pt) or run directory")
    e.add_argument("--split", choices=("train", "valid", "test"), default="valid")
    e.add_argument("--corpus", help="score another corpus than the one trained on")
    e.add_argument("--batch-size", type=_positive_int, default=10, help="lanes; 1 is the exact reference (default: 10)")
    e.add_argument("--threads", type=_nonneg_int, default=0)
    e.add_argument("--strict", action="store_true", help="refuse text with invalid UTF-8")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-words", type=int, default=50)
    add_flags(g, SampleConfig, "sample")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("complete", help="the most likely next words, or completions of a partial word")
    c.add_argument("checkpoint")
    c.add_argument("text", help='text typed so far, e.g. "the president of the" or "the pres"')
    c.add_argument("--k", type=int, default=5)
    c.add_argument("--threads", type=_nonneg_int, default=1)
    c.add_argument("--json", action="store_true", help="a JSON list of {word, prob}")
    c.set_defaults(func=cmd_complete)

    r = sub.add_parser("repl", help="interactive autocomplete")
    r.add_argument("checkpoint")
    r.add_argument("--k", type=int, default=5)
    r.add_argument("--threads", type=_nonneg_int, default=1)
    r.set_defaults(func=cmd_repl)

    co = sub.add_parser("corpus", help="list registered corpora, or count a corpus's tokens")
    co.add_argument("action", choices=("list", "info", "prepare"))
    co.add_argument("name", nargs="?", help="registered name, directory or file")
    co.add_argument("--strict", action="store_true", help="refuse text with invalid UTF-8")
    add_flags(co, TokenizerConfig, "tokenizer")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=cmd_corpus)

    rc = sub.add_parser("recipes", help="list the named training recipes, or print one as TOML")
    rc.add_argument("name", nargs="?", help="a recipe to print in full")
    rc.add_argument("-v", "--verbose", action="store_true", help="print every recipe in full")
    rc.set_defaults(func=cmd_recipes)

    pl = sub.add_parser("plot", help="draw a run's loss and perplexity curves to a PNG (needs matplotlib)")
    pl.add_argument("run", help="run directory with metrics.jsonl")
    pl.add_argument("--out", help="PNG path (default: RUN/curves.png)")
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("bench", help="speed and memory benchmarks (make bench)")
    b.add_argument("--only", nargs="+", choices=("train", "cache"), help="run only these benchmarks")
    b.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    b.set_defaults(func=cmd_bench)
    return p


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    return 0 if s == "0" else _positive_int(s)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lm: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LMError as e:
        print(f"lm {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lm generate ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
