"""Shared test helpers: relative error, numerical gradients, and the reference tier's imports."""
import importlib
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import miniclip  # noqa: E402,F401  before NumPy, so that the tests run with the settings the programs make
import numpy as np  # noqa: E402
import pytest  # noqa: E402


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


def clip_folders(folder, act="quick_gelu", width=64, layers=2, heads=2, image=64, patch=16, proj=32,
                 logit_scale=None, seed=0, mlp=None):
    """
    A random-weight CLIP written twice, as published checkpoints are: folder/"hf", transformers'
    save_pretrained with CLIP's vocabulary and image processor, and folder/"open_clip", the same tensors
    under OpenAI's names in open_clip_model.safetensors beside open_clip_config.json and the same
    tokenizer files. Returns (the transformers model, the hf folder, the open_clip folder).
    """
    import json
    import shutil

    import bpe
    import miniclip as mc
    import weights
    torch, transformers = reference("torch"), reference("transformers")
    safetensors_numpy = reference("safetensors.numpy")
    torch.manual_seed(seed)
    mlp = mlp or 4 * width                              # the MLP's width, in both towers
    tower = dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                 num_attention_heads=heads, hidden_act=act)
    config = transformers.CLIPConfig(text_config=tower, vision_config=dict(tower, image_size=image, patch_size=patch),
                                     projection_dim=proj, attn_implementation="eager",
                                     **({"logit_scale_init_value": logit_scale} if logit_scale else {}))
    model = transformers.CLIPModel(config).eval()
    hf, oc = folder / "hf", folder / "open_clip"
    model.save_pretrained(hf)
    bpe.load(open_clip_file("bpe_simple_vocab_16e6.txt.gz")).save_hf(hf)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image}) \
        .save_pretrained(hf)

    os.makedirs(oc)
    tensors = weights.hf_to_openai({k: v.numpy() for k, v in model.state_dict().items()})
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(oc / "open_clip_model.safetensors"))
    model_cfg = {"embed_dim": proj, "quick_gelu": act == "quick_gelu",
                 "vision_cfg": {"image_size": image, "layers": layers, "width": width,
                                "head_width": width // heads, "patch_size": patch, "mlp_ratio": mlp / width},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads,
                              "layers": layers, "mlp_ratio": mlp / width}}
    preprocess_cfg = {"mean": list(mc.CLIP_MEAN), "std": list(mc.CLIP_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf / name, oc / name)
    return model, hf, oc


def zeroshot_probabilities(checkpoint, image, labels):
    """
    What zeroshot.py must print for one image against labels, worked out here from the checkpoint:
    the image preprocessed and encoded, each label's prompts (the checkpoint's templates) encoded and
    averaged, and the softmax of the scaled cosines. {label: probability}.
    """
    import bpe
    import miniclip as mc
    import weights
    import zeroshot
    params, cfg, meta, _ = weights.load_checkpoint(checkpoint)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    tok, templates = bpe.from_list(meta["tokenizer"]), meta.get("templates") or [zeroshot.DEFAULT_TEMPLATE]
    pixels = mc.preprocess(mc.open_image(str(image)), cfg.image_size)[None]
    img = mc.l2_normalize(mc.encode_image(params, cfg, pixels))                              # (1, E)
    classes = mc.class_embeddings(params, cfg, zeroshot.prompt_ids(tok, cfg, labels, templates), len(templates))
    logits = mc.logit_scale_value(params) * (img @ classes.T)[0].astype(np.float64)
    p = np.exp(logits - logits.max())
    return dict(zip(labels, p / p.sum()))
