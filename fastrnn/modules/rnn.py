"""Drop-in replacements for torch.nn.LSTM, GRU and RNN backed by fastrnn's fused kernels.

Same constructor arguments, parameter names, shapes, initialisation (same RNG draws in the
same order), state_dict, inputs (dense, batch_first, unbatched, PackedSequence), return values
and errors as torch.nn. They subclass nn.Module rather than the torch.nn classes: torch.compile
refuses anything that isinstance-checks as nn.LSTM/GRU/RNN, and these compile with fullgraph=True.
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.utils.rnn import PackedSequence

from .. import functional as FR
from ._compat import TorchNNTwin, autocast_enabled, fx_leaf

__all__ = ["LSTM", "GRU", "RNN"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_ABSENT = object()
# The fused stack op's default overload, called by the layers' fast path (_fast_states; an
# overload packet resolves the overload at every call).
_STACK = torch.ops.fastrnn.recurrent_stack.default
_RNN_MODES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


def _apply_permutation(tensor: Tensor, permutation: Tensor, dim: int = 1) -> Tensor:
    return tensor.index_select(dim, permutation)


class _RNNBase(TorchNNTwin, nn.Module):
    """Parameters, checks and input handling shared by LSTM, GRU and RNN (torch.nn.RNNBase's)."""

    _torch_class: type = nn.RNNBase
    __constants__ = list(nn.RNNBase.__constants__)

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", stacklevel=3)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):  # (a bool is an int to torch.nn too)
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):  # (a bool is an int to torch.nn too)
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if not isinstance(num_layers, int):  # (True is 1 to torch.nn: range(True))
            raise TypeError(f"num_layers should be of type int, got: {type(num_layers).__name__}")
        num_layers = int(num_layers)
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool):
            raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if mode not in _GATES:
            raise ValueError("Unrecognized RNN mode: " + mode)

        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        num_directions = 2 if bidirectional else 1
        gate_size = _GATES[mode] * hidden_size
        real_hidden_size = proj_size if proj_size > 0 else hidden_size

        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
                shapes = [(gate_size, layer_input_size), (gate_size, real_hidden_size)]
                names = ["weight_ih_l{}{}", "weight_hh_l{}{}"]
                if bias:
                    shapes += [(gate_size,), (gate_size,)]
                    names += ["bias_ih_l{}{}", "bias_hh_l{}{}"]
                if proj_size > 0:
                    shapes += [(proj_size, hidden_size)]
                    names += ["weight_hr_l{}{}"]
                suffix = "_reverse" if direction == 1 else ""
                names = [n.format(layer, suffix) for n in names]
                for name, shape in zip(names, shapes):
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self._init_flat_weights()
        self.reset_parameters()

    # ---------------------------------------------------------------- torch.nn API
    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    # ------------------------------------------ the weight cache forward reads (torch.nn's)
    # torch.nn.RNNBase's forward runs the weights in a list, _flat_weights, built by
    # _init_flat_weights, updated entry by entry when a weight attribute is assigned (__setattr__)
    # and rebuilt before a forward when a weight is no longer the tensor the list was built from
    # (_update_flat_weights: torch.func.functional_call, parametrizations, a re-registered
    # parameter). Scripts assign the list, or an entry of it, to run a forward on other weights
    # (recurrent DropConnect in a subclass); fastrnn keeps the same cache, so those work alike and
    # a parametrized weight is evaluated as often as torch.nn evaluates it (a spectral norm's power
    # iteration advances per evaluation).
    def _init_flat_weights(self) -> None:
        self._flat_weights = [getattr(self, wn) if hasattr(self, wn) else None for wn in self._flat_weights_names]
        self._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in self._flat_weights]

    def __setattr__(self, attr, value) -> None:
        d = self.__dict__
        if attr in d.get("_flat_weights_names", ()) and "_flat_weights" in d:
            idx = self._flat_weights_names.index(attr)
            if idx < len(self._flat_weights):
                self._flat_weights[idx] = value
        super().__setattr__(attr, value)

    def _weights_have_changed(self) -> bool:
        refs, names = self.__dict__.get("_flat_weight_refs"), self._flat_weights_names
        if refs is None or len(refs) != len(names):
            return True
        # Registered parameters straight from _parameters (getattr goes through
        # nn.Module.__getattr__, ~1 us a name); with any other weight (a parametrization,
        # weight_norm's recomputed attribute, a plain tensor), torch.nn's hasattr and getattr, as
        # often as it calls them (a parametrization runs at each).
        params = self._parameters
        plain = all(map(params.__contains__, names))
        for ref, name in zip(refs, names):
            w = params[name] if plain else getattr(self, name) if hasattr(self, name) else None
            if w is not None and ref is not None and ref() is not w:
                return True
        return False

    def _update_flat_weights(self) -> None:
        if self._weights_have_changed():
            self._init_flat_weights()

    def _weights(self) -> list:
        """The weights forward runs: _flat_weights, brought up to date as torch.nn's forward does.
        While compiling, read by name (dynamo does not trace through the weak references)."""
        if torch.compiler.is_compiling():
            return [self._weight_by_name(wn) for wn in self._flat_weights_names]
        self._update_flat_weights()
        return self._flat_weights

    def _weight_by_name(self, name: str):
        w = self._parameters.get(name, _ABSENT)
        return getattr(self, name, None) if w is _ABSENT else w

    def _apply(self, fn, recurse=True):
        self._flat_weight_refs = []
        ret = super()._apply(fn, recurse)
        self._init_flat_weights()
        return ret

    def __getstate__(self):
        self._update_flat_weights()
        state = self.__dict__.copy()
        state.pop("_flat_weight_refs", None)  # (weak references do not pickle)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._init_flat_weights()

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, weight) for weight in weights] for weights in self._all_weights]

    def flatten_parameters(self) -> None:
        """Does nothing: fastrnn's kernels read the parameters where they are (torch.nn compatibility)."""

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if getattr(self, "zoneout", 0.0):
            s += ", zoneout={zoneout}"
        if getattr(self, "weight_drop", 0.0):
            s += ", weight_drop={weight_drop}"
        return s.format(**self.__dict__)

    # ---------------------------------------------------------------- checks (torch.nn's)
    def _first_weight(self) -> Tensor:
        if torch.compiler.is_compiling():  # (as _weights)
            return self._weight_by_name(self._flat_weights_names[0])
        return self._flat_weights[0]

    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        w = self._first_weight()
        if input.dtype != w.dtype and not autocast_enabled(input.device.type):
            # (torch.nn's LSTM does not check a packed input: its kernel raises a RuntimeError)
            error = RuntimeError if batch_sizes is not None and self.mode == "LSTM" else ValueError
            raise error(f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). Convert "
                        f"input: input.to({w.dtype}), or convert model: model.to({input.dtype})")
        if input.device != w.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                               f"{input.device} and parameter tensor at {w.device}")
        expected_input_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_input_dim:
            raise RuntimeError(f"input must have {expected_input_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.size(-1)}")
        if batch_sizes is None and input.size(0 if not self.batch_first else 1) == 0:
            raise RuntimeError(f"{type(self).__name__}: input must have at least one time step "
                               f"(zero-length sequence), got input of shape {list(input.shape)}")

    def _mini_batch(self, input: Tensor, batch_sizes: Tensor | None) -> int:
        if batch_sizes is not None:
            return int(batch_sizes[0])
        return input.size(0) if self.batch_first else input.size(1)

    def get_expected_hidden_size(self, input: Tensor, batch_sizes: Tensor | None) -> tuple[int, int, int]:
        num_directions = 2 if self.bidirectional else 1
        size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (self.num_layers * num_directions, self._mini_batch(input, batch_sizes), size)

    def get_expected_cell_size(self, input: Tensor, batch_sizes: Tensor | None) -> tuple[int, int, int]:
        num_directions = 2 if self.bidirectional else 1
        return (self.num_layers * num_directions, self._mini_batch(input, batch_sizes), self.hidden_size)

    @staticmethod
    def check_hidden_size(hx: Tensor, expected_hidden_size, msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input: Tensor, hidden, batch_sizes: Tensor | None) -> None:
        """torch.nn.RNNBase's check of a forward call (hidden: h_0, or (h_0, c_0) for the LSTM)."""
        self.check_input(input, batch_sizes)
        if self.mode == "LSTM":
            self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                                   "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                                   "Expected hidden[1] size {}, got {}")
        else:
            self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))

    def permute_hidden(self, hx, permutation: Tensor | None):
        """hx (a tensor, or (h, c) for the LSTM) reordered along the batch, as torch.nn's."""
        if permutation is None:
            return hx
        if self.mode == "LSTM":
            return _apply_permutation(hx[0], permutation), _apply_permutation(hx[1], permutation)
        return _apply_permutation(hx, permutation)

    def _check_state_tensor(self, t: Tensor, name: str, input: Tensor) -> None:
        if t.dtype != input.dtype and not autocast_enabled(input.device.type):
            raise RuntimeError(f"{name} dtype ({t.dtype}) does not match input dtype ({input.dtype})")
        if t.device != input.device:
            raise RuntimeError(f"Input and {name} tensors are not at the same device, found input tensor at "
                               f"{input.device} and {name} tensor at {t.device}")

    # ---------------------------------------------------------------- forward
    def _prepare(self, input, hx, n_states):
        """Normalises input and hx as torch.nn does. Returns
        (data, batch_sizes, sorted_indices, unsorted_indices, states, is_batched)."""
        fast = self._prepare_common(input, hx, n_states)
        if fast is not None:
            return fast
        name = type(self).__name__
        num_directions = 2 if self.bidirectional else 1
        hx_given, one_tensor = hx, n_states == 2 and isinstance(hx, Tensor)  # ((h_0, c_0) as one: checked last)
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            is_batched = True
            if hx is not None:
                hx = [hx] if n_states == 1 else list(hx)
                hx = [h if sorted_indices is None else _apply_permutation(h, sorted_indices) for h in hx]
        else:
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            if not isinstance(input, Tensor):
                raise TypeError(f"{name}: input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                data = input.unsqueeze(batch_dim)
            if hx is not None:
                hx = [hx] if n_states == 1 else list(hx)
                if n_states == 2 and len(hx) != 2:
                    raise RuntimeError(f"{name}: hx must be a tuple (h_0, c_0), got {len(hx)} tensors")
                want = 3 if is_batched else 2
                if any(h.dim() != want for h in hx):
                    dims = ", ".join(f"{h.dim()}-D" for h in hx)
                    what = "hx and cx" if n_states == 2 else "hx"
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    raise RuntimeError(f"For {kind} input, {what} should also be {want}-D but got ({dims}) tensors")
                if not is_batched:
                    hx = [h.unsqueeze(1) for h in hx]
        self.check_input(data, batch_sizes)
        expected = [self.get_expected_hidden_size(data, batch_sizes)]
        if n_states == 2:
            expected.append(self.get_expected_cell_size(data, batch_sizes))
        if hx is None:
            hx = [torch.zeros(e, dtype=data.dtype, device=data.device) for e in expected]
        else:
            for k, (h, e) in enumerate(zip(hx, expected)):
                msg = f"Expected hidden[{k}] size {{}}, got {{}}" if n_states == 2 else "Expected hidden size {}, got {}"
                if batch_sizes is not None and torch.compiler.is_compiling() and h.dim() == len(e):
                    # A packed input's batch (batch_sizes[0]) has no value while torch.compile
                    # traces: comparing sizes with it would break the graph, so torch._check
                    # asserts them at run time (without torch.nn's message: dynamo cannot trace
                    # one that formats the sizes).
                    for have, want in zip(h.shape, e):
                        torch._check(have == want)
                else:
                    self.check_hidden_size(h, e, msg)
                if k == 1 and self._promotes_c0(h, data, batch_sizes):
                    hx[1] = h = h.to(data.dtype)
                self._check_state_tensor(h, "hx" if k == 0 else "cx", data)
        if one_tensor and is_batched:
            # torch.nn indexes it as (h_0, c_0) for its checks (so their errors come first),
            # then its _VF.lstm refuses a tensor for the pair with a TypeError; list(hx) would
            # have split it. (Unbatched, torch.nn takes one.)
            raise TypeError(f"{name}: hx must be a tuple (h_0, c_0) for batched input, got a Tensor of shape "
                            f"{list(hx_given.shape)}")
        return data, batch_sizes, sorted_indices, unsorted_indices, hx, is_batched

    def _promotes_c0(self, c0, data, batch_sizes) -> bool:
        """Whether torch.nn's LSTM takes this c_0 of another dtype: outside its oneDNN path (used
        for a dense float32/bfloat16/float16 input without projection) it computes c' = f c + i g
        with c_0 promoted, so any c_0 whose dtype promotes to the input's (a lower-precision float,
        an integer or bool c_0) gives states in the input's dtype, with the values torch.nn's
        promotion gives."""
        if c0.dtype == data.dtype or torch.promote_types(c0.dtype, data.dtype) != data.dtype:
            return False
        onednn = data.dtype != torch.float64 and batch_sizes is None and self.proj_size == 0
        return not onednn

    def _prepare_common(self, input, hx, n_states):
        """_prepare's result for the common call, a batched dense input of the weights' dtype and
        device with states of the expected shapes, dtype and device (or none), in one pass of
        cheap tests (_common_states); None where any test fails, and the general path then checks
        one by one and names what is wrong."""
        if not isinstance(input, Tensor) or input.dim() != 3:
            return None
        states = self._common_states(input, hx, n_states, self._first_weight())
        return None if states is None else (input, None, None, None, states, True)

    def _fast_states(self, input, hx, n_states, weights):
        """The fast path's initial states (a list of n_states), for one call of the fused stack op
        (fastrnn::recurrent_stack) with nothing else done in Python (a step-at-a-time caller pays
        the general path's checks every call): a plain eager call (FR._plain_eager), no zoneout
        or weight_drop, a batched dense CPU input (a plain tensor) of float32 or float64, and
        what _common_states tests. None otherwise: forward takes the general path (_prepare,
        then the functional form, which route the other calls)."""
        if not FR._plain_eager() or input.__class__ is not Tensor or input.dim() != 3 or _variant_active(self):
            return None
        w = weights[0]
        if w is None or input.dtype not in FR._NATIVE_DTYPES or not input.is_cpu:
            return None
        return self._common_states(input, hx, n_states, w)

    def _common_states(self, input, hx, n_states, w):
        """The initial states (a list; zeros if hx is None) where the 3-D input has w's dtype and
        device, input_size features and at least one step, and the states have the expected
        shapes, dtype and device; else None."""
        dtype, device = input.dtype, input.device
        if dtype != w.dtype or device != w.device:
            return None
        T, B, I = input.shape
        if self.batch_first:
            T, B = B, T
        if I != self.input_size or T == 0:
            return None
        LD = self.num_layers * (2 if self.bidirectional else 1)
        shapes = ((LD, B, self.proj_size if self.proj_size > 0 else self.hidden_size), (LD, B, self.hidden_size))
        if hx is None:
            return [torch.zeros(shapes[k], dtype=dtype, device=device) for k in range(n_states)]
        states = [hx] if n_states == 1 else hx
        if n_states == 2 and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            return None
        for h, shape in zip(states, shapes):
            if not isinstance(h, Tensor) or h.shape != shape or h.dtype != dtype or h.device != device:
                return None
        return list(states)

    def _finish(self, output, states, batch_sizes, sorted_indices, unsorted_indices, is_batched):
        if batch_sizes is not None:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                states = [_apply_permutation(s, unsorted_indices) for s in states]
        elif not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            states = [s.squeeze(1) for s in states]
        return output, states

    # ---------------------------------------------------------------- conversion
    _fastrnn_only = ("zoneout", "weight_drop")

    def to_torch(self) -> nn.Module:
        if getattr(self, "zoneout", 0.0) or getattr(self, "weight_drop", 0.0):
            warnings.warn(f"{type(self).__name__}.to_torch(): torch.nn has no zoneout or weight_drop; the torch.nn "
                          "layer computes without them", stacklevel=2)
        return super().to_torch()


def _set_variant_options(module, zoneout, weight_drop):
    """fastrnn.LSTM/GRU's keyword-only extras (SEMANTICS.md, "Variants"): zoneout and recurrent
    DropConnect on W_hh, both 0 by default (then the layer is exactly the torch.nn drop-in). They
    are plain attributes, not parameters: the state_dict is unchanged."""
    module.zoneout = FR.check_probability("zoneout", zoneout)
    module.weight_drop = FR.check_probability("weight_drop", weight_drop)
    if module.zoneout > 0 and getattr(module, "proj_size", 0) > 0:
        raise ValueError(f"zoneout is not supported with proj_size > 0, got zoneout={zoneout} and "
                         f"proj_size={module.proj_size}")


def _variant_active(module) -> bool:
    # getattr: layers made by from_torch() skip __init__ and have neither attribute.
    return getattr(module, "zoneout", 0.0) > 0 or (getattr(module, "weight_drop", 0.0) > 0 and module.training)


class LSTM(_RNNBase):
    r"""Drop-in for :class:`torch.nn.LSTM`, running fastrnn's fused LSTM kernels.

    Args: as torch.nn.LSTM: input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None.

    Inputs: input, (h_0, c_0)
      - input: [T, B, I] ([B, T, I] if batch_first), unbatched [T, I], or a PackedSequence
      - h_0: [D*L, B, P] (unbatched [D*L, P]), c_0: [D*L, B, H]; zeros when omitted
    Outputs: output, (h_n, c_n)
      - output: [T, B, D*P] ([B, T, D*P] if batch_first; PackedSequence for packed input)
      - h_n: [D*L, B, P], c_n: [D*L, B, H]
    with D = 2 if bidirectional else 1, L = num_layers, P = proj_size or hidden_size.
    """

    _torch_class = nn.LSTM

    def __init__(self, *args, zoneout: float = 0.0, weight_drop: float = 0.0, **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        _set_variant_options(self, zoneout, weight_drop)

    @fx_leaf
    def forward(self, input, hx=None):
        weights = self._weights()  # (first, as torch.nn's _update_flat_weights)
        fast = self._fast_states(input, hx, 2, weights)
        if fast is not None:
            out, h, c = _STACK("LSTM", input, fast[0], fast[1], weights, self.bias, self.num_layers, self.dropout,
                               self.training, self.bidirectional, self.batch_first, None)
            return out, (h, c)
        data, batch_sizes, sidx, uidx, (h0, c0), is_batched = self._prepare(input, hx, 2)
        if _variant_active(self):
            out, h, c = FR.variant_lstm(data, (h0, c0), weights, self.bias, self.num_layers, self.dropout,
                                        self.training, self.bidirectional, self.batch_first, batch_sizes,
                                        zoneout=self.zoneout, weight_drop=self.weight_drop)
        else:
            out, h, c = FR.lstm(data, (h0, c0), weights, self.bias, self.num_layers, self.dropout,
                                self.training, self.bidirectional, self.batch_first, batch_sizes)
        output, (h, c) = self._finish(out, [h, c], batch_sizes, sidx, uidx, is_batched)
        return output, (h, c)


class GRU(_RNNBase):
    r"""Drop-in for :class:`torch.nn.GRU`, running fastrnn's fused GRU kernels.

    Args: input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, device=None, dtype=None.
    Inputs: input ([T, B, I], [B, T, I], [T, I] or PackedSequence), h_0 [D*L, B, H] (optional).
    Outputs: output [T, B, D*H] (or PackedSequence), h_n [D*L, B, H].
    """

    _torch_class = nn.GRU

    def __init__(self, *args, zoneout: float = 0.0, weight_drop: float = 0.0, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)
        _set_variant_options(self, zoneout, weight_drop)

    @fx_leaf
    def forward(self, input, hx=None):
        weights = self._weights()  # (first, as torch.nn's _update_flat_weights)
        fast = self._fast_states(input, hx, 1, weights)
        if fast is not None:
            out, h, _ = _STACK("GRU", input, fast[0], None, weights, self.bias, self.num_layers, self.dropout,
                               self.training, self.bidirectional, self.batch_first, None)
            return out, h
        data, batch_sizes, sidx, uidx, (h0,), is_batched = self._prepare(input, hx, 1)
        if _variant_active(self):
            out, h = FR.variant_gru(data, h0, weights, self.bias, self.num_layers, self.dropout,
                                    self.training, self.bidirectional, self.batch_first, batch_sizes,
                                    zoneout=self.zoneout, weight_drop=self.weight_drop)
        else:
            out, h = FR.gru(data, h0, weights, self.bias, self.num_layers, self.dropout, self.training,
                            self.bidirectional, self.batch_first, batch_sizes)
        output, (h,) = self._finish(out, [h], batch_sizes, sidx, uidx, is_batched)
        return output, h


class RNN(_RNNBase):
    r"""Drop-in for :class:`torch.nn.RNN` (Elman, tanh or relu), running fastrnn's fused kernels.

    Args: input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, device=None, dtype=None.
    Inputs and outputs as :class:`fastrnn.GRU`.
    """

    _torch_class = nn.RNN

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        nonlinearity = self.nonlinearity
        super().__init__(mode, *args, **kwargs)
        self.nonlinearity = nonlinearity

    @fx_leaf
    def forward(self, input, hx=None):
        weights = self._weights()  # (first, as torch.nn's _update_flat_weights)
        # (As the general path: FR.rnn's nonlinearity, which raises for anything else.)
        mode = _RNN_MODES.get(self.nonlinearity) if isinstance(self.nonlinearity, str) else None
        fast = self._fast_states(input, hx, 1, weights) if mode is not None else None
        if fast is not None:
            out, h, _ = _STACK(mode, input, fast[0], None, weights, self.bias, self.num_layers, self.dropout,
                               self.training, self.bidirectional, self.batch_first, None)
            return out, h
        data, batch_sizes, sidx, uidx, (h0,), is_batched = self._prepare(input, hx, 1)
        out, h = FR.rnn(data, h0, weights, self.bias, self.num_layers, self.dropout, self.training,
                        self.bidirectional, self.batch_first, batch_sizes, nonlinearity=self.nonlinearity)
        output, (h,) = self._finish(out, [h], batch_sizes, sidx, uidx, is_batched)
        return output, h
