"""
The paper's supervised baseline in miniature: its ImageNet models (Figures 13-14), here CLIP's own
image tower with a linear head over the seen classes, trained with cross-entropy on labeled images.
No text tower and no language: a class is a number. experiments/emoji_paper.py trains several of
them (sizes, lengths) to draw the line that models trained this way follow between accuracy on
their own distribution and on a shifted one, and asks whether zero-shot CLIP sits above it.

    features = encode_image(pixels)                 (N, E), CLIP's image tower, read at the class token
    logits = features head.weight^T + head.bias     (N, K)
    loss = mean_i -log softmax(logits_i)[y_i]       miniclip.cross_entropy_head_forward, q = one-hot(y)

The backward is the same two pieces read in reverse, each already checked on its own; the whole is
checked against central differences in tests/test_experiments.py.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402


def init_params(cfg, n_classes, seed=0, dtype=np.float32):
    """
    The image tower's parameters (visual.*) as miniclip.init_params draws them, and a head of
    n_classes rows: weight (K, E) at std E^-0.5, as the bag-of-words head's, and bias 0.
    """
    params = {k: v for k, v in mc.init_params(cfg, seed, dtype).items() if k.startswith("visual.")}
    rng = np.random.default_rng([seed, 1])              # apart from init_params' own stream
    params["head.weight"] = mc.xp.asarray(rng.normal(0.0, cfg.embed_dim ** -0.5, (n_classes, cfg.embed_dim)), dtype=dtype)
    params["head.bias"] = mc.xp.zeros(n_classes, dtype=dtype)
    return params


def loss_and_grads(params, cfg, pixels, labels):
    """
    One forward and backward pass over a batch of labeled images.
    pixels: (N, 3, S, S)   labels: (N,) ints in [0, K)   ->   (loss: float, grads: every key of params)
    """
    feat, cache = mc.encode_image_forward(params, cfg, pixels)                         # (N, E)
    K = len(params["head.bias"])
    q = mc.xp.eye(K, dtype=feat.dtype)[labels]                                          # (N, K) one-hot
    loss, head = mc.cross_entropy_head_forward(feat, params["head.weight"], params["head.bias"], q)
    dfeat, dw, db = mc.cross_entropy_head_backward(head)
    grads = mc.encode_image_backward(dfeat, cache, params)
    grads["head.weight"], grads["head.bias"] = dw, db
    return loss, grads


def class_scores(params, cfg, pixels):
    """The head's logits for each image, (N, K): the predicted class is their argmax."""
    return mc.linear_forward(mc.encode_image(params, cfg, pixels), params["head.weight"], params["head.bias"])[0]
