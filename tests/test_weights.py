"""Checkpoints and the safetensors reader: round trips, and clear errors on bad or hostile files."""
import json
import os
import struct
import sys

import numpy as np
import pytest

import miniclip as mc
import weights
from test_model import MICRO


def test_checkpoint_round_trip(tmp_path):
    params = mc.init_params(MICRO, seed=3)
    meta = {"labels": ["red circle"], "templates": ["a {}."]}
    weights.save_weights(tmp_path / "m.npz", params, MICRO, meta=meta, extra={"optim.m.x": np.ones(3)})
    loaded, cfg, got_meta, extra = weights.load_checkpoint(tmp_path / "m.npz")
    assert cfg == MICRO and got_meta == meta and list(extra) == ["optim.m.x"]
    assert all(np.array_equal(loaded[k], params[k]) for k in params)
    params2, cfg2 = weights.load_weights(tmp_path / "m.npz")
    assert cfg2 == MICRO and set(params2) == set(params)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]           # no temporary file left behind


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    params = mc.init_params(MICRO)
    weights.save_weights(tmp_path / "m.npz", params, MICRO)
    before = (tmp_path / "m.npz").read_bytes()
    with pytest.raises(ValueError):                     # fails while writing: a name collision
        weights.save_weights(tmp_path / "m.npz", params, MICRO, extra={"logit_scale": np.ones(1)})
    assert (tmp_path / "m.npz").read_bytes() == before


def test_pickled_npz_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        weights.load_weights(tmp_path / "evil.npz")


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_corrupt_npz_is_refused(tmp_path, content):
    (tmp_path / "bad.npz").write_bytes(content)
    with pytest.raises(ValueError, match="bad.npz"):
        weights.load_weights(tmp_path / "bad.npz")


def test_foreign_npz_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    with pytest.raises(ValueError, match="not a miniclip checkpoint"):
        weights.load_weights(tmp_path / "other.npz")


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
        weights.read_safetensors(tmp_path / "model.safetensors")
    with pytest.raises(ValueError):
        weights.load_weights(tmp_path / "model.safetensors")


def test_safetensors_without_clip_tensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(GOOD, b"\0" * 16))
    assert weights.read_safetensors(tmp_path / "model.safetensors")["w"].shape == (2, 2)
    with pytest.raises(ValueError, match="not a CLIP model"):
        weights.load_weights(tmp_path / "model.safetensors")


def test_missing_weights_path(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        weights.load_weights(tmp_path / "nothing.npz")
    with pytest.raises(ValueError, match="neither model.safetensors nor open_clip_model.safetensors"):
        weights.load_weights(tmp_path)


def test_config_inferred_from_shapes_matches_presets():
    """Every preset whose heads are 64 wide (the rule a bare file is read by) comes back from its shapes."""
    for name in ("ViT-B/32", "ViT-B/16", "ViT-L/14"):
        cfg = mc.PRESETS[name]
        shapes = mc.param_shapes(cfg)
        fake = {k: np.empty(s, dtype=np.float32) if s else np.empty((), np.float32) for k, s in shapes.items()}
        assert weights.config_from_params(fake) == cfg, name
    g = weights.config_from_params({k: np.empty(s, np.float32) for k, s in mc.param_shapes(mc.PRESETS["ViT-g/14"]).items()})
    assert (g.vision_mlp, g.vision_mlp_width, g.text_mlp_width) == (6144, 6144, 0)         # read off c_fc


@pytest.mark.parametrize("field, value, message", [("activation", "relu", "is not one of"),
                                                    ("objective", "mse", "is not one of"),
                                                    ("text_layers", -1, r"0 \(a bag of words\) or more"),
                                                    ("vision_layers", 0, "at least one layer")])
def test_config_refuses_what_the_model_cannot_run(field, value, message):
    with pytest.raises(ValueError, match=message):
        mc.Config(**{field: value})


# open_clip_config.json's model_cfg for ViT-B-32-quickgelu, as open_clip writes it.
OPEN_CLIP_B32 = {"embed_dim": 512, "quick_gelu": True,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}


def test_open_clip_config():
    assert weights.config_from_open_clip({"model_cfg": OPEN_CLIP_B32}, "x") == mc.PRESETS["ViT-B/32"]
    assert weights.config_from_open_clip(OPEN_CLIP_B32, "x") == mc.PRESETS["ViT-B/32"]   # a bare model config too
    # LAION's ViT-H-14: 80-wide heads, exact GELU (quick_gelu absent), open_clip's default patch of 16 unused.
    h14 = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                                             "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
    cfg = weights.config_from_open_clip(h14, "x")
    assert (cfg.vision_heads, cfg.text_heads, cfg.patch_size, cfg.activation) == (16, 16, 14, "gelu")
    assert cfg == mc.PRESETS["ViT-H/14"]
    # ViT-g-14 and ViT-bigG-14, as open_clip's model configs give them: MLPs of int(width * mlp_ratio).
    g14 = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88,
                                             "mlp_ratio": 4.3637, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
    big = {"embed_dim": 1280, "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664, "head_width": 104,
                                             "mlp_ratio": 4.9231, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32}}
    assert weights.config_from_open_clip(g14, "x") == mc.PRESETS["ViT-g/14"]
    assert weights.config_from_open_clip(big, "x") == mc.PRESETS["ViT-bigG/14"]
    assert (mc.PRESETS["ViT-bigG/14"].vision_mlp, mc.PRESETS["ViT-bigG/14"].text_mlp) == (8192, 5120)
    assert weights.config_from_open_clip({"embed_dim": 512, "vision_cfg": {}, "text_cfg": {}}, "x").patch_size == 16


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
        weights.config_from_open_clip(cfg, "open_clip_config.json")
    with pytest.raises(ValueError, match="not an open_clip config"):
        weights.config_from_open_clip({"model_cfg": {"embed_dim": 512}}, "open_clip_config.json")


def test_open_clip_folder_loads_the_same_tensors(tmp_path):
    """Both layouts of one model give the same parameters and config; the folder's own file is found."""
    from conftest import clip_folders
    _, hf, oc = clip_folders(tmp_path, "gelu", width=32, layers=1, image=32, patch=8, proj=16)
    (p1, c1), (p2, c2) = weights.load_weights(hf), weights.load_weights(oc)
    assert c1 == c2 and c1.activation == "gelu" and set(p1) == set(p2)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    p3, _ = weights.load_weights(oc / "open_clip_model.safetensors")
    assert all(np.array_equal(p1[k], p3[k]) for k in p1)


def shard(folder, name, tensors, groups):
    """Write tensors as shards name-0000i-of-0000n.safetensors, as the groups of names say, and the index."""
    from conftest import reference
    save_file = reference("safetensors.numpy").save_file
    stem = name.removesuffix(".safetensors")
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: np.ascontiguousarray(tensors[k]) for k in group}, str(folder / file))
        weight_map.update(dict.fromkeys(group, file))
    (folder / f"{name}.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / name).unlink()
    return weight_map


@pytest.mark.parametrize("layout, name", [("hf", "model.safetensors"), ("open_clip", "open_clip_model.safetensors")])
def test_sharded_weights_load_as_the_single_file_does(tmp_path, layout, name):
    """transformers' sharded layout (an index.json naming each tensor's shard), in both folder layouts:
    the same tensors as the one file; a missing shard, a tensor in two shards and a weight_map entry
    that no shard holds are refused, each by name."""
    from conftest import clip_folders, reference
    load_file = reference("safetensors.numpy").load_file
    _, hf, oc = clip_folders(tmp_path, "gelu", width=32, layers=1, image=32, patch=8, proj=16, mlp=88)
    folder = {"hf": hf, "open_clip": oc}[layout]
    want, cfg = weights.load_weights(folder)
    assert cfg.vision_mlp == cfg.text_mlp == 88
    tensors = load_file(str(folder / name))
    names = sorted(tensors)
    weight_map = shard(folder, name, tensors, [names[::2], names[1::2]])
    got, cfg2 = weights.load_weights(folder)
    assert cfg2 == cfg and set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    index = folder / f"{name}.index.json"
    first, second = sorted(set(weight_map.values()))

    def refused(edit, message):
        m = json.loads(index.read_text())
        edit(m)
        index.write_text(json.dumps(m))
        with pytest.raises(ValueError, match=message):
            weights.load_weights(folder)
        index.write_text(json.dumps({"weight_map": weight_map}))
    refused(lambda m: m["weight_map"].update({names[0]: "gone.safetensors"}), "shard 'gone.safetensors' is not a file")
    refused(lambda m: m["weight_map"].update({names[0]: second}), f"puts '{names[0]}' in {second}, which does not hold it")
    refused(lambda m: m["weight_map"].update({"x": first}), f"puts 'x' in {first}, which does not hold it")
    reference("safetensors.numpy").save_file({names[0]: np.ascontiguousarray(tensors[names[0]])}, str(folder / "extra.safetensors"))
    refused(lambda m: m["weight_map"].update({"y": "extra.safetensors"}), f"tensor '{names[0]}' is in two shards")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_holds_the_model_about_once(tmp_path, dtype):
    """Peak resident memory of a load, above the process's before it (benchmarks/load_memory.py, in a
    fresh process), at most 1.2x the float32 arrays it makes: each tensor is read into its array, and
    bfloat16 widened one tensor at a time. (Measured: 1.04x for float32 at 64 MiB; the mapped-then-
    converted reader this replaced held 2.0x.)"""
    from conftest import reference
    reference("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import load_memory
    load_memory.random_folder(str(tmp_path), width=256, layers=2, heads=4, dtype=dtype)
    grown, size, loaded = load_memory.peak_over_size(str(tmp_path))
    assert abs(loaded - size * (1 if dtype == "float32" else 2)) < 2 ** 20      # float32 arrays: the header aside
    assert grown <= 1.2 * loaded, (grown, loaded)
