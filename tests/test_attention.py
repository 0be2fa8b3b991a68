"""Fused attention ops vs the plain-PyTorch references and vs torch's own attention:
scaled dot-product, MultiheadAttention, additive (Bahdanau) and Luong."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastrnn
from fastrnn import _C
from fastrnn import functional as FR
from fastrnn import reference as R
from conftest import assert_close

DTYPES = [torch.float64, torch.float32]


def rnd(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def grads(outs, inputs, cots):
    return torch.autograd.grad(outs, [t for t in inputs if t is not None and t.requires_grad], cots)


def assert_same_values_and_grads(got, want, inputs):
    """got and want equal, and so are their gradients w.r.t. inputs for one random cotangent."""
    assert_close(got, want)
    cot = torch.randn_like(got)
    for a, b in zip(grads(got, inputs, cot), grads(want, inputs, cot)):
        assert_close(a, b)


def make_mask(kind, B, H, L, S, dtype):
    """Masks of every supported form; each leaves some rows fully masked where torch defines it."""
    g = torch.Generator().manual_seed(7)
    if kind == "none" or kind == "causal":
        return None
    if kind == "bool":
        m = torch.rand(L, S, generator=g) < 0.7
        m[1] = False  # a fully masked query row
        return m
    if kind == "bool_padding":  # [B, 1, 1, S], a key padding mask broadcast over heads and queries
        m = torch.rand(B, 1, 1, S, generator=g) < 0.6
        m[:, :, :, 0] = True
        return m
    if kind == "float":
        m = torch.randn(B, H, L, S, generator=g, dtype=dtype)
        m[:, :, 2] = float("-inf")
        return m
    raise AssertionError(kind)


# ----------------------------------------------------------------------- scaled dot-product
SDPA_SHAPES = [(2, 3, 5, 7, 4, 6), (1, 2, 70, 600, 16, 8), (2, 1, 200, 40, 8, 8)]
MASKS = ["none", "bool", "bool_padding", "float", "causal"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SDPA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_matches_reference_and_torch(shape, mask_kind, dtype):
    B, H, L, S, E, Ev = shape
    q, k, v = rnd(B, H, L, E, dtype=dtype), rnd(B, H, S, E, dtype=dtype), rnd(B, H, S, Ev, dtype=dtype)
    mask, causal = make_mask(mask_kind, B, H, L, S, dtype), mask_kind == "causal"
    out = FR.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    ref = R.scaled_dot_product_attention_ref(q, k, v, attn_mask=mask, is_causal=causal)
    builtin = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert_close(out, ref)
    assert_close(out, builtin)
    cot = torch.randn_like(out)
    for gf, gr, gt in zip(grads(out, (q, k, v), cot), grads(ref, (q, k, v), cot), grads(builtin, (q, k, v), cot)):
        assert_close(gf, gr)
        assert_close(gf, gt)
        assert torch.isfinite(gf).all()


def test_sdpa_fully_masked_rows_are_zero_like_torch():
    q, k, v = rnd(1, 2, 4, 8), rnd(1, 2, 6, 8), rnd(1, 2, 6, 8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    out = FR.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    # every key masked for every query: zero output, zero gradients
    q.grad = k.grad = v.grad = None
    out = FR.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(4, 6, dtype=torch.bool))
    assert not out.any()
    out.sum().backward()
    assert not q.grad.any() and not k.grad.any()


@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 2, 3)], ids=["2d", "3d", "4d", "5d"])
def test_sdpa_leading_dims_and_broadcast(lead):
    L, S, E = 5, 6, 4
    q, k, v = rnd(*lead, L, E), rnd(*lead, S, E), rnd(*lead, S, E)
    mask = torch.rand(*lead, L, S) < 0.8
    out = FR.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert out.shape == (*lead, L, E)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3))
    if len(lead) >= 2:  # key/value shared across the first batch dimension (broadcast)
        k1, v1 = rnd(1, *lead[1:], S, E), rnd(1, *lead[1:], S, E)
        out = FR.scaled_dot_product_attention(q, k1, v1)
        ref = R.scaled_dot_product_attention_ref(q, k1, v1)
        assert_same_values_and_grads(out, ref, (q, k1, v1))


def test_sdpa_non_contiguous_inputs():
    """MultiheadAttention hands over [B, H, L, d] views of [L, B, E] projections."""
    base = rnd(7, 2, 3 * 8, grad=False)
    q, k, v = (t.view(7, 2, 2, 4).permute(1, 2, 0, 3) for t in base.split(8, dim=-1))
    assert not q.is_contiguous()
    assert_close(FR.scaled_dot_product_attention(q, k, v), R.scaled_dot_product_attention_ref(q, k, v))


@pytest.mark.parametrize("backend", ["auto", "generic"])
@pytest.mark.parametrize("threads", [1, 2])
def test_sdpa_gemm_paths_and_threads(backend, threads):
    """The at::mm fallback (torch builds without MKL) and the backward's per-chunk partial dK/dV
    (fewer heads than threads) give the reference's result."""
    old_b, old_t = _C.get_gemm_backend(), torch.get_num_threads()
    _C.set_gemm_backend(backend)
    torch.set_num_threads(threads)
    try:
        q, k, v = rnd(1, 1, 300, 8), rnd(1, 1, 50, 8), rnd(1, 1, 50, 8)
        out = FR.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = R.scaled_dot_product_attention_ref(q, k, v, is_causal=True)
        assert_same_values_and_grads(out, ref, (q, k, v))
    finally:
        _C.set_gemm_backend(old_b)
        torch.set_num_threads(old_t)


def test_sdpa_saves_no_score_matrix():
    """Backward keeps O(L) per row (output and log-sum-exp), never the [L, S] probabilities."""
    B, H, L, S, E = 2, 2, 64, 96, 8
    q, k, v = rnd(B, H, L, E, dtype=torch.float32), rnd(B, H, S, E, dtype=torch.float32), rnd(B, H, S, E,
                                                                                             dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        FR.scaled_dot_product_attention(q, k, v).sum().backward()
    assert saved and max(saved) < B * H * L * S


def test_sdpa_dropout_uses_torch():
    q, k, v = rnd(2, 2, 5, 4), rnd(2, 2, 6, 4), rnd(2, 2, 6, 4)
    torch.manual_seed(3)
    a = FR.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert_close(a, b)
    assert not torch.allclose(a, FR.scaled_dot_product_attention(q, k, v))


def test_sdpa_gradcheck_and_double_backward():
    q, k, v = rnd(1, 2, 3, 4), rnd(1, 2, 5, 4), rnd(1, 2, 5, 3)
    mask = torch.rand(3, 5) < 0.7
    mask[:, 0] = True
    fn = lambda q, k, v: FR.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v), fast_mode=True)


def test_sdpa_float_mask_requiring_grad_is_differentiated():
    q, k, v = rnd(1, 1, 3, 4), rnd(1, 1, 5, 4), rnd(1, 1, 5, 4)
    mask = rnd(3, 5)
    out = FR.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = R.scaled_dot_product_attention_ref(q, k, v, attn_mask=mask)
    for a, b in zip(grads(out, (mask,), torch.ones_like(out)), grads(ref, (mask,), torch.ones_like(ref))):
        assert_close(a, b)


def test_sdpa_opcheck():
    q, k, v = rnd(2, 2, 5, 4), rnd(2, 2, 7, 4), rnd(2, 2, 7, 3)
    mask = torch.rand(2, 1, 5, 7) < 0.7
    torch.library.opcheck(torch.ops.fastrnn.sdpa_forward, (q, k, v, mask, False, 0.5))
    torch.library.opcheck(torch.ops.fastrnn.sdpa_forward, (q, k, v, None, True, 0.5))
    out, lse = torch.ops.fastrnn.sdpa_forward(q, k, v, mask, False, 0.5)
    torch.library.opcheck(torch.ops.fastrnn.sdpa_backward,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), mask, out.detach(),
                           lse.detach(), False, 0.5))


@pytest.mark.parametrize("call, match", [
    (lambda q: FR.scaled_dot_product_attention(q, q[..., :3], q), "key"),
    (lambda q: FR.scaled_dot_product_attention(q, q, q[:, :, :4]), "value"),
    (lambda q: FR.scaled_dot_product_attention(q, q.float(), q), "dtype"),
    (lambda q: FR.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 4, dtype=torch.int64)), "attn_mask"),
    (lambda q: FR.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 5, dtype=torch.bool)), "attn_mask"),
    (lambda q: FR.scaled_dot_product_attention(q[0], q[0], q[0], attn_mask=torch.ones(5, 5, dtype=torch.bool),
                                               is_causal=True), "attn_mask"),
    (lambda q: FR.scaled_dot_product_attention(q, q, q, dropout_p=1.5), "dropout_p"),
    (lambda q: FR.scaled_dot_product_attention(q[0, 0, 0], q, q), "query"),
    (lambda q: torch.ops.fastrnn.sdpa_forward(q[0], q, q, None, False, 1.0), "query"),
    (lambda q: torch.ops.fastrnn.sdpa_forward(q, q, q.to("meta"), None, False, 1.0), "value"),
])
def test_sdpa_bad_input_names_argument(call, match):
    q = rnd(2, 3, 5, 4, grad=False)
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(q)


def test_sdpa_empty_batch():
    q = rnd(0, 2, 5, 4)
    out = FR.scaled_dot_product_attention(q, q, q)
    assert out.shape == (0, 2, 5, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape


# ----------------------------------------------------------------------- MultiheadAttention
MHA_CONFIGS = {
    "default": dict(),
    "kdim_vdim": dict(kdim=5, vdim=7),
    "no_bias": dict(bias=False),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "batch_first": dict(batch_first=True),
}


def mha_pair(cfg, dtype=torch.float64):
    torch.manual_seed(11)
    ours = fastrnn.MultiheadAttention(8, 2, dtype=dtype, **cfg)
    torch.manual_seed(11)
    theirs = nn.MultiheadAttention(8, 2, dtype=dtype, **cfg)
    return ours, theirs


def mha_inputs(cfg, L=4, S=6, B=3, dtype=torch.float64):
    q = rnd(L, B, 8, dtype=dtype)
    k = rnd(S, B, cfg.get("kdim", 8), dtype=dtype)
    v = rnd(S, B, cfg.get("vdim", 8), dtype=dtype)
    if cfg.get("batch_first"):
        q, k, v = (t.detach().transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v))
    return q, k, v


@pytest.mark.parametrize("cfg_name", list(MHA_CONFIGS))
def test_mha_same_parameters_and_state_dict(cfg_name):
    ours, theirs = mha_pair(MHA_CONFIGS[cfg_name])
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name  # same initialisation under the same seed
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(b, strict=True)
    theirs.load_state_dict(a, strict=True)


@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("masks", ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn3d_float", "both",
                                   "causal"])
@pytest.mark.parametrize("cfg_name", list(MHA_CONFIGS))
def test_mha_matches_torch(cfg_name, masks, need_weights, average):
    cfg = MHA_CONFIGS[cfg_name]
    ours, theirs = mha_pair(cfg)
    q, k, v = mha_inputs(cfg)
    L, S, B = 4, 6, 3
    g = torch.Generator().manual_seed(5)
    kw = dict(need_weights=need_weights, average_attn_weights=average)
    if masks in ("kpm_bool", "both"):
        kpm = torch.rand(B, S, generator=g) < 0.3
        kpm[:, 0] = False
        kw["key_padding_mask"] = kpm
    if masks == "kpm_float":
        kw["key_padding_mask"] = torch.where(torch.rand(B, S, generator=g) < 0.3, float("-inf"), 0.0).double()
        kw["key_padding_mask"][:, 0] = 0.0
    if masks in ("attn2d_bool", "both"):
        am = torch.rand(L, S, generator=g) < 0.3
        am[:, 0] = False
        kw["attn_mask"] = am
    if masks == "attn3d_float":
        kw["attn_mask"] = torch.randn(B * 2, L, S, generator=g, dtype=torch.float64)
    if masks == "causal":
        kw["attn_mask"] = torch.triu(torch.full((L, S), float("-inf"), dtype=torch.float64), 1)
        kw["is_causal"] = True
    if cfg.get("add_bias_kv") or cfg.get("add_zero_attn"):
        kw.pop("is_causal", None)
    out, w = ours(q, k, v, **kw)
    out_t, w_t = theirs(q, k, v, **kw)
    assert_close(out, out_t)
    if need_weights:
        assert_close(w, w_t)
    else:
        assert w is None and w_t is None
    cot = torch.randn_like(out)
    ga = torch.autograd.grad(out, [q, k, v, *ours.parameters()], cot)
    gb = torch.autograd.grad(out_t, [q, k, v, *theirs.parameters()], cot)
    for a, b in zip(ga, gb):
        assert_close(a, b)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("L,B", [(4, 0), (0, 3)], ids=["empty_batch", "empty_target"])
def test_mha_empty_batch_or_target_as_torch(L, B, need_weights):
    ours, theirs = mha_pair({})
    q, k, v = mha_inputs({}, L=L, B=B)
    got, want = ours(q, k, v, need_weights=need_weights), theirs(q, k, v, need_weights=need_weights)
    assert got[0].shape == want[0].shape
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        assert got[1].shape == want[1].shape


@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_names_a_wrong_embedding_or_batch(need_weights):
    """A query of the wrong width gets torch's message (once a bare "mat1 and mat2 shapes cannot
    be multiplied"); a key batch other than the query's says which."""
    ours, theirs = mha_pair({})
    q, k, v = mha_inputs({})
    wide = torch.cat([q, q[..., :1]], -1)
    for m in (theirs, ours):
        with pytest.raises((RuntimeError, AssertionError), match=f"embedding dimension of {q.shape[-1]}, but got "
                                                                 f"{q.shape[-1] + 1}"):
            m(wide, k, v, need_weights=need_weights)
    with pytest.raises(RuntimeError, match="key's batch size 4 does not match query's 3"):
        ours(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
def test_mha_float_mask_of_another_dtype_raises_as_torch(which, mask_dtype, need_weights):
    """torch's float32 attention takes a float mask in float32 or the query's dtype only."""
    ours, theirs = mha_pair({}, dtype=torch.float32)
    q, k, v = mha_inputs({}, dtype=torch.float32)
    mask = torch.zeros((4, 6) if which == "attn_mask" else (3, 6), dtype=mask_dtype)
    for m in (theirs, ours):
        with pytest.raises(RuntimeError, match="dtype"):
            m(q, k, v, need_weights=need_weights, **{which: mask})


def test_mha_unbatched_and_float32():
    ours, theirs = mha_pair({}, dtype=torch.float32)
    q = rnd(5, 8, dtype=torch.float32)
    for nw in (True, False):
        a, b = ours(q, q, q, need_weights=nw), theirs(q, q, q, need_weights=nw)
        assert_close(a[0], b[0])
    ours.eval()
    theirs.eval()
    with torch.no_grad():  # torch takes its native fast path here
        x = rnd(2, 5, 8, dtype=torch.float32, grad=False)
        ours.batch_first = theirs.batch_first = True
        assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0])


def test_mha_dropout_in_training_only():
    ours = fastrnn.MultiheadAttention(8, 2, dropout=0.5)
    q = rnd(4, 3, 8, dtype=torch.float32)
    ours.eval()
    a, b = ours(q, q, q, need_weights=False)[0], ours(q, q, q, need_weights=False)[0]
    assert torch.equal(a, b)
    ours.train()
    assert not torch.allclose(ours(q, q, q, need_weights=False)[0], a)


def test_mha_bad_hyperparameters():
    with pytest.raises(ValueError, match="embed_dim"):
        fastrnn.MultiheadAttention(0, 2)
    with pytest.raises(AssertionError, match="divisible"):
        fastrnn.MultiheadAttention(10, 3)


# ----------------------------------------------------------------------- additive (Bahdanau)
def additive_case(B=3, T=5, S=7, Dq=5, Dk=6, D=37, Dv=4, dtype=torch.float64, bias=True):
    return dict(query=rnd(B, T, Dq, dtype=dtype), keys=rnd(B, S, Dk, dtype=dtype), values=rnd(B, S, Dv, dtype=dtype),
                w_q=rnd(D, Dq, dtype=dtype), w_k=rnd(D, Dk, dtype=dtype), v=rnd(D, dtype=dtype),
                bias=rnd(D, dtype=dtype) if bias else None)


def additive_mask(kind, B, T, S, dtype):
    g = torch.Generator().manual_seed(3)
    if kind == "none":
        return None
    if kind == "bool_bs":
        m = torch.rand(B, S, generator=g) < 0.6
        m[0] = False  # batch 0: every source position masked
        return m
    if kind == "bool_bts":
        m = torch.rand(B, T, S, generator=g) < 0.6
        m[1, T - 1] = False
        return m
    if kind == "float":
        m = torch.randn(B, T, S, generator=g, dtype=dtype)
        m[2, T - 1] = float("-inf")
        return m
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool_bs", "bool_bts", "float"])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("T, D", [(5, 37), (1, 16), (9, 64)])
def test_additive_matches_reference(T, D, scale, mask_kind, dtype):
    c = additive_case(T=T, D=D, dtype=dtype)
    mask = additive_mask(mask_kind, 3, T, 7, dtype)
    ctx, w = FR.additive_attention(**c, mask=mask, scale=scale)
    ctx_r, w_r = R.additive_attention_ref(**c, mask=mask, scale=scale)
    assert_close(ctx, ctx_r)
    assert_close(w, w_r)
    cots = (torch.randn_like(ctx), torch.randn_like(w))
    leaves = list(c.values())
    for a, b in zip(grads((ctx, w), leaves, cots), grads((ctx_r, w_r), leaves, cots)):
        assert_close(a, b)
        assert torch.isfinite(a).all()
    if mask_kind == "bool_bs":  # fully masked rows: zero weights, zero context
        assert not w[0].any() and not ctx[0].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_additive_nan_gives_nan_rows_as_the_reference(dtype):
    """A NaN query makes every energy of its row NaN, a NaN scale every energy: softmax gives NaN
    there, as the reference and the backward op do (the kernel used to take a row without a max
    for a fully masked one and return zeros). A NaN key spoils every row; a fully masked row
    still gives zeros."""
    c = additive_case(dtype=dtype)
    nan = float("nan")
    q_nan, k_nan = c["query"].clone(), c["keys"].clone()
    q_nan[1, 2, 0] = nan
    k_nan[0, 3, 1] = nan
    mask = torch.ones(3, 5, 7, dtype=torch.bool)  # (True: attended)
    mask[2, 1] = False  # one fully masked row
    qp, kp = torch.randn(3, 5, 37, dtype=dtype), torch.randn(3, 7, 37, dtype=dtype)
    for kw in (dict(query=q_nan), dict(keys=k_nan), dict(query=q_nan, mask=mask)):
        args = dict(c, **kw)
        got, want = FR.additive_attention(**args), R.additive_attention_ref(**args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, equal_nan=True)
        assert got[1].isnan().any()
    ctx, w = torch.ops.fastrnn.additive_attention_forward(qp, kp, c["values"], c["v"], None, nan)
    assert ctx.isnan().all() and w.isnan().all()
    ctx, w = torch.ops.fastrnn.additive_attention_forward(qp, kp, c["values"], c["v"], mask, 1.0)
    assert not w[2, 1].any() and not ctx[2, 1].any() and torch.isfinite(w).all()


def test_additive_no_bias_and_module():
    c = additive_case(bias=False)
    ctx, w = FR.additive_attention(**c)
    ctx_r, w_r = R.additive_attention_ref(**c)
    assert_close(ctx, ctx_r)
    m = fastrnn.AdditiveAttention(5, 6, 11, bias=True, scale=True).double()
    assert [n for n, _ in m.named_parameters()] == ["w_q", "w_k", "v", "bias"]
    q, keys, vals = rnd(3, 4, 5), rnd(3, 7, 6), rnd(3, 7, 2)
    mask = torch.rand(3, 7) < 0.7
    ctx, w = m(q, keys, vals, mask=mask)
    ctx_r, w_r = R.additive_attention_ref(q, keys, vals, m.w_q, m.w_k, m.v, m.bias, mask, scale=True)
    assert_close(ctx, ctx_r)
    assert_close(w, w_r)
    # the module without a bias (its constructor once raised KeyError: 'bias' set twice)
    m0 = fastrnn.AdditiveAttention(5, 6, 11, bias=False, scale=True).double()
    assert m0.bias is None and [n for n, _ in m0.named_parameters()] == ["w_q", "w_k", "v"]
    ctx0, w0 = m0(q, keys, vals, mask=mask)
    ctx0_r, w0_r = R.additive_attention_ref(q, keys, vals, m0.w_q, m0.w_k, m0.v, None, mask, scale=True)
    assert_close(ctx0, ctx0_r)
    assert_close(w0, w0_r)
    # one decoder step (2-D query), values default to keys
    ctx1, w1 = m(q[:, 0], keys, mask=mask)
    ctx1_r, w1_r = R.additive_attention_ref(q[:, :1], keys, keys, m.w_q, m.w_k, m.v, m.bias, mask, scale=True)
    assert ctx1.shape == (3, 6) and w1.shape == (3, 7)
    assert_close(ctx1, ctx1_r[:, 0])
    assert_close(w1, w1_r[:, 0])


def test_additive_never_materialises_the_tanh_tensor():
    """Nothing saved for backward is [B, T, S, D]-sized: memory stays O(B*T*S)."""
    B, T, S, D = 2, 16, 24, 32
    c = additive_case(B=B, T=T, S=S, D=D, Dq=8, Dk=8, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ctx, w = FR.additive_attention(**c)
    (ctx.sum() + w.sum()).backward()
    assert saved and max(saved) <= max(B * T * S, B * max(T, S) * D)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        R.additive_attention_ref(**c)
    assert max(saved) >= B * T * S * D  # the plain formula does


def test_additive_gradcheck_and_double_backward():
    c = additive_case(B=2, T=3, S=4, Dq=3, Dk=2, D=5, Dv=2)
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    names = list(c)
    fn = lambda *a: FR.additive_attention(**dict(zip(names, a)), mask=mask, scale=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(c.values()), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, tuple(c.values()), fast_mode=True)


def test_additive_opcheck():
    qp, kp, vals, v = rnd(2, 3, 5), rnd(2, 4, 5), rnd(2, 4, 3), rnd(5)
    mask = torch.rand(2, 1, 4) < 0.7
    torch.library.opcheck(torch.ops.fastrnn.additive_attention_forward, (qp, kp, vals, v, mask, 0.5))
    ctx, w = torch.ops.fastrnn.additive_attention_forward(qp, kp, vals, v, mask, 0.5)
    torch.library.opcheck(torch.ops.fastrnn.additive_attention_backward,
                          (torch.randn_like(ctx), torch.randn_like(w), qp.detach(), kp.detach(), vals.detach(),
                           v.detach(), w.detach(), 0.5))


@pytest.mark.parametrize("threads", [1, 2])
def test_additive_threads_and_small_batch(threads):
    """One batch row and two threads: the backward splits the query rows with partial d(keys)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c = additive_case(B=1, T=13, S=9, D=20)
        ctx, w = FR.additive_attention(**c)
        ctx_r, w_r = R.additive_attention_ref(**c)
        leaves = list(c.values())
        cots = (torch.randn_like(ctx), torch.randn_like(w))
        for a, b in zip(grads((ctx, w), leaves, cots), grads((ctx_r, w_r), leaves, cots)):
            assert_close(a, b)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("change, match", [
    (dict(query=lambda t: t[0]), "query"),
    (dict(keys=lambda t: t[:2]), "batch"),
    (dict(values=lambda t: t[:, :3]), "values"),
    (dict(w_q=lambda t: t[:, :2]), "w_q"),
    (dict(w_k=lambda t: t[:3]), "w_k"),
    (dict(v=lambda t: t[:3]), "v"),
    (dict(bias=lambda t: t.float()), "bias"),
    (dict(keys=lambda t: t.float()), "dtype"),
    (dict(mask=lambda _: torch.ones(3, 4, dtype=torch.bool)), "mask"),
    (dict(mask=lambda _: torch.ones(3, 7, dtype=torch.int32)), "mask"),
])
def test_additive_bad_input_names_argument(change, match):
    c = {k: (t.detach() if t is not None else None) for k, t in additive_case().items()}
    c["mask"] = None
    for k, f in change.items():
        c[k] = f(c[k])
    with pytest.raises((RuntimeError, ValueError), match=match):
        FR.additive_attention(**c)


def test_additive_module_bad_hyperparameters():
    with pytest.raises(ValueError, match="hidden_dim"):
        fastrnn.AdditiveAttention(4, 4, 0)


# ----------------------------------------------------------------------- Luong
@pytest.mark.parametrize("method", ["general", "dot"])
@pytest.mark.parametrize("mask_kind", ["none", "bool_bs", "float"])
def test_luong_matches_formula(method, mask_kind):
    m = fastrnn.LuongAttention(6, 6 if method == "dot" else 5, method=method).double()
    q, keys, vals = rnd(3, 4, 6), rnd(3, 7, 6 if method == "dot" else 5), rnd(3, 7, 2)
    mask = additive_mask(mask_kind, 3, 4, 7, torch.float64)
    ctx, w = m(q, keys, vals, mask=mask)
    kp = keys if method == "dot" else keys @ m.weight.T
    scores = q @ kp.transpose(1, 2)
    if mask is not None:
        mm = mask.unsqueeze(1) if mask.dim() == 2 else mask
        scores = scores.masked_fill(~mm, float("-inf")) if mm.dtype == torch.bool else scores + mm
    expect = torch.softmax(scores, -1).nan_to_num(0.0)
    assert_close(w, expect)
    assert_close(ctx, expect @ vals)
    ctx.sum().backward()
    assert torch.isfinite(q.grad).all()
    ctx1, w1 = m(q[:, 0], keys)
    assert ctx1.shape == (3, keys.shape[-1]) and w1.shape == (3, 7)
    assert_close(ctx1, m(q[:, :1], keys)[0][:, 0])


def test_luong_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        fastrnn.LuongAttention(4, method="concat")
    with pytest.raises(ValueError, match="key_dim"):
        fastrnn.LuongAttention(4, 5, method="dot")
    with pytest.raises(RuntimeError, match="weight"):
        FR.luong_attention(rnd(2, 3, 4), rnd(2, 5, 6), rnd(2, 5, 6), weight=rnd(4, 5))


# ----------------------------------------------------------------------- torch.compile
class AttnModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = fastrnn.MultiheadAttention(8, 2, batch_first=True)
        self.add = fastrnn.AdditiveAttention(8, 8, 16, scale=True)
        self.luong = fastrnn.LuongAttention(8)

    def forward(self, x, kpm):
        h, _ = self.mha(x, x, x, key_padding_mask=kpm, need_weights=False)
        c1, _ = self.add(h, x, mask=~kpm)
        c2, _ = self.luong(h[:, -1], x, mask=~kpm)
        q = h.view(h.shape[0], h.shape[1], 2, 4).transpose(1, 2)
        s = FR.scaled_dot_product_attention(q, q, q, is_causal=True)
        return c1.sum(1) + c2 + s.sum((1, 2)).repeat(1, 2)


def test_compile_fullgraph_attention():
    torch._dynamo.reset()
    model = AttnModel()
    x = torch.randn(3, 6, 8)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    eager = model(x, kpm)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, kpm)
    out.sum().backward()
    assert_close(out, eager)
    for g, e in zip([p.grad for p in model.parameters()], eager_grads):
        assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_nonfinite_scores_give_nan_rows_as_torch(dtype):
    # A NaN or +inf score makes a row's softmax NaN in torch; the kernel used to return the zeros
    # of a row with no key attended (lse = +inf) instead. A non-finite scale: every row NaN.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 4, dtype=dtype), torch.randn(2, 2, 5, 4, dtype=dtype),
               torch.randn(2, 2, 5, 3, dtype=dtype))
    k[..., 0] = k[..., 0].abs() * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=dtype)  # +inf and -inf scores
    q_inf, q_nan = q.clone(), q.clone()
    q_inf[0, 0, 0, 0] = float("inf")
    q_nan[1, 1, 2, 3] = float("nan")
    calls = [(q, s) for s in (float("nan"), float("inf"), -float("inf"))] + [(q_inf, 0.5), (q_nan, 0.5)]
    for query, scale in calls:
        want = F.scaled_dot_product_attention(query, k, v, scale=scale)
        got = FR.scaled_dot_product_attention(query, k, v, scale=scale)
        out, lse = torch.ops.fastrnn.sdpa_forward(query, k, v, None, False, scale)
        nan_rows = want.isnan().any(-1)
        if query is q:  # a non-finite scale: every row
            assert nan_rows.all()
        else:  # one non-finite element of the query: its row only
            assert nan_rows.sum().item() == 1
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-6, atol=1e-6)
        assert torch.equal(lse.isnan(), nan_rows)


def test_forward_mode_ad_as_the_reference():
    """Dual tensors through the attention functions give the reference's (torch's) tangents:
    inside a dual level they run the plain formulas (the fused ops' autograd has no jvp)."""
    import torch.autograd.forward_ad as fwAD
    c = additive_case()
    t = torch.randn_like(c["query"])
    q, k, v = (rnd(2, 2, 3, 4), rnd(2, 2, 5, 4), rnd(2, 2, 5, 3))
    tq = torch.randn_like(q)
    calls = [(lambda x: FR.additive_attention(**dict(c, query=x)), lambda x: R.additive_attention_ref(**dict(c, query=x)),
              c["query"], t),
             (lambda x: FR.scaled_dot_product_attention(x, k, v), lambda x: F.scaled_dot_product_attention(x, k, v),
              q, tq)]
    for ours, ref, x, tx in calls:
        res = []
        for fn in (ours, ref):
            with fwAD.dual_level():
                out = fn(fwAD.make_dual(x.detach(), tx))
                res.append([fwAD.unpack_dual(o) for o in (out if isinstance(out, tuple) else (out,))])
        for (p, tp), (r, tr) in zip(*res):
            assert_close(p, r)
            assert tp is not None
            assert_close(tp, tr)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_output_layout_as_torch(batch_first):
    """The output's strides are torch.nn's in every mode: its native inference path (eval, no
    grad, batch-first self-attention) returns a contiguous [B, L, E] where fastrnn once returned
    a transposed view (and .view() on it failed); elsewhere both return the transposed layout."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    ours = fastrnn.MultiheadAttention(8, 2, batch_first=batch_first)
    ours.load_state_dict(ref.state_dict())
    x, y = torch.randn(3, 5, 8), torch.randn(3, 6, 8) if batch_first else torch.randn(6, 5, 8)
    for training, grad, self_attn, need_weights in itertools.product([False, True], repeat=4):
        kv = x if self_attn else y
        for m in (ref, ours):
            m.train(training)
        with torch.set_grad_enabled(grad):
            got, want = ours(x, kv, kv, need_weights=need_weights), ref(x, kv, kv, need_weights=need_weights)
        assert got[0].stride() == want[0].stride(), (training, grad, self_attn, need_weights)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_mha_as_self_attn_of_torch_transformer_layers():
    """fastrnn.MultiheadAttention as the self_attn of torch.nn.TransformerEncoderLayer: the
    layer's inference fast path calls self_attn.merge_masks (once an AttributeError)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    ours = copy.deepcopy(layer)
    mha = fastrnn.MultiheadAttention(8, 2, batch_first=True)
    mha.load_state_dict(layer.self_attn.state_dict())
    ours.self_attn = mha
    x = torch.randn(3, 5, 8)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        for kw in ({}, dict(src_key_padding_mask=pad)):
            got, want = ours(x, **kw), layer(x, **kw)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert mha.merge_masks(None, pad, x) == layer.self_attn.merge_masks(None, pad, x)


# ------------------------------------------------- drop-in details of SDPA and MultiheadAttention
def test_sdpa_single_rows_with_odd_strides_as_torch():
    """A one-row query (a decoding step) or a one-step value made by .mT has a row stride below
    its width; torch calls it contiguous, and the GEMMs once read it with that stride as the
    leading dimension: wrong values (and oneMKL's "Parameter 8 was incorrect")."""
    torch.manual_seed(0)
    for qs, vs in (((2, 2, 8, 1), (2, 2, 4, 6)), ((2, 2, 3, 8), (2, 2, 6, 1))):
        q = rnd(*qs).mT if qs[-1] == 1 else rnd(*qs)
        S = 4 if vs[-1] != 1 else 1
        k = rnd(2, 2, S, 8)
        v = rnd(*vs).mT if vs[-1] == 1 else rnd(*vs)
        assert q.is_contiguous() and v.is_contiguous()
        got, want = FR.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
        assert_same_values_and_grads(got, want, (q, k, v))
    # The additive kernel reads its projections the same way.
    qp, kp = rnd(2, 5, 1).mT, rnd(2, 4, 5)
    vals, v = rnd(2, 4, 3), rnd(5)
    got = torch.ops.fastrnn.additive_attention_forward(qp, kp, vals, v, None, 1.0)
    want = R.additive_attention_core_ref(qp, kp, vals, v, None, 1.0)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_attention_under_torch_func_transforms():
    """torch.func.grad / jacrev through fastrnn's SDPA and MultiheadAttention (need_weights=False)
    as through torch's (the ops' autograd Function once refused functorch)."""
    torch.manual_seed(0)
    q, k, v = rnd(1, 2, 3, 4, grad=False), rnd(1, 2, 5, 4, grad=False), rnd(1, 2, 5, 4, grad=False)
    for f in (FR.scaled_dot_product_attention, F.scaled_dot_product_attention):
        g = torch.func.grad(lambda q: f(q, k, v).sin().sum())(q)
        j = torch.func.jacrev(lambda v: f(q, k, v))(v)
        if f is FR.scaled_dot_product_attention:
            got = (g, j)
        else:
            assert_close(got[0], g)
            assert_close(got[1], j)
    ours, theirs = mha_pair({})
    x = rnd(4, 3, 8, grad=False)
    run = lambda m: torch.func.grad(lambda x: m(x, x, x, need_weights=False)[0].sum())(x)  # noqa: E731
    assert_close(run(ours), run(theirs))


@pytest.mark.parametrize("q_heads, kv_heads, lead", [(4, (2, 2), (2,)), (4, (2, 1), (2,)), (4, (4, 4), (2,)),
                                                      (4, (1, 1), ()), (6, (3, 2), (2, 2))])
def test_sdpa_enable_gqa_as_torch(q_heads, kv_heads, lead):
    torch.manual_seed(0)
    q = rnd(*lead, q_heads, 3, 8)
    k, v = rnd(*lead, kv_heads[0], 5, 8), rnd(*lead, kv_heads[1], 5, 6)
    got = FR.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert_same_values_and_grads(got, want, (q, k, v))


def test_sdpa_enable_gqa_refuses_what_torch_refuses():
    q, k, v = rnd(2, 4, 3, 8), rnd(2, 3, 5, 8), rnd(2, 3, 5, 8)
    for f in (FR.scaled_dot_product_attention, F.scaled_dot_product_attention):
        with pytest.raises(RuntimeError, match="must divide the number of heads"):
            f(q, k, v, enable_gqa=True)
        with pytest.raises(RuntimeError):
            f(q, k[:, :2], v[:, :2])  # heads that do not broadcast without enable_gqa
        with pytest.raises(IndexError):
            f(q[0, 0], k[0, 0], v[0, 0], enable_gqa=True)  # no heads dimension


def test_sdpa_causal_with_mask_where_torch_takes_both():
    """torch's CPU SDPA applies is_causal and an attn_mask together for 4-D inputs of one batch
    and head count with equal widths; elsewhere it refuses the pair. fastrnn does the same."""
    torch.manual_seed(0)
    for L, S in ((4, 4), (3, 5), (5, 3)):
        q, k, v = rnd(2, 2, L, 8), rnd(2, 2, S, 8), rnd(2, 2, S, 8)
        for mask in (torch.rand(L, S) < 0.7, torch.randn(2, 1, L, S, dtype=torch.float64)):
            got = FR.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
            assert_same_values_and_grads(got, want, (q, k, v))
    for L, S in ((0, 5), (3, 0)):  # empty lengths: taken by both
        q, k, v = rnd(2, 2, L, 8), rnd(2, 2, S, 8), rnd(2, 2, S, 8)
        m = torch.rand(L, S) < 0.7
        assert_close(FR.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True),
                     F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True))
    m = torch.rand(3, 5) < 0.7
    q4, k4 = rnd(2, 2, 3, 8), rnd(2, 2, 5, 8)
    refused = [((rnd(2, 3, 8), rnd(2, 5, 8), rnd(2, 5, 8)), m),         # 3-D
               ((q4, k4, rnd(2, 2, 5, 6)), m),                           # value width != query width
               ((q4, rnd(1, 2, 5, 8), rnd(1, 2, 5, 8)), m),               # broadcast batch
               ((q4, k4, k4), m.expand(2, 3, 5)),                         # a 3-D mask
               ((q4, k4, k4), rnd(3, 5)),                                 # a mask that needs a gradient
               ((rnd(2, 2, 8, 3).mT, k4, k4), m)]                         # a last stride other than 1
    for (q, k, v), mask in refused:
        for f in (FR.scaled_dot_product_attention, F.scaled_dot_product_attention):
            with pytest.raises(RuntimeError, match="Explicit attn_mask should not be set when is_causal=True"):
                f(q, k, v, attn_mask=mask, is_causal=True)


def test_sdpa_causal_with_mask_compiles_fullgraph():
    """(The check of torch's flash flag is not traceable: it is skipped while compiling.)"""
    q, k, v = (torch.randn(2, 2, n, 8) for n in (4, 5, 5))
    m = torch.rand(4, 5) < 0.7
    fn = torch.compile(lambda q, k, v: FR.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True),
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True))


@pytest.mark.parametrize("L, S", [(0, 4), (3, 0), (0, 0)])
def test_sdpa_empty_lengths_with_many_leading_dims(L, S):
    q, k, v = rnd(2, 3, 2, L, 4), rnd(2, 3, 2, S, 4), rnd(2, 3, 2, S, 5)
    got, want = FR.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert got.shape == want.shape == (2, 3, 2, L, 5)
    assert_close(got, want)


def test_sdpa_dropout_bounds_and_scale_type_as_torch():
    q = rnd(2, 2, 3, 4)
    for f in (FR.scaled_dot_product_attention, F.scaled_dot_product_attention):
        assert f(q, q, q, dropout_p=1.0).abs().max() == 0  # everything dropped
        for p in (1.5, -0.1):
            with pytest.raises(RuntimeError):
                f(q, q, q, dropout_p=p)
        for bad in ("a", torch.tensor([0.5])):
            with pytest.raises(TypeError, match="scale"):
                f(q, q, q, scale=bad)
        with pytest.raises(TypeError, match="attn_mask"):  # (not read as a tensor by the pair check)
            f(q, q, q, attn_mask=[1], is_causal=True)
        assert_close(f(q, q, q, scale=2), FR.scaled_dot_product_attention(q, q, q, scale=2.0))


def test_mha_dropout_one_in_training_as_torch():
    ours, theirs = mha_pair(dict(dropout=1.0))
    q, k, v = mha_inputs({})
    for m in (ours, theirs):
        out, _ = m(q, k, v, need_weights=False)
        assert torch.equal(out, F.linear(torch.zeros_like(q), m.out_proj.weight, m.out_proj.bias))


def test_mha_shape_errors_raise_torchs_assertion_error():
    """torch's multi_head_attention_forward checks these shapes with `assert`; code written for
    torch.nn catches AssertionError, so fastrnn raises that class (once RuntimeError)."""
    q = torch.randn(3, 2, 8, dtype=torch.float64)
    cases = [({}, (torch.randn(3, 2, 6, dtype=torch.float64),) * 3, {}, "embedding dimension of 8"),
             ({}, (q, torch.randn(4, 2, 8, dtype=torch.float64), torch.randn(5, 2, 8, dtype=torch.float64)), {},
              "does not match value shape"),
             ({}, (q, q, q), dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), "key_padd"),
             (dict(kdim=5, vdim=7), (q, torch.randn(4, 2, 5, dtype=torch.float64),
                                     torch.randn(6, 2, 7, dtype=torch.float64)), {}, "sequence and batch dims")]
    for cfg, args, kw, match in cases:
        ours, theirs = mha_pair(cfg)
        for m in (theirs, ours):
            for need_weights in (True, False):
                with pytest.raises(AssertionError, match=match):
                    m(*args, need_weights=need_weights, **kw)


def test_mha_answers_as_torch_where_torch_takes_its_native_path():
    """Eval, no grad, batch-first self-attention: torch.nn answers on its native path, whose
    answers differ from its general path's (NaN for a fully masked row, is_causal without a mask
    ignored, a 4-D mask taken, a contiguous output); fastrnn gives torch.nn's there too."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours = fastrnn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8)
    full = torch.zeros(3, 3, dtype=torch.bool)
    full[1] = True
    nobias = fastrnn.MultiheadAttention(8, 2, batch_first=True, bias=False).eval()
    nobias_ref = nn.MultiheadAttention(8, 2, batch_first=True, bias=False).eval()
    nobias.load_state_dict(nobias_ref.state_dict())
    with torch.no_grad():  # (bias=False: torch merges the masks, then runs its general path)
        for mask in (torch.zeros(1, 1, 3, 3, dtype=torch.bool), torch.zeros(2, 2, 3, 3, dtype=torch.bool)):
            with pytest.raises(Exception) as want:
                nobias_ref(x, x, x, attn_mask=mask)
            with pytest.raises(want.type):
                nobias(x, x, x, attn_mask=mask)
        torch.testing.assert_close(nobias(x, x, x), nobias_ref(x, x, x), rtol=0, atol=0)
    calls = [dict(attn_mask=full, need_weights=False), dict(is_causal=True, need_weights=False),
             dict(attn_mask=torch.zeros(1, 1, 3, 3, dtype=torch.bool)), dict(attn_mask=torch.randn(3, 3)),
             dict(key_padding_mask=torch.tensor([[False, False, True], [False, False, False]]))]
    with torch.no_grad():
        for kw in calls:
            got, want = ours(x, x, x, **kw), theirs(x, x, x, **kw)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
            assert got[0].stride() == want[0].stride()


def test_mha_without_masks_runs_the_fused_kernel_on_torchs_native_path(monkeypatch):
    """Without masks torch's native path answers as its general one (up to rounding), so fastrnn's
    fused attention runs there (what benchmarks/bench_attention.py measures), in torch's
    contiguous layout; with a mask torch.nn's forward runs instead."""
    calls = []
    real = FR.scaled_dot_product_attention
    monkeypatch.setattr(FR, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours = fastrnn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        got, want = ours(x, x, x, need_weights=False), theirs(x, x, x, need_weights=False)
        assert calls == [1] and got[0].stride() == want[0].stride()
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        ours(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
        assert calls == [1]


@pytest.mark.parametrize("method", ["general", "dot"])
def test_luong_attention_of_an_empty_source_as_additive(method):
    """No keys (S = 0): zero context and empty weights, as additive attention gives (the
    reference's softmax once raised an IndexError on the empty dimension)."""
    q, k = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 0, 4, dtype=torch.float64)
    for m in (fastrnn.LuongAttention(4, method=method).double(), fastrnn.AdditiveAttention(4, 4, 5).double()):
        context, weights = m(q, k)
        assert context.shape == (2, 3, 4) and weights.shape == (2, 3, 0)
        assert torch.equal(context, torch.zeros_like(context))
