"""
Every layer's backward against float64 central differences. Each check builds the scalar
L = sum(out * R) for a fixed random R, so dL/dout = R, and compares the analytic gradient of every
input with the numerical one. CS231n's relative error (see conftest.rel_error) must stay below 1e-6.
"""
import math
import warnings

import numpy as np
import pytest

import miniclip as mc
from conftest import numerical_grad, rel_error

TOL = 1e-6


def check(forward, backward, inputs, differentiable, seed=0):
    """Compare backward() with central differences for each input named in `differentiable`."""
    rng = np.random.default_rng(seed)
    out, cache = forward(*inputs)
    R = rng.standard_normal(np.shape(out))
    grads = backward(R, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    worst = 0.0
    for i, g in zip(differentiable, grads):
        num = numerical_grad(lambda: float(np.sum(forward(*inputs)[0] * R)), inputs[i])
        err = rel_error(g.reshape(-1), num)
        assert err < TOL, f"input {i}: relative error {err:.2e}"
        worst = max(worst, err)
    return worst


def randn(*shape, seed=1):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape)


def test_linear():
    check(mc.linear_forward, mc.linear_backward, [randn(2, 3, 5), randn(4, 5), randn(4)], [0, 1, 2])


def test_linear_without_bias():
    x, w = randn(6, 5), randn(4, 5)
    dx, dw, db = mc.linear_backward(np.ones((6, 4)), mc.linear_forward(x, w)[1])
    assert db is None
    check(lambda x, w: mc.linear_forward(x, w), lambda d, c: mc.linear_backward(d, c)[:2], [x, w], [0, 1])


@pytest.mark.parametrize("fast", [False, True])
def test_layernorm(fast):
    x = randn(3, 4, 7) * 3 + 1
    forward, backward = (mc.layernorm_forward_fast, mc.layernorm_backward_fast) if fast else \
        (mc.layernorm_forward, mc.layernorm_backward)
    check(forward, backward, [x, randn(7), randn(7)], [0, 1, 2])


@pytest.mark.parametrize("fast", [False, True])
def test_quickgelu(fast):
    forward, backward = (mc.quickgelu_forward_fast, mc.quickgelu_backward_fast) if fast else \
        (mc.quickgelu_forward, mc.quickgelu_backward)
    check(forward, backward, [randn(4, 6) * 3], [0])


@pytest.mark.parametrize("threads", [1, 3])
def test_fast_layernorm_and_quickgelu_are_the_plain_ones(monkeypatch, threads):
    """The speed devices' LayerNorm (sums as BLAS products) and QuickGELU (sigmoid through tanh) compute
    the plain layers' numbers up to rounding, forward and backward, in one piece or split over threads:
    float64. Measured over 20 inputs: forward 2.8e-14, backward 2.5e-13 (LayerNorm's dx, a difference of
    nearly equal terms); the bounds are about 4x those."""
    monkeypatch.setattr(mc, "MIN_SPLIT", 0)
    monkeypatch.setattr(mc, "cpu_threads", lambda: threads)
    x, dout = (randn(5, 6, 16, seed=s) * 3 + 1 for s in (1, 2))
    g, b = randn(16), randn(16, seed=3)
    for plain, fast, args in ((mc.layernorm_forward, mc.layernorm_forward_fast, (g, b)),
                              (mc.quickgelu_forward, mc.quickgelu_forward_fast, ())):
        (out, cache), (out_fast, cache_fast) = plain(x, *args), fast(x, *args)
        assert rel_error(out_fast, out) < 1e-13
        back = {mc.layernorm_forward: (mc.layernorm_backward, mc.layernorm_backward_fast),
                mc.quickgelu_forward: (mc.quickgelu_backward, mc.quickgelu_backward_fast)}[plain]
        grads, grads_fast = back[0](dout, cache), back[1](dout, cache_fast)
        for a, c in zip(grads if isinstance(grads, tuple) else (grads,), grads_fast if isinstance(grads_fast, tuple) else (grads_fast,)):
            assert rel_error(c, a) < 1e-12


def test_erf_matches_math_erf():
    """Cody's approximation to the last bits of float64, on and across each interval's boundaries."""
    x = np.concatenate([np.linspace(-12, 12, 48001), [0.0, -0.0, 1e-300, 0.46875, -0.46875, 4.0, -4.0, 30.0]])
    x = np.concatenate([x, np.nextafter(x, np.inf)])
    ref = np.array([math.erf(v) for v in x])
    assert np.abs(mc.erf(x) - ref).max() < 1e-15
    assert np.array_equal(mc.erf(np.array([np.inf, -np.inf])), [1.0, -1.0])
    assert np.isnan(mc.erf(np.array([np.nan]))).all()


def test_gelu():
    x = np.concatenate([randn(4, 6) * 3, [[0.0, 0.3, -0.5, 4.5, -6.0, 9.0]]])   # every interval of erf
    check(mc.gelu_forward, mc.gelu_backward, [x], [0])


def test_gelu_is_the_normal_cdf_times_x():
    x = randn(50) * 4
    want = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x]
    assert np.abs(mc.gelu_forward(x)[0] - want).max() < 1e-15


def test_cross_entropy_head():
    """The bag-of-words baseline's loss and the supervised classifier's: features, weights and bias;
    bags of 3 words, of 1 (a one-hot label), and empty."""
    q = np.zeros((4, 7))
    q[:, [1, 3, 5]] = 1 / 3
    q[2] = np.eye(7)[6]
    q[3] = 0
    check(lambda f, w, b: mc.cross_entropy_head_forward(f, w, b, q),
          lambda d, cache: tuple(d * g for g in mc.cross_entropy_head_backward(cache)),     # d: the scalar loss's R
          [randn(4, 5), randn(7, 5), randn(7)], [0, 1, 2])


def test_bag_of_words_counts_the_caption_only():
    """SOT (first), EOT (the largest id) and the padding after it are left out; id 0 inside is a word ("!")."""
    V = 10
    ids = np.array([[8, 3, 0, 3, 9, 0, 0], [8, 5, 9, 0, 0, 0, 0]])
    q = mc.bag_of_words(ids, V)
    assert np.allclose(q[0], np.bincount([3, 0, 3], minlength=V) / 3) and np.allclose(q[1], np.eye(V)[5])


def test_softmax():
    check(mc.softmax_forward, mc.softmax_backward, [randn(3, 5, 6)], [0])


@pytest.mark.parametrize("causal", [False, True])
def test_attention(causal):
    N, T, D, H = 2, 5, 12, 3
    inputs = [randn(N, T, D), randn(3 * D, D) * 0.3, randn(3 * D), randn(D, D) * 0.3, randn(D)]
    fwd = lambda *a: mc.attention_forward(*a, n_heads=H, causal=causal)
    check(fwd, mc.attention_backward, inputs, [0, 1, 2, 3, 4])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("at", [None, np.array([3, 0])])
def test_fast_attention(causal, at):
    N, T, D, H = 2, 5, 12, 3
    inputs = [randn(N, T, D), randn(3 * D, D) * 0.3, randn(3 * D), randn(D, D) * 0.3, randn(D)]
    fwd = lambda *a: mc.attention_forward_fast(*a, n_heads=H, causal=causal, at=at)
    check(fwd, mc.attention_backward_fast, inputs, [0, 1, 2, 3, 4])


def test_attention_key_bias_gets_no_gradient():
    """q.(k + b) = q.k + q.b adds the same number to every score in a row, and softmax ignores that."""
    N, T, D, H = 2, 5, 6, 2
    out, cache = mc.attention_forward(randn(N, T, D), randn(3 * D, D), randn(3 * D), randn(D, D), randn(D), H, False)
    db_in = mc.attention_backward(randn(N, T, D), cache)[2]
    assert np.abs(db_in[D:2 * D]).max() < 1e-12 < np.abs(db_in[:D]).max()


def test_causal_attention_ignores_the_future():
    """Changing token t must leave outputs before t unchanged."""
    N, T, D, H = 1, 6, 8, 2
    x, w_in, b_in, w_out, b_out = randn(N, T, D), randn(3 * D, D), randn(3 * D), randn(D, D), randn(D)
    out1 = mc.attention_forward(x, w_in, b_in, w_out, b_out, H, True)[0]
    x[:, 4] += 1.0
    out2 = mc.attention_forward(x, w_in, b_in, w_out, b_out, H, True)[0]
    assert np.array_equal(out1[:, :4], out2[:, :4]) and not np.allclose(out1[:, 4:], out2[:, 4:])


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("act", sorted(mc.ACTIVATIONS))
@pytest.mark.parametrize("at", [None, np.array([1, 3])])
@pytest.mark.parametrize("F", [None, 20])                  # the MLP 4D wide, or 2.5D
def test_block(fast, act, at, F):
    N, T, D, H = 2, 4, 8, 2
    keys, shapes = mc.BLOCK_KEYS, mc.block_shapes(D, F)
    inputs = [randn(N, T, D)] + [randn(*shapes[k], seed=i) * 0.5 for i, k in enumerate(keys)]
    forward, backward = (mc.block_forward_fast, mc.block_backward_fast) if fast else (mc.block_forward, mc.block_backward)
    fwd = lambda x, *p: forward(x, dict(zip(keys, p)), H, True, 1e-5, act, at)

    def bwd(d, cache):
        dx, g = backward(d, cache)
        return (dx, *[g[k] for k in keys])
    check(fwd, bwd, inputs, list(range(13)))


@pytest.mark.parametrize("causal", [False, True])
def test_the_fast_block_read_at_one_position_is_the_plain_block_read_there(causal):
    """
    block_forward_fast(x, at=at), which works out those positions alone, is the plain block_forward(x)
    read there, and its backward is the plain block's backward with a gradient only at those positions
    (float64, up to rounding: measured 4e-15 for the output, 1.2e-13 for the worst gradient). A block
    that saw the wrong query, mask row or residual row, or sent a gradient to the wrong place, is off by
    order 1.
    """
    N, T, D, H = 3, 6, 12, 3
    p = {k: randn(*s, seed=i) * 0.5 for i, (k, s) in enumerate(mc.block_shapes(D).items())}
    x, at = randn(N, T, D), np.array([5, 0, 2])
    rows = np.arange(N)
    whole, whole_cache = mc.block_forward(x, p, H, causal, 1e-5)
    one, one_cache = mc.block_forward_fast(x, p, H, causal, 1e-5, at=at)
    assert np.allclose(mc.block_forward(x, p, H, causal, 1e-5, at=at)[0], one, rtol=0, atol=1e-12)
    assert one.shape == (N, 1, D)
    assert rel_error(one[:, 0], whole[rows, at]) < 5e-14
    dout = np.zeros_like(whole)
    dout[rows, at] = randn(N, D, seed=7)
    dx, g = mc.block_backward(dout, whole_cache)
    dx_one, g_one = mc.block_backward_fast(dout[rows, at][:, None], one_cache)
    assert rel_error(dx_one, dx) < 1e-12
    assert max(rel_error(g_one[k], g[k]) for k in g) < 1e-12


@pytest.mark.parametrize("n, threads", [(1, 2), (2, 2), (5, 2), (5, 3), (7, 4), (3, 8)])
def test_by_rows_covers_every_row_once(monkeypatch, n, threads):
    monkeypatch.setattr(mc, "MIN_SPLIT", 0)
    monkeypatch.setattr(mc, "cpu_threads", lambda: threads)
    slices = []
    mc.by_rows(slices.append, np.zeros((n, 3)))
    rows = [i for r in slices for i in range(n)[r]]
    assert sorted(rows) == list(range(n)) and len(slices) == min(n, threads)


@pytest.mark.parametrize("threads", [2, 3])
def test_by_rows_keeps_the_callers_errstate_in_every_thread(monkeypatch, threads):
    """train.py runs a step under numpy.errstate(all="ignore") and reports a non-finite loss itself. The
    last slice, which overflows here, runs on a pool thread; it must follow the caller's errstate too."""
    monkeypatch.setattr(mc, "MIN_SPLIT", 0)
    monkeypatch.setattr(mc, "cpu_threads", lambda: threads)
    x = np.zeros((6, 2))
    x[-1] = 1000.0                                      # exp overflows in the last rows only
    out = np.empty_like(x)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        mc.by_rows(lambda r: np.exp(x[r], out=out[r]), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # a RuntimeWarning would fail the test
        with np.errstate(over="ignore"):
            mc.by_rows(lambda r: np.exp(x[r], out=out[r]), x)
    assert np.isinf(out[-1]).all() and (out[:-1] == 1).all()


@pytest.mark.parametrize("threads", [2, 3])
def test_rows_split_across_threads_give_the_same_numbers(monkeypatch, threads):
    """
    by_rows splits only arrays of MIN_SPLIT elements or more, larger than the checks above use. Here
    it splits every array, and a block (LayerNorm, attention, QuickGELU), forward and backward, must
    give the same bits as in one piece.
    """
    N, T, D, H = 5, 4, 12, 3
    shapes = mc.block_shapes(D)
    p = {k: randn(*shapes[k], seed=i).astype(np.float32) * 0.5 for i, k in enumerate(mc.BLOCK_KEYS)}
    x, dout = randn(N, T, D).astype(np.float32), randn(N, T, D, seed=2).astype(np.float32)

    def run():
        arrays = []
        for causal in (False, True):
            for at in (None, np.array([3, 0, 1, 3, 2])):
                out, cache = mc.block_forward_fast(x, p, H, causal, 1e-5, at=at)
                dx, g = mc.block_backward_fast(dout if at is None else dout[:, :1], cache)
                arrays += [out, dx, *g.values()]
        return arrays
    whole = run()
    calls = []
    by_rows = mc.by_rows
    monkeypatch.setattr(mc, "by_rows", lambda fn, a: (calls.append(len(a)), by_rows(fn, a)))
    monkeypatch.setattr(mc, "MIN_SPLIT", 0)
    monkeypatch.setattr(mc, "cpu_threads", lambda: threads)
    split = run()
    assert len(calls) == 4 * 8          # each block: 2 LayerNorms, attention and QuickGELU, forward and back
    assert all(np.array_equal(a, b) for a, b in zip(whole, split))


def test_patchify_is_conv1():
    """patchify @ W^T equals a direct stride-P convolution written as loops."""
    N, S, P, D = 2, 12, 4, 5
    pixels, w = randn(N, 3, S, S), randn(D, 3, P, P)
    ours = mc.patchify(pixels, P) @ w.reshape(D, -1).T                 # (N, G*G, D)
    G = S // P
    for n in range(N):
        for gy in range(G):
            for gx in range(G):
                patch = pixels[n, :, gy * P:(gy + 1) * P, gx * P:(gx + 1) * P]
                want = np.tensordot(w, patch, axes=([1, 2, 3], [0, 1, 2]))
                assert np.allclose(ours[n, gy * G + gx], want)


def test_embed_image():
    N, G, P, D = 2, 2, 3, 4
    patches = randn(N, G * G, 3 * P * P)
    fwd = lambda w, cls, pos: mc.embed_image_forward(patches, w, cls, pos)
    check(fwd, mc.embed_image_backward, [randn(D, 3, P, P), randn(D), randn(1 + G * G, D)], [0, 1, 2])


@pytest.mark.parametrize("fast", [False, True])
def test_embed_tokens_repeated_ids(fast):
    ids = np.array([[3, 1, 3, 0], [1, 1, 2, 3]])      # repeated ids must accumulate; id 4 never occurs
    fwd = lambda tok, pos: mc.embed_tokens_forward(ids, tok, pos)
    check(fwd, mc.embed_tokens_backward_fast if fast else mc.embed_tokens_backward, [randn(5, 6), randn(7, 6)], [0, 1])


def test_fast_embed_tokens_backward_is_the_plain_one():
    """The sorted sums against add.at on a text batch's shape, float64: every id's row, those that occur
    many times (the padding id 0: 224 rows whose sum nearly cancels in places), once, or never. Measured
    over 20 inputs: 6.9e-15; the bound is about 4x that."""
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 300, (32, 16))
    ids[:, 9:] = 0
    dout = randn(32, 16, 8, seed=5)
    cache = mc.embed_tokens_forward(ids, randn(400, 8), randn(20, 8))[1]
    (dtok, dpos), (dtok_fast, dpos_fast) = mc.embed_tokens_backward(dout, cache), mc.embed_tokens_backward_fast(dout, cache)
    assert rel_error(dtok_fast, dtok) < 3e-14 and np.array_equal(dpos_fast, dpos)
    assert not dtok_fast[300:].any()


def test_l2_normalize():
    check(mc.l2_normalize_forward, mc.l2_normalize_backward, [randn(4, 5)], [0])


@pytest.mark.parametrize("t", [math.log(1 / 0.07), math.log(100) - 0.01, math.log(100) + 0.5])
def test_clip_loss(t):
    """
    Gradients of the loss in image features, text features and logit_scale. The loss does not clamp:
    above log 100 its scale still moves (train.py clamps the parameter after each step).
    """
    rng = np.random.default_rng(3)
    img = mc.l2_normalize_forward(rng.standard_normal((5, 4)))[0]
    txt = mc.l2_normalize_forward(rng.standard_normal((5, 4)))[0]
    scale = np.array(t)
    loss, cache = mc.clip_loss_forward(img, txt, scale)
    dimg, dtxt, dt = mc.clip_loss_backward(cache)
    f = lambda: mc.clip_loss_forward(img, txt, scale)[0]
    for analytic, x in ((dimg, img), (dtxt, txt), (dt, scale)):
        err = rel_error(np.reshape(analytic, -1), numerical_grad(f, x))
        assert err < TOL, f"relative error {err:.2e}"
    assert abs(float(dt)) > 1e-3


def test_clip_loss_is_finite_where_softmax_underflows():
    """
    At scale 100 in float32: image 0's own text is at cosine -0.196 and text 1 at cosine 1, so its own
    logit is ~120 below the best and its softmax is exp(-120) = 0 in float32, where log(softmax) gives
    inf. The log-sum-exp form gives the loss of float64 and finite gradients.
    """
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[-0.2, 1.0], [1.0, 0.0]])
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    want, _ = mc.clip_loss_forward(img, txt, np.array(math.log(100)))
    got, cache = mc.clip_loss_forward(img.astype(np.float32), txt.astype(np.float32),
                                      np.array(math.log(100), dtype=np.float32))
    assert np.isfinite(got) and abs(got - want) < 1e-5 * want, (got, want)
    assert all(np.all(np.isfinite(g)) for g in mc.clip_loss_backward(cache))


def test_clamp_logit_scale_holds_the_parameter_in_range():
    params = {"logit_scale": np.array(5.0)}
    mc.clamp_logit_scale(params)
    assert float(params["logit_scale"]) == math.log(100)
    params["logit_scale"][...] = -1.0
    mc.clamp_logit_scale(params)
    assert float(params["logit_scale"]) == 0.0
    params["logit_scale"][...] = 2.5
    mc.clamp_logit_scale(params)
    assert float(params["logit_scale"]) == 2.5


@pytest.mark.parametrize("rows", [slice(0, 2), slice(2, 4), slice(4, 6)])
def test_clip_loss_of_some_rows(rows):
    """One data-parallel process's loss: its rows against the whole gathered batch, every gradient checked."""
    rng = np.random.default_rng(4)
    img = mc.l2_normalize_forward(rng.standard_normal((6, 4)))[0]
    txt = mc.l2_normalize_forward(rng.standard_normal((6, 4)))[0]
    scale = np.array(math.log(1 / 0.07))
    loss, cache = mc.clip_loss_forward(img, txt, scale, rows)
    dimg, dtxt, dt = mc.clip_loss_backward(cache)
    assert dimg.shape == dtxt.shape == (6, 4)
    f = lambda: mc.clip_loss_forward(img, txt, scale, rows)[0]
    for analytic, x in ((dimg, img), (dtxt, txt), (dt, scale)):
        err = rel_error(np.reshape(analytic, -1), numerical_grad(f, x))
        assert err < TOL, f"relative error {err:.2e}"


def test_clip_loss_splits_over_rows():
    """The mean of the losses of 3 equal row blocks, and of their gradients, is the whole batch's."""
    rng = np.random.default_rng(5)
    img = mc.l2_normalize_forward(rng.standard_normal((6, 4)))[0]
    txt = mc.l2_normalize_forward(rng.standard_normal((6, 4)))[0]
    scale = np.array(2.0)
    whole = mc.clip_loss_forward(img, txt, scale)
    parts = [mc.clip_loss_forward(img, txt, scale, slice(i, i + 2)) for i in (0, 2, 4)]
    assert abs(np.mean([p[0] for p in parts]) - whole[0]) < 1e-14
    for g_whole, *g_parts in zip(mc.clip_loss_backward(whole[1]), *(mc.clip_loss_backward(p[1]) for p in parts)):
        assert np.abs(np.mean(g_parts, axis=0) - g_whole).max() < 1e-14


def test_clip_loss_by_hand():
    """Two pairs, orthogonal features, scale 1: each row's CE is log(1 + e^-1) (target logit 1, other 0)."""
    img = txt = np.eye(2)
    loss, _ = mc.clip_loss_forward(img, txt, np.array(0.0))
    assert abs(loss - math.log(1 + math.exp(-1))) < 1e-12
