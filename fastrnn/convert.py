"""convert(model): swap torch.nn recurrent layers and cells for their fastrnn equivalents.

Only modules whose type is exactly torch.nn.LSTM, GRU, RNN, LSTMCell, GRUCell or RNNCell (or
that type parametrized by torch.nn.utils.parametrize) are replaced; subclasses (which may
override forward) are left alone. The replacements share the
original parameters (same tensors: device, dtype, requires_grad and optimizer state carry
over), the training mode, and whatever else is registered on the old modules: extra parameters
and buffers, hooks (weight_norm, spectral_norm, pruning, AWD-LSTM's WeightDrop keep working).
"""
from __future__ import annotations

from torch import nn

from .modules._compat import plain_class
from .modules.cells import GRUCell, LSTMCell, RNNCell
from .modules.rnn import GRU, LSTM, RNN

_SWAPS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}


def convert(model: nn.Module) -> nn.Module:
    """Replace every torch.nn LSTM/GRU/RNN (and cell) in `model` with fastrnn's, in place.
    Returns the model (or the replacement, if `model` itself is such a layer). A layer reachable
    under several names (encoder and decoder sharing one) becomes one fastrnn layer, still shared.
    """
    return _swap(model, lambda m: _SWAPS.get(plain_class(m)) is not None,
                 lambda m: _SWAPS[plain_class(m)].from_torch(m), {})


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of convert(): replace fastrnn layers and cells with torch.nn ones, in place."""
    back = {v: k for k, v in _SWAPS.items()}
    return _swap(model, lambda m: plain_class(m) in back, lambda m: m.to_torch(), {})


def _swap(model: nn.Module, wanted, make, done: dict) -> nn.Module:
    """model with every submodule for which wanted(m) replaced by make(m), each such module
    made once (done: id -> replacement), so modules shared between parents stay shared."""
    if id(model) in done:
        return done[id(model)][1]
    if wanted(model):
        new = make(model)
    else:
        # (every name: named_children() yields a module registered twice only once)
        for name, child in list(model._modules.items()):
            if child is None:
                continue
            new_child = _swap(child, wanted, make, done)
            if new_child is not child:
                setattr(model, name, new_child)
        new = model
    done[id(model)] = (model, new)  # (the original kept alive, so its id is not reused)
    return new
