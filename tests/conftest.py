"""Shared test helpers: relative error, numerical gradients, and the reference tier's imports."""
import importlib
import importlib.util
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rel_error(a, b):
    """
    CS231n's relative error, element by element, the largest: |a - b| / max(|a| + |b|, floor).
    The floor is 1e-3 of the tensor's largest entry (and at least 1e-12). Central differences carry
    an absolute round-off of about eps * |L| / h (~1e-10 here), so an entry that is exactly zero, such
    as the gradient of the key bias, which softmax ignores, would otherwise compare noise with noise.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not a.size:
        return 0.0
    floor = max(1e-3 * np.abs(b).max(), 1e-12)
    return float(np.max(np.abs(a - b) / np.maximum(floor, np.abs(a) + np.abs(b))))


def max_rel(a, b):
    """max |a - b| / max |b|: the error relative to the tensor's scale (for float32 comparisons)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def numerical_grad(f, x, h=1e-5, index=None):
    """
    Central differences of the scalar f() with respect to the array x, changed in place:
        df/dx_i ~ (f(x + h e_i) - f(x - h e_i)) / 2h
    index: the flat positions to probe (all of them if None). Returns the gradient at those positions.
    """
    flat = x.reshape(-1)
    positions = range(flat.size) if index is None else index
    out = []
    for i in positions:
        old = flat[i]
        flat[i] = old + h
        plus = f()
        flat[i] = old - h
        minus = f()
        flat[i] = old
        out.append((plus - minus) / (2 * h))
    return np.array(out)


def reference(name):
    """
    Import a module of the reference tier (torch, transformers, ...). When it is missing the test is
    skipped with the reason, except where MINICLIP_REQUIRE_REFERENCE=1 (CI sets it): there a missing
    reference is a failure, so the comparisons cannot silently stop running.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("MINICLIP_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"reference tier required but {name} is missing ({e}); pip install -r requirements-dev.txt",
                        pytrace=False)
        pytest.skip(f"{name} is not installed (pip install -r requirements-dev.txt)", allow_module_level=True)


def open_clip_file(name):
    """
    A file from the open_clip_torch package, found without importing the package (whose __init__
    needs torchvision): CLIP's vocabulary bpe_simple_vocab_16e6.txt.gz and OpenAI's tokenizer.py.
    """
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(spec.submodule_search_locations[0], name) if spec else None
    if path is None or not os.path.exists(path):
        if os.environ.get("MINICLIP_REQUIRE_REFERENCE") == "1":
            pytest.fail("reference tier required but open_clip_torch is missing "
                        "(pip install --no-deps open-clip-torch==3.3.0)", pytrace=False)
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open-clip-torch==3.3.0)")
    return path
