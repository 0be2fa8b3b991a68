"""Recurrent variants torch.nn lacks, on fused kernels: LayerNorm LSTM and GRU, peephole LSTM
(layers and cells), all with zoneout and recurrent DropConnect. Semantics: SEMANTICS.md, "Variants".

The layers take fastrnn.LSTM/GRU's constructor arguments (input_size, hidden_size, num_layers,
bias, batch_first, dropout, bidirectional, device, dtype; no proj_size) plus keyword-only
``zoneout`` and ``weight_drop``, accept the same inputs (dense, batch_first, unbatched,
PackedSequence, optional hx) and return the same values. Parameters, per layer l and direction
(suffix ``_l{l}`` or ``_l{l}_reverse``), after torch.nn's weight_ih/weight_hh/bias_ih/bias_hh:

- LayerNorm LSTM: ``ln_ih_weight``/``ln_ih_bias`` [4H] (LayerNorm of W_ih x), ``ln_hh_weight``/
  ``ln_hh_bias`` [4H] (of W_hh h), ``ln_c_weight``/``ln_c_bias`` [H] (of the new cell before tanh).
- LayerNorm GRU: ``ln_ih_*`` and ``ln_hh_*`` [3H].
- Peephole LSTM: ``weight_ci``, ``weight_cf``, ``weight_co`` [H] (diagonal peepholes).

Initialisation: weights, biases and peepholes uniform(-1/sqrt(H), 1/sqrt(H)) as torch.nn's RNNs;
LayerNorm gains 1 and biases 0 as torch.nn.LayerNorm. With LayerNorm, bias_ih + bias_hh add after
the normalisation (redundant with the LayerNorm biases, kept so the weight names and shapes are
fastrnn.LSTM's). LayerNorm eps is 1e-5.

Zoneout (probability p, Krueger et al. 2016): in training every unit of h (and c) keeps its
previous value with probability p at every step (masks drawn with torch's RNG: reproducible under
torch.manual_seed); in eval h' = p h + (1 - p) h~. The layer output at each step is the zoned h.
DropConnect (``weight_drop``, AWD-LSTM): in training W_hh is replaced by F.dropout(W_hh, p), one
mask per forward call and per layer/direction, scaled by 1/(1 - p) as AWD-LSTM does; gradients
flow through that product by autograd. In eval W_hh is used unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import init

from .. import functional as FR
from .cells import _CellBase
from .rnn import _GATES, _RNNBase
from ._compat import fx_leaf

__all__ = ["LayerNormLSTM", "LayerNormGRU", "PeepholeLSTM", "LayerNormLSTMCell", "LayerNormGRUCell",
           "PeepholeLSTMCell"]


def _extra_params(mode: str, layer_norm: bool, peephole: bool, H: int):
    """(name prefix, shape) of a variant's own parameters, in the order the kernels take them."""
    G = _GATES[mode]
    out = []
    if layer_norm:
        out += [("ln_ih_weight", (G * H,)), ("ln_ih_bias", (G * H,)), ("ln_hh_weight", (G * H,)),
                ("ln_hh_bias", (G * H,))]
        if mode == "LSTM":
            out += [("ln_c_weight", (H,)), ("ln_c_bias", (H,))]
    if peephole:
        out += [("weight_ci", (H,)), ("weight_cf", (H,)), ("weight_co", (H,))]
    return out


def _reset(module: nn.Module, hidden_size: int) -> None:
    stdv = 1.0 / math.sqrt(hidden_size)
    for name, p in module.named_parameters():
        if name.startswith("ln_"):
            (init.ones_ if "_weight" in name else init.zeros_)(p)
        else:
            init.uniform_(p, -stdv, stdv)


class _VariantRNN(_RNNBase):
    _layer_norm = False
    _peephole = False
    _mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 zoneout: float = 0.0, weight_drop: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(self._mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype)
        self.zoneout = FR.check_probability("zoneout", zoneout)
        self.weight_drop = FR.check_probability("weight_drop", weight_drop)
        extras = _extra_params(self._mode, self._layer_norm, self._peephole, hidden_size)
        groups = []
        for names in self._all_weights:
            suffix = names[0][len("weight_ih"):]  # _l{k} or _l{k}_reverse
            new = [prefix + suffix for prefix, _ in extras]
            for name, (_, shape) in zip(new, extras):
                setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
            groups.append(list(names) + new)
        self._all_weights = groups
        self._flat_weights_names = [n for g in groups for n in g]
        self._init_flat_weights()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)

    @classmethod
    def from_torch(cls, module):
        raise TypeError(f"{cls.__name__} has no torch.nn counterpart to convert from")

    def to_torch(self):
        raise TypeError(f"{type(self).__name__} has no torch.nn counterpart (torch.nn lacks its parameters)")


class _VariantLSTM(_VariantRNN):
    @fx_leaf
    def forward(self, input, hx=None):
        weights = self._weights()  # (first, as torch.nn's _update_flat_weights)
        data, batch_sizes, sidx, uidx, (h0, c0), is_batched = self._prepare(input, hx, 2)
        out, h, c = FR.variant_lstm(data, (h0, c0), weights, self.bias, self.num_layers, self.dropout,
                                    self.training, self.bidirectional, self.batch_first, batch_sizes,
                                    layer_norm=self._layer_norm, peephole=self._peephole, zoneout=self.zoneout,
                                    weight_drop=self.weight_drop)
        output, (h, c) = self._finish(out, [h, c], batch_sizes, sidx, uidx, is_batched)
        return output, (h, c)


class LayerNormLSTM(_VariantLSTM):
    r"""LayerNorm LSTM (Ba, Kiros & Hinton 2016): gates = LN_x(W_ih x) + LN_h(W_hh h) + b,
    h' = σ(o) ⊙ tanh(LN_c(c')). Arguments, inputs and outputs as :class:`fastrnn.LSTM` (no
    proj_size), plus ``zoneout`` and ``weight_drop``; parameters in the module docstring."""

    _layer_norm = True


class PeepholeLSTM(_VariantLSTM):
    r"""Peephole LSTM (Gers & Schmidhuber): i and f see w_ci ⊙ c and w_cf ⊙ c, o sees w_co ⊙ c'.
    Arguments, inputs and outputs as :class:`fastrnn.LSTM` (no proj_size), plus ``zoneout`` and
    ``weight_drop``; peephole vectors weight_ci/weight_cf/weight_co_l{k} [H]."""

    _peephole = True


class LayerNormGRU(_VariantRNN):
    r"""LayerNorm GRU: LN_x on W_i x and LN_h on W_h h, then the GRU's gate arithmetic.
    Arguments, inputs and outputs as :class:`fastrnn.GRU`, plus ``zoneout`` and ``weight_drop``."""

    _layer_norm = True
    _mode = "GRU"

    @fx_leaf
    def forward(self, input, hx=None):
        weights = self._weights()  # (first, as torch.nn's _update_flat_weights)
        data, batch_sizes, sidx, uidx, (h0,), is_batched = self._prepare(input, hx, 1)
        out, h = FR.variant_gru(data, h0, weights, self.bias, self.num_layers, self.dropout, self.training,
                                self.bidirectional, self.batch_first, batch_sizes, layer_norm=True,
                                zoneout=self.zoneout, weight_drop=self.weight_drop)
        output, (h,) = self._finish(out, [h], batch_sizes, sidx, uidx, is_batched)
        return output, h


# ---------------------------------------------------------------------------- cells
class _VariantCell(_CellBase):
    _layer_norm = False
    _peephole = False
    _mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        if isinstance(hidden_size, int) and hidden_size <= 0:  # (as the variant layers: no kernel for H = 0)
            raise ValueError(f"{type(self).__name__}: hidden_size must be greater than zero, got {hidden_size}")
        super().__init__(input_size, hidden_size, bias, num_chunks=_GATES[self._mode], device=device, dtype=dtype)
        for name, shape in _extra_params(self._mode, self._layer_norm, self._peephole, hidden_size):
            setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset(self, self.hidden_size)

    def _extras(self):
        return [getattr(self, n) for n, _ in _extra_params(self._mode, self._layer_norm, self._peephole,
                                                           self.hidden_size)]

    @classmethod
    def from_torch(cls, module):
        raise TypeError(f"{cls.__name__} has no torch.nn counterpart to convert from")

    def to_torch(self):
        raise TypeError(f"{type(self).__name__} has no torch.nn counterpart")


class _VariantLSTMCell(_VariantCell):
    @fx_leaf
    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        x, (h, c), is_batched = self._prepare(input, hx, 2)
        extras = self._extras()
        ln = tuple(extras[:6]) if self._layer_norm else None
        w_peep = torch.stack(extras[-3:]) if self._peephole else None
        _, h, c = FR.variant_lstm_layer(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, ln,
                                        w_peep)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


class LayerNormLSTMCell(_VariantLSTMCell):
    r"""One step of :class:`LayerNormLSTM`, in the style of torch.nn.LSTMCell: input [B, I] or [I];
    hx = (h [B, H], c [B, H]) or None. Returns (h', c'). Parameters weight_ih, weight_hh, bias_ih,
    bias_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias."""

    _layer_norm = True


class PeepholeLSTMCell(_VariantLSTMCell):
    r"""One step of :class:`PeepholeLSTM` (torch.nn.LSTMCell's style); peepholes weight_ci,
    weight_cf, weight_co [H]. Returns (h', c')."""

    _peephole = True


class LayerNormGRUCell(_VariantCell):
    r"""One step of :class:`LayerNormGRU` (torch.nn.GRUCell's style): input [B, I] or [I]; hx [B, H]
    or [H]. Returns h'. Parameters weight_ih, weight_hh, bias_ih, bias_hh, ln_ih_weight,
    ln_ih_bias, ln_hh_weight, ln_hh_bias."""

    _layer_norm = True
    _mode = "GRU"

    @fx_leaf
    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, (h,), is_batched = self._prepare(input, hx, 1)
        _, h = FR.variant_gru_layer(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                    tuple(self._extras()))
        return h if is_batched else h.squeeze(0)
