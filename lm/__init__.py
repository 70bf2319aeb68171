"""lm: word-level LSTM language models: train, evaluate, generate, autocomplete."""

__version__ = "0.1.0"
