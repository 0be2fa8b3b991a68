"""Bad input gets a clear exception naming the argument, matching torch.nn's error type."""
import pytest
import torch
from torch import nn

import fastrnn

F64 = torch.float64


def both(kind, *args, **kw):
    tcls = getattr(nn, kind)
    fcls = getattr(fastrnn, kind)
    return tcls(*args, **kw), fcls(*args, **kw)


def same_error(ref, ours, *call_args, match=None):
    """Both raise; ours raises the same exception type, with a message matching `match`."""
    with pytest.raises(Exception) as r:
        ref(*call_args)
    with pytest.raises(type(r.value), match=match):
        ours(*call_args)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_wrong_input_rank(kind):
    ref, ours = both(kind, 3, 4)
    same_error(ref, ours, torch.randn(2, 3, 4, 3), match="Expected input to be 2D or 3D, got 4D")
    same_error(ref, ours, torch.randn(3), match="Expected input to be 2D or 3D, got 1D")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_wrong_feature_size(kind):
    ref, ours = both(kind, 3, 4)
    same_error(ref, ours, torch.randn(5, 2, 7), match="input_size. Expected 3, got 7")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_dtype_mismatch(kind):
    ref, ours = both(kind, 3, 4)
    same_error(ref, ours, torch.randn(5, 2, 3, dtype=F64), match="input dtype .* does not match weight dtype")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_zero_length_sequence(kind):
    ref, ours = both(kind, 3, 4)
    same_error(ref, ours, torch.randn(0, 2, 3), match="zero-length")


def test_hx_errors_lstm():
    ref, ours = both("LSTM", 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    good_h, good_c = torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)
    same_error(ref, ours, x, (torch.zeros(2, 3, 4), good_c), match=r"Expected hidden\[0\] size \(2, 2, 4\), got \[2, 3, 4\]")
    same_error(ref, ours, x, (good_h, torch.zeros(1, 2, 4)), match=r"Expected hidden\[1\] size")
    same_error(ref, ours, x, (torch.zeros(2, 4), good_c), match="should also be 3-D")
    same_error(ref, ours, x, (good_h, good_c.double()), match="dtype")


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_hx_errors_gru_rnn(kind):
    ref, ours = both(kind, 3, 4)
    x = torch.randn(5, 2, 3)
    same_error(ref, ours, x, torch.zeros(1, 3, 4), match=r"Expected hidden size \(1, 2, 4\), got \[1, 3, 4\]")
    same_error(ref, ours, x, torch.zeros(1, 2, 5), match="Expected hidden size")
    same_error(ref, ours, x, torch.zeros(2, 4), match="should also be 3-D")
    same_error(ref, ours, torch.randn(5, 3), torch.zeros(1, 1, 4), match="should also be 2-D")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("kwargs,exc", [
    (dict(dropout=1.5), ValueError), (dict(dropout=True), ValueError), (dict(num_layers=0), ValueError),
    (dict(bias="yes"), TypeError), (dict(batch_first=1), TypeError),
])
def test_bad_constructor_arguments(kind, kwargs, exc):
    with pytest.raises(exc):
        getattr(nn, kind)(3, 4, **kwargs)
    with pytest.raises(exc):
        getattr(fastrnn, kind)(3, 4, **kwargs)


def test_bad_sizes_and_proj():
    for args, kw in [((0, 4), {}), ((3, 0), {}), ((3, 4), dict(proj_size=4)), ((3, 4), dict(proj_size=-1))]:
        with pytest.raises(ValueError):
            nn.LSTM(*args, **kw)
        with pytest.raises(ValueError):
            fastrnn.LSTM(*args, **kw)
    with pytest.raises(TypeError):
        fastrnn.LSTM(3.0, 4)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        fastrnn.GRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        fastrnn.RNN(3, 4, nonlinearity="gelu")


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_errors(kind):
    ref, ours = both(kind, 3, 4)
    same_error(ref, ours, torch.randn(2, 2, 3), match="Expected input to be 1D or 2D")
    same_error(ref, ours, torch.randn(2, 5), match="input_size")
    hx = torch.zeros(3, 4)
    if kind == "LSTMCell":
        hx = (hx, hx)
    same_error(ref, ours, torch.randn(2, 3), hx, match="batch size")


def test_lstm_state_tuple_length():
    ref, ours = both("LSTMCell", 3, 4)
    same_error(ref, ours, torch.randn(2, 3), (torch.zeros(2, 4),), match="tuple of 2 tensors")
    with pytest.raises(RuntimeError, match="tuple \\(h_0, c_0\\)"):
        fastrnn.LSTM(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),))


# ------------------------------------------------------------------ raw ops: checks before memory
def lstm_args(T=4, B=2, I=3, H=5, dtype=torch.float32):
    return dict(input=torch.randn(T, B, I, dtype=dtype), w_ih=torch.randn(4 * H, I, dtype=dtype),
                w_hh=torch.randn(4 * H, H, dtype=dtype), b_ih=torch.randn(4 * H, dtype=dtype),
                b_hh=torch.randn(4 * H, dtype=dtype), w_hr=None, hx=torch.zeros(B, H, dtype=dtype),
                cx=torch.zeros(B, H, dtype=dtype), batch_sizes=None, reverse=False, train=False)


BAD_LSTM_CALLS = [
    ("input", dict(input=torch.randn(4, 3)), "input must be 3-D"),
    ("input", dict(input=torch.randn(0, 2, 3)), "zero-length"),
    ("input", dict(input=torch.randn(4, 2, 7)), "w_ih must have shape"),
    ("w_ih", dict(w_ih=torch.randn(19, 3)), "w_ih must have shape"),
    ("w_hh", dict(w_hh=torch.randn(20, 4)), "w_hh must have shape"),
    ("w_hh", dict(w_hh=torch.randn(20)), "w_hh must be 2-D"),
    ("b_ih", dict(b_ih=torch.randn(19)), "b_ih must have shape"),
    ("b_hh", dict(b_hh=None), "b_ih and b_hh must be given together"),
    ("hx", dict(hx=torch.zeros(3, 5)), "hx must have shape"),
    ("cx", dict(cx=torch.zeros(2, 4)), "cx must have shape"),
    ("hx", dict(hx=torch.zeros(2, 5, dtype=F64)), "hx and input must have the same dtype"),
    ("w_ih", dict(w_ih=torch.randn(20, 3, dtype=F64)), "w_ih and input must have the same dtype"),
    ("input", dict(input=torch.randint(0, 3, (4, 2, 3))), "float32, float64 or bfloat16"),
    ("w_hr", dict(w_hr=torch.randn(7, 5)), "proj_size"),
    ("batch_sizes", dict(input=torch.randn(6, 3), batch_sizes=torch.tensor([2, 3, 1])), "non-increasing"),
    ("batch_sizes", dict(input=torch.randn(6, 3), batch_sizes=torch.tensor([2, 2, 1])), "sum\\(batch_sizes\\)"),
    ("batch_sizes", dict(input=torch.randn(6, 3), batch_sizes=torch.tensor([2., 2., 2.])), "int64"),
    ("batch_sizes", dict(input=torch.randn(6, 3), batch_sizes=torch.tensor([3, 3])), "hx must have shape"),
    ("batch_sizes", dict(input=torch.randn(0, 3), batch_sizes=torch.tensor([], dtype=torch.long)), "zero-length"),
    ("batch_sizes", dict(input=torch.randn(2, 3), batch_sizes=torch.tensor([2, 0])), "positive"),
]


@pytest.mark.parametrize("arg,change,match", BAD_LSTM_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_LSTM_CALLS)])
def test_lstm_op_rejects_bad_arguments(arg, change, match):
    a = lstm_args()
    a.update(change)
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.fastrnn.lstm_forward(*a.values())


def test_gru_rnn_ops_reject_bad_arguments():
    x, hx = torch.randn(4, 2, 3), torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="w_ih must have shape"):
        torch.ops.fastrnn.gru_forward(x, torch.randn(14, 3), torch.randn(15, 5), None, None, hx, None, False, False)
    with pytest.raises(RuntimeError, match="w_hh must have shape"):
        torch.ops.fastrnn.rnn_forward(x, torch.randn(5, 3), torch.randn(5, 4), None, None, hx, None, False, False)


def test_backward_op_checks_workspace_shapes():
    a = lstm_args()
    out, hy, cy, gates, cells, pin = torch.ops.fastrnn.lstm_forward(*{**a, "train": True}.values())
    with pytest.raises(RuntimeError, match="gates must have shape"):
        torch.ops.fastrnn.lstm_backward(out, hy, cy, a["input"], a["w_ih"], a["w_hh"], None, a["hx"], a["cx"], None,
                                        False, out, gates.reshape(4, -1), cells, pin)
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        torch.ops.fastrnn.lstm_backward(out[:2], hy, cy, a["input"], a["w_ih"], a["w_hh"], None, a["hx"], a["cx"],
                                        None, False, out, gates, cells, pin)


def test_device_mismatch_is_an_error():
    m = fastrnn.LSTM(3, 4)
    x = torch.randn(5, 2, 3, device="meta")
    with pytest.raises(RuntimeError, match="not at the same device"):
        m(x)
    with pytest.raises(RuntimeError, match="same device|must be a CPU tensor"):
        torch.ops.fastrnn.rnn_forward(torch.randn(2, 1, 3), torch.randn(4, 3), torch.randn(4, 4), None, None,
                                      torch.zeros(1, 4, device="meta"), None, False, False)


def test_stacked_functions_reject_malformed_states():
    # fastrnn.functional.lstm/gru/rnn (torch._VF's arguments): states of the wrong rank or layer
    # count, or an LSTM hx that is not a pair, are named before any kernel runs.
    from fastrnn import functional as FR
    m = nn.LSTM(4, 5, num_layers=2)
    ps = [p.detach() for p in m._flat_weights]
    x = torch.randn(3, 2, 4)
    h = torch.zeros(2, 2, 5)
    with pytest.raises(RuntimeError, match="hx must be a pair"):
        FR.lstm(x, (h,), ps, True, 2, 0.0, False, False, False)
    for bad in (torch.zeros(5), torch.zeros(1, 2, 5), torch.zeros(2, 5)):
        with pytest.raises(RuntimeError, match=r"cx: expected initial states of shape \[num_layers"):
            FR.lstm(x, (h, bad), ps, True, 2, 0.0, False, False, False)
        with pytest.raises(RuntimeError, match=r"hx: expected initial states of shape \[num_layers"):
            FR.lstm(x, (bad, h), ps, True, 2, 0.0, False, False, False)
    g = nn.GRU(4, 5)
    with pytest.raises(RuntimeError, match=r"hx: expected initial states"):
        FR.gru(x, torch.zeros(2, 5), [p.detach() for p in g._flat_weights], True, 1, 0.0, False, False, False)


def test_stack_names_the_layer_and_checks_every_parameter_first():
    """fastrnn::recurrent_stack checks every parameter's dtype, device and rank before any layer
    runs, and a size error a layer op raises names the layer and its slice of params."""
    from fastrnn import functional as FR
    m = fastrnn.LSTM(4, 6, num_layers=3, bidirectional=True)
    x, st = torch.randn(5, 2, 4), (torch.zeros(6, 2, 6), torch.zeros(6, 2, 6))
    for bad, err, pattern in ((torch.randn(24, 6).double(), ValueError, r"params\[17\] and input must have the same dtype"),
                              (torch.randn(24), RuntimeError, r"params\[17\] \(a weight of layer 2\) must be 2-D"),
                              (torch.randn(24, 7), RuntimeError, r"w_hh must have shape .* in layer 2 \(params\[16:24\]")):
        ps = list(m._flat_weights)
        ps[17] = bad
        with pytest.raises(err, match=pattern):
            FR.lstm(x, st, ps, True, 3, 0.0, False, True, False)


@pytest.mark.parametrize("op", ["lstm_forward", "gru_forward", "rnn_forward"])
def test_huge_expanded_input_fails_before_allocating(op):
    # The size limit is checked before the per-step schedule is built: an expanded input of 2^40
    # steps used to reach the allocator (std::bad_alloc), one of 2^28 x 8 allocated 4 GB first.
    G = {"lstm_forward": 4, "gru_forward": 3, "rnn_forward": 1}[op]
    w_ih, w_hh = torch.zeros(G * 2, 5), torch.zeros(G * 2, 2)
    fn = getattr(torch.ops.fastrnn, op)

    def call(x, batch_sizes=None, B=1):
        h = torch.zeros(B, 2)
        if op == "lstm_forward":
            return fn(x, w_ih, w_hh, None, None, None, h, h, batch_sizes, False, False)
        return fn(x, w_ih, w_hh, None, None, h, batch_sizes, False, False)  # (GRU: train; RNN: relu)

    with pytest.raises(RuntimeError, match=r"sizes beyond 2\^31 are not supported, got input of shape \[1099511627776, 1, 5\]"):
        call(torch.zeros(1, 1, 5).expand(2 ** 40, 1, 5))
    with pytest.raises(RuntimeError, match=r"sizes beyond 2\^31 are not supported"):
        call(torch.zeros(1, 1, 5).expand(2 ** 28, 8, 5), B=8)
    # packed: 2^40 rows, or batch_sizes of 2^40 steps (expanded) for 3 rows
    with pytest.raises(RuntimeError, match=r"sizes beyond 2\^31 are not supported, got a packed input"):
        call(torch.zeros(1, 5).expand(2 ** 40, 5), torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"3 rows and 1099511627776 steps in batch_sizes"):
        call(torch.zeros(3, 5), torch.ones(1, dtype=torch.int64).expand(2 ** 40))
