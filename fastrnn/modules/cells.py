"""Drop-in replacements for torch.nn.LSTMCell, GRUCell and RNNCell.

A cell step is the fused sequence kernel run for one step, so cells share the layer kernels
(and their backward). Parameters, initialisation, shapes and errors follow torch.nn.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import init

from .. import functional as FR
from ._compat import TorchNNTwin, autocast_enabled, fx_leaf

__all__ = ["LSTMCell", "GRUCell", "RNNCell"]

_ABSENT = object()
# The layer ops' default overloads, called by the fast path (an overload packet resolves the
# overload at every call).
_LSTM, _GRU, _RNN = (torch.ops.fastrnn.lstm_forward.default, torch.ops.fastrnn.gru_forward.default,
                     torch.ops.fastrnn.rnn_forward.default)
_run = FR._call


class _CellBase(TorchNNTwin, nn.Module):
    __constants__ = ["input_size", "hidden_size", "bias"]
    _torch_class: type = nn.RNNCellBase

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int, device=None,
                 dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def _fast(self, input, states, n_states: int):
        """The common call's (weights, train) in one pass of cheap tests, for one call of the fused
        op (a decoder pays the general path's checks at every step): a plain eager call
        (FR._plain_eager), a 2-D CPU input of the weights' dtype (float32 or float64) and
        input_size, n_states states each [batch, hidden_size] of that dtype on the CPU, plain
        tensors, registered parameters. None otherwise: forward then takes the general path,
        which checks one by one and names what is wrong. train: FR._needs_grad's, as the general
        path's."""
        if not FR._plain_eager():
            return None
        p = self._parameters
        w_ih, w_hh, b_ih, b_hh = (p.get("weight_ih", _ABSENT), p.get("weight_hh", _ABSENT),
                                  p.get("bias_ih", _ABSENT), p.get("bias_hh", _ABSENT))
        if (input.__class__ is not Tensor or input.dim() != 2 or len(states) != n_states or w_ih is _ABSENT
                or w_hh is _ABSENT or b_ih is _ABSENT or b_hh is _ABSENT or w_ih is None or w_hh is None):
            return None
        dtype, hidden = input.dtype, self.hidden_size
        if (dtype not in FR._NATIVE_DTYPES or w_ih.dtype != dtype or not input.is_cpu or not w_ih.is_cpu
                or input.size(1) != self.input_size or hidden == 0):
            return None
        shape = (input.size(0), hidden)
        for s in states:
            if s.__class__ is not Tensor or s.dtype != dtype or not s.is_cpu or s.shape != shape:
                return None
        return (w_ih, w_hh, b_ih, b_hh), FR._needs_grad(input, w_ih, w_hh, b_ih, b_hh, *states)

    def _fused(self, x: Tensor) -> bool:
        # hidden_size=0 (empty states, as torch.nn returns) runs torch's implementation.
        return self.hidden_size > 0 and FR._has_kernel(x)

    def _prepare(self, input: Tensor, hx, n_states: int):
        name = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.dtype != self.weight_ih.dtype and not autocast_enabled(input.device.type):
            raise RuntimeError(f"{name}: input dtype ({input.dtype}) does not match weight dtype "  # (torch.nn's
                               f"({self.weight_ih.dtype})")  # class: its kernel raises)
        if input.device != self.weight_ih.device:
            raise RuntimeError(f"{name}: input and parameter tensors are not at the same device, found input tensor "
                               f"at {input.device} and parameter tensor at {self.weight_ih.device}")
        states = None if hx is None else ([hx] if n_states == 1 else list(hx))
        if states is not None and len(states) != n_states:
            raise RuntimeError(f"{name}: hx must be a tuple of {n_states} tensors (h_0, c_0), got {len(states)}")
        if states is not None:
            for idx, value in enumerate(states):
                if value.dim() not in (1, 2):
                    label = f"hx[{idx}]" if n_states == 2 else "hidden"
                    raise ValueError(f"{name}: Expected {label} to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if input.size(1) != self.input_size:
            raise RuntimeError(f"{name}: input has inconsistent input_size: got {input.size(1)} expected "
                               f"{self.input_size}")
        if states is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            states = [zeros] * n_states
        else:
            if not is_batched:
                states = [s.unsqueeze(0) for s in states]
            for idx, s in enumerate(states):
                if s.size(0) != input.size(0):
                    raise RuntimeError(f"{name}: Input batch size {input.size(0)} doesn't match hidden{idx} batch "
                                       f"size {s.size(0)}")
                if s.size(1) != self.hidden_size:
                    raise RuntimeError(f"{name}: hidden{idx} has inconsistent hidden_size: got {s.size(1)}, "
                                       f"expected {self.hidden_size}")
                # LSTMCell's c_0 is exempt: torch.nn promotes it (c' = f c + i g), see LSTMCell.forward.
                if idx == 0 and s.dtype != input.dtype and not autocast_enabled(input.device.type):
                    raise RuntimeError(f"{name}: hidden{idx} dtype ({s.dtype}) does not match input dtype "
                                       f"({input.dtype})")
        return input.unsqueeze(0), states, is_batched


class LSTMCell(_CellBase):
    r"""Drop-in for :class:`torch.nn.LSTMCell`.

    input [B, I] or [I]; hx = (h [B, H], c [B, H]) or unbatched, zeros when omitted.
    Returns (h' [B, H], c' [B, H]).
    """

    _torch_class = nn.LSTMCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    @fx_leaf
    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        fast = self._fast(input, hx, 2) if isinstance(hx, (tuple, list)) else None
        if fast is not None:
            (w_ih, w_hh, b_ih, b_hh), train = fast
            h, c = hx
            out = _run(_LSTM, train, input.unsqueeze(0), w_ih, w_hh, b_ih, b_hh, None, h, c, None, False, train)
            return out[1], out[2]
        x, (h, c), is_batched = self._prepare(input, hx, 2)
        # A c_0 of another dtype (float64 beside float32 input and h_0) is promoted by torch.nn,
        # which then returns states of the promoted dtype: its implementation runs such calls.
        if not self._fused(x) or c.dtype != x.dtype:
            h, c = torch._VF.lstm_cell(x[0], (h, c), self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        else:
            _, h, c = FR.lstm_layer(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


class GRUCell(_CellBase):
    r"""Drop-in for :class:`torch.nn.GRUCell`. input [B, I] or [I]; hx [B, H] or [H]. Returns h' [B, H]."""

    _torch_class = nn.GRUCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    @fx_leaf
    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        fast = self._fast(input, (hx,), 1)
        if fast is not None:
            (w_ih, w_hh, b_ih, b_hh), train = fast
            return _run(_GRU, train, input.unsqueeze(0), w_ih, w_hh, b_ih, b_hh, hx, None, False, train)[1]
        x, (h,), is_batched = self._prepare(input, hx, 1)
        if not self._fused(x):
            h = torch._VF.gru_cell(x[0], h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        else:
            _, h = FR.gru_layer(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h if is_batched else h.squeeze(0)


class RNNCell(_CellBase):
    r"""Drop-in for :class:`torch.nn.RNNCell` (tanh or relu). input [B, I] or [I]; hx [B, H] or [H].
    Returns h' [B, H]."""

    _torch_class = nn.RNNCell
    __constants__ = ["input_size", "hidden_size", "bias", "nonlinearity"]

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    @fx_leaf
    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        relu = self.nonlinearity == "relu"
        fast = self._fast(input, (hx,), 1) if relu or self.nonlinearity == "tanh" else None
        if fast is not None:
            (w_ih, w_hh, b_ih, b_hh), train = fast
            return _run(_RNN, train, input.unsqueeze(0), w_ih, w_hh, b_ih, b_hh, hx, None, False, relu)[1]
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        x, (h,), is_batched = self._prepare(input, hx, 1)
        if not self._fused(x):
            fn = torch._VF.rnn_tanh_cell if self.nonlinearity == "tanh" else torch._VF.rnn_relu_cell
            h = fn(x[0], h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        else:
            _, h = FR.rnn_layer(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                nonlinearity=self.nonlinearity)
        return h if is_batched else h.squeeze(0)
