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

    Returns the model (or the replacement, if `model` itself is such a layer).
    """
    swap = _SWAPS.get(plain_class(model))
    if swap is not None:
        return swap.from_torch(model)
    for name, child in list(model.named_children()):
        new = convert(child)
        if new is not child:
            setattr(model, name, new)
    return model


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of convert(): replace fastrnn layers and cells with torch.nn ones, in place."""
    back = {v: k for k, v in _SWAPS.items()}
    if plain_class(model) in back:
        return model.to_torch()
    for name, child in list(model.named_children()):
        new = to_torch(child)
        if new is not child:
            setattr(model, name, new)
    return model
