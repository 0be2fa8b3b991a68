"""Ready models for the combinations fastrnn is built around (shared SEMANTICS.md, last section).

Built only from fastrnn layers and torch.nn, so `fastrnn.to_torch(model)` gives the same model
(same parameters) on torch.nn's recurrent layers, and `fastrnn.convert` swaps back.

Shapes below use B = batch, T = time steps (source length S for seq2seq), F = features per
step, D = 2 if bidirectional else 1, H = hidden size. Every model is batch-first.

- CNNRNN: Conv1d front end over [B, T, F] -> (bi)LSTM -> head.
- FrameCNNLSTM: small 2-D CNN on each frame of [B, T, C, H, W] -> LSTM -> head.
- LSTMAttentionClassifier: (bi)LSTM -> additive attention pooling -> head.
- LSTMTransformer: LSTM layers -> Transformer encoder layers on fastrnn.MultiheadAttention.
- Seq2SeqAttention: LSTM encoder, LSTM decoder with additive (Bahdanau) attention; teacher
  forcing (`forward`) and greedy decoding (`greedy_decode`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .modules.rnn import LSTM

__all__ = ["CNNRNN", "FrameCNNLSTM", "LSTMAttentionClassifier", "LSTMTransformer", "TransformerEncoderLayer",
           "Seq2SeqAttention", "lengths_to_mask"]


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B] lengths -> bool mask [B, max_len], True at the real (attend-to) steps."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths.to(torch.long)[:, None]


def _run_lstm(lstm: nn.Module, x: Tensor, lengths: Tensor | None, hx=None):
    """Runs a batch-first LSTM, packing by `lengths` (CPU or not, any order) when given.

    Returns the padded output [B, T, D*H] (zeros past each length) and (h_n, c_n)."""
    if lengths is None:
        return lstm(x, hx)
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, state = lstm(packed, hx)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, state


def _last_hidden(h_n: Tensor, bidirectional: bool) -> Tensor:
    """h_n [D*L, B, H] -> the last layer's final state [B, D*H] (both directions concatenated)."""
    return torch.cat([h_n[-2], h_n[-1]], dim=-1) if bidirectional else h_n[-1]


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over dim 1 of [B, T, E], over the True steps of mask [B, T] when given."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def _check_pool(pool: str) -> str:
    # (at construction: an unknown pool once surfaced only at the first forward)
    if pool not in ("last", "mean"):
        raise ValueError(f"pool must be 'last' or 'mean', got {pool!r}")
    return pool


def _pool(out: Tensor, h_n: Tensor, pool: str, bidirectional: bool, mask: Tensor | None) -> Tensor:
    if _check_pool(pool) == "last":
        return _last_hidden(h_n, bidirectional)
    return _masked_mean(out, mask)


def _head(in_features: int, num_outputs: int, dropout: float) -> nn.Sequential:
    # nn.Dropout takes a NaN (its range test is false for it) and fails only at a training
    # forward; the head refuses it here, with nn.Dropout's message and class.
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout}")
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_outputs))


class CNNRNN(nn.Module):
    """Conv1d front end over a feature sequence, then a (bi)LSTM, then a linear head.

    Args:
        input_size: F, features per step.
        num_outputs: classes (logits) or regression targets.
        conv_channels: output channels of each Conv1d block (one block per entry).
        kernel_size: odd; 'same' padding keeps T (each block: Conv1d -> BatchNorm1d -> ReLU).
        hidden_size, num_layers, bidirectional, dropout: of the LSTM (dropout also before the head).
        pool: 'last' (final hidden state of each direction) or 'mean' (mean over valid steps).

    forward(x, lengths=None):
        x: [B, T, F]; lengths: optional [B] valid steps (padded steps are then ignored: the
        LSTM runs on a PackedSequence).  Returns [B, num_outputs].
    """

    def __init__(self, input_size: int, num_outputs: int, conv_channels=(64,), kernel_size: int = 5,
                 hidden_size: int = 128, num_layers: int = 1, bidirectional: bool = True, dropout: float = 0.0,
                 pool: str = "last"):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd ('same' padding)")
        _check_pool(pool)
        blocks, c_in = [], input_size
        for c_out in conv_channels:
            blocks.append(nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                                        nn.BatchNorm1d(c_out), nn.ReLU()))
            c_in = c_out
        self.conv = nn.ModuleList(blocks)
        self.lstm = LSTM(c_in, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional,
                         dropout=dropout if num_layers > 1 else 0.0)
        self.pool = pool
        self.bidirectional = bidirectional
        self.head = _head((2 if bidirectional else 1) * hidden_size, num_outputs, dropout)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        # With lengths, steps past each length are zeroed before every conv block and after the
        # last, so they read as the zeros of 'same' padding: a padded sequence gives the output of
        # the same sequence alone (in eval mode, where BatchNorm does not mix the batch).
        mask = lengths_to_mask(lengths, x.shape[1]).to(x.device) if lengths is not None else None
        keep = mask.unsqueeze(1).to(x.dtype) if mask is not None else None
        feats = x.transpose(1, 2)  # [B, F, T]
        for block in self.conv:
            feats = block(feats if keep is None else feats * keep)
        if keep is not None:
            feats = feats * keep
        feats = feats.transpose(1, 2)  # [B, T, C]
        out, (h_n, _) = _run_lstm(self.lstm, feats, lengths)
        return self.head(_pool(out, h_n, self.pool, self.bidirectional, mask))


class FrameCNNLSTM(nn.Module):
    """A small 2-D CNN applied to every frame of a clip, then an LSTM over the frame features.

    Args:
        in_channels: C of each frame.
        num_outputs: classes (logits) or regression targets.
        channels: output channels of each Conv2d block (3x3, BatchNorm2d, ReLU, 2x2 max-pool);
            the last block is followed by global pooling, so any H, W >= 2**len(channels) works.
        global_pool: 'avg' or 'max' over each frame's positions ('max' suits a small object on a
            large frame).
        hidden_size, num_layers, bidirectional, dropout: of the LSTM (dropout also before the head).
        pool: 'last' or 'mean' over the frames.

    forward(x): x [B, T, C, H, W] -> [B, num_outputs].
    """

    def __init__(self, in_channels: int, num_outputs: int, channels=(16, 32), hidden_size: int = 128,
                 num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0, pool: str = "last",
                 global_pool: str = "avg"):
        super().__init__()
        blocks, c_in = [], in_channels
        for c_out in channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        pools = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}
        if global_pool not in pools:
            raise ValueError(f"global_pool must be 'avg' or 'max', got {global_pool!r}")
        blocks += [pools[global_pool](1), nn.Flatten()]
        self.cnn = nn.Sequential(*blocks)
        self.lstm = LSTM(c_in, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional,
                         dropout=dropout if num_layers > 1 else 0.0)
        self.pool = _check_pool(pool)
        self.bidirectional = bidirectional
        self.head = _head((2 if bidirectional else 1) * hidden_size, num_outputs, dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T = x.shape[:2]
        feats = self.cnn(x.flatten(0, 1)).unflatten(0, (B, T))  # [B, T, channels[-1]]
        out, (h_n, _) = self.lstm(feats)
        return self.head(_pool(out, h_n, self.pool, self.bidirectional, None))


class LSTMAttentionClassifier(nn.Module):
    """(Bi)LSTM over the sequence, additive attention pooling over its outputs, linear head.

    Attention pooling: a learned query vector attends over the LSTM outputs with
    fastrnn.AdditiveAttention (e_t = v^T tanh(W_q q + W_k o_t + b), softmax over valid steps);
    the context (attention-weighted sum of outputs) goes to the head.

    Args:
        input_size: F, features per step; with vocab_size, the embedding size instead.
        num_outputs: classes.
        hidden_size, num_layers, bidirectional, dropout: of the LSTM (dropout also before the head).
        attention_size: query size and hidden size of the additive score.
        vocab_size: if given, the input is token ids [B, T] and an nn.Embedding comes first.
        padding_idx: of that embedding.

    forward(x, lengths=None, return_attention=False):
        x: [B, T, F] float, or [B, T] token ids with vocab_size; lengths: optional [B] valid steps.
        Returns logits [B, num_outputs], and the attention weights [B, T] (zero past each
        length) when return_attention.
    """

    def __init__(self, input_size: int, num_outputs: int, hidden_size: int = 128, num_layers: int = 1,
                 bidirectional: bool = True, dropout: float = 0.0, attention_size: int = 64,
                 vocab_size: int | None = None, padding_idx: int | None = None):
        super().__init__()
        from . import AdditiveAttention

        self.embedding = nn.Embedding(vocab_size, input_size, padding_idx=padding_idx) if vocab_size else None
        self.lstm = LSTM(input_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional,
                         dropout=dropout if num_layers > 1 else 0.0)
        out_size = (2 if bidirectional else 1) * hidden_size
        if not isinstance(attention_size, int) or isinstance(attention_size, bool) or attention_size <= 0:
            raise ValueError(f"LSTMAttentionClassifier: attention_size must be a positive int, got {attention_size!r}")
        self.query = nn.Parameter(torch.empty(attention_size).uniform_(-1 / math.sqrt(attention_size),
                                                                       1 / math.sqrt(attention_size)))
        self.attention = AdditiveAttention(attention_size, out_size, attention_size)
        self.head = _head(out_size, num_outputs, dropout)

    def forward(self, x: Tensor, lengths: Tensor | None = None, return_attention: bool = False):
        if self.embedding is not None:
            x = self.embedding(x)
        out, _ = _run_lstm(self.lstm, x, lengths)
        mask = lengths_to_mask(lengths, x.shape[1]) if lengths is not None else None
        query = self.query.expand(x.shape[0], -1)  # [B, attention_size]: one query step
        context, weights = self.attention(query, out, mask=mask)  # [B, D*H], [B, T]
        logits = self.head(context)
        return (logits, weights) if return_attention else logits


class TransformerEncoderLayer(nn.Module):
    """torch.nn.TransformerEncoderLayer on fastrnn.MultiheadAttention (always batch-first).

    Same submodule and parameter names as torch.nn.TransformerEncoderLayer(batch_first=True)
    (self_attn, linear1, linear2, norm1, norm2, dropout, dropout1, dropout2), so their
    state_dicts load into each other, and the same computation (post-norm by default,
    pre-norm with norm_first=True).

    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        src [B, T, d_model]; src_mask [T, T] (bool, True = masked out, or additive float);
        src_key_padding_mask [B, T] (True = padding, as torch.nn). Returns [B, T, d_model].
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", layer_norm_eps: float = 1e-5, norm_first: bool = False,
                 bias: bool = True):
        super().__init__()
        from . import MultiheadAttention

        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        acts = {"relu": nn.functional.relu, "gelu": nn.functional.gelu}
        if activation not in acts:
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.activation = acts[activation]

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class LSTMTransformer(nn.Module):
    """LSTM layers (order, local context) followed by Transformer encoder layers (long range).

    The LSTM output is projected to d_model (when sizes differ), runs through num_encoder_layers
    TransformerEncoderLayer blocks (fastrnn.MultiheadAttention), then a linear head per step or
    after pooling. With causal=True (and a unidirectional LSTM), step t sees only steps <= t:
    a language model or a streaming tagger.

    Args:
        input_size: F, features per step; with vocab_size, the embedding size instead.
        num_outputs: classes / targets per step (pool='none') or per sequence.
        hidden_size, num_lstm_layers, bidirectional: of the LSTM.
        d_model, nhead, num_encoder_layers, dim_feedforward, dropout, norm_first: of the encoder.
        pool: 'none' (per-step outputs), 'mean' (mean over valid steps) or 'last' (last valid step).
        causal: causal self-attention (requires bidirectional=False).
        vocab_size: if given, the input is token ids [B, T] and an nn.Embedding comes first.

    forward(x, lengths=None):
        x: [B, T, F] float, or [B, T] token ids; lengths: optional [B] valid steps (padding is
        masked out of attention and the LSTM runs packed).
        Returns [B, T, num_outputs] with pool='none', else [B, num_outputs].
    """

    def __init__(self, input_size: int, num_outputs: int, hidden_size: int = 128, num_lstm_layers: int = 1,
                 bidirectional: bool = False, d_model: int | None = None, nhead: int = 4,
                 num_encoder_layers: int = 2, dim_feedforward: int | None = None, dropout: float = 0.1,
                 norm_first: bool = True, pool: str = "none", causal: bool = False, vocab_size: int | None = None):
        super().__init__()
        if causal and bidirectional:
            raise ValueError("causal=True needs a unidirectional LSTM")
        if pool not in ("none", "mean", "last"):
            raise ValueError(f"pool must be 'none', 'mean' or 'last', got {pool!r}")
        lstm_out = (2 if bidirectional else 1) * hidden_size
        d_model = d_model or lstm_out
        self.embedding = nn.Embedding(vocab_size, input_size) if vocab_size else None
        self.lstm = LSTM(input_size, hidden_size, num_lstm_layers, batch_first=True, bidirectional=bidirectional,
                         dropout=dropout if num_lstm_layers > 1 else 0.0)
        self.proj = nn.Linear(lstm_out, d_model) if d_model != lstm_out else nn.Identity()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward or 4 * d_model, dropout, norm_first=norm_first)
            for _ in range(num_encoder_layers))
        self.norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.head = nn.Linear(d_model, num_outputs)
        self.pool = pool
        self.causal = causal

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        T = x.shape[1]
        out, _ = _run_lstm(self.lstm, x, lengths)
        h = self.proj(out)
        mask = lengths_to_mask(lengths, T) if lengths is not None else None
        padding = ~mask if mask is not None else None
        attn_mask = None
        if self.causal:
            attn_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # True = masked out
        for layer in self.layers:
            h = layer(h, src_mask=attn_mask, src_key_padding_mask=padding, is_causal=self.causal)
        h = self.norm(h)
        if self.pool == "mean":
            h = _masked_mean(h, mask)
        elif self.pool == "last":
            if lengths is None:
                h = h[:, -1]
            else:
                h = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device).long() - 1]
        return self.head(h)


class Seq2SeqAttention(nn.Module):
    """LSTM encoder, LSTM decoder with additive (Bahdanau) attention over the encoder outputs.

    Encoder: Embedding -> (bi)LSTM over the source. The decoder's initial state is
    tanh(Linear(final encoder states)) for every decoder layer.

    Decoder, at step t (y_{t-1} the previous target token, s the decoder state):
      - feed_context=False (default): s_t = LSTM(emb(y_{t-1}), s_{t-1}); the decoder output o_t
        queries the encoder outputs with additive attention,
        e_tj = v^T tanh(W_q o_t + W_k enc_j + b), context c_t = sum_j softmax_j(e_tj) enc_j;
        logits = out(tanh(W_c [o_t; c_t])). Under teacher forcing the decoder LSTM runs once over
        the whole target and attention is one batched call over all steps: the fast path.
      - feed_context=True: Bahdanau's original order: c_t is computed from the previous decoder
        output o_{t-1} (the initial h for t = 1) and fed into the LSTM with the input,
        s_t = LSTM([emb(y_{t-1}); c_t], s_{t-1}); logits as above. Step by step, also in training.

    Args:
        src_vocab, tgt_vocab: vocabulary sizes; embed_size; hidden_size (of each LSTM direction);
        num_layers (encoder and decoder); bidirectional (encoder); attention_size; dropout;
        feed_context as above; padding_idx: of both embeddings (ignored positions of the source
        are given by src_lengths, not by this).

    forward(src, tgt_in, src_lengths=None): teacher forcing.
        src [B, S] token ids, tgt_in [B, T] decoder inputs (BOS then the target shifted right),
        src_lengths optional [B]. Returns logits [B, T, tgt_vocab].
    greedy_decode(src, bos, max_len, src_lengths=None, eos=None, return_logits=False):
        Returns tokens [B, max_len] (each step's argmax fed back; after eos a row keeps emitting
        eos) and, with return_logits, the logits [B, max_len, tgt_vocab].
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, embed_size: int = 64, hidden_size: int = 128,
                 num_layers: int = 1, bidirectional: bool = True, attention_size: int = 128, dropout: float = 0.0,
                 feed_context: bool = False, padding_idx: int | None = None):
        super().__init__()
        from . import AdditiveAttention

        enc_out = (2 if bidirectional else 1) * hidden_size
        self.src_embedding = nn.Embedding(src_vocab, embed_size, padding_idx=padding_idx)
        self.tgt_embedding = nn.Embedding(tgt_vocab, embed_size, padding_idx=padding_idx)
        lstm_dropout = dropout if num_layers > 1 else 0.0
        self.encoder = LSTM(embed_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional,
                            dropout=lstm_dropout)
        dec_in = embed_size + (enc_out if feed_context else 0)
        self.decoder = LSTM(dec_in, hidden_size, num_layers, batch_first=True, dropout=lstm_dropout)
        self.bridge = nn.Linear(enc_out, 2 * hidden_size)
        self.attention = AdditiveAttention(hidden_size, enc_out, attention_size)
        self.combine = nn.Linear(hidden_size + enc_out, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, tgt_vocab)
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.feed_context = feed_context

    def encode(self, src: Tensor, src_lengths: Tensor | None = None):
        """src [B, S] -> encoder outputs [B, S, D*H], mask [B, S] or None, decoder state (h0, c0)."""
        enc, (h_n, c_n) = _run_lstm(self.encoder, self.dropout(self.src_embedding(src)), src_lengths)
        mask = lengths_to_mask(src_lengths, src.shape[1]).to(enc.device) if src_lengths is not None else None
        h0, c0 = torch.tanh(self.bridge(_last_hidden(h_n, self.bidirectional))).chunk(2, dim=-1)
        L = self.num_layers
        state = (h0.unsqueeze(0).expand(L, -1, -1).contiguous(), c0.unsqueeze(0).expand(L, -1, -1).contiguous())
        return enc, mask, state

    def _logits(self, dec_out: Tensor, context: Tensor) -> Tensor:
        return self.out(self.dropout(torch.tanh(self.combine(torch.cat([dec_out, context], dim=-1)))))

    def _step(self, y_prev: Tensor, enc: Tensor, mask, state, prev_out: Tensor):
        """One decoder step: y_prev [B] -> logits [B, V], new state, decoder output [B, H]."""
        emb = self.dropout(self.tgt_embedding(y_prev))
        if self.feed_context:
            context, _ = self.attention(prev_out, enc, mask=mask)
            dec_out, state = self.decoder(torch.cat([emb, context], dim=-1).unsqueeze(1), state)
            dec_out = dec_out.squeeze(1)
        else:
            dec_out, state = self.decoder(emb.unsqueeze(1), state)
            dec_out = dec_out.squeeze(1)
            context, _ = self.attention(dec_out, enc, mask=mask)
        return self._logits(dec_out, context), state, dec_out

    def forward(self, src: Tensor, tgt_in: Tensor, src_lengths: Tensor | None = None) -> Tensor:
        enc, mask, state = self.encode(src, src_lengths)
        if not self.feed_context:
            dec_out, _ = self.decoder(self.dropout(self.tgt_embedding(tgt_in)), state)  # [B, T, H]
            context, _ = self.attention(dec_out, enc, mask=mask)  # [B, T, D*H]
            return self._logits(dec_out, context)
        if tgt_in.shape[1] == 0:  # (as the decoder LSTM refuses T = 0 without feed_context)
            raise RuntimeError("Seq2SeqAttention: tgt_in must have at least one time step, got shape "
                               f"{list(tgt_in.shape)}")
        prev_out, logits = state[0][-1], []
        for t in range(tgt_in.shape[1]):
            step_logits, state, prev_out = self._step(tgt_in[:, t], enc, mask, state, prev_out)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, bos: int, max_len: int, src_lengths: Tensor | None = None,
                      eos: int | None = None, return_logits: bool = False):
        if not isinstance(max_len, int) or max_len < 0:
            raise ValueError(f"Seq2SeqAttention.greedy_decode: max_len must be a non-negative int, got {max_len!r}")
        enc, mask, state = self.encode(src, src_lengths)
        y = torch.full((src.shape[0],), bos, dtype=torch.long, device=src.device)
        prev_out, tokens, logits = state[0][-1], [], []
        done = torch.zeros_like(y, dtype=torch.bool)
        for _ in range(max_len):
            step_logits, state, prev_out = self._step(y, enc, mask, state, prev_out)
            y = step_logits.argmax(-1)
            if eos is not None:
                y = torch.where(done, torch.full_like(y, eos), y)
                done = done | (y == eos)
            tokens.append(y)
            logits.append(step_logits)
        if max_len == 0:
            tokens = y.new_empty((y.shape[0], 0))
            logits = enc.new_empty((y.shape[0], 0, self.out.out_features))
        else:
            tokens, logits = torch.stack(tokens, dim=1), torch.stack(logits, dim=1)
        return (tokens, logits) if return_logits else tokens
