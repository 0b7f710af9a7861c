"""The whole model: its gradient against central differences, and sanity checks on the loss."""
import dataclasses
import math

import numpy as np
import pytest

import miniclip as mc
from conftest import numerical_grad, rel_error

# A micro CLIP: 12x12 images of 4x4 patches, two layers per tower, heads of width 4 and 6.
MICRO = mc.Config(image_size=12, patch_size=4, vision_width=8, vision_layers=2, vision_heads=2,
                  context_length=7, vocab_size=20, text_width=12, text_layers=2, text_heads=2, embed_dim=6)


def batch(cfg, N, seed=0):
    """Random pixels and token rows [SOT=V-2, words..., EOT=V-1, 0...] with EOT as the highest id."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((N, 3, cfg.image_size, cfg.image_size))
    ids = np.zeros((N, cfg.context_length), dtype=np.int64)
    for i in range(N):
        n = rng.integers(1, cfg.context_length - 1)
        ids[i, :n + 2] = [cfg.vocab_size - 2, *rng.integers(1, cfg.vocab_size - 2, n), cfg.vocab_size - 1]
    return pixels, ids


@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), math.log(100)])
@pytest.mark.parametrize("checkpoint, act, objective, text_layers", [(False, "quick_gelu", "contrastive", 2),
                                                                    (True, "quick_gelu", "contrastive", 2),
                                                                    (False, "gelu", "contrastive", 2),
                                                                    (True, "gelu", "bow", 2),
                                                                    (True, "quick_gelu", "contrastive", 0)])
def test_model_gradient(logit_scale, checkpoint, act, objective, text_layers):
    """
    Every parameter tensor, up to 12 sampled entries each, float64, relative error < 1e-5. The
    bag-of-words objective leaves the text tower and the temperature out: their gradients are zero,
    which the numerical gradient confirms. text_layers 0: the bag-of-words text encoder.
    """
    cfg = dataclasses.replace(MICRO, activation=act, objective=objective, text_layers=text_layers)
    params = mc.init_params(cfg, seed=1, dtype=np.float64)
    params["logit_scale"][...] = logit_scale
    pixels, ids = batch(cfg, 4)
    loss, grads = mc.loss_and_grads(params, cfg, pixels, ids, checkpoint)
    assert set(grads) == set(params)
    rng = np.random.default_rng(0)
    f = lambda: mc.loss_and_grads(params, cfg, pixels, ids)[0]
    worst = {}
    for name, p in params.items():
        g = np.asarray(grads[name]).reshape(-1)
        assert g.shape == (p.size,) and np.all(np.isfinite(g))
        if name == "token_embedding.weight":            # only the rows of ids in the batch are used
            rows = np.unique(ids)
            index = rng.choice(rows, 6) * p.shape[1] + rng.integers(0, p.shape[1], 6)
        else:
            index = rng.choice(p.size, min(12, p.size), replace=False)
        worst[name] = rel_error(g[index], numerical_grad(f, p, index=index))
    bad = {k: v for k, v in worst.items() if v >= 1e-5}
    assert not bad, f"relative errors over 1e-5: {bad}"


def test_bag_of_words_text_encoder_is_ln_final_of_the_mean_word():
    """text_layers = 0: a text's feature is ln_final(the mean of its words' embedding rows) @ text_projection,
    SOT, EOT and padding left out; so word order does not count, a repeated word counts twice, and the
    model has no text transformer and no positions."""
    cfg = dataclasses.replace(MICRO, text_layers=0)
    params = mc.init_params(cfg, seed=2, dtype=np.float64)
    assert not any(k.startswith("transformer.") or k == "positional_embedding" for k in params)
    SOT, EOT = cfg.vocab_size - 2, cfg.vocab_size - 1
    ids = np.array([[SOT, 3, 5, 3, EOT, 0, 0], [SOT, 5, 3, 3, EOT, 0, 0], [SOT, 3, 5, EOT, 0, 0, 0]])
    feat = mc.encode_text(params, cfg, ids)
    mean = params["token_embedding.weight"][[3, 5, 3]].mean(axis=0, keepdims=True)
    x = mc.layernorm_forward(mean, params["ln_final.weight"], params["ln_final.bias"], cfg.layer_norm_eps)[0]
    assert np.abs(feat[0] - (x @ params["text_projection"])[0]).max() < 1e-12
    assert np.abs(feat[1] - feat[0]).max() < 1e-12 and np.abs(feat[2] - feat[0]).max() > 1e-3
    assert np.abs(mc.encode_text(params, cfg, ids[:, :5]) - feat).max() < 1e-12   # fewer padding columns


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing each block in the backward changes where activations live, not the numbers: float64, 1e-12."""
    params = mc.init_params(MICRO, seed=2, dtype=np.float64)
    pixels, ids = batch(MICRO, 5, seed=3)
    loss, grads = mc.loss_and_grads(params, MICRO, pixels, ids)
    loss_c, grads_c = mc.loss_and_grads(params, MICRO, pixels, ids, checkpoint=True)
    assert loss_c == loss
    errors = {k: float(np.abs(grads_c[k] - g).max() / max(np.abs(g).max(), 1e-300)) for k, g in grads.items()}
    assert max(errors.values()) < 1e-12, errors


@pytest.mark.parametrize("checkpoint", [False, True])
def test_the_speed_devices_give_the_plain_models_numbers(monkeypatch, checkpoint):
    """
    The model with its speed devices (the default) against the plain layers alone (FAST off), float64:
    the features, the loss and every gradient to rounding (the largest over 8 seeds, with and without
    checkpointing: features 1.3e-15, loss 7.7e-16 relative, gradients 1.2e-14 relative; the bounds are
    about 4x those). Both
    towers read their last block at one position, so a wrong row there is off by order 1.
    """
    cfg = dataclasses.replace(MICRO, context_length=9)
    params = mc.init_params(cfg, seed=4, dtype=np.float64)
    pixels, ids = batch(cfg, 5, seed=6)
    assert mc.FAST
    (img, txt), _ = mc.features_forward(params, cfg, pixels, ids)
    loss, grads = mc.loss_and_grads(params, cfg, pixels, ids, checkpoint)
    monkeypatch.setattr(mc, "FAST", False)
    (img0, txt0), _ = mc.features_forward(params, cfg, pixels, ids)
    loss0, grads0 = mc.loss_and_grads(params, cfg, pixels, ids, checkpoint)
    assert np.abs(img - img0).max() < 5e-15 and np.abs(txt - txt0).max() < 5e-15
    assert abs(loss - loss0) < 3e-15 * abs(loss0)
    errors = {k: float(np.abs(grads[k] - g).max() / max(np.abs(g).max(), 1e-300)) for k, g in grads0.items()}
    assert max(errors.values()) < 5e-14, errors


def test_inference_in_chunks_is_the_whole_batch_at_once(monkeypatch):
    """encode_image and encode_text cut the batch into chunks whose MLP activations stay under
    CHUNK_BYTES (here 2 sequences: chunks of 2, 2 and 1); the features are the whole batch's, and
    each chunk's widest activation is within the bound."""
    params = mc.init_params(MICRO, seed=5, dtype=np.float64)
    pixels, ids = batch(MICRO, 5, seed=7)
    whole_img = mc.encode_image_forward(params, MICRO, pixels)[0]
    whole_txt = mc.encode_text_forward(params, MICRO, ids)[0]
    tokens = (MICRO.image_size // MICRO.patch_size) ** 2 + 1
    monkeypatch.setattr(mc, "CHUNK_BYTES", 2 * tokens * MICRO.vision_mlp * 8 + 7)
    assert mc.chunk_rows(tokens, MICRO.vision_mlp, np.float64) == 2
    seen = []
    forward = mc.encode_image_forward
    monkeypatch.setattr(mc, "encode_image_forward", lambda p, c, x, **kw: (seen.append(len(x)), forward(p, c, x, **kw))[1])
    assert rel_error(mc.encode_image(params, MICRO, pixels), whole_img) < 1e-12
    assert seen == [2, 2, 1]
    monkeypatch.setattr(mc, "CHUNK_BYTES", 3 * ids.shape[1] * MICRO.text_mlp * 8)
    assert mc.chunk_rows(ids.shape[1], MICRO.text_mlp, np.float64) == 3
    assert rel_error(mc.encode_text(params, MICRO, ids), whole_txt) < 1e-12
    monkeypatch.setattr(mc, "CHUNK_BYTES", 1)                 # less than one sequence: one at a time
    assert mc.chunk_rows(ids.shape[1], MICRO.text_mlp, np.float64) == 1
    assert rel_error(mc.encode_text(params, MICRO, ids), whole_txt) < 1e-12


def test_checkpointed_blocks_keep_only_their_input():
    params = mc.init_params(MICRO, seed=2, dtype=np.float64)
    pixels, ids = batch(MICRO, 2)
    _, cache = mc.features_forward(params, MICRO, pixels, ids, checkpoint=True)
    blocks = cache[0][2].caches + cache[2][1].caches    # the image's and the text's block caches
    assert len(blocks) == MICRO.vision_layers + MICRO.text_layers
    assert all(isinstance(b, mc.Recompute) for b in blocks)


def test_unused_token_rows_get_zero_gradient():
    params = mc.init_params(MICRO, dtype=np.float64)
    pixels, ids = batch(MICRO, 3)
    _, grads = mc.loss_and_grads(params, MICRO, pixels, ids)
    unused = np.setdiff1d(np.arange(MICRO.vocab_size), ids)
    assert np.all(grads["token_embedding.weight"][unused] == 0)


@pytest.mark.parametrize("N", [8, 32])
def test_initial_loss_is_log_batch(N):
    """
    At init, image and text features are unrelated, so with the scale at 1 the logits are cosines near
    0 and each row's softmax is near uniform: loss ~ log N. (At the real init scale, 1/0.07, random
    64-wide features give logits of std ~14.3/8 = 1.8 and the loss is about log N + 1.8^2/2 instead.)
    """
    cfg = mc.PRESETS["tiny"]
    params = mc.init_params(cfg)
    params["logit_scale"][...] = 0.0
    pixels, ids = batch(cfg, N)
    loss, _ = mc.loss_and_grads(params, cfg, pixels.astype(np.float32), ids)
    assert abs(loss - math.log(N)) < 0.02 * math.log(N), (loss, math.log(N))


def test_overfits_eight_pairs():
    """A micro model must drive the loss on 8 fixed pairs to near zero (CS231n's first sanity check)."""
    cfg = MICRO
    params = mc.init_params(cfg, seed=0)
    pixels, ids = batch(cfg, 8, seed=5)
    pixels = pixels.astype(np.float32)
    opt = mc.AdamW(params, weight_decay=0.0)
    first = None
    for step in range(300):
        loss, grads = mc.loss_and_grads(params, cfg, pixels, ids)
        first = loss if first is None else first
        opt.step(params, grads, lr=3e-3)
    assert first > 1.5 and loss < 0.02, (first, loss)


def test_encoders_accept_shorter_text_and_float64():
    """Text may be shorter than the context (positions are sliced); a float64 model stays float64."""
    params = mc.init_params(MICRO, dtype=np.float64)
    pixels, ids = batch(MICRO, 2)
    ids[:, 5:] = 0
    full = mc.encode_text(params, MICRO, ids)
    short = mc.encode_text(params, MICRO, ids[:, :5])
    assert full.dtype == np.float64 and np.allclose(full, short, rtol=1e-12, atol=1e-12)
    assert mc.encode_image(params, MICRO, pixels).shape == (2, MICRO.embed_dim)


def test_initial_stds_are_openais():
    """
    Each tensor's sample mean and standard deviation against OpenAI's init, the numbers written out
    for one shape (D = 256, vision 2 layers, text 3, patch 8): a wrong factor in any std fails.
    """
    cfg = mc.Config(image_size=64, patch_size=8, vision_width=256, vision_layers=2, vision_heads=4, context_length=32,
                    vocab_size=2048, text_width=256, text_layers=3, text_heads=4, embed_dim=128)
    params = mc.init_params(cfg, seed=0, dtype=np.float64)
    want = {"token_embedding.weight": 0.02, "positional_embedding": 0.01, "visual.class_embedding": 1 / 16,
            "visual.positional_embedding": 1 / 16, "visual.proj": 1 / 16, "text_projection": 1 / 16,
            "visual.conv1.weight": (1 / math.sqrt(3 * 8 * 8)) / math.sqrt(3)}       # uniform(+-1/sqrt(fan_in))
    for prefix, L in (("visual.transformer.", 2), ("transformer.", 3)):
        for i in range(L):
            want.update({f"{prefix}resblocks.{i}.attn.in_proj_weight": 1 / 16,
                         f"{prefix}resblocks.{i}.attn.out_proj.weight": 1 / 16 / math.sqrt(2 * L),
                         f"{prefix}resblocks.{i}.mlp.c_fc.weight": 1 / math.sqrt(512),
                         f"{prefix}resblocks.{i}.mlp.c_proj.weight": 1 / 16 / math.sqrt(2 * L)})
    for name, p in params.items():
        if name in want:
            assert abs(p.mean()) < 4 * want[name] / math.sqrt(p.size), name
            assert abs(p.std() / want[name] - 1) < 0.1, (name, p.std(), want[name])
        elif name == "logit_scale":
            assert float(p) == math.log(1 / 0.07)
        else:                                           # LayerNorm gains 1, every bias 0
            assert np.all(p == (1.0 if "ln" in name and name.endswith("weight") else 0.0)), name


# The tensors weight decay shrinks, by name: open_clip's rule (every tensor of 2 or more dimensions),
# written out rather than recomputed, so a changed rule fails here. See miniclip.decays.
DECAYED = {"visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
           "positional_embedding", "text_projection",
           *(f"{tower}resblocks.{i}.{k}" for tower in ("visual.transformer.", "transformer.") for i in range(2)
             for k in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))}


def test_adamw_decays_exactly_the_weight_tensors():
    """With zero gradients, the DECAYED tensors shrink by (1 - lr * wd) per step and nothing else moves."""
    params = mc.init_params(MICRO, dtype=np.float64)
    before = {k: v.copy() for k, v in params.items()}
    opt = mc.AdamW(params, weight_decay=0.1)
    opt.step(params, {k: np.zeros_like(v) for k, v in params.items()}, lr=0.5)
    assert len(DECAYED) == 22 and DECAYED < set(params)
    for k, v in params.items():
        factor = 0.95 if k in DECAYED else 1.0
        assert np.allclose(v, before[k] * factor, rtol=0, atol=1e-15), k


def test_adamw_first_step_is_lr_sign():
    """After one step from zero moments, bias correction makes the update lr * g / (|g| + eps)."""
    params = {"b": np.zeros(4)}
    opt = mc.AdamW(params, weight_decay=0.0)
    opt.step(params, {"b": np.array([2.0, -3.0, 0.5, -1e-3])}, lr=0.1)
    g = np.array([2.0, -3.0, 0.5, -1e-3])
    assert np.allclose(params["b"], -0.1 * g / (np.abs(g) + 1e-6), rtol=1e-9, atol=0)


def test_bag_of_words_scores_a_label_by_the_log_probability_of_its_words():
    """With a predictor that favors word 3, the prompt "3 3" outranks "4", and templates are averaged."""
    cfg = dataclasses.replace(MICRO, objective="bow")
    params = mc.init_params(cfg, seed=0, dtype=np.float64)
    params["bow.weight"][...] = 0
    params["bow.bias"][...] = np.log(np.arange(1, cfg.vocab_size + 1))      # p(v) proportional to v + 1
    V, sot, eot = cfg.vocab_size, cfg.vocab_size - 2, cfg.vocab_size - 1
    prompts = np.array([[sot, 3, 3, eot, 0], [sot, 3, 5, eot, 0],          # label 0, two templates
                        [sot, 4, eot, 0, 0], [sot, 4, 4, 4, eot]])          # label 1
    pixels, _ = batch(cfg, 2)
    scores = mc.bow_label_scores(params, cfg, pixels, prompts, 2)
    logp = np.log(np.arange(1, V + 1) / np.arange(1, V + 1).sum())
    want = [(logp[3] + (logp[3] + logp[5]) / 2) / 2, logp[4]]
    assert scores.shape == (2, 2) and np.allclose(scores, [want, want])
