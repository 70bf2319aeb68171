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
                       check_threads, load_config_file, overrides_from_args)
from lm.errors import ConfigError, LMError


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (plus exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None))


# -- train -------------------------------------------------------------------------------

def _run_folder(arg: str) -> Path:
    """A run's folder, given as the folder or as any file in it (last.pt, best.pt,
    metrics.jsonl): pasting the path of a file lm train wrote works too."""
    path = Path(arg).expanduser()
    return path.parent if path.is_file() else path


def cmd_train(args: argparse.Namespace) -> int:
    from lm.evaluate import fmt_ppl
    from lm.recipes import recipe
    from lm.train import build_config, default_run_dir, resume_config, train

    flags = overrides_from_args(args)
    source = None
    if args.resume:
        run, source = _resume_source(args.resume)
        _check_resume_flags(args, run)
        cfg = resume_config(run, flags, source)
    else:
        layers = [recipe(args.recipe)] if args.recipe else []
        layers.append(load_config_file(args.config) if args.config else {})
        cfg = build_config(*layers, flags)
        run = Path(args.run) if args.run else default_run_dir(cfg)
    summary = train(cfg, run, resume=source or False, overwrite=args.overwrite, progress=not args.quiet,
                    log=(lambda *a: None) if args.json else print)
    if summary.get("rank"):  # torchrun's other ranks: rank 0 alone reports, as it alone logs
        return 0
    if args.json:
        _print_json(summary)
    else:
        best = summary["best_valid_ppl"]
        print(f"done: {summary['epochs']:g} epoch(s), {summary['steps']:,} steps in {summary['minutes']:.1f} min "
              f"({summary['stopped']}); best valid ppl {fmt_ppl(best)} -> {summary['checkpoint']}"
              if best is not None else f"stopped before the first evaluation ({summary['stopped']})"
              + (f"; saved {summary['checkpoint']}" if summary["checkpoint"] else ""))
    return 0


def _resume_source(arg: str) -> tuple[Path, Path]:
    """(run folder, checkpoint to resume from) for --resume: a checkpoint file (.pt, such
    as best.pt) is resumed from itself, in its folder; a folder, or another file in it
    (metrics.jsonl), from the folder's last.pt."""
    path = Path(arg).expanduser()
    if path.suffix == ".pt" and not path.is_dir():
        return path.parent, path
    run = _run_folder(arg)
    return run, run / "last.pt"


def _check_resume_flags(args: argparse.Namespace, run: Path) -> None:
    """Refuse what --resume would otherwise ignore: a resumed run keeps its own config
    and folder, and changes only by the budget and logistics flags resume_config takes."""
    for flag, given in (("--config", args.config), ("--recipe", args.recipe)):
        if given:
            raise ConfigError(f"{flag} does not apply with --resume: a resumed run keeps the config it was "
                              "trained with; give budget changes as flags (--epochs, --max-steps, --max-minutes; also "
                              "--min-lr, --patience, --max-rollbacks)")
    # the same folder again is no change (torchrun launches pass --run-dir and --resume alike)
    if args.run and Path(args.run).expanduser().resolve() != run.resolve():
        raise ConfigError(f"--run {args.run} does not apply with --resume: the run is the one --resume names "
                          f"({run}); to start a new run in {args.run}, drop --resume")
    if args.overwrite:
        raise ConfigError(f"--overwrite does not apply with --resume: resuming continues the run in {run}; "
                          "to start it over, drop --resume")


def cmd_recipes(args: argparse.Namespace) -> int:
    from lm.recipes import RECIPES, to_toml

    names = [args.name] if args.name else list(RECIPES)
    print("\n\n".join(to_toml(n) for n in names) if args.name or args.verbose else
          "\n".join(f"{n:<10} {RECIPES[n]['description']}" for n in names))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from lm.plot import plot_run

    target = Path(args.out).expanduser() if args.out else None  # None: RUN/curves.png, the plot's own
    if target and target.is_file():  # (a folder gets plot_run's own message, naming curves.png in it)
        from lm.checkpoint import check_replaceable

        check_replaceable(target, "--out", "a PNG image", lambda p: p.open("rb").read(8) == b"\x89PNG\r\n\x1a\n")
    out = plot_run(_run_folder(args.run), target)
    print(f"wrote {out}")
    return 0


# -- info --------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    from lm.checkpoint import describe
    from lm.evaluate import fmt_ppl

    d = describe(args.checkpoint)
    if args.json:
        _print_json(d)
        return _damaged(d)
    layers = " + ".join(str(n) for n in d["layers"])
    head = ("full softmax" if d["head"] == "full" else
            f"adaptive head, cutoffs {','.join(map(str, d['cutoffs']))}" if d["cutoffs"] else "adaptive head with no clusters at this vocabulary size")
    words = f"{d['tokenizer']} vocabulary of {d['vocab_size']:,}, {d['text']} text" + (", lowercased" if d["lowercase"] else "")
    print(f"{d['file']}: {d['bytes'] / 1e6:.1f} MB, lm {d['lm_version']}, checkpoint format {d['format_version']}")
    print(f"model: LSTM {layers}, embeddings {d['emb_dim']}{', tied' if d['tied'] else ''}, {head}; "
          f"{d['parameters']:,} parameters")
    print(f"tokenizer: {words}")
    if d["step"] is not None:
        lr = f", lr now {d['lr']:.3g}" if d["lr"] is not None else ""
        print(f"training: {d['corpus']}, {'epoch ' + str(d['epoch']) + ', ' if d['epoch'] else ''}"
              f"{d['step']:,} steps in {d['minutes']:.1f} min ({d['optimizer']}{lr})")
    ppl = (f"valid ppl {fmt_ppl(d['valid_ppl'])}" + (f", train ppl {fmt_ppl(d['train_ppl'])}" if d["train_ppl"] else "")
           if d["valid_ppl"] is not None else "not yet validated")
    run = Path(d["file"]).parent
    print(f"{ppl}; " + (f"the run has finished, {d['finished']} (lm train --resume {run})" if d["finished"]
                        else f"lm train --resume {run} continues it" if d["resumable"] else "no loop state to resume from"))
    return _damaged(d)


def _damaged(d: dict) -> int:
    """lm info's exit: 0, or a one-line error after the description of a damaged checkpoint."""
    if d["damage"]:
        from lm.errors import CheckpointError
        raise CheckpointError(d["damage"])
    return 0


# -- eval --------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    from lm.checkpoint import load_model
    from lm.corpus import open_corpus
    from lm.data import token_stream, word_count
    from lm.evaluate import add_word_level, evaluate, fmt_ppl, write_token_dump
    from lm.train import set_threads

    _refuse_unused_eval_flags(args)
    _check_eval_methods(args)
    set_threads(args.threads)
    cfg, model, tokenizer, _ = load_model(args.checkpoint)
    if args.autocomplete:
        from lm.keyboard import lstm_rows
        return _autocomplete(args, tokenizer, lambda stream: lstm_rows(model, stream, tokenizer.eos_id))
    corpus = open_corpus(args.corpus or cfg.data.corpus, strict=args.strict, held_out=cfg.data.held_out)
    args.split, args.batch_size = args.split or _default_eval_split(args, cfg, corpus), args.batch_size or EVAL_BATCH_SIZE
    if args.split == "all" and "all" not in getattr(corpus, "bounds", {}):
        raise ConfigError(f"--split all scores the whole text of a file, glob or folder without split files; "
                          f"{corpus.where} has train/valid/test of its own: choose --split train, valid or test")
    if args.split == "all" and args.tune_cache:
        raise ConfigError("--tune-cache chooses its settings on the valid split, which is part of the whole text "
                          "being scored: score --split test, or give --cache with --cache-theta/--cache-lambda")
    if args.split == "all" and args.dynamic == "rms":
        raise ConfigError("--dynamic rms takes gradient statistics from the train split, which is part of the whole "
                          "text being scored: score --split test, or use --dynamic sgd")
    stream = token_stream(corpus, args.split, tokenizer, progress=not args.json)
    dump = args.dump_tokens is not None
    result = evaluate(model, stream, bos_id=tokenizer.eos_id, batch_size=args.batch_size,
                      progress=not args.json, desc=args.split, unk_id=tokenizer.unk_id, keep_tokens=dump)
    columns = {"logprob": result.pop("token_log_probs")} if dump else {}
    result |= {"split": args.split, "corpus": corpus.name, "scored": corpus.describe(args.split),
               "checkpoint": str(args.checkpoint), "batch_size": args.batch_size}
    if tokenizer.subword:
        result = add_word_level(result, word_count(corpus, args.split, tokenizer))
    result |= _eval_methods(args, model, tokenizer, corpus, stream, columns)
    if dump:
        pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)] if tokenizer.subword else tokenizer.words
        result["dump_tokens"] = str(write_token_dump(args.dump_tokens, stream, pieces, columns))
    if args.json:
        _print_json(result)
    else:
        per_word = f"  word ppl {fmt_ppl(result['word_ppl'])}" if "word_ppl" in result else ""
        what = corpus.describe(args.split) if "all" in getattr(corpus, "bounds", {}) else f"{corpus.name} {args.split}"
        print(f"{what}: ppl {fmt_ppl(result['ppl'])}{per_word}  loss {result['loss']:.4f}  "
              f"tokens {result['tokens']:,}  oov {result['oov_rate']:.2%}  "
              f"({result['tokens_per_s']:,.0f} tok/s, {result['seconds']:.1f} s)")
        _print_eval_methods(result)
    return 0


# Defaults of eval flags that some modes ignore: the flags default to None, so that
# _refuse_unused_eval_flags can tell a value the user typed from the default.
EVAL_SPLIT, EVAL_BATCH_SIZE, AUTOCOMPLETE_K = "valid", 10, 3


def _default_eval_split(args: argparse.Namespace, cfg, corpus) -> str:
    """valid, as always on the run's own corpus; "all" for another file, glob or folder
    without split files given to --corpus: a held-out file is scored whole, not 5% of it."""
    if not args.corpus or "all" not in getattr(corpus, "bounds", {}):
        return EVAL_SPLIT
    same = args.corpus == cfg.data.corpus or (
        Path(args.corpus).expanduser().exists() and Path(cfg.data.corpus).expanduser().exists()
        and Path(args.corpus).expanduser().resolve() == Path(cfg.data.corpus).expanduser().resolve())
    return EVAL_SPLIT if same else "all"  # the training text itself: its whole would include train


_CACHE_OPTIONS = ("cache_window", "cache_theta", "cache_lambda")
_DYNAMIC_OPTIONS = ("dynamic_lr", "dynamic_decay", "dynamic_bptt", "dynamic_ms_tokens")


def _refuse_unused_eval_flags(args: argparse.Namespace) -> None:
    """Refuse a flag that the rest of the command line leaves without effect (lm eval
    and lm ngram eval): a flag quietly ignored reads as a result it did not shape."""
    def given(*dests: str) -> list[str]:
        values = {d: getattr(args, d, None) for d in dests}  # (lm ngram eval has fewer flags)
        return [_flag(d) for d, v in values.items() if v is not None and v is not False]  # 0 is given

    if args.autocomplete:
        unused = given("split", "corpus", "batch_size", "strict", "dump_tokens", "cache", "tune_cache",
                       *_CACHE_OPTIONS, "dynamic", *_DYNAMIC_OPTIONS)
        if unused:
            raise ConfigError(f"{unused[0]} has no effect with --autocomplete, which types FILE and reports "
                              "keyboard metrics only: drop one of them")
        return
    if unused := given("k", "max_words"):
        raise ConfigError(f"{unused[0]} has no effect without --autocomplete FILE (keyboard metrics)")
    if not (getattr(args, "cache", False) or getattr(args, "tune_cache", False)):
        if unused := given(*_CACHE_OPTIONS):
            raise ConfigError(f"{unused[0]} has no effect without --cache or --tune-cache")
    elif args.tune_cache and (unused := given("cache_theta", "cache_lambda")):
        raise ConfigError(f"{unused[0]} has no effect with --tune-cache, which chooses it on the valid split: "
                          "drop one of them")
    if not getattr(args, "dynamic", None):
        if unused := given(*_DYNAMIC_OPTIONS):
            raise ConfigError(f"{unused[0]} has no effect without --dynamic sgd or --dynamic rms")
    elif args.dynamic != "rms" and (unused := given("dynamic_ms_tokens")):
        raise ConfigError(f"{unused[0]} has no effect with --dynamic {args.dynamic}: only rms gathers "
                          "gradient statistics")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_output_path(flag: str, path: str) -> None:
    """Refuse an output file that cannot be written before the work that fills it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {path}: no such directory; create it or choose another path")


def _check_eval_methods(args: argparse.Namespace) -> None:
    """Refuse bad method settings before minutes of scoring, not after."""
    from lm import cache, dynamic

    if args.dump_tokens is not None:
        from lm.checkpoint import check_replaceable
        from lm.evaluate import is_token_dump

        _check_output_path("--dump-tokens", args.dump_tokens)
        check_replaceable(args.dump_tokens, "--dump-tokens", "a token dump", is_token_dump)
    cache.check_settings(args.cache_window or cache.WINDOW, _or(args.cache_theta, cache.THETA),
                         _or(args.cache_lambda, cache.LAMBDA))
    if args.dynamic:
        dynamic.check_settings(args.dynamic, _or(args.dynamic_lr, dynamic.LR[args.dynamic]),
                               _or(args.dynamic_decay, dynamic.DECAY[args.dynamic]), args.dynamic_bptt or dynamic.BPTT)


def _or(value, default):
    return default if value is None else value


def _eval_methods(args: argparse.Namespace, model, tokenizer, corpus, stream, columns: dict) -> dict:
    """The cache and dynamic evaluation results that ``lm eval`` was asked for, each
    under its own key; their per-token log-probabilities go into ``columns``."""
    from lm.cache import cache_result, evaluate_cache, tune_cache
    from lm.data import token_stream
    from lm.dynamic import BPTT, MS_TOKENS, dynamic_evaluate, gradient_ms

    out, show, dump, bos = {}, not args.json, args.dump_tokens is not None, tokenizer.eos_id
    if args.cache or args.tune_cache:
        window = {"window": args.cache_window} if args.cache_window is not None else {}
        given = {"theta": args.cache_theta, "lam": args.cache_lambda}
        cache = window | {k: v for k, v in given.items() if v is not None}
        scored_here = args.tune_cache and args.split == "valid"  # the tuning pass scores this split already
        if args.tune_cache:
            valid = stream if scored_here else token_stream(corpus, "valid", tokenizer, progress=show)
            tune = tune_cache(model, valid, bos_id=bos, progress=show, keep_scores=scored_here, **window)
            scores = tune.pop("scores", None)
            out["cache_tuning"] = tune
            cache |= {"theta": tune["theta"], "lam": tune["lambda"]}
        if scored_here:
            out["cache"] = cache_result(*scores, window=tune["window"], theta=tune["theta"], lam=tune["lambda"],
                                        seconds=tune["seconds"], keep_tokens=dump)
        else:
            out["cache"] = evaluate_cache(model, stream, bos_id=bos, progress=show, keep_tokens=dump, **cache)
        if dump:
            columns["logprob_cache"] = out["cache"].pop("token_log_probs")
    if args.dynamic:
        ms, stats, bptt = None, {}, args.dynamic_bptt or BPTT
        if args.dynamic == "rms":  # gradient statistics from the start of the training split
            start = time.perf_counter()
            train_ids = token_stream(corpus, "train", tokenizer, progress=show,
                                     limit=args.dynamic_ms_tokens or MS_TOKENS)
            ms = gradient_ms(model, train_ids, bos_id=bos, bptt=bptt, progress=show)
            stats = {"ms_tokens": train_ids.numel(), "ms_seconds": time.perf_counter() - start}
        out["dynamic"] = stats | dynamic_evaluate(model, stream, bos_id=bos, method=args.dynamic, lr=args.dynamic_lr,
                                                  decay=args.dynamic_decay, bptt=bptt, ms=ms,
                                                  progress=show, keep_tokens=dump)
        if dump:
            columns["logprob_dynamic"] = out["dynamic"].pop("token_log_probs")
    return out


def _print_eval_methods(r: dict) -> None:
    from lm.evaluate import fmt_ppl

    if "cache_tuning" in r:
        t = r["cache_tuning"]
        print(f"cache tuned on valid: theta {t['theta']:g}, lambda {t['lambda']:g} -> valid ppl {fmt_ppl(t['ppl'])} "
              f"(plain {fmt_ppl(t['plain_ppl'])}), {t['seconds']:.1f} s")
    if "cache" in r:
        c = r["cache"]
        print(f"+ cache (window {c['window']}, theta {c['theta']:g}, lambda {c['lambda']:g}): ppl {fmt_ppl(c['ppl'])}, "
              f"plain {fmt_ppl(c['plain_ppl'])} at batch size 1 ({c['ppl'] / c['plain_ppl'] - 1:+.1%})  "
              f"({c['tokens_per_s']:,.0f} tok/s, {c['seconds']:.1f} s)")
    if "dynamic" in r:
        d = r["dynamic"]
        print(f"+ dynamic {d['method']} (lr {d['lr']:g}, decay {d['decay']:g}, bptt {d['bptt']}): ppl {fmt_ppl(d['ppl'])} "
              f"({d['ppl'] / r['ppl'] - 1:+.1%} against the plain ppl above)  "
              f"({d['tokens_per_s']:,.0f} tok/s, {d['seconds']:.1f} s"
              + (f"; gradient statistics on {d['ms_tokens']:,} training tokens {d['ms_seconds']:.1f} s)"
                 if "ms_tokens" in d else ")"))
    if "dump_tokens" in r:
        print(f"per-token log-probabilities written to {r['dump_tokens']}")


# -- ngram, autocomplete ------------------------------------------------------------------

def cmd_ngram_train(args: argparse.Namespace) -> int:
    from lm.data import token_stream
    from lm.checkpoint import check_replaceable
    from lm.ngram import KneserNey, check_order, is_ngram_model

    check_order(args.order)  # before the corpus is read and tokenized
    if args.out:  # and a file --out must not replace (a checkpoint, a text) is refused before it too
        check_replaceable(args.out, "--out", "an n-gram model", is_ngram_model)
    corpus, spec, held_out, tokenizer, run = _ngram_source(args)
    start = time.perf_counter()
    stream = token_stream(corpus, "train", tokenizer, progress=not args.json)
    model = KneserNey.train(stream, tokenizer.vocab_size, tokenizer.eos_id, args.order, tokenizer=tokenizer,
                            meta={"corpus": spec, "held_out": held_out, "train_tokens": stream.numel()},
                            progress=not args.json)
    path = model.save(args.out or run / f"kn{args.order}.npz")
    summary = {"model": str(path), "order": args.order, "corpus": corpus.name, "train_tokens": stream.numel(),
               "ngrams": model.sizes(), "seconds": time.perf_counter() - start}
    if args.json:
        _print_json(summary)
    else:
        print(f"KN{args.order} on {corpus.name} train ({stream.numel():,} tokens): "
              f"{sum(summary['ngrams']):,} n-grams in {summary['seconds']:.1f} s -> {path}")
    return 0


def _ngram_source(args: argparse.Namespace):
    """(corpus, its spec, held-out fraction, tokenizer, default output directory) for
    ``lm ngram train``. An LSTM checkpoint or run directory lends its tokenizer and
    corpus, so that both models read the same stream; anything else is a corpus,
    tokenized as ``lm train`` would tokenize it."""
    from lm.checkpoint import load_model
    from lm.corpus import open_corpus
    from lm.data import load_tokenizer
    from lm.train import build_config, default_run_dir

    src, flags = Path(args.source), overrides_from_args(args)
    if src.suffix == ".pt" or (src.is_dir() and any((src / n).is_file() for n in ("best.pt", "last.pt"))):
        if flags:
            raise ConfigError(f"tokenizer flags do not apply to {src}: the n-gram model uses its tokenizer")
        cfg, _, tokenizer, _ = load_model(src, finite=False)  # its tokenizer only: damaged weights do no harm
        corpus = open_corpus(cfg.data.corpus, held_out=cfg.data.held_out)
        return corpus, cfg.data.corpus, cfg.data.held_out, tokenizer, src if src.is_dir() else src.parent
    cfg = build_config({"data": {"corpus": args.source}}, flags)
    corpus = open_corpus(args.source, held_out=cfg.data.held_out)
    return corpus, args.source, cfg.data.held_out, load_tokenizer(corpus, cfg.tokenizer), default_run_dir(cfg)


def cmd_ngram_eval(args: argparse.Namespace) -> int:
    from lm.corpus import open_corpus
    from lm.data import token_stream
    from lm.evaluate import fmt_ppl
    from lm.ngram import KneserNey

    _refuse_unused_eval_flags(args)
    model = KneserNey.load(args.model)
    tok = model.tokenizer
    if args.autocomplete:
        return _autocomplete(args, tok, lambda stream: model.log_prob_rows(stream, tok.eos_id))
    if "corpus" not in model.meta:
        raise ConfigError(f"{args.model} does not say which corpus it was trained on: "
                          "score a text file with --autocomplete instead")
    corpus = open_corpus(model.meta["corpus"], held_out=model.meta.get("held_out", DataConfig().held_out))
    args.split = args.split or EVAL_SPLIT
    stream = token_stream(corpus, args.split, tok, progress=not args.json)
    result = model.score(stream, tok.eos_id) | {"split": args.split, "corpus": corpus.name, "model": str(args.model),
                                                 "order": model.order}
    if args.json:
        _print_json(result)
    else:
        print(f"{corpus.name} {args.split}: ppl {fmt_ppl(result['ppl'])}  loss {result['loss']:.4f}  "
              f"tokens {result['tokens']:,}  (KN{model.order}, {result['tokens_per_s']:,.0f} tok/s, "
              f"{result['seconds']:.1f} s)")
    return 0


def _autocomplete(args: argparse.Namespace, tokenizer, rows) -> int:
    """``--autocomplete FILE`` for any model given as stream -> next-word log-prob rows."""
    from lm.keyboard import score_file

    r = score_file(args.autocomplete, tokenizer, rows, k=args.k or AUTOCOMPLETE_K, max_words=args.max_words,
                   progress=not args.json)
    if args.json:
        _print_json(r)
    else:
        print(f"autocomplete {r['file']}: {r['words']:,} words  top-1 {r['top1']:.1%}  top-3 {r['top3']:.1%}  "
              f"top-5 {r['top5']:.1%}  keystroke savings {r['keystroke_savings']:.1%} (k={r['k']})  "
              f"oov {r['oov_rate']:.1%}  ({r['words_per_s']:,.0f} words/s, {r['seconds']:.1f} s)")
    return 0


def _autocomplete_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autocomplete", metavar="FILE",
                   help="instead of perplexity: next-word accuracy and keystroke savings typing FILE "
                        "(definitions in lm/keyboard.py)")
    p.add_argument("--k", type=_positive_int, help=f"with --autocomplete: suggestions shown (default: {AUTOCOMPLETE_K})")
    p.add_argument("--max-words", type=_positive_int, metavar="N",
                   help="with --autocomplete: type only the first N words")


# -- generate ----------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from lm.checkpoint import load_model
    from lm.predict import read_user_text
    from lm.sample import continue_text

    sc = _sample_config(args)
    # --prompt @FILE reads the file (@- standard input); @@ stands for a literal leading @. The line
    # break every editor ends a file with is not the text's: kept, the continuation began a new paragraph
    if args.prompt.startswith("@") and not args.prompt.startswith("@@"):
        text = read_user_text("/dev/stdin" if args.prompt == "@-" else args.prompt[1:])
        prompt = text.removesuffix("\n").removesuffix("\r")
    else:
        prompt = args.prompt.removeprefix("@")
    from lm.train import set_threads

    set_threads(args.threads)
    _, model, tok, _ = load_model(args.checkpoint)
    if args.int8:
        from lm.quantize import quantize

        model = quantize(model)
    sys.stdout.write(prompt.rstrip(" \t"))  # as typed: words the model does not know stay words
    t0, n = time.perf_counter(), 0
    for piece in continue_text(model, tok, prompt, args.max_words, temperature=sc.temperature, top_k=sc.top_k,
                               top_p=sc.top_p, seed=sc.seed):
        sys.stdout.write(piece)
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

def _predictor(args: argparse.Namespace):
    """The predictor that complete, repl and serve share: session memory (neural cache)
    unless --cache-lambda is 0, a block list, text learned from --learn files, and
    optionally int8 weights."""
    from lm.cache import LAMBDA, THETA, WINDOW, NeuralCache, check_settings
    from lm.checkpoint import load_model
    from lm.predict import Predictor, read_user_text
    from lm.train import set_threads

    window, theta, lam = _or(args.cache_window, WINDOW), _or(args.cache_theta, THETA), _or(args.cache_lambda, LAMBDA)
    check_settings(window, theta, lam)
    set_threads(args.threads)
    _, model, tok, _ = load_model(args.checkpoint)
    if tok.subword:
        raise LMError(f"autocomplete needs a word-level model, and {args.checkpoint} uses {tok.kind} "
                      "subwords: train one with --kind word")
    if args.int8:
        from lm.quantize import quantize
        model = quantize(model)
    memory = NeuralCache(window, theta, lam, model.layers[-1].hidden_size) if lam > 0 else None
    pred = Predictor(model, tok, memory=memory, block=read_user_text(args.block).split() if args.block else ())
    for path in getattr(args, "learn", None) or ():
        try:
            pred.learn(read_user_text(path))
        except LMError as e:
            raise (e if pred.memory is None or path in str(e) else type(e)(f"--learn {path}: {e}")) from None
    return pred


def _check_k(k: int, most: int = 1000) -> None:
    if not 1 <= k <= most:
        raise ConfigError(f"--k must be between 1 and {most}, got {k}")


def cmd_complete(args: argparse.Namespace) -> int:
    _check_k(args.k)
    s = _predictor(args).complete_text(args.text, args.k)
    if args.json:  # as /complete answers: a script can tell completions of "pre" from next words
        _print_json({"kind": s.kind, "prefix": s.prefix, "suggestions": s.to_json()})
    else:
        from lm.repl import format_suggestions
        print(format_suggestions(s))
    return 0


def cmd_repl(args: argparse.Namespace) -> int:
    from lm.repl import MAX_K, run

    _check_k(args.k, MAX_K)  # the same bound as the REPL's own :k
    return run(_predictor(args), k=args.k, plain=args.plain)


def cmd_serve(args: argparse.Namespace) -> int:
    from lm.serve import serve

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    return serve(_predictor(args), args.host, args.port)


def _predictor_flags(p: argparse.ArgumentParser, learn: bool = True) -> None:
    p.add_argument("--threads", type=_integer, default=1, help="torch threads; 0 = one per core (default: 1)")
    p.add_argument("--block", metavar="FILE", help="never suggest these words (whitespace-separated, any casing)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="int8 weights (lm.quantize): a word costs 2-4x less time, with the same top-k accuracy "
                        "on WikiText-2; --no-int8 keeps the float weights (default: int8)")
    if learn:
        p.add_argument("--learn", metavar="FILE", action="append",
                       help="adapt the suggestions to your own text (repeatable; its last --cache-window words count)")
    # defaults (None here) are lm.cache's, resolved in _predictor: building the parser imports no torch
    p.add_argument("--cache-window", type=_positive_int, help="session memory: words remembered (default: 3785)")
    p.add_argument("--cache-theta", type=float, help="session memory: similarity scale (default: 0.662)")
    p.add_argument("--cache-lambda", type=float,
                   help="session memory: weight in the mixture; 0 turns it off (default: 0.1279)")


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

    held = {} if args.held_out is None else {"held_out": args.held_out}  # as lm train --held-out splits it
    cfg = build_config({"data": {"corpus": args.name, **held}}, overrides_from_args(args))
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

def _is_bench_result(path: Path) -> bool:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(d, dict) and "machine" in d  # every lm bench result names the machine


def cmd_bench(args: argparse.Namespace) -> int:
    from lm.bench import run

    if args.json:
        _check_output_path("--json", args.json)
        from lm.checkpoint import check_replaceable

        check_replaceable(args.json, "--json", "an earlier lm bench result", _is_bench_result)
    results = run(args.only, checkpoint=args.checkpoint)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            print(json.dumps(results, indent=2))  # the measurements are not lost
            raise LMError(f"cannot write {args.json}: {e.strerror}; the results are printed above") from None
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
    t.add_argument("--resume", metavar="RUN", help="continue the run in RUN exactly where it stopped: its folder (from its last.pt), or a "
                        "checkpoint in it to continue from that one (RUN/best.pt)")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in --run")
    t.add_argument("--config", metavar="FILE", help="TOML file with [tokenizer] [data] [model] [train] tables")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, cls in (("tokenizer", TokenizerConfig), ("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
        add_flags(t, cls, name)
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="what a checkpoint holds: model, tokenizer, training, last validation")
    i.add_argument("checkpoint", help="a checkpoint file (best.pt) or run directory")
    i.add_argument("--json", action="store_true", help="print it as one JSON object (with the full config)")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval", help="perplexity of a checkpoint on a split")
    e.add_argument("checkpoint", help="a checkpoint file (best.pt) or run directory")
    e.add_argument("--split", choices=("train", "valid", "test", "all"),
                   help=f"which split to score; all: the whole text of a file, glob or folder without split files "
                        f"(default: all for such a --corpus, else {EVAL_SPLIT})")
    e.add_argument("--corpus", help="score another corpus than the one trained on (a file, a glob or a folder "
                                    "without train.txt is scored whole unless --split says otherwise)")
    e.add_argument("--batch-size", type=_positive_int,
                   help=f"lanes; 1 is the exact reference (default: {EVAL_BATCH_SIZE})")
    e.add_argument("--threads", type=_integer, default=0, help="torch threads; 0 = one per core (default: 0)")
    e.add_argument("--strict", action="store_true", help="refuse text with invalid UTF-8")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _autocomplete_flags(e)
    e.add_argument("--dump-tokens", metavar="FILE",
                   help="write every target token's position, string and natural-log probability (one column per "
                        "method run): JSON lines if FILE ends in .jsonl, else tab-separated with a header row")
    e.add_argument("--cache", action="store_true",
                   help="also score with the continuous cache pointer (Grave et al. 2017), at batch size 1")
    e.add_argument("--cache-window", type=_positive_int, help="positions the cache remembers (default: 3785)")
    e.add_argument("--cache-theta", type=float, help="similarity scale (default: 0.662)")
    e.add_argument("--cache-lambda", type=float, help="cache weight in the mixture, 0 to 1 (default: 0.1279)")
    e.add_argument("--tune-cache", action="store_true",
                   help="choose --cache-theta and --cache-lambda on the valid split first (implies --cache)")
    e.add_argument("--dynamic", choices=("sgd", "rms"),
                   help="also score with dynamic evaluation (Krause et al. 2018): plain SGD, or RMS-normalised "
                        "steps with decay toward the trained weights")
    e.add_argument("--dynamic-lr", type=float, help="step size (default: sgd 0.5, rms 0.0001)")
    e.add_argument("--dynamic-decay", type=float, help="pull toward the trained weights per step (default: sgd 0, rms 0.002)")
    e.add_argument("--dynamic-bptt", type=_positive_int, help="tokens per update (default: 20)")
    e.add_argument("--dynamic-ms-tokens", type=_positive_int,
                   help="rms: training tokens for the gradient statistics (default: 200000)")
    e.set_defaults(func=cmd_eval)

    ng = sub.add_parser("ngram", help="Kneser-Ney n-gram baseline: train on a corpus, then score it like eval")
    ngs = ng.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    nt = ngs.add_parser("train", help="count the n-grams of a training split")
    nt.add_argument("source", help="corpus name, directory or file; or an LSTM checkpoint or run directory, "
                                   "whose tokenizer and corpus the n-gram model then shares")
    nt.add_argument("--order", type=_positive_int, default=5, help="n, 1 to 9 (default: 5)")
    nt.add_argument("--out", metavar="FILE", help="model file (default: knN.npz in the checkpoint's run directory, "
                                                  "or in checkpoints/CORPUS)")
    nt.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_flags(nt, TokenizerConfig, "tokenizer")
    nt.set_defaults(func=cmd_ngram_train)
    nv = ngs.add_parser("eval", help="perplexity on a split, or autocomplete metrics on a text file")
    nv.add_argument("model", help="a model file from lm ngram train, or the run directory holding it")
    nv.add_argument("--split", choices=("train", "valid", "test"), help=f"which split to score (default: {EVAL_SPLIT})")
    nv.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _autocomplete_flags(nv)
    nv.set_defaults(func=cmd_ngram_eval)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("checkpoint", help="a checkpoint file (best.pt) or run directory")
    g.add_argument("--prompt", default="", help="text to continue, or @FILE for a file's text (@- standard input, @@ a literal @)")
    g.add_argument("--max-words", type=int, default=50, metavar="N", help="tokens to generate, 1 to 1,000,000: words, punctuation marks and line breaks each "
                        "count one (a subword model's: pieces) (default: 50)")
    g.add_argument("--threads", type=_integer, default=1, help="intra-op threads (default: 1; one word is a small step)")
    g.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="int8 weights (lm.quantize): about 4x the words/s of float weights for the default model, "
                        "test perplexity +0.1%%; --no-int8 keeps the float weights (default: int8)")
    add_flags(g, SampleConfig, "sample")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("complete", help="the most likely next words, or completions of a partial word")
    c.add_argument("checkpoint", help="a checkpoint file (best.pt) or run directory")
    c.add_argument("text", help='text typed so far, e.g. "the president of the" or "the pres"')
    c.add_argument("--k", type=int, default=5, help="suggestions to show, 1 to 1,000 (default: 5)")
    c.add_argument("--json", action="store_true", help="JSON, as /complete answers: {kind, prefix, suggestions: [{word, prob}]}")
    _predictor_flags(c, learn=False)
    c.set_defaults(func=cmd_complete)

    r = sub.add_parser("repl", help="interactive autocomplete")
    r.add_argument("checkpoint", help="a checkpoint file (best.pt) or run directory")
    r.add_argument("--k", type=int, default=5, help="suggestions per line, 1 to 100 (default: 5; :k N changes it)")
    r.add_argument("--plain", action="store_true", help="line mode even on a terminal (as when input is piped)")
    _predictor_flags(r)
    r.set_defaults(func=cmd_repl)

    sv = sub.add_parser("serve", help="HTTP JSON API: next words, completions, phrases, generation")
    sv.add_argument("checkpoint", help="a checkpoint file (best.pt) or run directory")
    sv.add_argument("--host", default="127.0.0.1", help="address or name to listen on, IPv4 or IPv6 (::1) (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8080, help="TCP port; 0 = any free one (default: 8080)")
    _predictor_flags(sv)
    sv.set_defaults(func=cmd_serve)

    co = sub.add_parser("corpus", help="list registered corpora, or count a corpus's tokens")
    co.add_argument("action", choices=("list", "info", "prepare"), help="list the corpora, describe one, or prepare its token caches")
    co.add_argument("name", nargs="?", help="registered name, directory or file")
    co.add_argument("--strict", action="store_true", help="refuse text with invalid UTF-8")
    co.add_argument("--held-out", type=float, metavar="F",
                    help="fraction of lines held out for valid and for test when there are no split files, "
                         "as lm train --held-out (default: 0.05)")
    add_flags(co, TokenizerConfig, "tokenizer")
    co.add_argument("--json", action="store_true", help="print the result as JSON")
    co.set_defaults(func=cmd_corpus)

    rc = sub.add_parser("recipes", help="list the named training recipes, or print one as TOML")
    rc.add_argument("name", nargs="?", help="a recipe to print in full")
    rc.add_argument("-v", "--verbose", action="store_true", help="print every recipe in full")
    rc.set_defaults(func=cmd_recipes)

    pl = sub.add_parser("plot", help="draw a run's loss and perplexity curves to a PNG (needs matplotlib)")
    pl.add_argument("run", help="run directory with metrics.jsonl (or any file in it)")
    pl.add_argument("--out", help="image path: .png, .pdf or .svg; a name with no suffix gets .png "
                                  "(default: RUN/curves.png)")
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("bench", help="speed and memory benchmarks (make bench)")
    from lm.bench import BENCHES, EXTRAS  # names only: lm.bench imports torch lazily

    b.add_argument("--only", nargs="+", choices=BENCHES + EXTRAS,
                   help="run only these benchmarks (host, only when named: 2 minutes of the machine's state "
                        "beside the 2x200 training step's phases)")
    b.add_argument("--checkpoint", default="checkpoints/wikitext-2/best.pt",
                   help="trained model for the inference rows (default: the make-train model; an untrained "
                        "default model is timed when it is missing)")
    b.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    b.set_defaults(func=cmd_bench)
    return p


def _integer(s: str) -> int:
    """Any integer; its range is checked after parsing (--threads: check_threads)."""
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None


def _positive_int(s: str) -> int:
    v = _integer(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lm: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    # The hub client logs each failed request and retry; its failure reaches the user as
    # one line (HF_HUB_VERBOSITY=warning shows them again).
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command that was given them, not by "lm" (which argparse does)
        prog = " ".join(["lm", args.command] + ([args.action] if getattr(args, "action", None) else []))
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)\n")
    try:
        if getattr(args, "threads", None) is not None:  # every command's --threads, checked once, before any work
            check_threads(args.threads)
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
