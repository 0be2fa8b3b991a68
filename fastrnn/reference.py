"""Plain-PyTorch reference implementations: the oracle every fused op is tested against.

They follow ../shared/SEMANTICS.md line by line, one time step at a time, with nothing fused
and nothing clever. Shapes: x [B, I]; h [B, P]; c [B, H]; W x means x @ W.T.
"""
from __future__ import annotations

import math

import torch


def lstm_cell_ref(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    """One LSTM step. Returns (h', c'); h' is [B, proj_size] when w_hr is given."""
    gates = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.T
    return h_new, c_new


def gru_cell_ref(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU step (gate order r, z, n; r multiplies W_hn h + b_hn). Returns h'."""
    gi = x @ w_ih.T
    gh = h @ w_hh.T
    if b_ih is not None:
        gi = gi + b_ih
        gh = gh + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def rnn_cell_ref(x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """One Elman RNN step: act(W_ih x + b_ih + W_hh h + b_hh). Returns h'."""
    pre = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        pre = pre + b_ih + b_hh
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def _scan(step, input, state, batch_sizes=None, reverse=False):
    """Runs `step(x_t, *state_rows) -> new_state` over time; state[0] is the output.

    input is [T, B, I], or packed [N, I] with batch_sizes [T] (non-increasing): at step t only
    the first batch_sizes[t] rows are alive, the rest keep their state.
    """
    if batch_sizes is None:
        T, B = input.shape[0], input.shape[1]
        sizes = [B] * T
        xs = list(input.unbind(0))
    else:
        sizes = [int(b) for b in batch_sizes]
        xs = list(input.split(sizes, dim=0))
    state = list(state)
    outs = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n = sizes[t]
        new = step(xs[t], *[s[:n] for s in state])
        state = [torch.cat([ns, s[n:]], dim=0) for ns, s in zip(new, state)]
        outs[t] = new[0]
    output = torch.stack(outs) if batch_sizes is None else torch.cat(outs, dim=0)
    return output, state


def lstm_layer_ref(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None, reverse=False):
    """One LSTM layer, one direction. Returns (output, h_n, c_n)."""
    out, (h, c) = _scan(lambda x, h, c: lstm_cell_ref(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr), input, (hx, cx),
                        batch_sizes, reverse)
    return out, h, c


def gru_layer_ref(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, reverse=False):
    """One GRU layer, one direction. Returns (output, h_n)."""
    out, (h,) = _scan(lambda x, h: (gru_cell_ref(x, h, w_ih, w_hh, b_ih, b_hh),), input, (hx,), batch_sizes, reverse)
    return out, h


def rnn_layer_ref(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, batch_sizes=None, reverse=False, nonlinearity="tanh"):
    """One Elman RNN layer, one direction. Returns (output, h_n)."""
    out, (h,) = _scan(lambda x, h: (rnn_cell_ref(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity),), input, (hx,),
                      batch_sizes, reverse)
    return out, h


def _stack_ref(layer, input, states, params, num_layers, bidirectional, batch_first, batch_sizes):
    """Stacked (bi)directional layers without dropout; params grouped per layer and direction
    in torch.nn's order. states: list of [L*D, B, *] tensors."""
    D = 2 if bidirectional else 1
    if batch_first and batch_sizes is None:
        input = input.transpose(0, 1)
    finals = [[] for _ in states]
    for layer_idx in range(num_layers):
        outs = []
        for d in range(D):
            k = layer_idx * D + d
            out, *fin = layer(input, [s[k] for s in states], params[k], batch_sizes, d == 1)
            outs.append(out)
            for acc, f in zip(finals, fin):
                acc.append(f)
        input = torch.cat(outs, dim=-1)
    if batch_first and batch_sizes is None:
        input = input.transpose(0, 1)
    return input, [torch.stack(f) for f in finals]


def lstm_ref(input, hx, params, num_layers=1, bidirectional=False, batch_first=False, batch_sizes=None):
    """Multi-layer LSTM as torch.nn.LSTM computes it (dropout 0).

    params: per layer and direction (torch.nn order), a tuple (w_ih, w_hh, b_ih, b_hh, w_hr)
    with None for absent tensors. hx = (h0 [L*D, B, P], c0 [L*D, B, H]).
    Returns (output, (h_n, c_n)).
    """
    def layer(x, st, p, bsz, rev):
        return lstm_layer_ref(x, st[0], st[1], *p, batch_sizes=bsz, reverse=rev)
    out, (h, c) = _stack_ref(layer, input, list(hx), params, num_layers, bidirectional, batch_first, batch_sizes)
    return out, (h, c)


def gru_ref(input, hx, params, num_layers=1, bidirectional=False, batch_first=False, batch_sizes=None):
    """Multi-layer GRU; params per layer/direction: (w_ih, w_hh, b_ih, b_hh). Returns (output, h_n)."""
    def layer(x, st, p, bsz, rev):
        return gru_layer_ref(x, st[0], *p, batch_sizes=bsz, reverse=rev)
    out, (h,) = _stack_ref(layer, input, [hx], params, num_layers, bidirectional, batch_first, batch_sizes)
    return out, h


def rnn_ref(input, hx, params, num_layers=1, bidirectional=False, batch_first=False, batch_sizes=None,
            nonlinearity="tanh"):
    """Multi-layer Elman RNN; params per layer/direction: (w_ih, w_hh, b_ih, b_hh). Returns (output, h_n)."""
    def layer(x, st, p, bsz, rev):
        return rnn_layer_ref(x, st[0], *p, batch_sizes=bsz, reverse=rev, nonlinearity=nonlinearity)
    out, (h,) = _stack_ref(layer, input, [hx], params, num_layers, bidirectional, batch_first, batch_sizes)
    return out, h


# ------------------------------------------------------------------------------------ attention
def masked_softmax_ref(scores, mask=None):
    """softmax over the last dimension of scores + mask.

    mask: bool (True = attend) or float (added), broadcastable to scores. A row whose every
    entry is masked (all -inf) gets all-zero weights, as torch's scaled_dot_product_attention
    gives it on CPU, instead of the NaNs a bare softmax produces.
    """
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    if scores.shape[-1] == 0:  # no keys (an empty source): empty weights, as the fused kernels
        return torch.softmax(scores, dim=-1)
    dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
    # The dead rows' scores are replaced (not just their output), so no NaN reaches backward.
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1)
    return weights.masked_fill(dead, 0.0)


def causal_mask_ref(L, S, device=None):
    """torch's is_causal mask: query i attends to keys j <= i (top-left aligned), [L, S] bool."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def scaled_dot_product_attention_ref(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """softmax(Q K^T * scale + mask) V with torch.nn.functional.scaled_dot_product_attention's
    arguments. query [..., L, E], key [..., S, E], value [..., S, Ev] -> [..., L, Ev].
    scale defaults to 1/sqrt(E). dropout (on the weights) always applies when dropout_p > 0."""
    L, S, E = query.size(-2), key.size(-2), query.size(-1)
    scale = (1.0 / math.sqrt(E) if E > 0 else 1.0) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        scores = scores.masked_fill(~causal_mask_ref(L, S, query.device), float("-inf"))
    weights = masked_softmax_ref(scores, attn_mask)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return weights @ value


def additive_attention_ref(query, keys, values, w_q, w_k, v, bias=None, mask=None, scale=False):
    """Bahdanau attention as the plain formula: e_ij = v . tanh(W_q q_i + W_k k_j + b)
    (divided by sqrt(D) when scale), weights = masked softmax over j, context_i = sum_j w_ij values_j.

    query [B, T, Dq], keys [B, S, Dk], values [B, S, Dv], w_q [D, Dq], w_k [D, Dk], v [D], bias [D];
    mask bool (True = attend) or float (added), [B, S] or [B, T, S].
    Materialises the [B, T, S, D] tanh tensor: this is what the fused op avoids.
    Returns (context [B, T, Dv], weights [B, T, S]).
    """
    qp = query @ w_q.T
    if bias is not None:
        qp = qp + bias
    scale_factor = 1.0 / math.sqrt(w_q.shape[0]) if scale else 1.0
    return additive_attention_core_ref(qp, keys @ w_k.T, values, v, mask, scale_factor)


def additive_attention_core_ref(query_proj, key_proj, values, v, mask=None, scale=1.0):
    """The part of additive attention after the projections (what the fused op computes):
    e_ij = scale * v . tanh(query_proj_i + key_proj_j), masked softmax, weighted sum of values.
    query_proj [B, T, D], key_proj [B, S, D]; mask broadcastable to [B, T, S] ([B, S] masks one
    source position for every target step). Returns (context [B, T, Dv], weights [B, T, S])."""
    energies = (torch.tanh(query_proj.unsqueeze(2) + key_proj.unsqueeze(1)) @ v) * scale
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(1)
    weights = masked_softmax_ref(energies, mask)
    return weights @ values, weights


def luong_attention_ref(query, keys, values, weight=None, mask=None):
    """Luong attention: e_ij = q_i^T W k_j ("general", weight W [Dq, Dk]) or q_i^T k_j ("dot",
    weight None); masked softmax over j; context_i = sum_j w_ij values_j.
    query [B, T, Dq], keys [B, S, Dk], values [B, S, Dv]. Returns (context [B, T, Dv], weights [B, T, S])."""
    kp = keys if weight is None else keys @ weight.T
    energies = query @ kp.transpose(1, 2)
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(1)
    weights = masked_softmax_ref(energies, mask)
    return weights @ values, weights
# ---------------------------------------------------------------------------- variant cells
# SEMANTICS.md, "Variants". ln = (ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b[, ln_c_w, ln_c_b]) or None;
# w_peep = [3, H] rows (w_ci, w_cf, w_co) or None. Zoneout: `keep` is the mask d ([B, 2H] for the
# LSTM: h then c; [B, H] for the GRU), 1 where a unit keeps its previous value; without a mask the
# constant zoneout_p takes d's place (eval mode), 0 meaning no zoneout.
LAYER_NORM_EPS = 1e-5


def layer_norm_ref(x, weight, bias, eps=LAYER_NORM_EPS):
    """LayerNorm over the last dimension (biased variance, as torch.nn.LayerNorm)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _zone(new, old, d):
    return d * old + (1 - d) * new


def variant_lstm_cell_ref(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, ln=None, w_peep=None, keep=None, zoneout_p=0.0):
    """One step of the LayerNorm / peephole LSTM with zoneout. Returns (h', c')."""
    gx, gh = x @ w_ih.T, h @ w_hh.T
    if ln is not None:
        gx, gh = layer_norm_ref(gx, ln[0], ln[1]), layer_norm_ref(gh, ln[2], ln[3])
    gates = gx + gh
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    if w_peep is not None:
        i, f = i + w_peep[0] * c, f + w_peep[1] * c
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    if w_peep is not None:
        o = o + w_peep[2] * c_new
    c_out = layer_norm_ref(c_new, ln[4], ln[5]) if ln is not None else c_new
    h_new = torch.sigmoid(o) * torch.tanh(c_out)
    if keep is not None:
        dh, dc = keep.chunk(2, dim=1)
        return _zone(h_new, h, dh), _zone(c_new, c, dc)
    if zoneout_p:
        return _zone(h_new, h, zoneout_p), _zone(c_new, c, zoneout_p)
    return h_new, c_new


def variant_gru_cell_ref(x, h, w_ih, w_hh, b_ih=None, b_hh=None, ln=None, keep=None, zoneout_p=0.0):
    """One step of the LayerNorm GRU with zoneout: LN_x on W_i x and LN_h on W_h h, then the
    GRU's gate arithmetic. Returns h'."""
    gi, gh = x @ w_ih.T, h @ w_hh.T
    if ln is not None:
        gi, gh = layer_norm_ref(gi, ln[0], ln[1]), layer_norm_ref(gh, ln[2], ln[3])
    if b_ih is not None:
        gi, gh = gi + b_ih, gh + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    h_new = (1 - z) * n + z * h
    if keep is not None:
        return _zone(h_new, h, keep)
    if zoneout_p:
        return _zone(h_new, h, zoneout_p)
    return h_new


def _with_mask(input, mask):
    # The mask rides along with the input (same leading shape), so _scan splits it per step.
    return input if mask is None else torch.cat([input, mask.to(input.dtype)], dim=-1)


def variant_lstm_layer_ref(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, ln=None, w_peep=None,
                           zoneout_mask=None, zoneout_p=0.0, batch_sizes=None, reverse=False):
    """One variant LSTM layer, one direction. zoneout_mask: [*input.shape[:-1], 2H] or None.
    Returns (output, h_n, c_n)."""
    I = input.shape[-1]

    def step(xm, h, c):
        x, keep = (xm, None) if zoneout_mask is None else (xm[:, :I], xm[:, I:])
        return variant_lstm_cell_ref(x, h, c, w_ih, w_hh, b_ih, b_hh, ln, w_peep, keep, zoneout_p)

    out, (h, c) = _scan(step, _with_mask(input, zoneout_mask), (hx, cx), batch_sizes, reverse)
    return out, h, c


def variant_gru_layer_ref(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, ln=None, zoneout_mask=None, zoneout_p=0.0,
                          batch_sizes=None, reverse=False):
    """One variant GRU layer, one direction. zoneout_mask: [*input.shape[:-1], H] or None.
    Returns (output, h_n)."""
    I = input.shape[-1]

    def step(xm, h):
        x, keep = (xm, None) if zoneout_mask is None else (xm[:, :I], xm[:, I:])
        return (variant_gru_cell_ref(x, h, w_ih, w_hh, b_ih, b_hh, ln, keep, zoneout_p),)

    out, (h,) = _scan(step, _with_mask(input, zoneout_mask), (hx,), batch_sizes, reverse)
    return out, h
