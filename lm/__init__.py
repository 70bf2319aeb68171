"""lm: word-level LSTM language models: train, evaluate, generate, autocomplete."""
import os

# Back every CPU tensor of 2 MB or more with transparent huge pages (PyTorch reads this
# once, at its first allocation, so it is set before torch is imported). A training step
# sweeps the tied 33,278-row matrix and its bf16 copy (40 MB for the 2x200 model) several
# times; in 4 KB pages that is 10,000 TLB entries per sweep, in 2 MB pages 20. Side by
# side on this 2-core CPU: +7% tokens/s for the 2x200 adaptive bf16 model (README, "Speed
# on a CPU"). Set THP_MEM_ALLOC_ENABLE=0 to turn it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
