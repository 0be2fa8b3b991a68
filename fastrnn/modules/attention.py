"""Attention layers: MultiheadAttention (a drop-in for torch.nn.MultiheadAttention), additive
(Bahdanau) and Luong attention.

Shapes: B = batch, T (or L) = target/query length, S = source/key length, E = embed_dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import functional as FR
from ._compat import fx_leaf

__all__ = ["MultiheadAttention", "AdditiveAttention", "LuongAttention"]


# Shape errors torch's multi_head_attention_forward reports with `assert` raise AssertionError
# here too (code written for torch.nn catches that class), with its messages.
def _check_key_padding_mask(key_padding_mask, src_len, bsz):
    # torch's own check builds its message in a closure over the tensor, which fullgraph compile rejects.
    if tuple(key_padding_mask.shape) != (bsz, src_len):
        raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                             f"{key_padding_mask.shape}")


def _mha_forward(query, key, value, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn,
                 dropout_p, out_proj_weight, out_proj_bias, training, key_padding_mask, need_weights, attn_mask,
                 q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, average_attn_weights=True,
                 is_causal=False):
    """torch.nn.functional.multi_head_attention_forward's computation (sequence-first inputs,
    masks already canonical: float, -inf = masked), with the attention itself on fastrnn's fused
    scaled_dot_product_attention when the weights are not asked for. When they are, the weights
    are formed explicitly exactly as torch does (so a fully masked row gives NaN weights there,
    as in torch)."""
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    if embed_dim != out_proj_weight.shape[1]:
        raise AssertionError(f"was expecting embedding dimension of {out_proj_weight.shape[1]}, but got {embed_dim}")
    if key.shape[1] != bsz:
        raise RuntimeError(f"key's batch size {key.shape[1]} does not match query's {bsz}")
    head_dim = embed_dim // num_heads

    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the fused kernel applies the causal mask itself
    elif key_padding_mask is not None:
        is_causal = False

    if q_proj_weight is None:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    else:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, b_q, b_k, b_v)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

    if add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=1)
        v = torch.cat([v, zeros], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)

    if not training:
        dropout_p = 0.0

    if need_weights:
        if key_padding_mask is not None:
            _check_key_padding_mask(key_padding_mask, src_len, bsz)
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(
                bsz * num_heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = torch.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, out_proj_weight.size(0))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights

    # Masks stay broadcast views where they can: a key padding mask alone is [B, 1, 1, S].
    mask4 = None
    if attn_mask is not None:
        mask4 = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1
                 else attn_mask.view(bsz, num_heads, attn_mask.size(1), src_len))
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, src_len, bsz)
        kpm = key_padding_mask.view(bsz, 1, 1, src_len)
        mask4 = kpm if mask4 is None else mask4 + kpm
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = FR.scaled_dot_product_attention(q, k, v, mask4, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, out_proj_weight.size(0))
    if not is_batched:
        out = out.squeeze(1)
    return out, None


class MultiheadAttention(nn.Module):
    """Drop-in for torch.nn.MultiheadAttention: the same constructor, parameters (names, shapes,
    initialisation under the same seed), state_dict, forward arguments and returns.

    With need_weights=False the attention runs on fastrnn's fused scaled-dot-product kernel
    (CPU float32/float64). need_weights=True has to form the [B, H, L, S] weights anyway and
    computes them as torch does. Where torch.nn would take its native inference path (eval, no
    grad, batch-first self-attention, ...: see _torch_native_path) with masks or is_causal,
    torch.nn's forward runs, so the answers are torch.nn's exactly, quirks of that path included;
    without them the fused kernel runs and returns that path's contiguous layout.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads} instead")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != self.embed_dim:
            raise AssertionError("embed_dim must be divisible by num_heads")
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    # torch.nn's, used by its Transformer layers' inference fast path on their self_attn.
    merge_masks = nn.MultiheadAttention.merge_masks

    def _torch_native_path(self, query, key, value) -> bool:
        """Whether torch.nn.MultiheadAttention may answer this call on its native inference path
        (torch._native_multi_head_attention: eval, no grad, batch-first self-attention, ...): the
        cheap necessary tests; _native_layout adds the rest that decide it without masks."""
        if (not self.batch_first or self.training or query.dim() != 3 or query is not key or key is not value
                or torch.compiler.is_compiling() or not torch.backends.mha.get_fastpath_enabled()):
            return False
        if self.in_proj_weight is None or self.num_heads % 2:
            return False
        args = (query, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args))

    def _native_layout(self, query) -> bool:
        """(After _torch_native_path.) Whether torch.nn answers a call without masks natively: its
        output is then a contiguous [B, L, E] (its general path returns a transposed view)."""
        b = self.in_proj_bias
        return (b is not None and query.dtype == b.dtype == self.in_proj_weight.dtype and self.bias_k is None
                and self.bias_v is None and not self.add_zero_attn and not torch.is_autocast_enabled())

    def __setstate__(self, state):
        if "_qkv_same_embed_dim" not in state:
            state["_qkv_same_embed_dim"] = True
        super().__setstate__(state)

    @fx_leaf
    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """query [L, B, E] ([B, L, E] if batch_first, or unbatched [L, E]); key [S, B, kdim]; value
        [S, B, vdim]; key_padding_mask [B, S] and attn_mask [L, S] or [B*num_heads, L, S]: bool (True =
        NOT attended, torch.nn's convention) or float (added).
        Returns (attn_output like query with E features, weights [B, L, S] averaged over heads or
        [B, num_heads, L, S], or None when need_weights=False)."""
        native = self._torch_native_path(query, key, value)
        if native and (attn_mask is not None or key_padding_mask is not None or is_causal):
            # With masks torch's native path answers otherwise than its general one (NaN for a
            # fully masked row, is_causal without a mask ignored, 4-D masks taken; with
            # bias=False it still merges the masks first): torch.nn's forward runs, and decides.
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                                 average_attn_weights, is_causal)
        native = native and self._native_layout(query)
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            # Keep self-attention's identity (query is key is value): the in-projection is then one GEMM.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = _mha_forward(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            q_proj_weight=None if self._qkv_same_embed_dim else self.q_proj_weight,
            k_proj_weight=None if self._qkv_same_embed_dim else self.k_proj_weight,
            v_proj_weight=None if self._qkv_same_embed_dim else self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
            if native:
                out = out.contiguous()
        return out, weights


def _single_step(query, fn):
    """A 2-D query [B, Dq] is one decoder step: run it as T = 1."""
    if query.dim() == 2:
        return query.unsqueeze(1), True
    if query.dim() != 3:
        raise ValueError(f"{fn}: query must be 3-D [batch, tgt_len, query_dim] or 2-D [batch, query_dim] "
                         f"(one step), got shape {list(query.shape)}")
    return query, False


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention: e_ij = v . tanh(W_q q_i + W_k k_j + bias), divided by
    sqrt(hidden_dim) when scale=True; weights = masked softmax over the keys; context = weights @ values.

    Parameters: w_q [hidden_dim, query_dim], w_k [hidden_dim, key_dim], v [hidden_dim],
    bias [hidden_dim] (when bias=True).
    forward(query [B, T, Dq] or [B, Dq], keys [B, S, Dk], values [B, S, Dv] = keys, mask [B, S] or
    [B, T, S], bool True = attend, or float added) -> (context [B, T, Dv] or [B, Dv], weights
    [B, T, S] or [B, S]). Runs on the fused kernel (fastrnn.functional.additive_attention).
    """

    def __init__(self, query_dim, key_dim, hidden_dim, bias=True, scale=False, device=None, dtype=None):
        super().__init__()
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"AdditiveAttention: {name} must be a positive int, got {val!r}")
        kw = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.hidden_dim, self.scale = query_dim, key_dim, hidden_dim, bool(scale)
        self.w_q = nn.Parameter(torch.empty(hidden_dim, query_dim, **kw))
        self.w_k = nn.Parameter(torch.empty(hidden_dim, key_dim, **kw))
        self.v = nn.Parameter(torch.empty(hidden_dim, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(hidden_dim, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's default initialisation for both projections; v and bias U(-1/sqrt(D), 1/sqrt(D)).
        for w in (self.w_q, self.w_k):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.hidden_dim)
        nn.init.uniform_(self.v, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @fx_leaf
    def forward(self, query, keys, values=None, mask=None):
        query, step = _single_step(query, "AdditiveAttention")
        values = keys if values is None else values
        context, weights = FR.additive_attention(query, keys, values, self.w_q, self.w_k, self.v, self.bias, mask,
                                                 self.scale)
        return (context.squeeze(1), weights.squeeze(1)) if step else (context, weights)

    def extra_repr(self):
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}, "
                f"bias={self.bias is not None}, scale={self.scale}")


class LuongAttention(nn.Module):
    """Luong attention: "general" e_ij = q_i^T W k_j (weight W [query_dim, key_dim]) or "dot"
    e_ij = q_i^T k_j (no parameters; key_dim must equal query_dim). Same forward as AdditiveAttention."""

    def __init__(self, query_dim, key_dim=None, method="general", device=None, dtype=None):
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        if method not in ("general", "dot"):
            raise ValueError(f"LuongAttention: method must be 'general' or 'dot', got {method!r}")
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"LuongAttention: {name} must be a positive int, got {val!r}")
        if method == "dot" and key_dim != query_dim:
            raise ValueError(f"LuongAttention: method 'dot' needs key_dim == query_dim, got key_dim={key_dim} and "
                             f"query_dim={query_dim}")
        self.query_dim, self.key_dim, self.method = query_dim, key_dim, method
        if method == "general":
            self.weight = nn.Parameter(torch.empty(query_dim, key_dim, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @fx_leaf
    def forward(self, query, keys, values=None, mask=None):
        query, step = _single_step(query, "LuongAttention")
        values = keys if values is None else values
        context, weights = FR.luong_attention(query, keys, values, self.weight, mask)
        return (context.squeeze(1), weights.squeeze(1)) if step else (context, weights)

    def extra_repr(self):
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, method={self.method!r}"
