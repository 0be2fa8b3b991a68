"""fastrnn.models: shapes, gradients, learning a tiny task, padding, torch.nn equivalence, compile."""
import copy

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn import models as M
from conftest import assert_close


def _tokens(*shape, vocab=11):
    return torch.randint(0, vocab, shape)


# name -> (constructor, inputs, expected output shape); small sizes, dropout off (deterministic).
CASES = {
    "cnnrnn": (lambda: M.CNNRNN(3, 5, conv_channels=(8, 6), hidden_size=12),
               lambda: (torch.randn(4, 10, 3),), (4, 5)),
    "cnnrnn_mean_uni": (lambda: M.CNNRNN(3, 2, conv_channels=(8,), hidden_size=12, num_layers=2, bidirectional=False,
                                         pool="mean"),
                        lambda: (torch.randn(4, 10, 3), torch.tensor([10, 3, 7, 1])), (4, 2)),
    "frame_cnn_lstm": (lambda: M.FrameCNNLSTM(1, 10, channels=(4, 8), hidden_size=12),
                       lambda: (torch.randn(2, 5, 1, 12, 12),), (2, 10)),
    "frame_cnn_lstm_bi_mean": (lambda: M.FrameCNNLSTM(3, 4, channels=(4,), hidden_size=12, bidirectional=True,
                                                      pool="mean", global_pool="max"),
                               lambda: (torch.randn(2, 3, 3, 8, 10),), (2, 4)),
    "lstm_attention": (lambda: M.LSTMAttentionClassifier(3, 4, hidden_size=12, attention_size=8),
                       lambda: (torch.randn(4, 10, 3), torch.tensor([10, 3, 7, 1])), (4, 4)),
    "lstm_attention_tokens": (lambda: M.LSTMAttentionClassifier(6, 3, hidden_size=12, num_layers=2,
                                                                bidirectional=False, vocab_size=11),
                              lambda: (_tokens(3, 7),), (3, 3)),
    "lstm_transformer": (lambda: M.LSTMTransformer(3, 7, hidden_size=8, d_model=16, nhead=2, dropout=0.0),
                         lambda: (torch.randn(2, 9, 3),), (2, 9, 7)),
    "lstm_transformer_causal_tokens": (lambda: M.LSTMTransformer(6, 11, hidden_size=16, nhead=2, dropout=0.0,
                                                                 causal=True, vocab_size=11, norm_first=False),
                                       lambda: (_tokens(2, 9),), (2, 9, 11)),
    "lstm_transformer_pool": (lambda: M.LSTMTransformer(3, 5, hidden_size=8, bidirectional=True, nhead=2,
                                                        dropout=0.0, pool="last"),
                              lambda: (torch.randn(3, 9, 3), torch.tensor([9, 4, 6])), (3, 5)),
    "seq2seq": (lambda: M.Seq2SeqAttention(11, 13, embed_size=8, hidden_size=12, attention_size=10),
                lambda: (_tokens(3, 6), _tokens(3, 5, vocab=13), torch.tensor([6, 2, 4])), (3, 5, 13)),
    "seq2seq_feed_context": (lambda: M.Seq2SeqAttention(11, 13, embed_size=8, hidden_size=12, num_layers=2,
                                                        bidirectional=False, feed_context=True),
                             lambda: (_tokens(3, 6), _tokens(3, 5, vocab=13)), (3, 5, 13)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_shapes_and_finite_gradients_on_every_parameter(name):
    torch.manual_seed(0)
    make, inputs, shape = CASES[name]
    model = make()
    out = model(*inputs())
    assert out.shape == shape
    assert torch.isfinite(out).all()
    (out.float() ** 2).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_recurrent_layers_are_fastrnn_and_to_torch_gives_the_same_model(name):
    """Every LSTM in a model is fastrnn's; to_torch swaps them for nn.LSTM with the same outputs."""
    torch.manual_seed(0)
    make, inputs, _ = CASES[name]
    model = make().eval()
    lstms = [m for m in model.modules() if isinstance(m, fastrnn.LSTM)]
    assert lstms
    x = inputs()
    out = model(*x)
    ref = fastrnn.to_torch(copy.deepcopy(model))
    assert not any(isinstance(m, fastrnn.LSTM) for m in ref.modules())
    assert sum(type(m) is nn.LSTM for m in ref.modules()) == len(lstms)
    assert_close(ref(*x), out)


def test_padding_is_ignored():
    """A sequence padded inside a batch gives the output it gives alone (eval mode)."""
    torch.manual_seed(0)
    lengths = torch.tensor([9, 4, 6])
    x = torch.randn(3, 9, 3)
    x_noisy = x.clone()
    for i, n in enumerate(lengths):
        x_noisy[i, n:] = 100.0  # garbage in the padding must not leak in
    for model in (M.CNNRNN(3, 4, conv_channels=(8, 8), hidden_size=12, pool="mean"),
                  M.CNNRNN(3, 4, conv_channels=(8,), hidden_size=12),
                  M.LSTMAttentionClassifier(3, 4, hidden_size=12),
                  M.LSTMTransformer(3, 4, hidden_size=8, nhead=2, bidirectional=True, pool="mean"),
                  M.LSTMTransformer(3, 4, hidden_size=8, nhead=2, pool="last")):
        model.eval()
        batch = model(x_noisy, lengths)
        for i, n in enumerate(lengths):
            alone = model(x[i:i + 1, :n], lengths[i:i + 1])
            assert_close(batch[i:i + 1], alone, msg=type(model).__name__)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="odd"):
        M.CNNRNN(3, 2, kernel_size=4)
    with pytest.raises(ValueError, match="global_pool"):
        M.FrameCNNLSTM(1, 2, global_pool="median")
    with pytest.raises(ValueError, match="pool must be 'last' or 'mean', got 'first'"):
        M.CNNRNN(3, 2, pool="first")  # at construction, as LSTMTransformer (once only at the first call)
    with pytest.raises(ValueError, match="pool"):
        M.LSTMTransformer(3, 2, pool="first")
    with pytest.raises(ValueError, match="pool must be 'last' or 'mean', got 'first'"):
        M.FrameCNNLSTM(1, 2, pool="first")
    with pytest.raises(ValueError, match="attention_size must be a positive int, got 0"):
        M.LSTMAttentionClassifier(3, 2, attention_size=0)  # (once a ZeroDivisionError)
    for make in (M.CNNRNN, M.LSTMAttentionClassifier, M.FrameCNNLSTM):
        # nn.Dropout takes a NaN and fails only at a training forward
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got nan"):
            make(3, 2, dropout=float("nan"))


def test_attention_weights_are_a_distribution_over_valid_steps():
    torch.manual_seed(0)
    model = M.LSTMAttentionClassifier(3, 4, hidden_size=12)
    lengths = torch.tensor([10, 3, 7])
    _, w = model(torch.randn(3, 10, 3), lengths, return_attention=True)
    assert w.shape == (3, 10)
    assert_close(w.sum(-1), torch.ones(3))
    assert (w[~M.lengths_to_mask(lengths, 10)] == 0).all()


def test_causal_lstm_transformer_does_not_look_ahead():
    torch.manual_seed(0)
    model = M.LSTMTransformer(3, 5, hidden_size=8, nhead=2, causal=True, dropout=0.0).eval()
    x = torch.randn(2, 8, 3)
    y = x.clone()
    y[:, 5:] = torch.randn(2, 3, 3)
    assert_close(model(y)[:, :5], model(x)[:, :5])
    assert not torch.allclose(model(y)[:, 5:], model(x)[:, 5:])
    with pytest.raises(ValueError):
        M.LSTMTransformer(3, 5, bidirectional=True, causal=True)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch_nn(norm_first):
    """Same state_dict keys as nn.TransformerEncoderLayer; same outputs with both kinds of mask."""
    torch.manual_seed(0)
    ours = M.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=norm_first, activation="gelu").eval()
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=norm_first, activation="gelu",
                                     batch_first=True).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 7, 16)
    pad = ~M.lengths_to_mask(torch.tensor([7, 2, 5]), 7)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    assert_close(ours(x), ref(x))
    assert_close(ours(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad))
    assert_close(ours(x, src_mask=causal, is_causal=True), ref(x, src_mask=causal, is_causal=True))


@pytest.mark.parametrize("feed_context", [False, True])
def test_greedy_decode_matches_teacher_forcing_on_its_own_output(feed_context):
    torch.manual_seed(0)
    model = M.Seq2SeqAttention(11, 13, embed_size=8, hidden_size=12, num_layers=2,
                               feed_context=feed_context).eval()
    src, lengths, bos = _tokens(4, 6), torch.tensor([6, 2, 4, 5]), 1
    tokens, logits = model.greedy_decode(src, bos, 7, lengths, return_logits=True)
    assert tokens.shape == (4, 7) and logits.shape == (4, 7, 13)
    assert (tokens == logits.argmax(-1)).all()
    tgt_in = torch.cat([torch.full((4, 1), bos), tokens[:, :-1]], dim=1)
    assert_close(model(src, tgt_in, lengths), logits)


@pytest.mark.parametrize("feed_context", [False, True])
def test_greedy_decode_of_no_steps_and_an_empty_target(feed_context):
    """max_len=0 decodes nothing: empty tokens [B, 0] and logits [B, 0, V] (it once raised from
    torch.stack); a negative max_len and, with feed_context, an empty target are errors that say
    so (without feed_context the decoder LSTM refuses T = 0 itself)."""
    model = M.Seq2SeqAttention(11, 13, embed_size=8, hidden_size=12, feed_context=feed_context).eval()
    src = _tokens(4, 6)
    tokens, logits = model.greedy_decode(src, 1, 0, return_logits=True)
    assert tokens.shape == (4, 0) and tokens.dtype == torch.long and logits.shape == (4, 0, 13)
    assert model.greedy_decode(src, 1, 0, eos=2).shape == (4, 0)
    with pytest.raises(ValueError, match="max_len must be a non-negative int"):
        model.greedy_decode(src, 1, -1)
    with pytest.raises(RuntimeError, match="at least one time step"):
        model(src, torch.zeros(4, 0, dtype=torch.long))


def test_greedy_decode_keeps_emitting_eos():
    torch.manual_seed(0)
    model = M.Seq2SeqAttention(11, 13, embed_size=8, hidden_size=12).eval()
    src = _tokens(5, 6)
    free = model.greedy_decode(src, 1, 6)
    eos = int(free[0, 1])  # a token the model does emit
    tokens = model.greedy_decode(src, 1, 6, eos=eos)
    for row in tokens:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == eos).all()
    assert (tokens[0, 1:] == eos).all()


# ---- learning tiny synthetic tasks (fixed seeds; each a few seconds) -------------------------

def _train(model, batch, loss_fn, steps, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        inputs, target = batch(step)
        loss = loss_fn(model(*inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _accuracy(logits, target):
    return (logits.argmax(-1) == target).float().mean().item()


def test_cnnrnn_learns_sign_of_a_windowed_sum():
    torch.manual_seed(0)
    model = M.CNNRNN(2, 2, conv_channels=(16,), hidden_size=16)

    def batch(step):
        x = torch.randn(64, 16, 2)
        return (x,), (x[:, 4:12, 0].sum(1) > 0).long()

    ce = nn.functional.cross_entropy
    losses = _train(model, batch, ce, 80)
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    (x,), y = batch(0)
    assert _accuracy(model(x), y) > 0.85


def test_frame_cnn_lstm_learns_direction_of_motion():
    """A bright dot moves left or right across the frames: only the frame order tells which."""
    torch.manual_seed(0)
    model = M.FrameCNNLSTM(1, 2, channels=(8, 8), hidden_size=16)

    def batch(step, B=32, T=5, S=8):
        direction = torch.randint(0, 2, (B,))
        start = torch.randint(0, S - T + 1, (B,))
        rows = torch.randint(0, S, (B,))
        x = torch.zeros(B, T, 1, S, S)
        for b in range(B):
            for t in range(T):
                col = start[b] + (t if direction[b] else T - 1 - t)
                x[b, t, 0, rows[b], col] = 1.0
        return (x,), direction

    losses = _train(model, batch, nn.functional.cross_entropy, 60)
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    (x,), y = batch(0, B=128)
    assert _accuracy(model(x), y) > 0.9


def test_lstm_attention_classifier_learns_which_token_occurs():
    """Label = which of tokens 1..3 appears (once) among filler tokens; variable lengths."""
    torch.manual_seed(0)
    model = M.LSTMAttentionClassifier(8, 3, hidden_size=16, attention_size=16, vocab_size=10)

    def batch(step, B=64, T=12):
        x = torch.randint(4, 10, (B, T))
        lengths = torch.randint(4, T + 1, (B,))
        label = torch.randint(0, 3, (B,))
        pos = (torch.rand(B) * lengths).long()
        x[torch.arange(B), pos] = label + 1
        return (x, lengths), label

    losses = _train(model, batch, nn.functional.cross_entropy, 60)
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    (x, lengths), y = batch(0, B=256)
    logits, w = model(x, lengths, return_attention=True)
    assert _accuracy(logits, y) > 0.95


def test_lstm_transformer_learns_delayed_copy():
    """Causal per-step task: output at step t is the token at step t-3 (long-ish range)."""
    torch.manual_seed(0)
    model = M.LSTMTransformer(8, 6, hidden_size=32, nhead=4, num_encoder_layers=1, dropout=0.0, causal=True,
                              vocab_size=6)

    def batch(step, B=32, T=16):
        x = torch.randint(0, 6, (B, T))
        return (x,), x

    def loss_fn(logits, x):
        return nn.functional.cross_entropy(logits[:, 3:].reshape(-1, 6), x[:, :-3].reshape(-1))

    losses = _train(model, batch, loss_fn, 100)
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    (x,), _ = batch(0, B=64)
    assert _accuracy(model(x)[:, 3:], x[:, :-3]) > 0.9


@pytest.mark.parametrize("feed_context", [False, True])
def test_seq2seq_learns_to_reverse(feed_context):
    torch.manual_seed(0)
    V, BOS, S = 8, 0, 5  # tokens 1..7, 0 = BOS
    model = M.Seq2SeqAttention(V, V, embed_size=16, hidden_size=32, attention_size=32, feed_context=feed_context)

    def batch(step, B=64):
        src = torch.randint(1, V, (B, S))
        tgt = src.flip(1)
        tgt_in = torch.cat([torch.full((B, 1), BOS), tgt[:, :-1]], dim=1)
        return (src, tgt_in), tgt

    def loss_fn(logits, tgt):
        return nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))

    losses = _train(model, batch, loss_fn, 150)
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    (src, _), tgt = batch(0, B=128)
    assert (model.greedy_decode(src, BOS, S) == tgt).float().mean() > 0.9


# ---- torch.compile(fullgraph=True) ------------------------------------------------------------

COMPILE_CASES = ["cnnrnn", "frame_cnn_lstm", "lstm_attention_tokens", "lstm_transformer",
                 "lstm_transformer_causal_tokens", "seq2seq"]


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compile_fullgraph_forward_backward(name):
    """Dense inputs (no lengths: packing is data-dependent); teacher-forced seq2seq."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    make, inputs, _ = CASES[name]
    model = make()
    x = tuple(t for t in inputs() if t.dim() > 1)  # drop the lengths
    model.eval()  # BatchNorm running stats would differ between the two runs in train mode
    eager = model(*x)
    (eager ** 2).mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(*x)
    (out ** 2).mean().backward()
    assert_close(out, eager)
    for (pname, p), g in zip(model.named_parameters(), eager_grads):
        assert_close(p.grad, g, msg=pname)
