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

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.config import ModelConfig
from lm.regularizers import LSTMLayer, embedding_dropout, locked_dropout

Hidden = list[tuple[Tensor, Tensor]]  # per layer: (h, c), each (1, B, H_layer)
READ_CHUNK = 4096  # tokens per model call when reading a long text (bounds activation memory)


class LSTMLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        E, H, L = cfg.emb_dim, cfg.hidden_dim, cfg.n_layers
        # Training looks words up with ``lookup`` (its gradient rows go straight into
        # weight.grad); the module holds the matrix and serves no-grad lookups.
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
        self.tied_grad: TiedGradient | None = None  # see defer_tied_gradient

    def defer_tied_gradient(self, on: bool = True) -> TiedGradient | None:
        """With a tied adaptive head, collect the shared matrix's gradient as factors
        (``TiedGradient``) instead of in ``embedding.weight.grad``; whoever turns this on
        must hand the result to ``lm.train.clipped_step``, which applies it. Returns the
        collector, or None where there is nothing to defer (untied or full softmax)."""
        head = self.head
        on = on and isinstance(head, AdaptiveSoftmax) and head.tied is not None
        self.tied_grad = TiedGradient(self.embedding.weight) if on else None
        if isinstance(head, AdaptiveSoftmax):
            head.tied_grad = self.tied_grad
        return self.tied_grad

    def forward(self, x: Tensor, hidden: Hidden | None = None, return_raw: bool = False):
        """x: (B, T) token ids -> features (B, T, D) and the new hidden state; with
        ``return_raw`` also the last layer's output before dropout (for TAR)."""
        cfg, train = self.cfg, self.training
        h = embedding_dropout(lookup(self.embedding.weight, x, self.tied_grad), x, self.embedding.num_embeddings,
                              cfg.dropout_embed, train)  # (B, T, E)
        h = locked_dropout(h, cfg.dropout_input, train)
        new_hidden: Hidden = []
        for i, layer in enumerate(self.layers):
            h, state = layer(h, None if hidden is None else hidden[i])  # (B, T, H_i)
            new_hidden.append(state)
            raw = h
            last = i == len(self.layers) - 1
            h = locked_dropout(h, cfg.dropout if last else cfg.dropout_hidden, train)
        return (h, new_hidden, raw) if return_raw else (h, new_hidden)

    def read(self, ids: Sequence[int], hidden: Hidden | None = None) -> Iterator[tuple[Tensor, Hidden]]:
        """Run over a long text (one sequence of token ids) in pieces of ``READ_CHUNK``,
        so activations stay small: yields each piece's features (T_i, D) and the state
        after it. The same numbers as one call over the whole text."""
        device = next(self.parameters()).device
        for i in range(0, len(ids), READ_CHUNK):
            features, hidden = self(torch.tensor([ids[i:i + READ_CHUNK]], device=device), hidden)
            yield features[0], hidden

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
        self.int8: nn.Module | None = None  # an inference-only int8 map (lm.quantize)

    def logits(self, h: Tensor) -> Tensor:
        if self.int8 is not None:
            return _rows(self.int8, h)
        return F.linear(h, self.weight, self.bias)  # (N, V)

    def folded(self) -> list[tuple[Tensor, Tensor | None]]:
        """(weight, bias) of the map from features to logits."""
        return [(self.weight, self.bias)]

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
        # Inference-only int8 maps set by lm.quantize: [head, tail 0, tail 1, ...], each
        # features -> logits, with the bias and the tail's projection folded in.
        self.int8: nn.ModuleList | None = None
        self.tied_grad: TiedGradient | None = None  # set by LSTMLM.defer_tied_gradient

    def _sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds, self.bounds[1:])]

    def _weights(self) -> tuple[Tensor, list[Tensor]]:
        """(shortlist word vectors, per-cluster word vectors)."""
        if self.tied is not None:
            short, *tails = self.tied.split(self._sizes())
            return short, tails
        return self.shortlist, list(self.out)

    def _head_logits(self, h: Tensor) -> Tensor:
        """(N, D) -> (N, c_0 + n_clusters): the shortlist words, then one per cluster."""
        if self.int8 is not None:
            return _rows(self.int8[0], h)
        short, _ = self._weights()
        return F.linear(h, torch.cat([short, self.cluster]), self.head_bias)

    def _tail_logits(self, i: int, h: Tensor) -> Tensor:
        """(N, D) -> (N, size of cluster i)."""
        if self.int8 is not None:
            return _rows(self.int8[i + 1], h)
        _, tails = self._weights()
        b = self.out_bias[i] if self.head_bias is not None else None
        return F.linear(self.proj[i](h), tails[i], b)

    def folded(self) -> list[tuple[Tensor, Tensor | None]]:
        """(weight, bias) of each map from features to logits: the head, then each tail
        with its projection multiplied in (W_i P_i: one matmul instead of two)."""
        short, tails = self._weights()
        maps = [(torch.cat([short, self.cluster]), self.head_bias)]
        for i, p in enumerate(self.proj):
            maps.append((tails[i] @ p.weight, self.out_bias[i] if self.head_bias is not None else None))
        return maps

    def nll(self, h: Tensor, target: Tensor) -> Tensor:
        """h: (N, D), target: (N,) -> (N,). Only targets' clusters are computed."""
        cluster = torch.bucketize(target.contiguous(), self.cuts, right=True)  # 0 = head, i+1 = tail i
        # The tokens of every tail cluster, grouped by cluster: one gather of their
        # features (and one scatter of its gradient) for all the clusters.
        counts = torch.bincount(cluster, minlength=len(self.bounds) - 1).tolist()
        tail_rows = torch.argsort(cluster, stable=True)[counts[0]:]
        sizes, rows = padded_rows(tail_rows, counts[1:])
        xs = h[rows].split(sizes)
        if self.tied is not None and self.int8 is None:
            # One kernel for every block of the shared matrix: its backward writes all
            # block gradients into a single embedding-sized tensor (or, with a
            # TiedGradient, hands it their factors).
            word_logits = block_linear(self.tied, self._sizes(), [h, *(p(x) for p, x in zip(self.proj, xs))],
                                       self.tied_grad)
            head, head_bias = torch.cat([word_logits[0], F.linear(h, self.cluster)], dim=1), self.head_bias
            biases = list(self.out_bias) if self.head_bias is not None else [None] * len(xs)
            tails = list(zip(word_logits[1:], biases))
        else:  # the biases are in the logits already
            head, head_bias = self._head_logits(h), None
            tails = [(self._tail_logits(i, x), None) for i, x in enumerate(xs)]
        head_index = torch.where(cluster == 0, target, self.bounds[1] + cluster - 1)
        out = softmax_nll(head, head_index, head_bias)
        local = (target[rows] - self.cuts[cluster[rows] - 1]).split(sizes)
        # a padded cluster's extra rows are dropped here, so they get no gradient
        tail_nll = [softmax_nll(logits, t, bias)[:n]
                    for (logits, bias), t, n in zip(tails, local, counts[1:]) if t.numel()]
        return out.index_add(0, tail_rows, torch.cat(tail_nll)) if tail_nll else out

    def log_probs(self, h: Tensor) -> Tensor:
        """(..., D) -> (..., V): every word's exact log-probability."""
        head_lp = F.log_softmax(self._head_logits(h), dim=-1)
        c0 = self.bounds[1]
        parts = [head_lp[..., :c0]]
        for i in range(len(self.proj)):
            parts.append(head_lp[..., c0 + i : c0 + i + 1] + F.log_softmax(self._tail_logits(i, h), dim=-1))
        return torch.cat(parts, dim=-1)


# A cluster with more than PAD_ABOVE tokens in a batch gets its count rounded up to a
# multiple of PAD_TO (copies of its first token, whose losses are dropped). oneDNN builds
# a kernel for every matrix shape it meets and caches 1,024. At batch 64 x 35 the
# clusters' token counts vary so much that the default model's products come in more
# shapes than that, and oneDNN kept evicting and rebuilding kernels: after 300 warm
# steps, 10.6 builds and 8.6 ms of building per step (ONEDNN_VERBOSE=2), about 7% of the
# step; padded, 0.3 builds and 0.1 ms (the wt2-cpu model: 4.1 ms -> 0.1 ms). Paired in
# one process (7 rounds of 15 s, default model): +2.2%, and +5.2% with a bound of 64,
# which cost the 2x200 model at batch 20 (whose shapes fit the cache) 2.6%. A larger
# cache is no way out: each cached kernel holds about 300 KB here.
PAD_ABOVE, PAD_TO = 128, 16


def padded_rows(rows: Tensor, counts: list[int]) -> tuple[list[int], Tensor]:
    """``rows`` grouped by ``counts``, each group of more than PAD_ABOVE rows padded to a
    multiple of PAD_TO with copies of its first row: (the padded counts, the rows)."""
    sizes = [n if n <= PAD_ABOVE else -(-n // PAD_TO) * PAD_TO for n in counts]
    if sizes == counts:
        return sizes, rows
    parts = [p if m == n else torch.cat([p, p[:1].expand(m - n)])
             for p, n, m in zip(rows.split(counts), counts, sizes)]
    return sizes, torch.cat(parts)


def softmax_nll(logits: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
    """``-log_softmax(logits + bias)`` at each row's target, in fp32: (N, C), (N,), (C,)
    -> (N,). Under autograd one ``_SoftmaxNLL`` (see there) instead of a bias add, a
    log-softmax, a gather and their backward passes; without, a logsumexp."""
    if torch.is_grad_enabled() and (logits.requires_grad or (bias is not None and bias.requires_grad)):
        return _SoftmaxNLL.apply(logits, target, bias)
    z = logits.float() if bias is None else logits.float() + bias
    return z.logsumexp(1) - z.gather(1, target.unsqueeze(1)).squeeze(1)


class _SoftmaxNLL(torch.autograd.Function):
    """The negative log-likelihood of a softmax, forward and backward in one piece.

    Its gradient with respect to the logits is ``softmax - onehot(target)`` times the
    incoming gradient; forward keeps the softmax (in place of the logits' fp32 copy) and
    backward scales it, subtracts at the targets and sums it for the bias. Autograd
    through ``log_softmax(logits + bias).gather`` makes about twice as many passes over
    the (N, C) logits: the bias add, the log-softmax, the gather's zero-filled scatter,
    the log-softmax's backward and the cast back."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, bias: Tensor | None) -> Tensor:
        z = logits.float()
        if bias is not None:
            z = z + bias
        elif z is logits:
            z = z.clone()  # overwritten below
        top = z.amax(1, keepdim=True)
        picked = z.gather(1, target.unsqueeze(1))
        total = z.sub_(top).exp_().sum(1, keepdim=True)
        ctx.save_for_backward(z, total, target)  # the softmax is z / total
        ctx.logits_dtype = logits.dtype
        return (total.log() + top - picked).squeeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        exp, total, target = ctx.saved_tensors
        g = grad.unsqueeze(1).to(exp.dtype)
        d = exp * (g / total)  # the softmax times the incoming gradient, in one pass
        d.scatter_add_(1, target.unsqueeze(1), -g)
        grad_bias = d.sum(0) if ctx.needs_input_grad[2] else None
        return d.to(ctx.logits_dtype) if ctx.needs_input_grad[0] else None, None, grad_bias


def lookup(weight: Tensor, words: Tensor, sink: TiedGradient | None = None) -> Tensor:
    """``weight[words]``; under autograd the rows' gradients are added straight into
    ``weight.grad`` (see ``_Lookup``), so ``backward()`` gives the usual ``.grad``, or,
    with a ``sink``, handed to it."""
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return F.embedding(words, weight)
    return _Lookup.apply(words, weight.detach().requires_grad_(), (weight, sink))


class _Lookup(torch.autograd.Function):
    """An embedding lookup whose backward adds the looked-up rows' gradients into
    ``weight.grad`` itself.

    A tied matrix gets two gradients: the head's, dense, and the lookup's, a few
    rows. Returned to autograd, the two are summed into a new embedding-sized tensor
    (the engine adds a sparse gradient to a dense one out of place), which took a seventh
    of a CPU training step. Here the head's gradient becomes ``weight.grad`` untouched and
    the rows are added into it (``index_add_``); if the lookup's backward happens to run
    first it starts from zeros, and autograd then adds the head's gradient in place, so
    the result never depends on the order. The weight reaches ``forward`` twice: a
    detached alias that requires grad (so that autograd calls ``backward``; it gets no
    gradient) and, hidden from autograd inside a tuple, the parameter whose ``.grad``
    is written. ``torch.autograd.grad`` therefore does not see the lookup's part; this
    project only uses ``backward()``."""

    @staticmethod
    def forward(ctx, words: Tensor, alias: Tensor, hidden: tuple) -> Tensor:
        ctx.save_for_backward(words)
        ctx.weight, ctx.sink = hidden
        return F.embedding(words, alias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (words,) = ctx.saved_tensors
        weight = ctx.weight
        if ctx.sink is not None:
            ctx.sink.add_rows(words, grad)
            return None, None, None
        with torch.no_grad():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.index_add_(0, words.reshape(-1), grad.reshape(-1, grad.size(-1)).to(weight.dtype))
        return None, None, None


def _rows(linear: nn.Module, h: Tensor) -> Tensor:
    """Apply a quantised linear map (which takes 2-D input only) to (..., D) features."""
    return linear(h.reshape(-1, h.size(-1))).view(*h.shape[:-1], -1)


def block_linear(weight: Tensor, sizes: list[int], inputs: list[Tensor],
                 sink: TiedGradient | None = None) -> list[Tensor]:
    """``inputs[j] @ W_j.T`` for the row blocks ``W_j`` of ``weight`` (split by ``sizes``);
    an input may have zero rows. With a ``sink``, the weight's gradient goes to it as
    factors instead of to autograd."""
    return list(_BlockLinear.apply(weight, (tuple(sizes), sink), *inputs))


# Under autocast, a block whose input has at most this many rows (a rare-word cluster's
# share of a batch) gets its weight gradient from an fp32 product written straight into
# the gradient tensor; with more rows, from a bf16 product and a copy. Side by side
# (bf16 training steps, interleaved), on session 6's host: 128 rows gave +10% tokens/s
# on the 2x200 model at batch 20x35, +2% on the wt2-cpu model at 64x35 (512 rows: +11%
# and -1%). On session 11's CPU (AMD family 26, whose bf16 products run 2.5-3x faster
# than fp32 ones at 70-120 rows; one model, the bound switched between interleaved
# rounds), 64 rows against 128: +2.0% on the 2x200 model, +4.1% on the default model,
# +3.0% on wt2-cpu's; it also matches GRAM_ROWS, so a block the clip's Gram matrices
# converted to fp32 reuses that copy and a larger one is formed in bf16 once.
FP32_GRAD_ROWS = 64


def _product_in(dtype: torch.dtype, g: Tensor, x: Tensor) -> bool:
    """Whether a block's weight gradient ``g^T x`` is best formed in the weight's
    ``dtype`` itself: its inputs already are, or it has few rows (FP32_GRAD_ROWS);
    otherwise a bf16 product, then converted."""
    return g.dtype == x.dtype == dtype or x.size(0) <= FP32_GRAD_ROWS


class _BlockLinear(torch.autograd.Function):
    """Autograd through ``weight.split`` makes each block's gradient separately and then
    concatenates them into a new embedding-sized tensor; with a tied embedding that
    tensor is then added to the embedding's own zero-filled gradient. On a CPU those
    embedding-sized copies and fills took a third of a training step. Here each block's
    gradient is written straight into its rows of one uninitialised tensor (an input
    with no rows writes zeros)."""

    @staticmethod
    def forward(ctx, weight: Tensor, how: tuple, *inputs: Tensor):
        (sizes, ctx.sink), ctx.weight_dtype = how, weight.dtype
        ctx.sizes = sizes
        # Under autocast the activations are bf16: cast the matrix once, for both passes
        # (a sink keeps that copy up to date as it updates the weight: no cast at all).
        dtype = inputs[0].dtype
        cast = ctx.sink.cast(dtype) if ctx.sink is not None and ctx.sink.weight is weight else weight.to(dtype)
        ctx.save_for_backward(cast, *inputs)
        return tuple(x @ w.t() for x, w in zip(inputs, cast.split(sizes)))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        cast, *inputs = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[0] and ctx.sink is not None:
            ctx.sink.add_blocks(ctx.sizes, grads, inputs)
        elif ctx.needs_input_grad[0]:
            grad_weight = cast.new_empty(cast.shape, dtype=ctx.weight_dtype)
            for out, x, g in zip(grad_weight.split(ctx.sizes), inputs, grads):
                if _product_in(out.dtype, g, x):
                    # fp32 (or, under autocast, few rows): the product straight into place
                    torch.mm(g.t().to(out.dtype), x.to(out.dtype), out=out)
                else:  # autocast, many rows: a bf16 product (faster), copied into the fp32 gradient
                    out.copy_(g.t() @ x.to(g.dtype))
        grad_inputs = [g @ w.to(g.dtype) if need else None
                       for g, w, need in zip(grads, cast.split(ctx.sizes), ctx.needs_input_grad[2:])]
        return (grad_weight, None, *grad_inputs)


# The clip's norm of a block's gradient G^T X (n tokens) comes from the Gram matrices
# G G^T and X X^T only while n is at most this. They cost about 2 n^2 (size + dim)
# flops, on top of the update's own product; the other way, the product is formed once
# for both (the norm reads it, the update adds it: two passes over size x dim floats).
# Products of a few dozen rows and thousands of columns run slowly here, so the Grams
# lose from about 64 rows on at these widths. Measured side by side (one model, the
# rule switched between interleaved rounds of bf16 training steps), against the earlier
# rule (Grams whenever they are smaller than the block): default model (batch 64)
# +6.7%, wt2-cpu model +5.0%, 2x200 model at batch 20 (clusters of 17-73 tokens) +0.8%
# and +1.2% (two runs); bounds of 32 and 48 cost the 2x200 model 2-3%, and 80 and 96
# gained less on the batch-64 models.
GRAM_ROWS = 64


def _gram_cheaper(n: int, size: int, dim: int) -> bool:
    """Whether a block's share of the clip's norm is best taken from its factors' Gram
    matrices rather than from its gradient written out (see GRAM_ROWS)."""
    return n <= GRAM_ROWS and n * (size + dim) < size * dim


class TiedGradient:
    """One step's gradient of a tied matrix, kept as the factors it is made of.

    A tied adaptive head's gradient is, per row block j (the shortlist, each cluster),
    ``G_j^T X_j``: G_j (n_j, V_j) the logits' gradients, X_j (n_j, D) the inputs, n_j the
    batch's tokens in that cluster; plus the looked-up rows' gradients added at their
    words. Written out, it is an embedding-sized fp32 tensor that the clip then reads
    once for its norm and SGD once more for the update, while n_j is a few dozen against
    D in the hundreds. Kept as factors, the norm comes from small Gram matrices
    (``||G^T X||^2 = sum((G G^T) * (X X^T))``; a block with more than GRAM_ROWS tokens
    is written out once instead, block-sized, for the norm and the update alike) and
    the update goes straight into the weight (``apply``). ``lm.train.clipped_step``
    does both for plain SGD and otherwise writes the gradient out into ``weight.grad``
    (``materialize``), so every optimiser still sees the usual gradient. Entries from
    several backward passes add up.

    Under autocast the forward pass multiplies by a bf16 copy of the weight; casting it
    reads the whole fp32 matrix once more per step, from memory, since an
    embedding-sized matrix does not stay in cache between steps. ``apply`` therefore
    writes that copy itself, block by block right after updating the block (while it
    is still in cache), and ``cast`` hands it to the next forward pass as long as the
    weight has not changed since (its version counter; a checkpoint load or any other
    in-place change means a fresh cast). Side by side: +15% tokens/s on the 2x200
    model, +5% on the wt2-cpu model."""

    def __init__(self, weight: Tensor):
        self.weight = weight
        self._copy: Tensor | None = None  # the weight in a lower precision, as of _copy_version
        self._copy_version = -1
        self._copy_dtype: torch.dtype | None = None  # the precision forward asked for last
        self.clear()

    def cast(self, dtype: torch.dtype) -> Tensor:
        """The weight in ``dtype``: the copy ``apply`` keeps, if the weight has not
        changed since, else a fresh cast (and ``apply`` keeps one from then on). "Changed"
        is read from the weight's version counter, which every in-place change bumps
        (optimisers, ``load_state_dict``, ``copy_`` under ``no_grad``) except one made
        through ``weight.data``, which this project never does to a tied weight."""
        weight = self.weight
        if dtype == weight.dtype:
            return weight
        self._copy_dtype = dtype
        copy = self._copy
        if copy is not None and copy.dtype == dtype and self._copy_version == weight._version:
            return copy
        return weight.to(dtype)

    def clear(self) -> None:
        self.blocks: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}  # (lo, hi) -> [(G, X)]
        self.words: list[Tensor] = []
        self.rows: list[Tensor] = []
        self._ready: tuple | None = None

    def pending(self) -> bool:
        return bool(self.blocks or self.words)

    def add_blocks(self, sizes: Sequence[int], grads: Sequence[Tensor | None], inputs: Sequence[Tensor]) -> None:
        lo = 0
        for size, g, x in zip(sizes, grads, inputs):
            if g is not None and g.size(0):
                self.blocks.setdefault((lo, lo + size), []).append((g.detach(), x.detach()))
            lo += size
        self._ready = None

    def add_rows(self, words: Tensor, grad: Tensor) -> None:
        self.words.append(words.reshape(-1))
        self.rows.append(grad.detach().reshape(-1, grad.size(-1)))
        self._ready = None

    def _prepare(self) -> tuple:
        """Blocks as (lo, hi, G, X, product or None); the looked-up words (unique, sorted)
        and their summed gradient rows."""
        if self._ready is None:
            blocks = []
            for (lo, hi), parts in sorted(self.blocks.items()):
                if len(parts) == 1 and parts[0][0].dtype == parts[0][1].dtype:
                    g, x = parts[0]
                else:
                    dtype = parts[0][0].dtype if all(g.dtype == parts[0][0].dtype for g, _ in parts) else torch.float32
                    g = torch.cat([g.to(dtype) for g, _ in parts])
                    x = torch.cat([x.to(dtype) for _, x in parts])
                blocks.append([lo, hi, g, x, None, None])  # + product, fp32 (G, X)
            dim, dtype = self.weight.size(1), self.weight.dtype
            if self.words:
                uniq, where = torch.unique(torch.cat(self.words), return_inverse=True)
                summed = torch.zeros(uniq.numel(), dim, dtype=dtype).index_add_(0, where, torch.cat(self.rows).to(dtype))
            else:
                uniq, summed = torch.zeros(0, dtype=torch.long), torch.zeros(0, dim, dtype=dtype)
            self._ready = (blocks, uniq, summed)
        return self._ready

    def _product(self, g: Tensor, x: Tensor) -> Tensor:
        """G^T X as _BlockLinear forms it: in the weight's dtype, or a bf16 product left
        in bf16 (converting it changes no value; the norm and the update read it as is,
        half the bytes of an fp32 copy)."""
        if _product_in(self.weight.dtype, g, x):
            return torch.mm(g.t().to(self.weight.dtype), x.to(self.weight.dtype))
        return g.t() @ x

    @torch.no_grad()
    def norm_sq(self) -> Tensor:
        """The squared Frobenius norm of the whole gradient (an fp32 scalar)."""
        blocks, uniq, summed = self._prepare()
        total = summed.float().pow(2).sum()
        # the looked-up words (sorted) that fall in each block: one search for all blocks
        edges = torch.searchsorted(uniq, torch.tensor([b[:2] for b in blocks], dtype=uniq.dtype)).tolist()
        for block, (a, b) in zip(blocks, edges):
            lo, hi, g, x, _, _ = block
            words, rows = uniq[a:b] - lo, summed[a:b].float()
            n, size, dim = g.size(0), hi - lo, x.size(1)
            if _gram_cheaper(n, size, dim):
                # In fp32: bf16 products would take half the time, but oneDNN builds a
                # kernel for every new shape, and n differs from batch to batch (measured
                # side by side: 6-10% fewer tokens/s in all).
                gf, xf = block[5] = g.float(), x.float()  # apply's fp32 product takes them too
                total += ((gf @ gf.t()) * (xf @ xf.t())).sum()
                if words.numel():  # cross terms with the looked-up rows: 2 <G^T X, rows>
                    total += 2 * ((gf.index_select(1, words).t() @ xf) * rows).sum()
            else:  # written out (kept for apply)
                block[4] = product = self._product(g, x)
                total += torch.linalg.vector_norm(product, dtype=torch.float32).square()
                if words.numel():
                    total += 2 * (product[words].float() * rows).sum()
        return total

    @torch.no_grad()
    def apply(self, alpha: float, out: Tensor | None = None) -> None:
        """``out += alpha * gradient`` (``out`` defaults to the weight, whose
        lower-precision copy, if forward uses one, is rewritten as it goes), then clear."""
        copy = None
        if out is None:
            out = self.weight
            if self._copy_dtype is not None:
                if self._copy is None or self._copy.dtype != self._copy_dtype or self._copy.shape != out.shape:
                    self._copy = torch.empty(out.shape, dtype=self._copy_dtype, device=out.device)
                copy = self._copy
        blocks, uniq, summed = self._prepare()
        if uniq.numel():  # first the looked-up rows, so that each block is final when copied
            out.index_add_(0, uniq, summed.to(out.dtype), alpha=alpha)
        done = 0  # rows of the copy written so far
        for lo, hi, g, x, product, converted in blocks:
            if product is not None:
                out[lo:hi].add_(product, alpha=alpha)
            elif _product_in(out.dtype, g, x):
                if converted is None or converted[0].dtype != out.dtype:
                    converted = g.to(out.dtype), x.to(out.dtype)
                gc, xc = converted
                out[lo:hi].addmm_(gc.t(), xc, alpha=alpha)
            else:
                out[lo:hi].add_(g.t() @ x, alpha=alpha)
            if copy is not None:  # the rows before it that no block touched, and the block
                copy[done:hi].copy_(out[done:hi])
                done = hi
        if copy is not None:
            copy[done:].copy_(out[done:])
            self._copy_version = out._version
        self.clear()

    def materialize(self) -> None:
        """Add the gradient into ``weight.grad`` (the usual place), then clear."""
        if self.pending():
            weight = self.weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            self.apply(1.0, weight.grad)
