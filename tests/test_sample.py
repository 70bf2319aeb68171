import torch

from lm import checkpoint
from lm.sample import generate, sample_next


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.randn(100)
    g = torch.Generator().manual_seed(1)
    assert sample_next(logits, temperature=0) == int(logits.argmax())
    assert all(sample_next(logits, top_k=1, generator=g) == int(logits.argmax()) for _ in range(20))


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
