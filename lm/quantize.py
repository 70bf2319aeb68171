"""int8 inference: dynamic quantisation of the LSTM and the output head.

Generation and autocomplete run the model one word at a time (batch 1), where every
step reads all the weights once: the head's V x D matrix (33,278 x 256 floats, 34 MB,
for the default WikiText-2 model) dominates, and reading it is memory-bound. int8
weights are a quarter of the bytes, and x86 CPUs multiply them with VNNI instructions.
Activations stay float and are quantised on the fly per call ("dynamic"), so there is
nothing to calibrate. Each weight row gets its own scale (per-channel), which keeps the
perplexity cost small; ``lm bench`` measures it.

The quantised model is a copy for inference only (no gradients, never saved): the
checkpoint keeps the float weights.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from lm.model import FullSoftmax, LSTMLM


def quantize(model: LSTMLM, lstm: bool = True) -> LSTMLM:
    """An int8 copy of ``model`` for CPU inference: the head always, the LSTM layers
    too unless ``lstm`` is False. The original model is left untouched."""
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    q = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        # torch marks its quantised-tensor constructors as deprecated in favour of the
        # separate torchao package; they still work, and the tests check the results.
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        maps = nn.ModuleList()
        for weight, bias in q.head.folded():
            lin = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None)
            with torch.no_grad():
                lin.weight.copy_(weight)
                if bias is not None:
                    lin.bias.copy_(bias)
            lin.qconfig = per_channel_dynamic_qconfig
            maps.append(nnqd.Linear.from_float(lin))
        q.head.int8 = maps[0] if isinstance(q.head, FullSoftmax) else maps
        if lstm:
            for i, layer in enumerate(q.layers):
                plain = nn.LSTM(layer.input_size, layer.hidden_size, batch_first=True)
                plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k in plain.state_dict()})
                plain.qconfig = default_dynamic_qconfig
                q.layers[i] = nnqd.LSTM.from_float(plain)
    for p in q.parameters():
        p.requires_grad_(False)
    return q
