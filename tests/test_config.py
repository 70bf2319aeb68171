"""Config layers read from files: every value is checked against its field's type, and
an error is one line that names the file, the key, what it takes and what it got."""
import tomllib

import pytest
import torch

from lm.cli import main
from lm.config import (MAX_SEED, Config, SampleConfig, TrainConfig, check_registry_entry, load_config_file,
                       merge)
from lm.errors import ConfigError
from lm.recipes import RECIPES, recipe, to_toml


@pytest.mark.parametrize("toml, says", [
    ("[data]\nbatch_size = 4.5", "[data] batch_size must be an integer, got 4.5"),
    ("[model]\nn_layers = 2.0", "[model] n_layers must be an integer, got 2.0"),
    ("[model]\ncutoffs = \"500\"", "[model] cutoffs must be a list of integers, e.g. [1, 2], got \"500\""),
    ("[model]\ncutoffs = [500, true]", "[model] cutoffs must be a list of integers, e.g. [1, 2], got [500, true]"),
    ("[data]\ncorpus = 5", "[data] corpus must be a \"string\", got 5"),
    ("[model]\ntie_weights = \"no\"", "[model] tie_weights must be true or false, got \"no\""),  # "no" is truthy
    ("[train]\nbf16 = \"false\"", "[train] bf16 must be true or false, got \"false\""),
    ("[train]\nseed = 1e30", "[train] seed must be an integer, got 1e+30"),
    ("[train]\nepochs = 1.5", "[train] epochs must be an integer, got 1.5"),
    ("[train]\nmax_steps = true", "[train] max_steps must be an integer, got true"),  # a bool is no int
    ("[train]\nlr = \"1\"", "[train] lr must be a number, got \"1\""),
    ("[tokenizer]\nvocab_size = 100.5", "[tokenizer] vocab_size must be an integer, got 100.5"),
    ("model = 5", "model must be a [model] table of settings, got 5"),
    ("[model]\nfoo = 1", "unknown key(s) in [model]: foo"),
])
def test_a_wrongly_typed_value_in_a_config_file_is_named_with_its_file(tmp_path, toml, says):
    f = tmp_path / "c.toml"
    f.write_text(toml + "\n")
    with pytest.raises(ConfigError) as e:
        load_config_file(f)
    assert str(e.value) == f"config file {f}: {says}"


def test_the_cli_gives_one_line_and_exit_2_for_a_wrong_type(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_layers = 2.0\n")
    assert main(["train", "--config", str(f), "--run", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lm train: error: config file {f}: [model] n_layers must be an integer, got 2.0"]
    assert not (tmp_path / "r").exists()


def test_types_are_checked_with_no_file_too_and_right_types_pass(tmp_path):
    with pytest.raises(ConfigError, match=r"^\[model\] tie_weights must be true or false, got \"no\"$"):
        Config.from_dict({"model": {"tie_weights": "no"}})
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 1\nbf16 = false\nseed = 7\n[model]\ncutoffs = [10, 20]\n")
    cfg = Config.from_dict(load_config_file(f))  # an int is a fine float
    assert (cfg.train.lr, cfg.train.bf16, cfg.train.seed, cfg.model.cutoffs) == (1, False, 7, [10, 20])
    assert Config.from_dict(Config().to_dict()) == Config()  # what a checkpoint stores reads back
    for name in RECIPES:  # and so does every recipe printed as TOML
        f.write_text(to_toml(name) + "\n")
        assert load_config_file(f) == recipe(name)


@pytest.mark.parametrize("toml, says", [
    ("defaults = 5", "defaults must be a [defaults] table, got 5"),
    ("path = 5", "path must be a \"string\", got 5"),
    ("mirror = [1]", "mirror must be a \"string\", got [1]"),
    ("hub = \"x\"", "hub must be a [hub] table, got \"x\""),
    ("[defaults.model]\nn_layers = 2.0", "[defaults.model] n_layers must be an integer, got 2.0"),
    ("[defaults]\nmodel = 3", "defaults.model must be a [defaults.model] table of settings, got 3"),
    ("[defaults]\nfoo = 3", "unknown config section(s): foo"),
    ("foo = 1\npath = \"x\"", "unknown key(s) foo; the known keys are description, path, mirror, tokens, vocab, "
                                "hub, defaults"),
])
def test_a_corpus_registry_entry_is_checked_naming_its_file(toml, says):
    with pytest.raises(ConfigError) as e:
        check_registry_entry(tomllib.loads(toml), "corpora/mine.toml")
    assert str(e.value) == f"corpus registry entry corpora/mine.toml: {says}"
    from lm.corpus import registry

    for entry in registry().values():  # the shipped entries pass
        assert check_registry_entry(entry, entry["_file"]) is entry
    with pytest.raises(ConfigError, match="a config layer must be a table of"):  # defaults = 5 reaching merge
        merge(5, {})


@pytest.mark.parametrize("section", [TrainConfig, SampleConfig])
def test_a_seed_torch_cannot_take_is_refused_before_training(section):
    with pytest.raises(ConfigError, match=r"--seed must be between 0 and 9223372036854775807, got 10{20}"):
        section(seed=10**20).validate()
    with pytest.raises(ConfigError, match="--seed must be between"):
        section(seed=-1).validate()
    section(seed=MAX_SEED).validate()
    torch.manual_seed(MAX_SEED + 1000 * 64 + 10**9)  # training adds rank and step offsets: still in torch's range
