"""
miniclip: CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") with every forward and backward pass written by hand in NumPy, or CuPy on a GPU.

Reading order: the array backend, the layers (each a forward/backward pair), the contrastive loss,
the config and parameters, the two encoders and the model's backward, AdamW, and image
preprocessing. Last come the speed devices, which a first reading skips: they compute what the
layers compute, faster, and are tested against them.

Notation used in every shape comment:
    N   batch size                      T   tokens in a sequence (text: context, image: 1 + G*G)
    D   width of a transformer          H   attention heads, Dh = D // H the width of one head
    F   width of the MLP hidden layer (4 * D in OpenAI's CLIP; 6144 at D = 1408 in LAION's ViT-g/14)
    E   width of the joint embedding    V   vocabulary size
    P   patch size in pixels            G   patches along one side of the image (S // P)
    S   image side in pixels

Conventions. A layer is a pair: `x_forward(...) -> (out, cache)` and `x_backward(dout, cache) ->
grads`, the grads in the order of the forward's arguments. A backward made of several steps lists
them bottom-up, each under a comment that quotes the forward line it differentiates. The encoders
take the parameters as a dict and their backwards return a dict of gradients under the same names.
Linear weights are stored as PyTorch stores them, (out_features, in_features), so that OpenAI's
checkpoints load without a transpose.
"""
import contextvars
import functools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

# OpenBLAS reads its settings once, when NumPy loads it, so miniclip makes its own here, before
# `import numpy`, where nothing has loaded NumPy yet; a first reading can skip this: cpu_settings()
# says what they are and what they save.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    LOCAL_PROCESSES = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if LOCAL_PROCESSES and not any(k in os.environ for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                             "MKL_NUM_THREADS")):
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(LOCAL_PROCESSES)))

import numpy  # noqa: E402

# -----------------------------------------------------------------------------
# Array backend. `xp` is the array module every compute line calls: NumPy, or CuPy when the GPU is
# asked for. Arrays cross between the two only at the edges: to_device() on the way in, to_numpy()
# on the way out.

xp = numpy


def set_device(device):
    """Make `xp` NumPy ("cpu") or CuPy ("gpu")."""
    global xp
    if device == "cpu":
        xp = numpy
    elif device == "gpu":
        try:
            import cupy
        except ImportError as e:
            raise RuntimeError("device 'gpu' needs CuPy: pip install -r requirements-gpu.txt") from e
        xp = cupy
    else:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'gpu'")


set_device(os.environ.get("MINICLIP_DEVICE", "cpu"))


def to_device(tree):
    """A NumPy array, or a dict of them, as arrays of the current backend."""
    if isinstance(tree, dict):
        return {k: to_device(v) for k, v in tree.items()}
    return xp.asarray(tree)


def to_numpy(tree):
    """A backend array, or a dict of them, as NumPy arrays."""
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    return tree.get() if xp is not numpy and isinstance(tree, xp.ndarray) else numpy.asarray(tree)


# -----------------------------------------------------------------------------
# Layers


def linear_forward(x, w, b=None):
    """
    out = x @ w.T + b, over the last axis of x.
    x: (..., In)   w: (Out, In)   b: (Out,) or None   ->   out: (..., Out)
    """
    x2 = x.reshape(-1, x.shape[-1])                     # (M, In), M = product of the leading axes
    out = x2 @ w.T                                      # (M, Out)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], w.shape[0]), (x2, w, b is not None)


def linear_backward(dout, cache):
    """
    From out = x w^T + b:  dx = dout w,  dw = dout^T x,  db = sum of dout over rows.
    Returns (dx, dw, db); db is None when the forward had no bias.
    """
    x2, w, has_bias = cache
    d2 = dout.reshape(-1, w.shape[0])                   # (M, Out)
    dx = (d2 @ w).reshape(*dout.shape[:-1], w.shape[1])  # (..., In)
    dw = d2.T @ x2                                      # (Out, In)
    db = d2.sum(axis=0) if has_bias else None           # (Out,)
    return dx, dw, db


def layernorm_forward(x, g, b, eps=1e-5):
    """
    Normalize each row of x to zero mean and unit variance, then scale and shift:
        xhat = (x - mean) / sqrt(var + eps),   out = g * xhat + b
    x: (..., D)   g, b: (D,)   ->   out: (..., D)
    """
    xc = x - x.mean(axis=-1, keepdims=True)
    var = (xc * xc).mean(axis=-1, keepdims=True)                        # the biased variance, as PyTorch
    rstd = 1.0 / xp.sqrt(var + eps)                                     # (..., 1)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd, g)


def layernorm_backward(dout, cache):
    """
    dg = sum dout * xhat,  db = sum dout  (summed over every row).
    For dx, let dxhat = dout * g. xhat depends on every x of its row through the mean and the variance:
        d xhat_j / d x_i = rstd * (delta_ij - 1/D - xhat_i xhat_j / D)
    so, with means taken over the row,
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    """
    xhat, rstd, g = cache
    D = xhat.shape[-1]
    dxhat = dout * g
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    dg = (dout * xhat).reshape(-1, D).sum(axis=0)
    db = dout.reshape(-1, D).sum(axis=0)
    return dx, dg, db


def quickgelu_forward(x):
    """
    CLIP's activation, a cheap GELU: out = x * s with s = sigmoid(1.702 x) = 1 / (1 + exp(-1.702 x)).
    Any shape. For x < -52, exp overflows to inf and s = 1/inf = 0, the right limit.
    """
    with numpy.errstate(over="ignore"):
        s = 1.0 / (xp.exp(x * -1.702) + 1.0)
    return x * s, (x, s)


def quickgelu_backward(dout, cache):
    """d/dx [x s(1.702x)] = s + 1.702 x s (1 - s), with s' = s (1 - s)."""
    x, s = cache
    return ((1.0 - s) * s * x * 1.702 + s) * dout


# erf, which NumPy lacks, for the exact GELU. W. J. Cody, "Rational Chebyshev approximations for the
# error function", Math. Comp. 23 (1969), 631-637, as in his SPECFUN routine CALERF: three rational
# functions, each on its own interval, accurate to about 1e-16 in float64. Coefficients are listed
# from the highest power down, for Horner's rule.
ERF_NUM = (1.85777706184603153e-1, 3.16112374387056560e00, 1.13864154151050156e02,
           3.77485237685302021e02, 3.20937758913846947e03)              # erf(x) = x P(x^2)/Q(x^2), |x| <= 0.5
ERF_DEN = (1.0, 2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
           2.84423683343917062e03)
ERFC_NUM = (2.15311535474403846e-8, 5.64188496988670089e-1, 8.88314979438837594e00,
            6.61191906371416295e01, 2.98635138197400131e02, 8.81952221241769090e02,
            1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03)
ERFC_DEN = (1.0, 1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
            1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
            3.43936767414372164e03, 1.23033935480374942e03)     # erfc(y) = e^-y^2 P(y)/Q(y), 0.5 < y <= 4
ERFC_TAIL_NUM = (1.63153871373020978e-2, 3.05326634961232344e-1, 3.60344899949804439e-1,
                 1.25781726111229246e-1, 1.60837851487422766e-2, 6.58749161529837803e-4)
ERFC_TAIL_DEN = (1.0, 2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1,
                 6.05183413124413191e-2, 2.33520497626869185e-3)   # y > 4, in r = 1/y^2, below
ERF_SPLIT = 0.46875


def horner(coeffs, x):
    """coeffs[0] x^n + coeffs[1] x^(n-1) + ... + coeffs[n]."""
    out = xp.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        out *= x
        out += c
    return out


def erf(x):
    """
    The error function, elementwise, in x's dtype. Every interval's formula runs on the whole array
    (inputs clipped into its interval so nothing overflows) and xp.where picks one per element:
        |x| <= 0.46875:      erf(x) = x P1(x^2) / Q1(x^2)
        0.46875 < y <= 4:    erfc(y) = exp(-y^2) P2(y) / Q2(y)                   y = |x|
        y > 4:               erfc(y) = exp(-y^2) / y (1/sqrt(pi) - r P3(r) / Q3(r))    r = 1/y^2
    and erf(x) = sign(x) (1 - erfc(|x|)) outside the first interval.
    """
    y = xp.abs(x)
    small = xp.minimum(y, ERF_SPLIT) ** 2
    erf_small = x * horner(ERF_NUM, small) / horner(ERF_DEN, small)
    mid = xp.clip(y, ERF_SPLIT, 4.0)
    erfc_mid = horner(ERFC_NUM, mid) / horner(ERFC_DEN, mid)
    far = xp.maximum(y, 4.0)
    r = 1.0 / (far * far)
    erfc_far = (1.0 / math.sqrt(math.pi) - r * horner(ERFC_TAIL_NUM, r) / horner(ERFC_TAIL_DEN, r)) / far
    erfc = xp.where(y <= 4.0, erfc_mid, erfc_far) * xp.exp(-y * y)
    return xp.where(y <= ERF_SPLIT, erf_small, xp.sign(x) * (1.0 - erfc))


def gelu_forward(x):
    """
    GELU as PyTorch computes it by default (nn.GELU, approximate="none"; LAION's OpenCLIP models):
    out = x Phi(x), with Phi the standard normal CDF, Phi(x) = (1 + erf(x / sqrt 2)) / 2. Any shape.
    """
    cdf = erf(x * (1.0 / math.sqrt(2.0)))
    cdf += 1.0
    cdf *= 0.5
    return x * cdf, (x, cdf)


def gelu_backward(dout, cache):
    """d/dx [x Phi(x)] = Phi(x) + x phi(x), with phi(x) = exp(-x^2 / 2) / sqrt(2 pi) the normal density."""
    x, cdf = cache
    d = xp.exp(x * x * -0.5)
    d *= x * (1.0 / math.sqrt(2.0 * math.pi))
    d += cdf
    d *= dout
    return d


# The activations a config can name, by transformers' hidden_act names.
ACTIVATIONS = {"quick_gelu": (quickgelu_forward, quickgelu_backward), "gelu": (gelu_forward, gelu_backward)}


def softmax_forward(x):
    """Softmax over the last axis. Subtracting the row max first keeps exp() from overflowing."""
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y, y


def softmax_backward(dout, y):
    """With y = softmax(x), dy_i/dx_j = y_i (delta_ij - y_j), so dx = y * (dout - sum(dout * y))."""
    return y * (dout - (dout * y).sum(axis=-1, keepdims=True))


def log_softmax(x):
    """log softmax(x) over the last axis, as x - max - log sum exp(x - max): finite where softmax underflows."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def attention_forward(x, w_in, b_in, w_out, b_out, n_heads, causal):
    """
    Multi-head self-attention as torch.nn.MultiheadAttention computes it, with q, k and v projected by
    one (3D, D) matrix (OpenAI's in_proj_weight):
        q, k, v = split(x w_in^T + b_in)
        A = softmax(q k^T / sqrt(Dh) + mask)      per head; mask is -inf above the diagonal if causal
        out = concat_heads(A v) w_out^T + b_out
    x: (N, T, D)   w_in: (3D, D)   b_in: (3D,)   w_out: (D, D)   b_out: (D,)   ->   out: (N, T, D)
    """
    N, T, D = x.shape
    H = n_heads
    Dh = D // H
    qkv, in_cache = linear_forward(x, w_in, b_in)                       # (N, T, 3D)
    q, k, v = qkv.reshape(N, T, 3, H, Dh).transpose(2, 0, 3, 1, 4)       # (N, H, T, Dh) each
    qs = q * (1.0 / math.sqrt(Dh))                                      # q / sqrt(Dh)
    scores = qs @ k.transpose(0, 1, 3, 2)                               # (N, H, T, T)
    if causal:
        scores += causal_mask(xp.arange(T), T, x.dtype)                 # (T, T), the same for every head
    att = softmax_forward(scores)[0]                                    # (N, H, T, T)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(N, T, D)                # (N, T, H, Dh): heads side by side
    out, out_cache = linear_forward(y, w_out, b_out)                    # (N, T, D)
    return out, (in_cache, qs, k, v, att, out_cache, H)


def causal_mask(q_pos, T, dtype):
    """(..., Tq, T) for queries at positions q_pos (..., Tq): 0 for keys at or before the query's
    position, -inf after it, so a token attends to itself and the tokens before it only."""
    return xp.where(xp.arange(T) > q_pos[..., None], -xp.inf, 0.0).astype(dtype)


def attention_backward(dout, cache):
    """
    The forward in reverse, each step under the forward line it differentiates. With qs = q / sqrt(Dh),
    s = qs k^T, A = softmax(s) and y = A v:
        dv = A^T dy,  dA = dy v^T,  ds = softmax_backward(dA),  dqs = ds k,  dk = ds^T qs,  dq = dqs / sqrt(Dh)
    The mask is a constant, so it sends no gradient; masked entries of A are 0 and get ds = 0.
    Returns (dx, dw_in, db_in, dw_out, db_out).
    """
    in_cache, qs, k, v, att, out_cache, H = cache
    N, _, T, Dh = qs.shape
    # out = y w_out^T + b_out
    dy, dw_out, db_out = linear_backward(dout, out_cache)               # (N, T, D)
    dy = dy.reshape(N, T, H, Dh).transpose(0, 2, 1, 3)                  # (N, H, T, Dh)
    # y = A v
    dv = att.transpose(0, 1, 3, 2) @ dy                                 # (N, H, T, Dh)
    dA = dy @ v.transpose(0, 1, 3, 2)                                   # (N, H, T, T)
    # A = softmax(s)
    ds = softmax_backward(dA, att)
    # s = qs k^T
    dqs = ds @ k                                                        # (N, H, T, Dh)
    dk = ds.transpose(0, 1, 3, 2) @ qs
    # qs = q / sqrt(Dh)
    dq = dqs * (1.0 / math.sqrt(Dh))
    # q, k, v = split(x w_in^T + b_in)
    dqkv = xp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4)              # (N, T, 3, H, Dh)
    dx, dw_in, db_in = linear_backward(dqkv.reshape(N, T, 3 * H * Dh), in_cache)
    return dx, dw_in, db_in, dw_out, db_out


# The residual block and the stack of them. A block's parameters live under a prefix such as
# "visual.transformer.resblocks.3." with OpenAI's names below it.


def block_shapes(D, F=None):
    """A block's 12 parameters of width D and MLP width F (default 4D): OpenAI's names and their shapes."""
    F = F or 4 * D
    return {"ln_1.weight": (D,), "ln_1.bias": (D,),
            "attn.in_proj_weight": (3 * D, D), "attn.in_proj_bias": (3 * D,),
            "attn.out_proj.weight": (D, D), "attn.out_proj.bias": (D,),
            "ln_2.weight": (D,), "ln_2.bias": (D,),
            "mlp.c_fc.weight": (F, D), "mlp.c_fc.bias": (F,),
            "mlp.c_proj.weight": (D, F), "mlp.c_proj.bias": (D,)}


BLOCK_KEYS = tuple(block_shapes(1))


def block_forward(x, p, n_heads, causal, eps, act="quick_gelu", at=None):
    """
    The pre-LayerNorm residual block:
        x = x + attention(ln_1(x))
        x = x + c_proj(act(c_fc(ln_2(x))))          act: a key of ACTIVATIONS, quick_gelu in OpenAI's CLIP
    x: (N, T, D); p: the block's 12 parameters keyed by BLOCK_KEYS   ->   (N, T, D)
    at: None, or (N,) positions, one per sequence: the output is read there, (N, 1, D), as an encoder
    reads its last block (block_forward_fast works out only those positions).
    """
    h, ln1 = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], eps)
    h, att = attention_forward(h, p["attn.in_proj_weight"], p["attn.in_proj_bias"],
                               p["attn.out_proj.weight"], p["attn.out_proj.bias"], n_heads, causal)
    x = x + h
    h, ln2 = layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"], eps)
    h, fc = linear_forward(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])    # (N, T, F)
    h, act_cache = ACTIVATIONS[act][0](h)
    h, proj = linear_forward(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # (N, T, D)
    out = x + h
    if at is not None:
        out = out[xp.arange(len(out)), at][:, None]                     # (N, 1, D)
    return out, (ln1, att, ln2, fc, act, act_cache, proj, at, x.shape)


def block_backward(dout, cache):
    """
    The block read bottom-up. x feeds both the residual path and each branch, so its gradient is the
    sum of the two: dx = dout + (gradient through the branch). Returns (dx, grads keyed by BLOCK_KEYS).
    """
    ln1, att, ln2, fc, act, act_cache, proj, at, shape = cache
    if at is not None:
        # out = out[xp.arange(N), at][:, None]: the other positions get no gradient
        whole = xp.zeros(shape, dtype=dout.dtype)
        whole[xp.arange(shape[0]), at] = dout[:, 0]
        dout = whole
    g = {}
    # h = c_proj(h)
    dh, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = linear_backward(dout, proj)
    # h = act(h)
    dh = ACTIVATIONS[act][1](dh, act_cache)
    # h = c_fc(h)
    dh, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"] = linear_backward(dh, fc)
    # h = ln_2(x)
    dh, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward(dh, ln2)
    # out = x + h: the residual path and the MLP branch both read x
    dx = dout + dh
    # h = attention(h)
    dh, g["attn.in_proj_weight"], g["attn.in_proj_bias"], g["attn.out_proj.weight"], \
        g["attn.out_proj.bias"] = attention_backward(dx, att)
    # h = ln_1(x)
    dh, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward(dh, ln1)
    # x = x + h: the same again for the attention branch
    return dx + dh, g


class Recompute(NamedTuple):
    """What a checkpointed block keeps for its backward: its input and how to run it again."""
    x: object
    n_heads: int
    causal: bool
    eps: float
    act: str
    at: object


class Blocks(NamedTuple):
    """transformer_forward's cache: one per block (a block's cache, or a Recompute), and which blocks ran."""
    caches: list
    fast: bool                  # block_forward_fast's, else block_forward's


def transformer_forward(x, params, prefix, n_layers, n_heads, causal, eps, act, *, at=None, keep_cache=True,
                        checkpoint=False):
    """
    n_layers (>= 1) blocks in a row; block i reads the keys f"{prefix}resblocks.{i}.*".
    x: (N, T, D)   at: None   ->   (N, T, D), the last block's output at every position
                   at: (N,)   ->   (N, 1, D), read at one position per sequence, as an encoder reads it
    The blocks are block_forward_fast, the same numbers up to rounding in a fraction of the time
    (section "Speed devices"), unless FAST is off: then block_forward, the plain reading of the math.
    Without keep_cache (inference), each block's activations are freed as soon as the next block has
    run, so memory holds one layer's activations instead of all of them.
    With checkpoint (gradient checkpointing), each block keeps only its input x, (N, T, D), instead of
    its ~14 activations of up to (N, T, 4D) and (N, H, T, T), and the backward runs the block's forward
    again just before differentiating it: one more forward pass of compute for a fraction of the memory.
    """
    block = block_forward_fast if FAST else block_forward
    caches = []
    for i in range(n_layers):
        bp = f"{prefix}resblocks.{i}."
        block_in = x
        block_at = at if i == n_layers - 1 else None    # every position, but in the last block
        x, c = block(x, {k: params[bp + k] for k in BLOCK_KEYS}, n_heads, causal, eps, act, block_at)
        if checkpoint:
            caches.append(Recompute(block_in, n_heads, causal, eps, act, block_at))
        elif keep_cache:
            caches.append(c)
    return x, Blocks(caches, FAST)


def transformer_backward(dout, cache, prefix, params):
    """The blocks in reverse order. dout: the output's gradient, (N, 1, D) or (N, T, D) as the forward gave.
    Returns (dx: (N, T, D), the blocks' gradients under their full names)."""
    forward, backward = (block_forward_fast, block_backward_fast) if cache.fast else (block_forward, block_backward)
    grads = {}
    for i in reversed(range(len(cache.caches))):
        bp = f"{prefix}resblocks.{i}."
        c = cache.caches[i]
        if isinstance(c, Recompute):                    # checkpointed: rebuild this block's cache now
            _, c = forward(c.x, {k: params[bp + k] for k in BLOCK_KEYS}, c.n_heads, c.causal, c.eps, c.act, c.at)
        dout, g = backward(dout, c)
        grads.update({bp + k: v for k, v in g.items()})
    return dout, grads


def patchify(pixels, P):
    """
    Cut images into non-overlapping P x P patches, each flattened in (channel, row, column) order,
    which is the order of conv1.weight's (3, P, P) axes. A conv with kernel = stride = P is then
    one matrix product: patchify(pixels) @ conv1.weight.reshape(D, 3 P P).T
    pixels: (N, 3, S, S)   ->   (N, G*G, 3*P*P), patches in row-major order as conv1 emits them
    """
    N, C, S, _ = pixels.shape
    G = S // P
    x = pixels.reshape(N, C, G, P, G, P)                # (N, 3, Gy, P, Gx, P)
    x = x.transpose(0, 2, 4, 1, 3, 5)                   # (N, Gy, Gx, 3, P, P)
    return x.reshape(N, G * G, C * P * P)


def embed_image_forward(patches, conv_w, cls, pos):
    """
    The ViT's input: each patch projected to width D (CLIP's conv1, which has no bias), a learned
    class token prepended, and a learned position embedding added.
    patches: (N, G*G, 3PP)  conv_w: (D, 3, P, P)  cls: (D,)  pos: (1 + G*G, D)   ->   (N, 1+G*G, D)
    """
    N, L, _ = patches.shape
    D = conv_w.shape[0]
    x = linear_forward(patches, conv_w.reshape(D, -1))[0]              # (N, G*G, D)
    out = xp.empty((N, 1 + L, D), dtype=x.dtype)
    out[:, 0] = cls
    out[:, 1:] = x
    out += pos
    return out, (patches, conv_w.shape)


def embed_image_backward(dout, cache):
    """
    The class token and the position embedding are shared by every image, so their gradients sum
    over the batch. Pixels are data, so only conv1's gradient is formed: dW = dout^T patches.
    Returns (dconv_w, dcls, dpos).
    """
    patches, w_shape = cache
    D = dout.shape[-1]
    dconv = dout[:, 1:].reshape(-1, D).T @ patches.reshape(-1, patches.shape[-1])     # (D, 3PP)
    return dconv.reshape(w_shape), dout[:, 0].sum(axis=0), dout.sum(axis=0)


def embed_tokens_forward(ids, tok, pos):
    """
    x = token_embedding[ids] + positional_embedding[:T]
    ids: (N, T) int   tok: (V, D)   pos: (context, D)   ->   (N, T, D)
    """
    T = ids.shape[1]
    return tok[ids] + pos[:T], (ids, tok.shape, pos.shape)


def embed_tokens_backward(dout, cache):
    """
    A lookup copies rows, so its gradient adds rows back: each token's gradient is added into the row
    of its id (a scatter-add; an id that occurs twice gets both). The position rows sum over the batch.
    Returns (dtok, dpos).
    """
    ids, tok_shape, pos_shape = cache
    D = dout.shape[-1]
    dtok = xp.zeros(tok_shape, dtype=dout.dtype)
    xp.add.at(dtok, ids.reshape(-1), dout.reshape(-1, D))
    dpos = xp.zeros(pos_shape, dtype=dout.dtype)
    dpos[:ids.shape[1]] = dout.sum(axis=0)
    return dtok, dpos


def l2_normalize_forward(x):
    """y = x / |x| row by row. x: (N, E)   ->   (N, E)"""
    norm = xp.sqrt((x * x).sum(axis=-1, keepdims=True))
    y = x / norm
    return y, (y, norm)


def l2_normalize(x):
    """l2_normalize_forward without the cache, for inference."""
    return l2_normalize_forward(x)[0]


def l2_normalize_backward(dout, cache):
    """
    y = x / |x| has Jacobian (I - y y^T) / |x|: moving x along y does not change y. So
        dx = (dout - y (y . dout)) / |x|
    """
    y, norm = cache
    return (dout - y * (y * dout).sum(axis=-1, keepdims=True)) / norm


# -----------------------------------------------------------------------------
# The contrastive loss (InfoNCE)

MAX_LOGIT_SCALE = 100.0                                 # CLIP clips the temperature at 100


def clamp_logit_scale(params):
    """
    Hold the learned temperature in CLIP's range after an optimizer step: the paper clips the logit
    scale "to prevent scaling the logits by more than 100" (section 2.5), and open_clip does it by
    clamping the parameter into [0, log 100] after every step (open_clip_train/train.py,
    `logit_scale.clamp_(0, math.log(100))`). Clamping the parameter, not the scale inside the loss,
    keeps the loss's gradient honest: a clamp in the loss would zero dL/dt while Adam's momentum kept
    pushing t further above the cap.
    """
    t = params["logit_scale"]
    t[...] = xp.clip(t, 0.0, math.log(MAX_LOGIT_SCALE))


def logit_scale_value(params):
    """The multiplier s = exp(t) as a float, capped at 100 for weights saved by code that did not clamp."""
    return min(math.exp(float(params["logit_scale"])), MAX_LOGIT_SCALE)


def clip_loss_forward(img, txt, logit_scale, rows=None):
    """
    The symmetric cross-entropy of CLIP. Pair i is (image i, text i); every other pairing in the batch
    is a negative.
        s = exp(t)                          t = logit_scale, stored as a log so it stays positive
        Z_i2t = s * img[rows] @ txt^T       (n, N): each image of `rows` against every text
        Z_t2i = s * txt[rows] @ img^T       (n, N): each text of `rows` against every image
        loss = ( CE(Z_i2t, labels = own pair) + CE(Z_t2i, labels = own pair) ) / 2, the mean of n rows
    By default rows are the whole batch (n = N), which is the paper's loss, and Z_t2i = Z_i2t^T.
    A row's cross-entropy needs only its own row of logits, so the loss splits exactly over any
    partition of the rows: data-parallel training (train.py) gives each process its own n = N / K
    rows of the gathered batch, and the mean of the K losses is the loss of the whole batch.
    The log of each probability is taken as z_own - logsumexp(z), not as log(softmax(z)): at s = 100,
    where published checkpoints sit, a pair whose own similarity is ~1.04 below a negative's (a logit
    ~104 lower) has a softmax that underflows to 0 in float32, and its log would be -inf.
    img, txt: (N, E), already L2-normalized   logit_scale: () array   rows: a slice   ->   loss: float, cache
    """
    rows = slice(0, img.shape[0]) if rows is None else rows
    s = xp.exp(logit_scale)
    z_i2t = s * (img[rows] @ txt.T)                                     # (n, N)
    z_t2i = s * (txt[rows] @ img.T)                                     # (n, N)
    logp_i2t, logp_t2i = log_softmax(z_i2t), log_softmax(z_t2i)         # (n, N) each
    own = xp.arange(rows.start, rows.stop)                              # (n,): the column of each row's pair
    local = xp.arange(len(own))
    loss = -(logp_i2t[local, own].mean() + logp_t2i[local, own].mean()) / 2
    return float(loss), (img, txt, rows, s, z_i2t, z_t2i, xp.exp(logp_i2t), xp.exp(logp_t2i))


def clip_loss_backward(cache):
    """
    Derivation. For one row of logits z with target j, CE = -z_j + log sum_k exp(z_k), so
    dCE/dz = softmax(z) - onehot(j). Averaging over the n rows and halving the two directions:
        dZ_i2t = (P_i2t - Y) / 2n,   dZ_t2i = (P_t2i - Y) / 2n      Y: (n, N), a 1 at each row's own pair
    Every feature of the batch is a column of some logits, and the features of `rows` are also the
    rows themselves, so both uses add up:
        dimg = s * dZ_t2i^T @ txt[rows]        (N, E): as the columns of Z_t2i
        dimg[rows] += s * dZ_i2t @ txt         (n, E): as the rows of Z_i2t
    and the same with img and txt swapped. With rows = the whole batch this is the familiar
    dimg = s * (dZ_i2t + dZ_t2i^T) @ txt. When the rows are one process's share of a gathered batch,
    dimg reaches the other processes' features too: train.py sends those parts back to their owners.
    Since s = exp(t), ds/dt = s, giving dt = sum(dZ * Z) over both directions.
    Returns (dimg, dtxt, dlogit_scale), dimg and dtxt for the whole (N, E) batch.
    """
    img, txt, rows, s, z_i2t, z_t2i, p_i2t, p_t2i = cache
    n = z_i2t.shape[0]
    # loss = (CE(Z_i2t, own) + CE(Z_t2i, own)) / 2, each the mean of n rows
    y = xp.zeros_like(z_i2t)
    y[xp.arange(n), xp.arange(rows.start, rows.stop)] = 1               # (n, N)
    dz_i2t = (p_i2t - y) / (2 * n)
    dz_t2i = (p_t2i - y) / (2 * n)
    # z_t2i = s * txt[rows] @ img^T, and z_i2t = s * img[rows] @ txt^T
    dimg = s * (dz_t2i.T @ txt[rows])                                   # (N, E)
    dtxt = s * (dz_i2t.T @ img[rows])                                   # (N, E)
    dimg[rows] += s * (dz_i2t @ txt)
    dtxt[rows] += s * (dz_t2i @ img)
    # s = exp(t): dt = sum(dZ * dZ/dt) = sum(dZ * Z)
    dt = (dz_i2t * z_i2t).sum() + (dz_t2i * z_t2i).sum()
    return dimg, dtxt, dt


def bag_of_words(ids, vocab_size):
    """
    Each caption's tokens as a distribution over the vocabulary: counts / number of tokens, SOT, EOT
    and the padding after EOT left out. ids: (N, T) with SOT at 0 and EOT the row's largest id -> (N, V)
    """
    N, T = ids.shape
    eot = ids.argmax(axis=1)                                            # (N,)
    inside = (xp.arange(T) > 0) & (xp.arange(T) < eot[:, None])         # (N, T): the caption's own tokens
    q = xp.zeros((N, vocab_size))
    xp.add.at(q, (xp.nonzero(inside)[0], ids[inside]), 1.0)
    return q / xp.maximum(q.sum(axis=1, keepdims=True), 1.0)


def cross_entropy_head_forward(feat, w, b, q):
    """
    A linear head on features, and cross-entropy against a target distribution over its outputs.
    The paper's bag-of-words baseline (its Figure 2) predicts a caption's words, q = bag_of_words
    (the order thrown away); a supervised classifier (experiments/supervised.py) predicts a label,
    q = one-hot.
        logits = feat w^T + b            (N, K)
        loss = mean_i ( -sum_k q_ik log softmax(logits_i)_k )
    feat: (N, E)   w: (K, E)   b: (K,)   q: (N, K), rows summing to 1 (or 0)   ->   loss: float, cache
    """
    logits, lin = linear_forward(feat, w, b)
    logp = log_softmax(logits)
    return float(-(q * logp).sum(axis=1).mean()), (lin, logp, q)


def cross_entropy_head_backward(cache):
    """
    With p = softmax(logits), d/dlogits of -sum_k q_k log p_k = -sum_k q_k (logits_k - logsumexp)
    is p sum_k q_k - q: p - q for a target distribution, 0 for a row of zeros (a caption with no words).
    Averaged over N rows, then linear's backward. Returns (dfeat, dw, db).
    """
    lin, logp, q = cache
    return linear_backward((xp.exp(logp) * q.sum(axis=1, keepdims=True) - q) / len(q), lin)


# -----------------------------------------------------------------------------
# Config and parameters


OBJECTIVES = ("contrastive", "bow")


@dataclass
class Config:
    image_size: int = 224          # S, pixels per side of the square input
    patch_size: int = 32           # P
    vision_width: int = 768        # D of the image transformer
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77       # the most tokens a text may have, SOT and EOT included
    vocab_size: int = 49408        # V; CLIP's BPE vocabulary
    text_width: int = 512          # D of the text transformer
    text_layers: int = 12          # 0: no text transformer, a bag of words (encode_text_forward)
    text_heads: int = 8
    embed_dim: int = 512           # E, the joint image-text space
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"  # the MLP's: "quick_gelu" (OpenAI) or "gelu" (most LAION models)
    objective: str = "contrastive"  # or "bow": the image predicts its caption's words (an ablation)
    vision_mlp_width: int = 0      # F of the image tower; 0: 4 x vision_width, as in OpenAI's models
    text_mlp_width: int = 0        # F of the text tower; 0: 4 x text_width

    @property
    def vision_mlp(self):
        return self.vision_mlp_width or 4 * self.vision_width

    @property
    def text_mlp(self):
        return self.text_mlp_width or 4 * self.text_width

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        if not isinstance(self.vision_layers, int) or self.vision_layers < 1:   # read at its last block's output
            raise ValueError(f"the image tower needs at least one layer, not {self.vision_layers!r}")
        if not isinstance(self.text_layers, int) or self.text_layers < 0:
            raise ValueError(f"text_layers must be 0 (a bag of words) or more, not {self.text_layers!r}")
        for name in ("image_size", "patch_size", "vision_width", "vision_heads", "vocab_size", "text_width",
                     "text_heads", "embed_dim", "vision_mlp_width", "text_mlp_width"):
            value = getattr(self, name)
            low = 0 if name.endswith("mlp_width") else 1           # an MLP width of 0 means 4 x the width
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for tower, D, H in (("vision", self.vision_width, self.vision_heads), ("text", self.text_width, self.text_heads)):
            if D % H:
                raise ValueError(f"{tower}_width {D} does not split into {H} heads")
        if not isinstance(self.context_length, int) or self.context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, one token, end), got {self.context_length!r}")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)


# The published OpenAI shapes, and the small model that train.py --tiny trains on a CPU. Its text
# tower has 2 layers. On train.py's held-out color-shape pairs (seed 0, an earlier recipe: lr 1e-3, the
# batch order before data.py), 3 text layers with weight decay 0.1 reached 90.7% zero-shot, 2 layers
# with 0.2 reached 95.8%, and 1 layer with 0.2 reached 94.8%.
PRESETS = {
    "ViT-B/32": Config(),
    "ViT-B/16": Config(patch_size=16),
    "ViT-L/14": Config(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                       text_width=768, text_heads=12, embed_dim=768),
    # LAION's largest, as open_clip's model configs give them (GELU; heads 80, 88 and 104 wide; the MLPs
    # int(width * mlp_ratio): 1408 * 4.3637 -> 6144 and 1664 * 4.9231 -> 8192).
    "ViT-H/14": Config(patch_size=14, vision_width=1280, vision_layers=32, vision_heads=16, text_width=1024,
                       text_layers=24, text_heads=16, embed_dim=1024, activation="gelu"),
    "ViT-g/14": Config(patch_size=14, vision_width=1408, vision_layers=40, vision_heads=16, vision_mlp_width=6144,
                       text_width=1024, text_layers=24, text_heads=16, embed_dim=1024, activation="gelu"),
    "ViT-bigG/14": Config(patch_size=14, vision_width=1664, vision_layers=48, vision_heads=16, vision_mlp_width=8192,
                          text_width=1280, text_layers=32, text_heads=20, embed_dim=1280, activation="gelu"),
    "tiny": Config(image_size=32, patch_size=8, vision_width=96, vision_layers=3, vision_heads=3,
                   context_length=20, vocab_size=1024, text_width=96, text_layers=2, text_heads=3,
                   embed_dim=64),
}
# The emoji recipe's model (train.py --data data/emoji/train.csv): the tiny shape with room for CLDR's
# long names ("couple with heart: woman, man, medium-light skin tone, dark skin tone" is 28 tokens).
# On the validation concepts it did as well as 48-pixel and wider models, and its features moved
# better from Noto's art to Twemoji's (docs/real-images.md).
PRESETS["emoji"] = replace(PRESETS["tiny"], context_length=32)


def param_shapes(cfg):
    """Every parameter's name and shape, named exactly as in OpenAI CLIP's state_dict."""
    Dv, Dt, E = cfg.vision_width, cfg.text_width, cfg.embed_dim
    P, G = cfg.patch_size, cfg.image_size // cfg.patch_size

    def blocks(prefix, D, F, n):
        return {f"{prefix}resblocks.{i}.{k}": shape for i in range(n) for k, shape in block_shapes(D, F).items()}

    return {
        "visual.conv1.weight": (Dv, 3, P, P),
        "visual.class_embedding": (Dv,),
        "visual.positional_embedding": (G * G + 1, Dv),
        "visual.ln_pre.weight": (Dv,), "visual.ln_pre.bias": (Dv,),
        **blocks("visual.transformer.", Dv, cfg.vision_mlp, cfg.vision_layers),
        "visual.ln_post.weight": (Dv,), "visual.ln_post.bias": (Dv,),
        "visual.proj": (Dv, E),
        "token_embedding.weight": (cfg.vocab_size, Dt),
        **({"positional_embedding": (cfg.context_length, Dt)} if cfg.text_layers else {}),   # a bag has no order
        **blocks("transformer.", Dt, cfg.text_mlp, cfg.text_layers),
        "ln_final.weight": (Dt,), "ln_final.bias": (Dt,),
        "text_projection": (Dt, E),
        "logit_scale": (),
        **({"bow.weight": (cfg.vocab_size, E), "bow.bias": (cfg.vocab_size,)} if cfg.objective == "bow" else {}),
    }


def init_params(cfg, seed=0, dtype=numpy.float32):
    """
    Random parameters with the standard deviations of OpenAI's CLIP code (model.py,
    CLIP.initialize_parameters and VisionTransformer.__init__):
        token_embedding 0.02; positional_embedding 0.01; class and position embedding and visual.proj
        D^-0.5; attention in_proj D^-0.5; attention out_proj and mlp.c_proj D^-0.5 (2 layers)^-0.5;
        mlp.c_fc (2D)^-0.5; text_projection D^-0.5; logit_scale log(1/0.07); gains 1, biases 0.
    OpenAI sets the block stds for the text tower only and leaves the ViT's blocks at PyTorch's
    defaults; we use the published rule in both towers. conv1 keeps PyTorch's default,
    uniform(+-1/sqrt(fan_in)).
    """
    rng = numpy.random.default_rng(seed)
    stds = {"token_embedding.weight": 0.02, "positional_embedding": 0.01,
            "visual.class_embedding": cfg.vision_width ** -0.5,
            "visual.positional_embedding": cfg.vision_width ** -0.5,
            "visual.proj": cfg.vision_width ** -0.5, "text_projection": cfg.text_width ** -0.5,
            "bow.weight": cfg.embed_dim ** -0.5}
    for prefix, D, L in (("visual.transformer.", cfg.vision_width, cfg.vision_layers),
                         ("transformer.", cfg.text_width, cfg.text_layers)):
        for i in range(L):
            b = f"{prefix}resblocks.{i}."
            stds[b + "attn.in_proj_weight"] = D ** -0.5
            stds[b + "attn.out_proj.weight"] = D ** -0.5 * (2 * L) ** -0.5
            stds[b + "mlp.c_fc.weight"] = (2 * D) ** -0.5
            stds[b + "mlp.c_proj.weight"] = D ** -0.5 * (2 * L) ** -0.5
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name in stds:
            w = rng.normal(0.0, stds[name], shape)
        elif name == "visual.conv1.weight":
            bound = 1 / math.sqrt(math.prod(shape[1:]))
            w = rng.uniform(-bound, bound, shape)
        elif name == "logit_scale":
            w = numpy.array(math.log(1 / 0.07))
        elif name.endswith("bias"):
            w = numpy.zeros(shape)
        else:                                           # the LayerNorm gains
            w = numpy.ones(shape)
        params[name] = xp.asarray(w, dtype=dtype)
    return params


# -----------------------------------------------------------------------------
# The two encoders and the model


def encode_image_forward(params, cfg, pixels, keep_cache=True, checkpoint=False):
    """
    The Vision Transformer, read out at its class token.
    pixels: (N, 3, S, S), normalized   ->   features: (N, E), projected and not normalized
    """
    eps = cfg.layer_norm_eps
    patches = patchify(pixels.astype(params["visual.proj"].dtype, copy=False), cfg.patch_size)
    x, emb = embed_image_forward(patches, params["visual.conv1.weight"],
                                 params["visual.class_embedding"], params["visual.positional_embedding"])
    layernorm = layernorm_forward_fast if FAST else layernorm_forward   # see "Speed devices"
    x, ln_pre = layernorm(x, params["visual.ln_pre.weight"], params["visual.ln_pre.bias"], eps)
    cls_at = xp.zeros(len(x), dtype=numpy.int64)                        # (N,): the class token is first
    x, blocks = transformer_forward(x, params, "visual.transformer.", cfg.vision_layers, cfg.vision_heads,
                                    False, eps, cfg.activation, at=cls_at, keep_cache=keep_cache,
                                    checkpoint=checkpoint)                              # (N, 1, Dv)
    cls, ln_post = layernorm(x[:, 0], params["visual.ln_post.weight"], params["visual.ln_post.bias"], eps)
    feat = cls @ params["visual.proj"]                                  # (N, E)
    return feat, (emb, ln_pre, blocks, ln_post, cls)


def encode_image_backward(dfeat, cache, params):
    """encode_image_forward read from the bottom up. Returns the gradient of every visual.* parameter."""
    emb, ln_pre, blocks, ln_post, cls = cache
    layernorm_back = layernorm_backward_fast if FAST else layernorm_backward
    # feat = cls @ visual.proj
    g = {"visual.proj": cls.T @ dfeat}                                  # (Dv, E)
    dcls = dfeat @ params["visual.proj"].T                              # (N, Dv)
    # cls = layernorm(x[:, 0], ln_post)
    dcls, g["visual.ln_post.weight"], g["visual.ln_post.bias"] = layernorm_back(dcls, ln_post)
    # x = transformer(x), read at the class token
    dx, g_blocks = transformer_backward(dcls[:, None], blocks, "visual.transformer.", params)
    # x = layernorm(x, ln_pre)
    dx, g["visual.ln_pre.weight"], g["visual.ln_pre.bias"] = layernorm_back(dx, ln_pre)
    # x = [cls; patches @ conv1] + pos
    g["visual.conv1.weight"], g["visual.class_embedding"], g["visual.positional_embedding"] = \
        embed_image_backward(dx, emb)
    return {**g, **g_blocks}


def encode_text_forward(params, cfg, ids, keep_cache=True, checkpoint=False):
    """
    The causal text transformer, read out at the end-of-text token. That token has the highest id in
    CLIP's vocabulary, so its position is argmax(ids), as OpenAI's CLIP finds it.
    ids: (N, T) int, T <= context_length   ->   features: (N, E), projected and not normalized
    OpenAI applies ln_final to every position and then pools; LayerNorm works row by row, so pooling
    first gives the same numbers with T times less work.
    With cfg.text_layers = 0 the encoder is a bag of words, the text encoder of the CLIP paper's
    Figure 2: no transformer and no positions, a text is the mean of its words' embeddings (SOT, EOT
    and padding left out), the order thrown away; then ln_final and the projection as above.
    """
    eps = cfg.layer_norm_eps
    if cfg.text_layers == 0:
        q = bag_of_words(ids, cfg.vocab_size).astype(params["text_projection"].dtype)   # (N, V)
        x, emb, blocks = q @ params["token_embedding.weight"], q, None                     # (N, Dt)
    else:
        x, emb = embed_tokens_forward(ids, params["token_embedding.weight"], params["positional_embedding"])
        eot_at = ids.argmax(axis=-1)                                    # (N,), the first largest id
        x, blocks = transformer_forward(x, params, "transformer.", cfg.text_layers, cfg.text_heads, True, eps,
                                        cfg.activation, at=eot_at, keep_cache=keep_cache,
                                        checkpoint=checkpoint)                          # (N, 1, Dt)
        x = x[:, 0]
    layernorm = layernorm_forward_fast if FAST else layernorm_forward   # see "Speed devices"
    x, ln_final = layernorm(x, params["ln_final.weight"], params["ln_final.bias"], eps)
    feat = x @ params["text_projection"]                                # (N, E)
    return feat, (emb, blocks, ln_final, x)


def encode_text_backward(dfeat, cache, params):
    """encode_text_forward read from the bottom up. Returns the gradient of every text parameter."""
    emb, blocks, ln_final, x = cache
    layernorm_back, embed_back = ((layernorm_backward_fast, embed_tokens_backward_fast) if FAST else
                                  (layernorm_backward, embed_tokens_backward))
    # feat = x @ text_projection
    g = {"text_projection": x.T @ dfeat}                                # (Dt, E)
    dx = dfeat @ params["text_projection"].T                            # (N, Dt)
    # x = layernorm(x, ln_final)
    dx, g["ln_final.weight"], g["ln_final.bias"] = layernorm_back(dx, ln_final)
    if blocks is None:
        # x = q @ token_embedding, q the bag of words: each word's row gets its share of each dx
        g["token_embedding.weight"] = emb.T @ dx                        # (V, Dt)
        return g
    # x = transformer(x), read at the end-of-text token
    dx, g_blocks = transformer_backward(dx[:, None], blocks, "transformer.", params)
    # x = token_embedding[ids] + positional_embedding
    g["token_embedding.weight"], g["positional_embedding"] = embed_back(dx, emb)
    return {**g, **g_blocks}


# Inference runs the batch in chunks, so the activations alive at once stay small (256 texts of 77
# tokens in one piece would hold ~1 GB in each block of ViT-B/32): a chunk's widest activation, the
# MLP's (tokens, F), stays under CHUNK_BYTES. That is just under 32 MiB, glibc's largest mmap threshold,
# which cpu_settings sets: a larger array is mapped afresh and page-faults on every call, a smaller one
# reuses freed memory (ViT-B/32's text encoding, 256 x 77 tokens: 7.1 s in chunks of 4,000 tokens,
# 7.6-7.9 s in chunks of 8,192). Each matrix product still has thousands of rows, all BLAS needs.
CHUNK_BYTES = 31 * 2 ** 20


def chunk_rows(tokens, mlp_width, dtype):
    """How many sequences of `tokens` positions go into one chunk: their (tokens, F) MLP activations
    under CHUNK_BYTES, and at least one."""
    return max(1, CHUNK_BYTES // (tokens * mlp_width * numpy.dtype(dtype).itemsize))


def encode_image(params, cfg, pixels):
    """Image features, (N, E), projected and unnormalized as OpenAI's encode_image returns them."""
    n = chunk_rows((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.vision_mlp, params["visual.proj"].dtype)
    return xp.concatenate([encode_image_forward(params, cfg, pixels[i:i + n], keep_cache=False)[0]
                           for i in range(0, len(pixels), n)])


def encode_text(params, cfg, ids):
    """Text features, (N, E), projected and unnormalized as OpenAI's encode_text returns them."""
    n = chunk_rows(ids.shape[1], cfg.text_mlp, params["text_projection"].dtype)
    return xp.concatenate([encode_text_forward(params, cfg, ids[i:i + n], keep_cache=False)[0]
                           for i in range(0, len(ids), n)])


def features_forward(params, cfg, pixels, ids, checkpoint=False):
    """
    Both encoders and the L2 normalization: everything before the loss. checkpoint: see transformer_forward.
    pixels: (N, 3, S, S)   ids: (N, T)   ->   (img, txt): (N, E) each, unit rows, and the cache
    """
    img_feat, img_cache = encode_image_forward(params, cfg, pixels, checkpoint=checkpoint)  # (N, E)
    txt_feat, txt_cache = encode_text_forward(params, cfg, ids, checkpoint=checkpoint)      # (N, E)
    img, img_norm = l2_normalize_forward(img_feat)
    txt, txt_norm = l2_normalize_forward(txt_feat)
    return (img, txt), (img_cache, img_norm, txt_cache, txt_norm)


def features_backward(dimg, dtxt, cache, params):
    """features_forward read from the bottom up. Returns the gradient of every parameter but logit_scale."""
    img_cache, img_norm, txt_cache, txt_norm = cache
    return {**encode_image_backward(l2_normalize_backward(dimg, img_norm), img_cache, params),
            **encode_text_backward(l2_normalize_backward(dtxt, txt_norm), txt_cache, params)}


def loss_and_grads(params, cfg, pixels, ids, checkpoint=False):
    """
    One forward and backward pass of CLIP over a batch of N (image, text) pairs.
    pixels: (N, 3, S, S)   ids: (N, T)   ->   (loss: float, grads: a dict with every key of params)
    """
    if cfg.objective == "bow":
        return bow_loss_and_grads(params, cfg, pixels, ids, checkpoint)
    (img, txt), cache = features_forward(params, cfg, pixels, ids, checkpoint)
    loss, loss_cache = clip_loss_forward(img, txt, params["logit_scale"])
    dimg, dtxt, dt = clip_loss_backward(loss_cache)
    grads = features_backward(dimg, dtxt, cache, params)
    grads["logit_scale"] = dt
    return loss, grads


def bow_loss_and_grads(params, cfg, pixels, ids, checkpoint=False):
    """The bag-of-words baseline: the image tower and the word predictor train; the text tower gets zeros."""
    feat, cache = encode_image_forward(params, cfg, pixels, checkpoint=checkpoint)          # (N, E)
    loss, loss_cache = cross_entropy_head_forward(feat, params["bow.weight"], params["bow.bias"],
                                        bag_of_words(ids, cfg.vocab_size).astype(feat.dtype))
    dfeat, dw, db = cross_entropy_head_backward(loss_cache)
    grads = {k: xp.zeros_like(v) for k, v in params.items()}
    grads.update(encode_image_backward(dfeat, cache, params))
    grads["bow.weight"], grads["bow.bias"] = dw, db
    return loss, grads


def bow_label_scores(params, cfg, pixels, ids, n_templates):
    """
    Zero-shot with the bag-of-words model: a label's score for an image is the mean log-probability of
    its prompt's words, averaged over the templates. ids: (labels * n_templates, T), label-major
    pixels: (N, 3, S, S)   ->   (N, labels)
    """
    logp = log_softmax(linear_forward(encode_image(params, cfg, pixels), params["bow.weight"],
                                      params["bow.bias"])[0])                              # (N, V)
    q = bag_of_words(ids, cfg.vocab_size).astype(logp.dtype)                               # (prompts, V)
    return (logp @ q.T).reshape(len(logp), -1, n_templates).mean(axis=2)


def class_embeddings(params, cfg, ids, n_templates):
    """
    CLIP's zero-shot classifier, with prompt ensembling: each label is written into n_templates
    prompts ("a photo of a {}", ...); the prompts' normalized embeddings are averaged per label and the
    average normalized again. ids: (labels * n_templates, T), label-major   ->   (labels, E)
    """
    feats = l2_normalize(encode_text(params, cfg, ids))                                # (labels * n_templates, E)
    return l2_normalize(feats.reshape(len(ids) // n_templates, n_templates, -1).mean(axis=1))


# -----------------------------------------------------------------------------
# AdamW


def decays(name, shape):
    """
    Which tensors weight decay shrinks: those of two or more dimensions. The paper decays "all weights
    that are not gains or biases" (section 2.5); open_clip, whose training reproduces its numbers,
    exempts every tensor of fewer than 2 dimensions and logit_scale (open_clip_train/main.py,
    `exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n`). That decays
    the matrices, conv1, the projections and the token and position embedding tables, and leaves the
    LayerNorm gains and biases, every bias, the class embedding (a vector) and logit_scale alone.
    """
    return len(shape) >= 2


class AdamW:
    """
    Adam with decoupled weight decay (Loshchilov & Hutter 2019), CLIP's optimizer. For each tensor:
        m = b1 m + (1 - b1) g                   v = b2 v + (1 - b2) g^2
        w -= lr * ( m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * w )   (wd only where decays())
    The defaults are the paper's: b2 = 0.98 and eps = 1e-6 for stability at large batch.
    """

    def __init__(self, params, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, frozen=()):
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.frozen = set(frozen)                       # names left as they are (a fixed temperature)
        self.m = {k: xp.zeros_like(v) for k, v in params.items()}
        self.v = {k: xp.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads, lr):
        """Update params in place."""
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for k, w in params.items():
            if k in self.frozen:
                continue
            g, m, v = grads[k], self.m[k], self.v[k]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            if decays(k, w.shape):
                w *= 1 - lr * self.weight_decay
            w -= (lr / c1) * m / (xp.sqrt(v / c2) + self.eps)


# -----------------------------------------------------------------------------
# Images: opening a file safely, and CLIP's preprocessing.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 89_478_485        # Pillow's own decompression-bomb threshold (about 0.25 GB of RGBA)


def open_image(path):
    """
    Open an image file as an 8-bit RGB PIL image, or raise ValueError saying why not. EXIF
    orientation is applied; transparency is composited onto white (as transformers does); 16-bit
    images are scaled down to 8 bits; an image of more than MAX_PIXELS pixels is refused before any
    pixel is decoded, so a decompression bomb neither hangs nor fills memory.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        img = Image.open(path)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"image is {w}x{h} pixels, over the {MAX_PIXELS} limit "
                             "(a decompression bomb?)")
        img.load()
        ImageOps.exif_transpose(img, in_place=True)     # in place: no copy of an upright image
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ValueError("not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode the image ({e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):     # 16-bit: keep the top 8 bits of each value
        a = numpy.asarray(img, dtype=numpy.uint32)
        img = Image.fromarray((a >> 8 if a.max() > 255 else a).astype(numpy.uint8))
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_and_crop(img, size, crop=None):
    """Resize so the short side is `size` (bicubic), then take the centered crop x crop square (crop = size)."""
    from PIL import Image
    crop = crop or size
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def normalize_pixels(uint8_images, mean=CLIP_MEAN, std=CLIP_STD):
    """(..., S, S, 3) uint8 RGB -> (..., 3, S, S) float32: scaled to [0, 1], then CLIP's mean and std."""
    x = uint8_images.astype(numpy.float64) / 255.0
    x = (x - numpy.array(mean)) / numpy.array(std)
    return numpy.ascontiguousarray(numpy.moveaxis(x, -1, -3), dtype=numpy.float32)


def preprocess(img, size, crop=None, mean=CLIP_MEAN, std=CLIP_STD):
    """A PIL image as CLIP's model input: (3, crop, crop) float32 NumPy."""
    return normalize_pixels(numpy.asarray(resize_and_crop(img.convert("RGB"), size, crop)), mean, std)


# =============================================================================
# Speed devices. A first reading skips this section: what it computes is what the layers above
# compute, and tests/test_layers.py holds each device to the plain version (float64, to rounding).
# transformer_forward and the encoders use them while FAST is on, as it is unless a caller turns it off.
#
# Three devices; benchmarks/bench.py measures the first two against their absence:
# - The last block at one position. An encoder reads one position of its last block: an image's
#   class token, a text's end-of-text token. block_forward_fast(at=...) works out that position alone:
#   one query per sequence (every position still gives a key and a value), then the attention output,
#   the residual and the MLP on one row. That skips about 3/4 of the block's work (PyTorch's CLIPModel
#   runs every position through every block); on the tiny train step it saves 24-30%.
#   Tq in the shape comments below: the positions whose query is asked, T or 1.
# - Rows on every core (by_rows). LayerNorm, QuickGELU and attention's small per-head products are
#   cut into one slice of rows per core, each slice written into outputs allocated beforehand.
# - Fewer and cheaper passes. LayerNorm's row sums as dot products, QuickGELU's sigmoid through one
#   tanh, attention's softmax in place, the token embedding's scatter-add as sums over sorted ids.
#   Each rounds otherwise than the plain layer (tested in float64); on the 6 + 4 layer train step
#   they save 8% (173 -> 160 ms), on the ViT-B/32 encoding 3%; on the tiny step, the embedding's sort
#   and the fast LayerNorm for ln_pre, ln_post and ln_final save another 2-3% (44.6 -> 43.7 ms).

FAST = True

# Every core for the work BLAS does not do. BLAS runs matrix products on all cores, but NumPy runs
# each elementwise operation on one, and attention's N*H small per-head products one after another.
# That work is row by row, the same for every sample: by_rows(fn, x) cuts x's first axis into one
# slice per core and runs fn(rows) on all slices at once, each on a thread of its own. NumPy lets go
# of Python's lock inside its loops, so the slices really run side by side. fn writes its rows of
# outputs allocated beforehand, which get the same numbers, bit for bit, as one call on every row.
# PyTorch does the same inside each of its operations.

MIN_SPLIT = 1 << 15             # elements; below this, handing work to a thread costs more than it saves


def cpu_threads():
    """As many threads as BLAS runs: OMP_NUM_THREADS or OPENBLAS_NUM_THREADS if set (set at import
    under MPI, each process's share of the cores), else every core this process may use."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_settings():
    """
    The process-wide settings that miniclip's speed on a CPU depends on. Every entry point (train.py,
    zeroshot.py, the experiments and benchmarks) calls this first; a script of one's own imports
    miniclip before NumPy and calls it too. Three settings, each a no-op where it does not apply:

    - OpenBLAS's threads spin for about 2^28 cycles after each matrix product before they sleep, and
      so take the cores that by_rows runs the elementwise work on right after. OPENBLAS_THREAD_TIMEOUT=4
      (2^4 cycles, OpenBLAS's least) lets them sleep at once. OpenBLAS reads it when NumPy loads, so
      importing miniclip sets it (unless it is set, or NumPy came first: then this warns).
    - Under an MPI launcher the processes on one machine share its cores: unless the user chose, each
      gets its share of BLAS threads, as torchrun does (also at import). With more threads than cores,
      OpenBLAS's busy-waiting threads fight, and a data-parallel step of --tiny ran 3 to 12 times slower.
    - glibc's malloc serves blocks over 128 KiB with mmap and hands them back to the OS on free, so
      every NumPy temporary page-faults afresh on each of its 4 KiB pages. Raising the mmap and trim
      thresholds keeps freed memory in the process for reuse (MINICLIP_MALLOC_DEFAULTS=1 skips this).

    benchmarks/bench.py measures each against its absence on a tiny train step.
    """
    import ctypes
    import ctypes.util
    import warnings
    blas = numpy.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {}).get("name", "")
    if "openblas" in blas and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        warnings.warn("NumPy was imported before miniclip, so OpenBLAS's threads spin after each product "
                      "(import miniclip first, or set OPENBLAS_THREAD_TIMEOUT=4)", stacklevel=2)
    if os.environ.get("MINICLIP_MALLOC_DEFAULTS") == "1":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)    # glibc's largest allowed value
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)
        libc.mallopt(M_TOP_PAD, 64 * 2 ** 20)
    except (OSError, AttributeError):
        pass


@functools.cache
def thread_pool(n):
    """n threads that by_rows hands slices to, started on first use and kept."""
    return ThreadPoolExecutor(n, thread_name_prefix="miniclip-rows")


def by_rows(fn, x):
    """Call fn(rows) for slices `rows` of x's first axis that together cover it, all at once. Each
    thread runs fn in a copy of the caller's context, so a numpy.errstate around the call holds there too."""
    n = min(cpu_threads(), len(x)) if xp is numpy and x.size >= MIN_SPLIT else 1   # CuPy: one call
    if n <= 1:
        fn(slice(None))
        return
    cuts = [len(x) * i // n for i in range(n + 1)]
    others = [thread_pool(n - 1).submit(contextvars.copy_context().run, fn, slice(a, b))
              for a, b in zip(cuts[1:-1], cuts[2:])]
    fn(slice(0, cuts[1]))                               # this thread takes the first slice
    for f in others:
        f.result()                                      # waits, and raises what fn raised


def layernorm_forward_fast(x, g, b, eps=1e-5):
    """
    layernorm_forward with each row's two sums as einsum dot products, x . (1/D, ..., 1/D) for the mean
    and xc . xc for the variance: NumPy's reductions over short rows spend most of their time starting
    and ending each row (x.sum(axis=-1) over the tiny model's rows of 96 takes 2.3x as long as the
    einsum). Then one pass per operation, in place.
    The sums add in another order: the same numbers up to rounding. (A BLAS product is faster still,
    but its bits depend on where by_rows cuts the rows.)
    """
    D = x.shape[-1]
    x2 = x.reshape(-1, D)                                               # (M, D)
    out, xhat = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty((len(x2), 1), dtype=x.dtype)                        # (M, 1)
    mean_of = xp.full(D, 1.0 / D, dtype=x.dtype)                        # x2 . mean_of: each row's mean

    def rows(r):
        xh, o = xhat[r], out[r]
        xp.subtract(x2[r], xp.einsum("ij,j->i", x2[r], mean_of)[:, None], out=xh)     # x - mean
        var = xp.einsum("ij,ij->i", xh, xh) * (1.0 / D)                  # the biased variance, as PyTorch
        rstd[r, 0] = 1.0 / xp.sqrt(var + eps)
        xh *= rstd[r]
        xp.multiply(xh, g, out=o)
        o += b
    by_rows(rows, x2)
    return out.reshape(x.shape), (xhat, rstd, g)


def layernorm_backward_fast(dout, cache):
    """
    layernorm_backward with its row sums as dot products, as in the forward: mean(dxhat) is
    (dout . g) / D, and mean(dxhat * xhat) is ((dout * xhat) . g) / D, where dout * xhat is what dg
    sums anyway. dg and db are column sums, ones @ (...), over every row at once.
    """
    xhat, rstd, g = cache
    D = xhat.shape[-1]
    d2 = dout.reshape(-1, D)                                            # (M, D)
    dx, dout_xhat = xp.empty_like(d2), xp.empty_like(d2)

    def rows(r):
        xh, dr, o = xhat[r], d2[r], dx[r]
        xp.multiply(dr, xh, out=dout_xhat[r])
        mean_dxhat = xp.einsum("ij,j->i", dr, g) * (1.0 / D)                               # (m,)
        mean_dxhat_xhat = xp.einsum("ij,j->i", dout_xhat[r], g) * (1.0 / D)                # (m,)
        xp.multiply(dr, g, out=o)                                       # dxhat
        o -= mean_dxhat[:, None]
        o -= xh * mean_dxhat_xhat[:, None]
        o *= rstd[r]
    by_rows(rows, d2)
    ones = xp.ones(len(d2), dtype=d2.dtype)
    return dx.reshape(dout.shape), ones @ dout_xhat, ones @ d2


def embed_tokens_backward_fast(dout, cache):
    """
    embed_tokens_backward with the scatter-add as a sort: dout's rows in the order of their ids, one
    sum per run of equal ids (add.reduceat), each written once into its id's row. NumPy's add.at adds
    row by row, 4x as long on the tiny model's text batch. The sums add in another order: the same
    numbers up to rounding.
    """
    ids, tok_shape, pos_shape = cache
    D = dout.shape[-1]
    flat = ids.reshape(-1)                                              # (N*T,)
    order = xp.argsort(flat)
    sorted_ids = flat[order]
    starts = xp.concatenate([xp.zeros(1, dtype=order.dtype),          # where each id's run begins
                             xp.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1])
    dtok = xp.zeros(tok_shape, dtype=dout.dtype)
    dtok[sorted_ids[starts]] = xp.add.reduceat(dout.reshape(-1, D)[order], starts, axis=0)
    dpos = xp.zeros(pos_shape, dtype=dout.dtype)
    dpos[:ids.shape[1]] = dout.sum(axis=0)
    return dtok, dpos


def quickgelu_forward_fast(x):
    """
    quickgelu_forward by rows, with sigmoid(1.702 x) as (1 + tanh(0.851 x)) / 2: one tanh in place of
    an exp, an add and a reciprocal, the slowest of them a division. s is built in place in one buffer
    and out in a second: this layer sees the widest activations of the model, (N, T, 4D), and a fresh
    temporary per operation cost about three times as long. The same numbers up to rounding.
    The cache keeps out instead of x (see the backward), so x can be freed: the next linear layer
    keeps out as its input anyway.
    """
    s, out = xp.empty_like(x), xp.empty_like(x)

    def rows(r):
        xp.multiply(x[r], 0.851, out=s[r])
        xp.tanh(s[r], out=s[r])
        s[r] *= 0.5
        s[r] += 0.5
        xp.multiply(x[r], s[r], out=out[r])
    by_rows(rows, x)
    return out, (out, s)


def quickgelu_backward_fast(dout, cache):
    """
    quickgelu_backward from out and s instead of x and s: x s (1 - s) = out (1 - s), so
        dx = dout * (s + 1.702 * out * (1 - s)),
    one pass fewer than the plain layer's, by rows, built in place in one buffer.
    """
    out, s = cache
    d = xp.empty_like(s)

    def rows(r):
        dr, sr = d[r], s[r]                             # views: writing into dr writes d
        xp.subtract(1.0, sr, out=dr)
        dr *= out[r]
        dr *= 1.702
        dr += sr
        dr *= dout[r]
    by_rows(rows, s)
    return d


def attention_forward_fast(x, w_in, b_in, w_out, b_out, n_heads, causal, at=None):
    """
    attention_forward with its N*H small per-head products by rows, and a position to read:
    at: None, or (N,) positions, one per sequence: then only that position's query is asked (every
    position still gives its key and value) and out is (N, Tq = 1, D).
    """
    N, T, D = x.shape
    H = n_heads
    Dh = D // H
    qkv, in_cache = linear_forward(x, w_in, b_in)                       # (N, T, 3D)
    q, k, v = qkv.reshape(N, T, 3, H, Dh).transpose(2, 0, 3, 1, 4)       # (N, H, T, Dh) each
    if at is not None:
        q = q[xp.arange(N), :, at][:, :, None]                          # (N, H, 1, Dh): Tq = 1
    qs = q * (1.0 / math.sqrt(Dh))                                      # (N, H, Tq, Dh): q / sqrt(Dh)
    Tq = qs.shape[2]
    if causal:                                          # (N, 1, Tq, T), one row per query's position
        mask = causal_mask(xp.arange(T) if at is None else at[:, None], T, x.dtype)
        mask = xp.broadcast_to(mask[..., None, :, :], (N, 1, Tq, T))
    att = xp.empty((N, H, Tq, T), dtype=x.dtype)
    y = xp.empty((N, Tq, H, Dh), dtype=x.dtype)                         # heads side by side

    def rows(r):                                        # N*H small products: by rows, on every core
        a = att[r]                                      # the scores, then softmax_forward's steps in place
        xp.matmul(qs[r], k[r].transpose(0, 1, 3, 2), out=a)             # (n, H, Tq, T)
        if causal:
            a += mask[r]
        a -= a.max(axis=-1, keepdims=True)
        xp.exp(a, out=a)
        a /= a.sum(axis=-1, keepdims=True)
        xp.matmul(a, v[r], out=y[r].transpose(0, 2, 1, 3))              # A v, (n, H, Tq, Dh)
    by_rows(rows, x)
    out, out_cache = linear_forward(y.reshape(N, Tq, D), w_out, b_out)  # (N, Tq, D)
    return out, (in_cache, qs, k, v, att, out_cache, H, at)


def attention_backward_fast(dout, cache):
    """
    attention_backward by rows. With at, dq is the one query's gradient, (N, H, 1, Dh), in a buffer
    of its own; it goes back to its position in dqkv, and every other position's query gradient is 0.
    """
    in_cache, qs, k, v, att, out_cache, H, at = cache
    N, _, Tq, Dh = qs.shape
    T = k.shape[2]
    # out = y w_out^T + b_out
    dy, dw_out, db_out = linear_backward(dout, out_cache)               # (N, Tq, D)
    dy = dy.reshape(N, Tq, H, Dh).transpose(0, 2, 1, 3)                 # (N, H, Tq, Dh)
    dqkv = xp.empty((N, T, 3, H, Dh), dtype=dy.dtype)                   # x w_in^T + b_in's gradient
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)                          # (N, H, T, Dh) views of dqkv
    if at is not None:                                  # one query per sequence: its own buffer, and
        dqkv[:, :, 0] = 0                               # every other position's query gradient is 0
        dq = xp.empty_like(qs)                          # (N, H, 1, Dh)

    def rows(r):                                        # as in the forward: by rows, on every core
        # y = A v
        xp.matmul(att[r].transpose(0, 1, 3, 2), dy[r], out=dv[r])
        ds = dy[r] @ v[r].transpose(0, 1, 3, 2)                         # dA, (n, H, Tq, T)
        # A = softmax(s): softmax_backward's steps, in place
        ds -= (ds * att[r]).sum(axis=-1, keepdims=True)
        ds *= att[r]
        # s = qs k^T
        xp.matmul(ds, k[r], out=dq[r])                                  # dqs
        xp.matmul(ds.transpose(0, 1, 3, 2), qs[r], out=dk[r])
        # qs = q / sqrt(Dh)
        dq[r] *= 1.0 / math.sqrt(Dh)
    by_rows(rows, dy)
    if at is not None:
        # q = q[xp.arange(N), :, at][:, :, None]
        dqkv[xp.arange(N), at, 0] = dq[:, :, 0]
    # q, k, v = split(x w_in^T + b_in)
    dx, dw_in, db_in = linear_backward(dqkv.reshape(N, T, 3 * H * Dh), in_cache)
    return dx, dw_in, db_in, dw_out, db_out


def block_forward_fast(x, p, n_heads, causal, eps, act="quick_gelu", at=None):
    """
    block_forward with the fast LayerNorm, attention and QuickGELU, and with at, (N,) positions, only
    those positions worked out: attention asks their queries alone, and the residual and the MLP run
    on their rows. Returns (N, Tq, D): (N, 1, D) with at, as block_forward's read there.
    """
    h, ln1 = layernorm_forward_fast(x, p["ln_1.weight"], p["ln_1.bias"], eps)
    h, att = attention_forward_fast(h, p["attn.in_proj_weight"], p["attn.in_proj_bias"],
                                    p["attn.out_proj.weight"], p["attn.out_proj.bias"], n_heads, causal, at)
    if at is not None:
        x = x[xp.arange(len(x)), at][:, None]                           # (N, 1, D)
    x = x + h
    h, ln2 = layernorm_forward_fast(x, p["ln_2.weight"], p["ln_2.bias"], eps)
    h, fc = linear_forward(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])    # (N, Tq, F)
    h, act_cache = ACTIVATIONS_FAST[act][0](h)
    h, proj = linear_forward(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # (N, Tq, D)
    return x + h, (ln1, att, ln2, fc, act, act_cache, proj, at)


def block_backward_fast(dout, cache):
    """block_backward for block_forward_fast. With at, the residual path reached x at those positions only."""
    ln1, att, ln2, fc, act, act_cache, proj, at = cache
    g = {}
    # h = c_proj(h)
    dh, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = linear_backward(dout, proj)
    # h = act(h)
    dh = ACTIVATIONS_FAST[act][1](dh, act_cache)
    # h = c_fc(h)
    dh, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"] = linear_backward(dh, fc)
    # h = ln_2(x)
    dh, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward_fast(dh, ln2)
    # out = x + h: the residual path and the MLP branch both read x
    dx = dout + dh
    # h = attention(h)
    dh, g["attn.in_proj_weight"], g["attn.in_proj_bias"], g["attn.out_proj.weight"], \
        g["attn.out_proj.bias"] = attention_backward_fast(dx, att)
    # h = ln_1(x)
    dh, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward_fast(dh, ln1)
    # x = x + h: the same again for the attention branch
    if at is None:
        return dx + dh, g
    # x = x[xp.arange(len(x)), at][:, None]: the residual path reached x at those positions only
    dh[xp.arange(len(dh)), at] += dx[:, 0]
    return dh, g


# The activations of block_forward_fast: QuickGELU by rows, GELU as it is.
ACTIVATIONS_FAST = {"quick_gelu": (quickgelu_forward_fast, quickgelu_backward_fast),
                    "gelu": (gelu_forward, gelu_backward)}
