"""
The linear probe of experiments/paper.py, the CLIP paper's other evaluation: multinomial logistic regression on frozen image
features, fitted by full-batch L-BFGS, with the L2 strength searched on a split of the training
features and the model refitted on all of them (the paper's section 3.2 and appendix A.3). The
objective is scikit-learn's, so that a C means the same in both:
    J(W, b) = C sum_i -log softmax(x_i W + b)[y_i] + |W|^2 / 2          (the bias is not penalized)
Its gradient: with P = softmax(X W + b) and Y the one-hot labels, dJ/dW = C X^T (P - Y) + W and
dJ/db = C sum_i (P - Y)_i. J is convex, so any C has one minimum and L-BFGS finds it.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402


def probe_loss_and_grad(w, X, Y, C):
    """J and its gradient at w, the flat concatenation of W (D, K) and b (K,). X: (n, D), Y: (n, K) one-hot."""
    D, K = X.shape[1], Y.shape[1]
    W, b = w[:D * K].reshape(D, K), w[D * K:]
    logp = mc.log_softmax(X @ W + b)                                        # (n, K)
    dlogits = C * (np.exp(logp) - Y)                                        # (n, K)
    loss = -C * float((logp * Y).sum()) + 0.5 * float((W * W).sum())
    return loss, np.concatenate([(X.T @ dlogits + W).ravel(), dlogits.sum(axis=0)])


def lbfgs(f, w, iters=500, memory=10, tol=1e-6):
    """
    Minimize f(w) -> (value, gradient) from w, by L-BFGS (Nocedal & Wright, Numerical Optimization,
    algorithms 7.4 and 7.5): the step is -H g, with H the inverse-Hessian estimate built from the last
    `memory` pairs (s, y) of steps and gradient changes by the two-loop recursion, and a backtracking
    line search that asks for Armijo's sufficient decrease. Stops when |g|_inf <= tol * max(1, |f|).
    """
    value, g = f(w)
    history = []
    for _ in range(iters):
        if np.abs(g).max() <= tol * max(1.0, abs(value)):
            break
        q, alphas = g.copy(), []
        for s, y, rho in reversed(history):                                 # newest pair first
            a = rho * (s @ q)
            q -= a * y
            alphas.append(a)
        if history:                                                         # H0 = (s.y / y.y) I
            s, y, _ = history[-1]
            q *= (s @ y) / (y @ y)
        for (s, y, rho), a in zip(history, reversed(alphas)):               # oldest pair first
            q += (a - rho * (y @ q)) * s
        direction, step = -q, 1.0
        slope = g @ direction
        if slope >= 0:                                                      # not a descent direction: restart
            history, direction, slope = [], -g, -(g @ g)
        while True:
            new_value, new_g = f(w + step * direction)
            if new_value <= value + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s, y = step * direction, new_g - g
        w, value, g = w + s, new_value, new_g
        if s @ y > 1e-10:                                                   # keep H positive definite
            history = (history + [(s, y, 1.0 / (s @ y))])[-memory:]
    return w


def fit_probe(X, labels, n_classes, C):
    """(W, b) of the probe fitted with strength C. X: (n, D) float64, labels: (n,) ints."""
    D = X.shape[1]
    Y = np.eye(n_classes)[labels]
    w = lbfgs(lambda w: probe_loss_and_grad(w, X, Y, C), np.zeros(D * n_classes + n_classes))
    return w[:D * n_classes].reshape(D, n_classes), w[D * n_classes:]


# The paper sweeps C over 1e-6 ... 1e6 on a validation split, then refines around the best; a grid of
# half-decades over the same range does the first part.
PROBE_CS = tuple(10.0 ** e for e in np.arange(-6, 6.5, 0.5))


def linear_probe(train_features, train_labels, test_features, val_frac=0.2, seed=0, cs=PROBE_CS):
    """
    Predicted labels of test_features from a logistic-regression probe trained on train_features: the
    C with the best accuracy on a seeded val_frac of the training features, then a refit on all of them.
    Features are used as given (the paper's probes take the unnormalized image features).
    """
    X = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels)
    classes, y = np.unique(y, return_inverse=True)
    K = len(classes)
    order = np.random.default_rng(seed).permutation(len(X))
    n_val = max(1, int(len(X) * val_frac)) if len(X) > 1 else 0
    val, fit = order[:n_val], order[n_val:]
    best_c = cs[len(cs) // 2]
    if n_val and len(fit):
        scores = []
        for c in cs:
            W, b = fit_probe(X[fit], y[fit], K, c)
            scores.append(((X[val] @ W + b).argmax(axis=1) == y[val]).mean())
        best_c = cs[int(np.argmax(scores))]                 # ties: the smallest C, the strongest penalty
    W, b = fit_probe(X, y, K, best_c)
    return classes[(np.asarray(test_features, dtype=np.float64) @ W + b).argmax(axis=1)]
