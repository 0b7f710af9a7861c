"""Checkpoints and the safetensors reader: round trips, and clear errors on bad or hostile files."""
import json
import struct

import numpy as np
import pytest

import miniclip as mc
from test_model import MICRO


def test_checkpoint_round_trip(tmp_path):
    params = mc.init_params(MICRO, seed=3)
    meta = {"labels": ["red circle"], "templates": ["a {}."]}
    mc.save_weights(tmp_path / "m.npz", params, MICRO, meta=meta, extra={"optim.m.x": np.ones(3)})
    loaded, cfg, got_meta, extra = mc.load_checkpoint(tmp_path / "m.npz")
    assert cfg == MICRO and got_meta == meta and list(extra) == ["optim.m.x"]
    assert all(np.array_equal(loaded[k], params[k]) for k in params)
    params2, cfg2 = mc.load_weights(tmp_path / "m.npz")
    assert cfg2 == MICRO and set(params2) == set(params)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]           # no temporary file left behind


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    params = mc.init_params(MICRO)
    mc.save_weights(tmp_path / "m.npz", params, MICRO)
    before = (tmp_path / "m.npz").read_bytes()
    with pytest.raises(ValueError):                     # fails while writing: a name collision
        mc.save_weights(tmp_path / "m.npz", params, MICRO, extra={"logit_scale": np.ones(1)})
    assert (tmp_path / "m.npz").read_bytes() == before


def test_pickled_npz_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        mc.load_weights(tmp_path / "evil.npz")


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_corrupt_npz_is_refused(tmp_path, content):
    (tmp_path / "bad.npz").write_bytes(content)
    with pytest.raises(ValueError, match="bad.npz"):
        mc.load_weights(tmp_path / "bad.npz")


def test_foreign_npz_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    with pytest.raises(ValueError, match="not a miniclip checkpoint"):
        mc.load_weights(tmp_path / "other.npz")


def safetensors_bytes(header, data=b"", raw_header=None):
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "shorter than the 8-byte header"),
    (struct.pack("<Q", 2 ** 62) + b"{}", "does not fit"),
    (safetensors_bytes(None, raw_header=b"{not json"), "not JSON"),
    (safetensors_bytes(None, raw_header=b"[1, 2]"), "not a JSON object"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8),
     "outside"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}}, b"\0" * 16),
     "outside"),
    (safetensors_bytes({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2),
     "unsupported dtype"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, b"\0" * 16),
     "needs 24 bytes"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "bad shape"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 16]}},
                       b"\0" * 16), "needs"),
    (safetensors_bytes({"w": "nonsense"}), "malformed entry"),
])
def test_malformed_safetensors(tmp_path, content, message):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        mc.read_safetensors(tmp_path / "model.safetensors")
    with pytest.raises(ValueError):
        mc.load_weights(tmp_path / "model.safetensors")


def test_safetensors_without_clip_tensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(GOOD, b"\0" * 16))
    assert mc.read_safetensors(tmp_path / "model.safetensors")["w"].shape == (2, 2)
    with pytest.raises(ValueError, match="not a CLIP model"):
        mc.load_weights(tmp_path / "model.safetensors")


def test_missing_weights_path(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        mc.load_weights(tmp_path / "nothing.npz")
    with pytest.raises(ValueError, match="neither model.safetensors nor open_clip_model.safetensors"):
        mc.load_weights(tmp_path)


def test_config_inferred_from_shapes_matches_presets():
    for name in ("ViT-B/32", "ViT-B/16", "ViT-L/14"):
        cfg = mc.PRESETS[name]
        shapes = mc.param_shapes(cfg)
        fake = {k: np.empty(s, dtype=np.float32) if s else np.empty((), np.float32) for k, s in shapes.items()}
        assert mc.config_from_params(fake) == cfg, name


@pytest.mark.parametrize("field, value, message", [("activation", "relu", "is not one of"),
                                                    ("objective", "mse", "is not one of"),
                                                    ("text_layers", 0, "at least one layer"),
                                                    ("vision_layers", 0, "at least one layer")])
def test_config_refuses_what_the_model_cannot_run(field, value, message):
    with pytest.raises(ValueError, match=message):
        mc.Config(**{field: value})


# open_clip_config.json's model_cfg for ViT-B-32-quickgelu, as open_clip writes it.
OPEN_CLIP_B32 = {"embed_dim": 512, "quick_gelu": True,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}


def test_open_clip_config():
    assert mc.config_from_open_clip({"model_cfg": OPEN_CLIP_B32}, "x") == mc.PRESETS["ViT-B/32"]
    assert mc.config_from_open_clip(OPEN_CLIP_B32, "x") == mc.PRESETS["ViT-B/32"]   # a bare model config too
    # LAION's ViT-H-14: 80-wide heads, exact GELU (quick_gelu absent), open_clip's default patch of 16 unused.
    h14 = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                                             "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
    cfg = mc.config_from_open_clip(h14, "x")
    assert (cfg.vision_heads, cfg.text_heads, cfg.patch_size, cfg.activation) == (16, 16, 14, "gelu")
    assert mc.config_from_open_clip({"embed_dim": 512, "vision_cfg": {}, "text_cfg": {}}, "x").patch_size == 16


@pytest.mark.parametrize("change, message", [
    (("vision_cfg", "layers", [3, 4, 6, 3]), "ResNet image tower"),
    (("vision_cfg", "no_ln_pre", True), "vision_cfg.no_ln_pre = True"),
    (("vision_cfg", "image_size", [224, 192]), "square"),
    (("text_cfg", "pool_type", "last"), "text_cfg.pool_type = 'last'"),
    (("text_cfg", "hf_model_name", "xlm-roberta-base"), "text_cfg.hf_model_name"),
    (("text_cfg", "norm_kwargs", {"eps": 1e-6}), "eps differs"),
])
def test_open_clip_config_refuses_other_architectures(change, message):
    part, key, value = change
    cfg = {**OPEN_CLIP_B32, part: {**OPEN_CLIP_B32[part], key: value}}
    with pytest.raises(ValueError, match=message):
        mc.config_from_open_clip(cfg, "open_clip_config.json")
    with pytest.raises(ValueError, match="not an open_clip config"):
        mc.config_from_open_clip({"model_cfg": {"embed_dim": 512}}, "open_clip_config.json")


def test_open_clip_folder_loads_the_same_tensors(tmp_path):
    """Both layouts of one model give the same parameters and config; the folder's own file is found."""
    from conftest import clip_folders
    _, hf, oc = clip_folders(tmp_path, "gelu", width=32, layers=1, image=32, patch=8, proj=16)
    (p1, c1), (p2, c2) = mc.load_weights(hf), mc.load_weights(oc)
    assert c1 == c2 and c1.activation == "gelu" and set(p1) == set(p2)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    p3, _ = mc.load_weights(oc / "open_clip_model.safetensors")
    assert all(np.array_equal(p1[k], p3[k]) for k in p1)
