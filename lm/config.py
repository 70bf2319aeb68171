"""Typed configuration: the only place defaults live.

Each section is a dataclass; CLI flags are derived from its fields (``emb_dim`` ->
``--emb-dim``), an optional TOML config file sits between the defaults and the flags,
and every value is checked by ``validate()`` so that absurd values fail early with a
message instead of deep inside torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm.errors import ConfigError

MAX_SEED = (1 << 63) - 1  # torch takes seeds below 2**64; training adds rank and step offsets to its seed


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its CLI help text attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TokenizerConfig:
    kind: str = opt("word", "word (one token per word, the benchmark streams), or unigram / bpe subwords")
    vocab_size: int = opt(0, "cap the vocabulary at this many entries; 0 = every training word (subword: 8000)")
    min_count: int = opt(1, "words seen fewer times than this in training map to <unk>")
    text: str = opt("raw", "raw: natural prose, split WikiText-style before use; tokenized: already split (benchmarks)")
    lowercase: bool = opt(False, "fold all text to lower case (training and typed)")

    def validate(self) -> None:
        _choice("kind", self.kind, ("word", "unigram", "bpe"))
        _choice("text", self.text, ("raw", "tokenized"))
        _at_least("vocab_size", self.vocab_size, 0)
        if 0 < self.vocab_size < 3:
            raise ConfigError("--vocab-size must be 0 (no cap) or at least 3")
        if self.kind != "word" and 0 < self.vocab_size < 320:
            raise ConfigError("a subword --vocab-size must be at least 320: 256 byte pieces come first")
        _at_least("min_count", self.min_count, 1)


@dataclass
class DataConfig:
    corpus: str = opt("wikitext-2", "registered corpus name (lm corpus list), a directory or a text file")
    batch_size: int = opt(64, "parallel lanes B per training step")
    bptt: int = opt(35, "truncated-BPTT window T, in tokens")
    eval_batch_size: int = opt(10, "lanes for evaluation; 1 is the exact reference setting")
    strict: bool = opt(False, "refuse text with invalid UTF-8 instead of replacing the bad bytes")
    held_out: float = opt(0.05, "fraction of lines held out for valid and for test when a corpus has no split files")

    def validate(self) -> None:
        if not self.corpus.strip():
            raise ConfigError("--corpus is empty: give a corpus name (see `lm corpus list`) or a path")
        _between("batch_size", self.batch_size, 1, 65536)
        _between("bptt", self.bptt, 1, 100000)
        _between("eval_batch_size", self.eval_batch_size, 1, 65536)
        _between("held_out", self.held_out, 0.001, 0.4)


@dataclass
class ModelConfig:
    emb_dim: int = opt(256, "embedding size (also the last LSTM layer's size when tied)")
    hidden_dim: int = opt(256, "LSTM hidden size of every layer but the last when tied")
    n_layers: int = opt(2, "stacked LSTM layers")
    dropout: float = opt(0.2, "locked (variational) dropout on the last layer's output")
    dropout_hidden: float = opt(0.2, "locked dropout between LSTM layers")
    dropout_input: float = opt(0.2, "locked dropout on the embedded input")
    dropout_embed: float = opt(0.0, "embedding dropout: drop whole word types per batch")
    weight_drop: float = opt(0.0, "DropConnect on the hidden-to-hidden matrices (AWD-LSTM: 0.5)")
    tie_weights: bool = opt(True, "share the embedding matrix with the output layer")
    head: str = opt("adaptive", "output head: adaptive (fast, exact) or full softmax")
    cutoffs: list[int] = opt([500, 1500, 4000, 10000, 20000],
                             "adaptive head cluster boundaries (word ids, frequency order)")

    def validate(self) -> None:
        _between("emb_dim", self.emb_dim, 1, 65536)
        _between("hidden_dim", self.hidden_dim, 1, 65536)
        _between("n_layers", self.n_layers, 1, 64)
        for name in ("dropout", "dropout_hidden", "dropout_input", "dropout_embed", "weight_drop"):
            _between(name, getattr(self, name), 0.0, 0.99)
        _choice("head", self.head, ("adaptive", "full"))
        if any(c <= 0 for c in self.cutoffs) or list(self.cutoffs) != sorted(set(self.cutoffs)):
            raise ConfigError(f"--cutoffs must be increasing positive word ids, got {self.cutoffs}")


@dataclass
class TrainConfig:
    epochs: int = opt(3, "passes over the training split")
    max_steps: int = opt(0, "stop after this many optimizer steps; 0 = no limit")
    max_minutes: float = opt(15.0, "stop (and keep the best checkpoint) after this much training; 0 = no limit")
    optimizer: str = opt("sgd", "sgd (decay on plateau), ntasgd (AWD-LSTM's averaged SGD) or adamw")
    lr: float = opt(20.0, "initial learning rate (SGD: 20-30; AdamW: about 2e-3)")
    weight_decay: float = opt(0.0, "L2 penalty (AWD-LSTM: 1.2e-6)")
    lr_decay: float = opt(0.25, "multiply the learning rate by this when validation stops improving (sgd, adamw)")
    min_lr: float = opt(0.01, "stop early once a decay would go below this learning rate (for a run that "
                              "starts at or below it, such as AdamW's: --lr x 0.0005)")
    anneal: float = opt(0.3, "final fraction of the budget (epochs, steps or minutes, whichever ends first) over which the learning rate falls linearly to 0; 0 = off")
    nonmono: int = opt(5, "ntasgd: start averaging when validation is worse than the best of all but the last N evaluations")
    clip: float = opt(0.25, "clip the global gradient norm to this; 0 disables")
    max_rollbacks: int = opt(3, "on a NaN/inf loss, go back to the last saved state with half the learning rate, at most this many times; 0 = stop at once")
    alpha: float = opt(0.0, "activation regularisation (AR) weight (AWD-LSTM: 2)")
    beta: float = opt(0.0, "temporal activation regularisation (TAR) weight (AWD-LSTM: 1)")
    variable_bptt: bool = opt(False, "draw each window's length around --bptt (AWD-LSTM), rescaling the learning rate")
    patience: int = opt(0, "early stopping: stop after this many evaluations without improvement; 0 = off")
    save_every: int = opt(500, "steps between periodic last.pt checkpoints; 0 = only at epoch ends")
    seed: int = opt(1111, "random seed for initialisation, dropout and data order")
    log_every: int = opt(100, "steps between progress refreshes and metrics.jsonl records")
    threads: int = opt(0, "torch intra-op threads; 0 = one per available core")
    device: str = opt("auto", "cpu, cuda or auto")
    bf16: bool = opt(True, "bf16 autocast where the hardware has bf16 (CUDA; CPUs with AVX512-BF16 or AMX); weights and optimiser stay fp32")

    def validate(self) -> None:
        _between("epochs", self.epochs, 1, 100000)
        _at_least("max_steps", self.max_steps, 0)
        _between("max_minutes", self.max_minutes, 0.0, 1e6)
        _choice("optimizer", self.optimizer, ("sgd", "ntasgd", "adamw"))
        _between("lr", self.lr, 1e-9, 1e4, low_open=False)
        _between("weight_decay", self.weight_decay, 0.0, 10.0)
        _between("lr_decay", self.lr_decay, 1e-6, 1.0)
        _between("min_lr", self.min_lr, 0.0, 1e4)
        _between("anneal", self.anneal, 0.0, 1.0)
        _between("nonmono", self.nonmono, 1, 10000)
        _between("clip", self.clip, 0.0, 1e6)
        _between("max_rollbacks", self.max_rollbacks, 0, 1000)
        _between("alpha", self.alpha, 0.0, 1e3)
        _between("beta", self.beta, 0.0, 1e3)
        _at_least("patience", self.patience, 0)
        _at_least("save_every", self.save_every, 0)
        _between("seed", self.seed, 0, MAX_SEED)
        _between("log_every", self.log_every, 1, 10**9)
        check_threads(self.threads)
        _choice("device", self.device, ("cpu", "cuda", "auto"))


@dataclass
class SampleConfig:
    temperature: float = opt(1.0, "softmax temperature; 0 = greedy")
    top_k: int = opt(0, "sample among the k most likely words; 0 = all")
    top_p: float = opt(1.0, "nucleus sampling: smallest set with this much probability")
    seed: int = opt(0, "random seed; the same seed gives the same text")

    def validate(self) -> None:
        _between("temperature", self.temperature, 0.0, 100.0)
        _at_least("top_k", self.top_k, 0)
        _between("top_p", self.top_p, 1e-6, 1.0)
        _between("seed", self.seed, 0, MAX_SEED)


@dataclass
class Config:
    """Everything a training run needs; stored resolved in every checkpoint."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        for section in (self.tokenizer, self.data, self.model, self.train):
            section.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "", prefix: str = "") -> "Config":
        """The config ``d`` ({section: {field: value}}) describes, each value checked
        against its field's type. Errors start with ``source`` (the file ``d`` was read
        from, if any) and call each table ``[prefix + section]``."""
        where = f"{source}: " if source else ""
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"{where}unknown config section(s): {', '.join(sorted(unknown))}")
        return cls(**{name: _section_from_dict(make(), d.get(name, {}), prefix + name, where)
                      for name, make in sections.items()})


def _section_from_dict(section: Any, values: dict, name: str, where: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}{name} must be a [{name}] table of settings, got {_found(values)}")
    known = {f.name for f in dataclasses.fields(section)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    # TOML (and a checkpoint) hold any type anywhere: a float n_layers or a string
    # tie_weights = "no" (truthy!) would otherwise fail deep in torch or be misread.
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        expected = _expected(hints[key], value)
        if expected:
            raise ConfigError(f"{where}[{name}] {key} must be {expected}, got {_found(value)}")
    return dataclasses.replace(section, **values)


def _expected(tp: Any, value: Any) -> str | None:
    """What a field annotated ``tp`` takes, in words, if ``value`` is not that; else
    None. A bool is no int here (Python says it is), and an int is a fine float."""
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        (tp,) = (a for a in args if a is not type(None))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        ok = isinstance(value, list) and all(_KINDS[item][2](v) for v in value)
        return None if ok else f"a list of {_KINDS[item][1]}, e.g. [1, 2]"
    one, _, fits = _KINDS[tp]
    return None if fits(value) else one


_KINDS = {  # field type -> (what it takes, in words; the plural; whether a value fits)
    int: ("an integer", "integers", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", "numbers", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    bool: ("true or false", "booleans", lambda v: isinstance(v, bool)),
    str: ('a "string"', "strings", lambda v: isinstance(v, str)),
}


def _found(value: Any) -> str:
    """A wrong value for a message, as TOML spells it ("2" is a string, 2 a number,
    true a bool), cut short."""
    shown = json.dumps(value, default=str)
    return shown if len(shown) <= 60 else shown[:57] + "..."


REGISTRY_KEYS = ("description", "path", "mirror", "tokens", "vocab", "hub", "defaults")


def check_registry_entry(entry: dict, file: str | Path) -> dict:
    """Check the values of a corpus registry entry (``corpora/NAME.toml``, parsed) that
    become paths or config: ``path`` and ``mirror`` name folders, ``hub`` is a table, and
    ``defaults`` is a config layer under the config file and flags. Returns ``entry``;
    an error names the file and the key."""
    where = f"corpus registry entry {file}"
    unknown = [k for k in entry if k not in REGISTRY_KEYS and k != "_file"]  # _file: added when read
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; the known keys are "
                          f"{', '.join(REGISTRY_KEYS)}")
    for key, kind in (("path", str), ("mirror", str), ("hub", dict), ("defaults", dict)):
        if key in entry and not isinstance(entry[key], kind):
            what = 'a "string"' if kind is str else f"a [{key}] table"
            raise ConfigError(f"{where}: {key} must be {what}, got {_found(entry[key])}")
    Config.from_dict(entry.get("defaults", {}), where, prefix="defaults.")
    return entry


def load_config_file(path: str | Path) -> dict:
    """Read a TOML config file as data (never executed), its values checked here so
    that an error can name the file."""
    p = Path(path)
    try:
        layer = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory: give a TOML file (lm recipes NAME prints one)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    Config.from_dict(layer, f"config file {p}")
    return layer


# ---------------------------------------------------------------------------------------
# Flags derived from dataclass fields.

def add_flags(parser: argparse.ArgumentParser, section_cls: type, dest_prefix: str) -> None:
    """Add one ``--kebab-name`` flag per field of ``section_cls``; defaults stay None so
    that only flags the user actually typed override config-file and dataclass values."""
    hints = typing.get_type_hints(section_cls)
    group = parser.add_argument_group(dest_prefix)
    for f in dataclasses.fields(section_cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = dict(dest=f"{dest_prefix}.{f.name}", default=None,
                                  help=f"{f.metadata.get('help', '')} (default: {_show(default)})")
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            kw["type"] = _int_list
            kw["metavar"] = "N,N,..."
        else:
            kw["type"] = _finite if tp is float else tp
            kw["metavar"] = f.name.split("_")[-1].upper()
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """{section: {field: value}} for every flag given on the command line."""
    out: dict[str, dict] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def merge(*layers: dict) -> dict:
    """Merge {section: {field: value}} dicts, later layers winning."""
    out: dict[str, dict] = {}
    for layer in layers:
        if not isinstance(layer, dict):
            raise ConfigError(f"a config layer must be a table of [sections], got {_found(layer)}")
        for section, values in layer.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config entry {section!r} must be a [section] table")
            out.setdefault(section, {}).update(values)
    return out


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _finite(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{_flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def _at_least(name: str, value: float, low: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{_flag(name)} must be a number >= {low}, got {value!r}")


MAX_THREADS = 1024  # more only crashes: thousands of threads fail to start (libgomp), more segfault


def check_threads(threads: int) -> None:
    """The one check of every command's --threads (lm train's, eval's, generate's,
    complete's, repl's, serve's): 0, one thread per available core, up to MAX_THREADS."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be between 0 and {MAX_THREADS} (0 = one per available core), "
                          f"got {threads!r}")


def _between(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (low_open and value == low):
        raise ConfigError(f"{_flag(name)} must be between {low} and {high}, got {value!r}")
