"""The stacked LSTM language model and its output heads.

``LSTMLM.forward(x, hidden) -> (features, hidden)`` runs embedding, LSTM layers and
dropout; the head turns features into exact, normalized log-probabilities: ``nll`` for
the targets only (training and scoring), ``log_probs`` for the whole vocabulary
(sampling and prediction).

Two heads:
- ``FullSoftmax``: one linear layer over the vocabulary.
- ``AdaptiveSoftmax`` (Grave et al. 2017): the frequent words and one entry per rare-word
  cluster share a small softmax; a word in cluster i has log p = log p(cluster i) +
  log p(word | cluster i). Training computes a cluster's softmax only for the targets
  that fall in it, so most tokens never touch the 30k rare words. Unlike
  ``torch.nn.AdaptiveLogSoftmaxWithLoss`` (which it equals when untied, see the tests)
  it can tie its word vectors to the embedding, which is worth several perplexity points.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.config import ModelConfig
from lm.regularizers import LSTMLayer, embedding_dropout, locked_dropout

Hidden = list[tuple[Tensor, Tensor]]  # per layer: (h, c), each (1, B, H_layer)


class LSTMLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        E, H, L = cfg.emb_dim, cfg.hidden_dim, cfg.n_layers
        self.embedding = nn.Embedding(vocab_size, E)
        # AWD-style sizes: with tying, the last layer outputs E so its features meet
        # the (shared) embedding vectors in the head.
        sizes = [H] * (L - 1) + [E if cfg.tie_weights else H]
        ins = [E] + sizes[:-1]
        self.layers = nn.ModuleList(LSTMLayer(i, o, cfg.weight_drop) for i, o in zip(ins, sizes))
        tied = self.embedding.weight if cfg.tie_weights else None
        if cfg.head == "adaptive":
            self.head: nn.Module = AdaptiveSoftmax(sizes[-1], vocab_size, cfg.cutoffs, tied)
        else:
            self.head = FullSoftmax(sizes[-1], vocab_size, tied)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def forward(self, x: Tensor, hidden: Hidden | None = None, return_raw: bool = False):
        """x: (B, T) token ids -> features (B, T, D) and the new hidden state; with
        ``return_raw`` also the last layer's output before dropout (for TAR)."""
        cfg, train = self.cfg, self.training
        h = embedding_dropout(self.embedding, x, cfg.dropout_embed, train)  # (B, T, E)
        h = locked_dropout(h, cfg.dropout_input, train)
        new_hidden: Hidden = []
        for i, layer in enumerate(self.layers):
            h, state = layer(h, None if hidden is None else hidden[i])  # (B, T, H_i)
            new_hidden.append(state)
            raw = h
            last = i == len(self.layers) - 1
            h = locked_dropout(h, cfg.dropout if last else cfg.dropout_hidden, train)
        return (h, new_hidden, raw) if return_raw else (h, new_hidden)

    def nll(self, features: Tensor, targets: Tensor) -> Tensor:
        """Negative log-likelihood of each target: (..., D), (...) -> (...)."""
        return self.head.nll(features.reshape(-1, features.size(-1)), targets.reshape(-1)).view(targets.shape)

    def log_probs(self, features: Tensor) -> Tensor:
        """Log-probabilities over the vocabulary: (..., D) -> (..., V)."""
        return self.head.log_probs(features)


def detach(hidden: Hidden) -> Hidden:
    """Cut the graph between truncated-BPTT windows, keeping the values."""
    return [(h.detach(), c.detach()) for h, c in hidden]


class FullSoftmax(nn.Module):
    def __init__(self, in_dim: int, vocab_size: int, tied: nn.Parameter | None = None):
        super().__init__()
        self.weight = tied if tied is not None else nn.Parameter(torch.empty(vocab_size, in_dim).uniform_(-0.1, 0.1))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def logits(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight, self.bias)  # (N, V)

    def nll(self, h: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(h), target, reduction="none")

    def log_probs(self, h: Tensor) -> Tensor:
        return F.log_softmax(self.logits(h), dim=-1)


class AdaptiveSoftmax(nn.Module):
    """Exact two-level softmax over a frequency-sorted vocabulary.

    bounds = [0, c_0, c_1, ..., V]: ids below c_0 are in the head; cluster i holds
    ids [c_i, c_{i+1}). Untied, cluster i projects features down to D / 4^(i+1)
    dimensions first (rare words need fewer); tied, it projects D -> D (initialised to
    the identity) and scores against the embedding rows of its words.
    """

    def __init__(self, in_dim: int, vocab_size: int, cutoffs: list[int], tied: nn.Parameter | None = None,
                 div_value: float = 4.0, bias: bool = True):
        super().__init__()
        cutoffs = [c for c in cutoffs if 0 < c < vocab_size]
        self.bounds = [0, *cutoffs, vocab_size]
        self.register_buffer("cuts", torch.tensor(cutoffs, dtype=torch.long), persistent=False)
        n_clusters, shortlist = len(cutoffs), self.bounds[1]
        self.tied = tied
        if tied is None:
            self.shortlist = nn.Parameter(torch.empty(shortlist, in_dim).uniform_(-0.1, 0.1))
        if tied is not None and tied.size(1) != in_dim:
            raise ValueError("a tied adaptive head needs features of the embedding's size")
        self.cluster = nn.Parameter(torch.empty(n_clusters, in_dim).uniform_(-0.1, 0.1))
        self.head_bias = nn.Parameter(torch.zeros(shortlist + n_clusters)) if bias else None
        self.proj = nn.ModuleList()
        self.out = nn.ParameterList()
        self.out_bias = nn.ParameterList()
        for i in range(n_clusters):
            lo, hi = self.bounds[i + 1], self.bounds[i + 2]
            if tied is not None:
                p = nn.Linear(in_dim, in_dim, bias=False)
                nn.init.eye_(p.weight)
            else:
                d = max(1, int(in_dim // div_value ** (i + 1)))
                p = nn.Linear(in_dim, d, bias=False)
                self.out.append(nn.Parameter(torch.empty(hi - lo, d).uniform_(-0.1, 0.1)))
            self.proj.append(p)
            if bias:
                self.out_bias.append(nn.Parameter(torch.zeros(hi - lo)))

    def _weights(self) -> tuple[Tensor, list[Tensor]]:
        """(shortlist word vectors, per-cluster word vectors). Tied, one ``split`` of the
        embedding: its backward writes one gradient, where a slice per cluster would
        zero-fill a full embedding-sized gradient each (20% of a CPU step)."""
        if self.tied is not None:
            short, *tails = self.tied.split([b - a for a, b in zip(self.bounds, self.bounds[1:])])
            return short, tails
        return self.shortlist, list(self.out)

    def _tail_logits(self, i: int, h: Tensor, weight: Tensor) -> Tensor:
        b = self.out_bias[i] if self.head_bias is not None else None
        return F.linear(self.proj[i](h), weight, b)

    def _head_log_probs(self, h: Tensor, short: Tensor) -> Tensor:
        return F.log_softmax(F.linear(h, torch.cat([short, self.cluster]), self.head_bias), dim=-1)

    def nll(self, h: Tensor, target: Tensor) -> Tensor:
        """h: (N, D), target: (N,) -> (N,). Only targets' clusters are computed."""
        short, tails = self._weights()
        head_lp = self._head_log_probs(h, short)  # (N, c_0 + n_clusters)
        cluster = torch.bucketize(target, self.cuts, right=True)  # 0 = head, i+1 = tail i
        head_index = torch.where(cluster == 0, target, self.bounds[1] + cluster - 1)
        out = -head_lp.gather(1, head_index.unsqueeze(1)).squeeze(1)
        for i in range(len(self.proj)):
            rows = (cluster == i + 1).nonzero().squeeze(1)
            if rows.numel():
                tail_lp = F.log_softmax(self._tail_logits(i, h[rows], tails[i]), dim=-1)
                local = (target[rows] - self.bounds[i + 1]).unsqueeze(1)
                out = out.index_add(0, rows, -tail_lp.gather(1, local).squeeze(1))
        return out

    def log_probs(self, h: Tensor) -> Tensor:
        """(..., D) -> (..., V): every word's exact log-probability."""
        short, tails = self._weights()
        head_lp = self._head_log_probs(h, short)
        c0 = self.bounds[1]
        parts = [head_lp[..., :c0]]
        for i in range(len(self.proj)):
            parts.append(head_lp[..., c0 + i : c0 + i + 1] + F.log_softmax(self._tail_logits(i, h, tails[i]), dim=-1))
        return torch.cat(parts, dim=-1)
