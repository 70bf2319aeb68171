import torch

from lm import checkpoint
from lm.sample import generate, sample_next


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.randn(100)
    g = torch.Generator().manual_seed(1)
    assert sample_next(logits, temperature=0) == int(logits.argmax())
    assert all(sample_next(logits, top_k=1, generator=g) == int(logits.argmax()) for _ in range(20))


def test_a_tiny_temperature_is_greedy_not_a_crash():
    logits = torch.log_softmax(torch.randn(1000), -1)  # log-probs, all negative: x / 1e-300 was -inf for all
    logits[5] = float("-inf")  # a banned word
    g = torch.Generator().manual_seed(1)
    for t in (1e-39, 1e-300, 5e-324):
        assert sample_next(logits, temperature=t, generator=g) == int(logits.argmax())
    for top_k, top_p in ((3, 1.0), (0, 0.5)):
        assert sample_next(logits, temperature=1e-300, top_k=top_k, top_p=top_p, generator=g) == int(logits.argmax())


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(probs.log(), top_p=0.75, generator=g) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75 so token 1 is needed; 0.8 >= 0.75 so token 2 is not
    assert {sample_next(probs.log(), top_p=1e-3, generator=g) for _ in range(50)} == {0}


def test_same_seed_same_text_and_banned_never_drawn(tiny_run):
    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")
    prompt = [tok.eos_id] + tok.encode_line("the cat")
    a = list(generate(model, prompt, 40, seed=3, banned=[tok.unk_id]))
    b = list(generate(model, prompt, 40, seed=3, banned=[tok.unk_id]))
    c = list(generate(model, prompt, 40, seed=4, banned=[tok.unk_id]))
    assert a == b and a != c and tok.unk_id not in a and len(a) == 40


def test_text_stream_pieces_add_up_to_the_rendered_text():
    from lm.config import TokenizerConfig
    from lm.sample import TextStream
    from lm.tokenizer import Tokenizer

    tok = Tokenizer.train(['He said " a well-known , long road " ( 3.5 km ) .'], TokenizerConfig(text="raw"))
    ids = tok.encode_typed('He said "a well-known, long road" (3.5 km).\nHe said')
    stream = TextStream(tok, [])
    assert "".join(stream.add(i) for i in ids) == 'He said "a well-known, long road" (3.5 km).\nHe said'


def test_a_long_prompt_read_in_pieces_gives_the_same_text(tiny_run, monkeypatch):
    from lm import model as lm_model

    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")
    prompt = [tok.eos_id] + tok.encode_line("the cat sat on the mat . the old man looked at a tree . my")
    whole = list(generate(model, prompt, 30, seed=2))
    monkeypatch.setattr(lm_model, "READ_CHUNK", 3)
    assert list(generate(model, prompt, 30, seed=2)) == whole


def test_continue_text_streams_display_pieces(tiny_run):
    from lm.sample import continue_text

    _, model, tok, _ = checkpoint.load_model(tiny_run / "best.pt")
    one_line = "".join(continue_text(model, tok, "the dog", 200, temperature=2.0, seed=1, newlines=False))
    assert "\n" not in one_line and len(one_line.split()) > 100
    lines = "".join(continue_text(model, tok, "the dog", 200, temperature=2.0, seed=1))
    assert "\n" in lines  # <eos> is a line break
    assert "".join(continue_text(model, tok, "", 5, temperature=0)).strip()  # from nothing


def test_generate_prompt_from_a_file(tiny_run, tmp_path, capsys):
    from lm.cli import main

    (tmp_path / "prompt.txt").write_text("the old man looked at")
    args = ["generate", str(tiny_run / "best.pt"), "--max-words", "5", "--seed", "3"]
    assert main(args + ["--prompt", f"@{tmp_path / 'prompt.txt'}"]) == 0
    from_file = capsys.readouterr().out
    assert main(args + ["--prompt", "the old man looked at"]) == 0
    assert capsys.readouterr().out == from_file and from_file.startswith("the old man looked at ")
    (tmp_path / "saved.txt").write_text("the old man looked at\n")  # as an editor saves it
    assert main(args + ["--prompt", f"@{tmp_path / 'saved.txt'}"]) == 0
    assert capsys.readouterr().out == from_file  # the file's last line break does not start a paragraph
    import os
    import subprocess
    import sys

    from conftest import REPO
    piped = subprocess.run([sys.executable, "-m", "lm", *args, "--prompt", "@-"], input="the old man looked at\n",
                           capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert piped.returncode == 0 and piped.stdout == from_file  # @-: standard input
    assert main(args + ["--prompt", "@@the"]) == 0  # @@: a literal @
    assert capsys.readouterr().out.startswith("@the")
    assert main(args + ["--prompt", f"@{tmp_path / 'none.txt'}"]) == 1
    assert "not found" in capsys.readouterr().err
