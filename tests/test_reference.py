"""
miniclip against transformers' CLIPModel (QuickGELU or exact GELU, eager attention) on random weights, saved with
save_pretrained and read back with load_weights: features, loss, every parameter's gradient, and image
preprocessing. Skipped when torch/transformers are missing, except in CI (see conftest.reference).
"""
import numpy as np
import pytest

import miniclip as mc
import weights
from conftest import max_rel, reference

torch = reference("torch")
transformers = reference("transformers")
torch.set_num_threads(2)

# Two shapes, neither with 64-wide heads: (text width, heads), (vision width, heads), patch, image.
CONFIGS = {
    "heads8-16": dict(text=(48, 6), vision=(64, 4), patch=8, image=24, layers=2, vocab=300, context=12),
    "heads6-10": dict(text=(36, 6), vision=(40, 4), patch=7, image=28, layers=3, vocab=120, context=9),
    "gelu": dict(text=(48, 6), vision=(64, 4), patch=8, image=24, layers=2, vocab=300, context=12, act="gelu"),
    # MLPs other than 4x (transformers' intermediate_size), as LAION's ViT-g/14 and ViT-bigG/14 have.
    "mlp160-136": dict(text=(48, 4), vision=(40, 5), patch=8, image=24, layers=2, vocab=300, context=12,
                       mlp=(160, 136), act="gelu"),
}


def hf_model(tmp_path, spec, seed=0):
    torch.manual_seed(seed)
    (tw, th), (vw, vh) = spec["text"], spec["vision"]
    tf, vf = spec.get("mlp", (4 * tw, 4 * vw))
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=spec["vocab"], hidden_size=tw, intermediate_size=tf,
                         num_hidden_layers=spec["layers"], num_attention_heads=th,
                         max_position_embeddings=spec["context"], eos_token_id=spec["vocab"] - 1,
                         bos_token_id=spec["vocab"] - 2, hidden_act=spec.get("act", "quick_gelu")),
        vision_config=dict(hidden_size=vw, intermediate_size=vf, num_hidden_layers=spec["layers"],
                           num_attention_heads=vh, image_size=spec["image"], patch_size=spec["patch"],
                           hidden_act=spec.get("act", "quick_gelu")),
        projection_dim=16, attn_implementation="eager")
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():                               # non-trivial gains, biases and temperature
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(2.0)
    model.save_pretrained(tmp_path)
    return model


def inputs(spec, N=6, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((N, 3, spec["image"], spec["image"])).astype(np.float32)
    V, T = spec["vocab"], spec["context"]
    ids = np.zeros((N, T), dtype=np.int64)
    for i in range(N):
        n = rng.integers(0, T - 2)
        ids[i, :n + 2] = [V - 2, *rng.integers(1, V - 2, n), V - 1]
    return pixels, ids


def features(out):
    """get_*_features returns a tensor before transformers 5 and an output whose pooler_output is it after."""
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


@pytest.mark.parametrize("name", CONFIGS)
def test_features_loss_and_gradients_match_transformers(tmp_path, name):
    spec = CONFIGS[name]
    model = hf_model(tmp_path, spec)
    params, cfg = weights.load_weights(tmp_path)
    assert (cfg.text_heads, cfg.vision_heads) == (spec["text"][1], spec["vision"][1])
    assert (cfg.text_mlp, cfg.vision_mlp) == spec.get("mlp", (4 * spec["text"][0], 4 * spec["vision"][0]))
    assert cfg.activation == spec.get("act", "quick_gelu")
    pixels, ids = inputs(spec)

    with torch.no_grad():
        img_ref = features(model.get_image_features(pixel_values=torch.tensor(pixels)))
        txt_ref = features(model.get_text_features(input_ids=torch.tensor(ids)))
    out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), return_loss=True)
    out.loss.backward()

    # Bounds 3-6x the largest error measured over the three configs (float32 throughout):
    # features 6.0e-7, loss 1.3e-7, gradients 8.2e-6.
    assert max_rel(mc.encode_image(params, cfg, pixels), img_ref) < 2e-6
    assert max_rel(mc.encode_text(params, cfg, ids), txt_ref) < 2e-6
    loss, grads = mc.loss_and_grads(params, cfg, pixels, ids)
    assert abs(loss - out.loss.item()) / out.loss.item() < 5e-7

    ref_grads = weights.hf_to_openai({k: p.grad.numpy() for k, p in model.named_parameters()})
    assert set(ref_grads) == set(grads)
    errors = {k: max_rel(grads[k], ref_grads[k]) for k in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 5e-5, f"{worst}: {errors[worst]:.2e}"


def hidden_states(params, cfg, pixels, ids):
    """
    Each tower's input to its first block and every block's output, as transformers' hidden_states
    lists them: the image tower after ln_pre, the text tower after its embeddings.
    """
    eps = cfg.layer_norm_eps
    x = mc.embed_image_forward(mc.patchify(pixels, cfg.patch_size), params["visual.conv1.weight"],
                               params["visual.class_embedding"], params["visual.positional_embedding"])[0]
    x = mc.layernorm_forward(x, params["visual.ln_pre.weight"], params["visual.ln_pre.bias"], eps)[0]
    y = mc.embed_tokens_forward(ids, params["token_embedding.weight"], params["positional_embedding"])[0]
    states = {"vision": [x], "text": [y]}
    for tower, prefix, layers, heads, causal in (("vision", "visual.transformer.", cfg.vision_layers, cfg.vision_heads, False),
                                                 ("text", "transformer.", cfg.text_layers, cfg.text_heads, True)):
        for i in range(layers):
            block = {k: params[f"{prefix}resblocks.{i}.{k}"] for k in mc.BLOCK_KEYS}
            states[tower].append(mc.block_forward(states[tower][-1], block, heads, causal, eps, cfg.activation)[0])
    return states


@pytest.mark.parametrize("name", CONFIGS)
def test_each_layer_matches_transformers(tmp_path, name):
    """Layer by layer, so that a wrong block is named, not only a wrong feature at the end."""
    spec = CONFIGS[name]
    model = hf_model(tmp_path, spec)
    params, cfg = weights.load_weights(tmp_path)
    pixels, ids = inputs(spec)
    with torch.no_grad():
        ref = {"vision": model.vision_model(pixel_values=torch.tensor(pixels), output_hidden_states=True).hidden_states,
               "text": model.text_model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states}
    ours = hidden_states(params, cfg, pixels, ids)
    for tower in ("vision", "text"):
        assert len(ours[tower]) == len(ref[tower]) == spec["layers"] + 1
        for i, (a, b) in enumerate(zip(ours[tower], ref[tower])):
            err = max_rel(a, b.numpy())
            assert err < 2e-6, f"{tower} hidden state {i} ({'input' if i == 0 else f'after block {i - 1}'}): {err:.2e}"


@pytest.mark.parametrize("size", [(37, 23), (23, 37), (224, 224), (301, 299), (5, 640)])
def test_preprocessing_matches_clip_image_processor(size):
    from PIL import Image
    processor = transformers.CLIPImageProcessorPil()
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = processor(images=img, return_tensors="np")["pixel_values"][0]
    ours = mc.preprocess(img, 224)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert np.abs(ours - ref).max() < 1e-6


def test_preprocessing_composites_transparency_like_transformers(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "a.png")
    ref = transformers.CLIPImageProcessorPil()(images=rgba, return_tensors="np")["pixel_values"][0]
    assert np.abs(mc.preprocess(mc.open_image(tmp_path / "a.png"), 224) - ref).max() < 1e-6


def test_safetensors_reader_matches_the_safetensors_package(tmp_path):
    safetensors_numpy = reference("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32),
               "half": rng.standard_normal((5,)).astype(np.float16),
               "empty": np.zeros((0, 3), np.float32), "ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    safetensors_numpy.save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "np"})
    got = weights.read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].shape == v.shape and np.array_equal(got[k], v.astype(got[k].dtype))

    bf = torch.randn(4, 5).to(torch.bfloat16)
    safetensors_torch = reference("safetensors.torch")
    safetensors_torch.save_file({"w": bf}, str(tmp_path / "bf16.safetensors"))
    assert np.array_equal(weights.read_safetensors(tmp_path / "bf16.safetensors")["w"], bf.float().numpy())


def test_adamw_matches_torch_over_several_steps():
    """Our AdamW at its defaults (the paper's betas 0.9 and 0.98, eps 1e-6, decay 0.2 on matrices only)
    against torch.optim.AdamW set the same way, over 5 steps of random gradients, float64."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    ref = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    ours = mc.AdamW(params)
    theirs = torch.optim.AdamW([{"params": [ref["w"]], "weight_decay": 0.2}, {"params": [ref["b"]], "weight_decay": 0.0}],
                               lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    for step in range(5):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        ours.step(params, grads, lr=1e-2)
        for k, t in ref.items():
            t.grad = torch.tensor(grads[k])
        theirs.step()
    for k in params:
        assert np.abs(params[k] - ref[k].detach().numpy()).max() < 1e-14, k
