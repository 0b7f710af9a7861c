"""
Weights on disk: our own .npz checkpoints, the safetensors files of Hugging Face's and open_clip's
model folders read in either layout, and a trained checkpoint exported to both.

    python weights.py export checkpoints/tiny.npz exported/tiny                     Hugging Face's folder
    python weights.py export checkpoints/tiny.npz exported/tiny-oc --layout open_clip

Our parameters carry OpenAI's names ("visual.transformer.resblocks.0.attn.in_proj_weight"), which
open_clip uses too, so open_clip's files map one to one; transformers' CLIPModel splits q, k and v
and stores the projections transposed, and hf_to_openai / openai_to_hf hold that mapping. A config
file beside the weights gives the model's shape; without one, the shape is read off the tensors.
Nothing here unpickles: pytorch_model.bin files are refused, and so is an .npz holding objects.
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
from dataclasses import asdict

import miniclip as mc  # first: it makes OpenBLAS's settings before NumPy loads (mc.cpu_settings)
import numpy

import bpe
from miniclip import ACTIVATIONS, Config, param_shapes, to_numpy

# -----------------------------------------------------------------------------
# Our checkpoints: an .npz of the parameters (and optimizer state), and a JSON blob

FORMAT_VERSION = 1
META_KEY = "__meta__"          # our .npz holds its JSON metadata as a uint8 array under this name


def save_weights(path, params, cfg, meta=None, extra=None):
    """
    Write a checkpoint: params under their own names, `extra` arrays (optimizer state, say) under
    theirs, and a JSON blob with the config, the format version and `meta`; atomically (write_npz).
    """
    arrays = {k: to_numpy(v) for k, v in params.items()}
    for k, v in (extra or {}).items():
        if k in arrays or k == META_KEY:
            raise ValueError(f"extra array name {k!r} collides with a parameter name")
        arrays[k] = to_numpy(v)
    blob = json.dumps({"format": "miniclip", "version": FORMAT_VERSION, "config": asdict(cfg),
                       "meta": meta or {}, "params": sorted(params)})
    arrays[META_KEY] = numpy.frombuffer(blob.encode(), dtype=numpy.uint8)
    write_npz(path, arrays)


def write_npz(path, arrays):
    """NumPy arrays to an .npz that appears whole or not at all (atomic_file)."""
    with atomic_file(path) as f:
        numpy.savez(f, **arrays)


class atomic_file:
    """
    open(path, "wb") that leaves path untouched unless the block ends without an error: the bytes go
    to a temporary file beside it, flushed to disk, then renamed over it. Temporary files that an
    interrupted write left (killed mid-write, they can be as large as the file) go first.
    """

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        self.tmp = f"{self.path}.tmp{os.getpid()}"

    def __enter__(self):
        folder, base = os.path.split(self.path)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if name.startswith(base + ".tmp") and name[len(base) + 4:].isdigit():
                os.remove(os.path.join(folder, name))
        self.f = open(self.tmp, "wb")
        return self.f

    def __exit__(self, kind, value, tb):
        try:
            if kind is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if kind is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def load_checkpoint(path):
    """
    Read a checkpoint written by save_weights: (params, cfg, meta, extra), all arrays NumPy.
    Never unpickles: a file holding pickled objects is refused.
    """
    import zipfile
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable miniclip checkpoint (not an .npz archive)")
    try:
        with numpy.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        if "allow_pickle" in str(e):                    # NumPy refusing an object array
            raise ValueError(f"{path}: holds pickled objects; refusing to unpickle it") from None
        raise ValueError(f"{path}: not a readable miniclip checkpoint ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable miniclip checkpoint ({e})") from None
    if META_KEY not in arrays:
        raise ValueError(f"{path}: not a miniclip checkpoint (no {META_KEY} entry)")
    try:
        head = json.loads(arrays.pop(META_KEY).tobytes().decode())
        if head.get("format") != "miniclip" or head.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a miniclip checkpoint of format version {FORMAT_VERSION}")
        cfg, names, meta = Config.from_dict(head["config"]), list(head["params"]), head["meta"]
    except (AttributeError, KeyError, TypeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: bad checkpoint metadata ({e})") from None
    params = {k: arrays[k] for k in names if k in arrays}               # in the order they were saved
    check_params(params, cfg, path)
    return params, cfg, meta, {k: v for k, v in arrays.items() if k not in params}


def check_params(params, cfg, source):
    """Every parameter the config needs is there with its shape, and nothing else."""
    want = param_shapes(cfg)
    missing = sorted(set(want) - set(params))
    unexpected = sorted(set(params) - set(want))
    if missing or unexpected:
        raise ValueError(f"{source}: parameters do not match the config: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, shape in want.items():
        if tuple(params[k].shape) != tuple(shape):
            raise ValueError(f"{source}: {k} has shape {tuple(params[k].shape)}, expected {tuple(shape)}")


# -----------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header length n, n bytes of JSON that give each tensor's
# dtype, shape and [begin, end) byte range in the data that follows, then the data.
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4"}
MAX_HEADER_BYTES = 100 * 2 ** 20
READ_BYTES = 2 ** 24           # read_safetensors converts a tensor of another dtype this many bytes at a time


def read_header(path):
    """
    A safetensors file's header, checked: (entries, data_start), where entries maps each tensor's
    name to (dtype, shape, begin, end), its byte range in the data that starts at data_start.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"header is not JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not a valid safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a valid safetensors file: header is not a JSON object")
    n_data, entries = size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"unsupported dtype {dtype!r}")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError(f"bad shape {shape!r}")
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= n_data):
                raise ValueError(f"data offsets [{begin}, {end}) fall outside the {n_data} data bytes")
            itemsize = numpy.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
            if math.prod(shape) * itemsize != end - begin:
                raise ValueError(f"shape {shape} of {dtype} needs {math.prod(shape) * itemsize} bytes, "
                                 f"offsets give {end - begin}")
        except (KeyError, TypeError, ValueError) as e:
            msg = str(e) if isinstance(e, ValueError) else f"malformed entry {info!r}"[:200]
            raise ValueError(f"{path}: not a valid safetensors file: tensor {name!r}: {msg}") from None
        entries[name] = (dtype, tuple(shape), begin, end)
    return entries, 8 + n


def read_safetensors(path):
    """
    A dict of float32 NumPy arrays (integer tensors stay integers). Raises ValueError on a bad file.
    Each tensor is read straight into the array it ends as, so that a load holds the model once:
    float32 bytes land in place; float16, bfloat16 and float64 ones are converted a slice at a time
    (READ_BYTES), so even one huge embedding does not need a second copy of itself.
    """
    entries, data_start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in entries.items():
            f.seek(data_start + begin)
            kind = numpy.dtype(SAFETENSORS_DTYPES[dtype])
            out = numpy.empty(shape, numpy.float32 if dtype in ("F16", "BF16", "F64") else kind)
            flat, per_read = out.reshape(-1), max(1, READ_BYTES // kind.itemsize)
            for i in range(0, flat.size, per_read):
                part = flat[i:i + per_read]
                if out.dtype == kind:
                    got = f.readinto(memoryview(part.view(numpy.uint8)))
                else:
                    raw = numpy.frombuffer(f.read(part.size * kind.itemsize), kind)
                    got = raw.nbytes
                    if got == part.size * kind.itemsize:
                        if dtype == "BF16":                 # bfloat16 is the top half of a float32
                            bits = part.view(numpy.uint32)
                            bits[...] = raw
                            bits <<= 16
                        else:
                            part[...] = raw
                if got != part.size * kind.itemsize:
                    raise ValueError(f"{path}: tensor {name!r} ends past the end of the file")
            tensors[name] = out
    return tensors


def read_sharded_safetensors(index):
    """
    The tensors of a model saved in shards: transformers' NAME.safetensors.index.json, whose
    "weight_map" names the shard file (beside it) that holds each tensor. Every shard is read as one
    file; a missing shard, a tensor in two shards, or a tensor the map places in a shard that does
    not hold it is a ValueError naming it.
    """
    try:
        weight_map = read_json(index)["weight_map"]
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise TypeError("weight_map is not an object of file names")
    except (KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    folder, tensors, source = os.path.dirname(os.path.abspath(index)), {}, {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if os.path.basename(shard) != shard or not os.path.isfile(path):
            raise ValueError(f"{index}: its shard {shard!r} is not a file in {folder}")
        for name, value in read_safetensors(path).items():
            if name in source:
                raise ValueError(f"{index}: tensor {name!r} is in two shards, {source[name]} and {shard}")
            tensors[name], source[name] = value, shard
    for name, shard in weight_map.items():
        if source.get(name) != shard:
            raise ValueError(f"{index}: weight_map puts {name!r} in {shard}, which does not hold it")
    return tensors


# -----------------------------------------------------------------------------
# The two layouts: transformers' names and config.json, open_clip's (OpenAI's names) and its config

# transformers' names for the parts of a block, and for the tensors outside the blocks, against OpenAI's.
HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
HF_TOWERS = (("vision_model", "visual.transformer"), ("text_model", "transformer"))
HF_RENAMES = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
HF_PROJECTIONS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def hf_to_openai(hf):
    """
    Rename a transformers CLIPModel state dict to OpenAI's names. All the layout changes live here:
    q, k and v stack into one in_proj matrix, and the two projections, which transformers stores as
    nn.Linear weights (E, D), transpose to OpenAI's (D, E). Works on parameters and on their gradients.
    It takes the tensors out of hf as it goes, so that a loaded model is in memory once: q, k and v
    are let go as soon as their stack is made.
    """
    out = {}
    for tower, ours in HF_TOWERS:
        i = 0
        while f"{tower}.encoder.layers.{i}.layer_norm1.weight" in hf:
            src, dst = f"{tower}.encoder.layers.{i}.", f"{ours}.resblocks.{i}."
            for a, b in HF_BLOCK.items():
                for wb in ("weight", "bias"):
                    out[f"{dst}{b}.{wb}"] = hf.pop(f"{src}{a}.{wb}")
            for wb in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{wb}"] = numpy.concatenate(
                    [hf.pop(f"{src}self_attn.{p}_proj.{wb}") for p in "qkv"])
            i += 1
    for a, b in HF_RENAMES.items():
        out[b] = hf.pop(a)
    for a, b in HF_PROJECTIONS.items():
        out[b] = hf.pop(a).T
    out["logit_scale"] = numpy.asarray(out["logit_scale"]).reshape(())
    return out


def openai_to_hf(params, cfg):
    """hf_to_openai's inverse: OpenAI's names -> a transformers CLIPModel state dict (contiguous NumPy)."""
    hf = {a: params[b] for a, b in HF_RENAMES.items()}
    hf.update({a: params[b].T for a, b in HF_PROJECTIONS.items()})
    for (tower, ours), layers in zip(HF_TOWERS, (cfg.vision_layers, cfg.text_layers)):
        for i in range(layers):
            src, dst = f"{ours}.resblocks.{i}.", f"{tower}.encoder.layers.{i}."
            for a, b in HF_BLOCK.items():
                for wb in ("weight", "bias"):
                    hf[f"{dst}{a}.{wb}"] = params[f"{src}{b}.{wb}"]
            for wb in ("weight", "bias"):
                for p, part in zip("qkv", numpy.split(params[f"{src}attn.in_proj_{wb}"], 3)):
                    hf[f"{dst}self_attn.{p}_proj.{wb}"] = part
    return {k: numpy.asarray(v, order="C") for k, v in hf.items()}


def config_from_params(params):
    """
    Infer the config from the shapes. The MLP widths are read off the first block; the number of
    heads cannot be, so it follows OpenAI's rule that every head is 64 wide (a file whose heads are
    not, LAION's ViT-g/14 and ViT-bigG/14 among them, needs its config.json or open_clip_config.json).
    """
    conv = params["visual.conv1.weight"].shape
    n_pos = params["visual.positional_embedding"].shape[0]
    G = math.isqrt(n_pos - 1)
    count = lambda prefix: len({k for k in params if k.startswith(prefix) and k.endswith("ln_1.weight")})
    mlp = lambda prefix, D: mlp_width(D, params[prefix + "resblocks.0.mlp.c_fc.weight"].shape[0])
    return Config(image_size=G * conv[2], patch_size=conv[2], vision_width=conv[0],
                  vision_layers=count("visual.transformer.resblocks."), vision_heads=conv[0] // 64,
                  context_length=params["positional_embedding"].shape[0],
                  vocab_size=params["token_embedding.weight"].shape[0],
                  text_width=params["ln_final.weight"].shape[0],
                  text_layers=count("transformer.resblocks."),
                  text_heads=params["ln_final.weight"].shape[0] // 64,
                  embed_dim=params["text_projection"].shape[1],
                  vision_mlp_width=mlp("visual.transformer.", conv[0]),
                  text_mlp_width=mlp("transformer.", params["ln_final.weight"].shape[0]))


def mlp_width(D, F):
    """Config's MLP width field for a tower of width D whose MLP is F wide: 0 (4D, the default) or F."""
    return 0 if F is None or F == 4 * D else int(F)


def config_from_hf(d, source):
    """A Config from a transformers config.json dict (CLIPConfig's, with text_config and vision_config)."""
    try:
        t, v = d["text_config"], d["vision_config"]
        acts = {c.get("hidden_act", "quick_gelu") for c in (t, v)}
        if len(acts) > 1 or not acts <= set(ACTIVATIONS):
            raise ValueError(f"{source}: hidden_act {sorted(acts)}: miniclip runs one of {sorted(ACTIVATIONS)}, "
                             "the same in both towers")
        return Config(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                      vision_width=v.get("hidden_size", 768), vision_layers=v.get("num_hidden_layers", 12),
                      vision_heads=v.get("num_attention_heads", 12),
                      context_length=t.get("max_position_embeddings", 77),
                      vocab_size=t.get("vocab_size", 49408), text_width=t.get("hidden_size", 512),
                      text_layers=t.get("num_hidden_layers", 12), text_heads=t.get("num_attention_heads", 8),
                      embed_dim=d.get("projection_dim", 512),
                      layer_norm_eps=v.get("layer_norm_eps", 1e-5), activation=acts.pop(),
                      vision_mlp_width=mlp_width(v.get("hidden_size", 768), v.get("intermediate_size")),
                      text_mlp_width=mlp_width(t.get("hidden_size", 512), t.get("intermediate_size")))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{source}: not a CLIP config.json ({e})") from None


# open_clip's configs (open_clip_config.json's "model_cfg", or a file of open_clip's model_configs/):
# the defaults of its CLIPVisionCfg and CLIPTextCfg, and the options that change the architecture away
# from OpenAI's, with the value that keeps it. A config that sets one of them otherwise is refused.
OPEN_CLIP_VISION = {"layers": 12, "width": 768, "head_width": 64, "patch_size": 16, "image_size": 224}
OPEN_CLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
OPEN_CLIP_SAME_AS_OPENAI = {
    "vision_cfg": {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                   "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                   "timm_model_name": None, "qk_norm": False, "scaled_cosine_attn": False,
                   "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False},
    "text_cfg": {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                 "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False, "proj_type": "linear",
                 "hf_model_name": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                 "scale_attn_inner": False, "scale_attn": False, "scale_fc": False},
}


def config_from_open_clip(d, source):
    """A Config from open_clip_config.json (or a bare model config): the towers OpenAI's CLIP has."""
    try:
        m = d.get("model_cfg", d)
        v, t = m["vision_cfg"], m["text_cfg"]
        for part, cfg in (("vision_cfg", v), ("text_cfg", t)):
            for key, same in OPEN_CLIP_SAME_AS_OPENAI[part].items():
                if cfg.get(key, same) != same:
                    raise ValueError(f"{part}.{key} = {cfg[key]!r}: miniclip implements only OpenAI's "
                                     f"architecture ({key} = {same!r})")
        if isinstance(v.get("layers"), (list, tuple)):
            raise ValueError("a ResNet image tower (vision_cfg.layers is a list): miniclip implements the ViT")
        v, t = {**OPEN_CLIP_VISION, **v}, {**OPEN_CLIP_TEXT, **t}
        size = v["image_size"]
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"image_size {size}: miniclip takes square images")
            size = size[0]
        eps = {c.get("norm_kwargs", {}).get("eps", 1e-5) for c in (v, t)}
        if len(eps) > 1:
            raise ValueError(f"LayerNorm eps differs between the towers ({sorted(eps)})")
        return Config(image_size=size, patch_size=v["patch_size"], vision_width=v["width"],
                      vision_layers=v["layers"], vision_heads=v["width"] // v["head_width"],
                      context_length=t["context_length"], vocab_size=t["vocab_size"], text_width=t["width"],
                      text_layers=t["layers"], text_heads=t["heads"], embed_dim=m["embed_dim"],
                      layer_norm_eps=eps.pop(), activation="quick_gelu" if m.get("quick_gelu") else "gelu",
                      vision_mlp_width=mlp_width(v["width"], int(v["width"] * v.get("mlp_ratio", 4.0))),
                      text_mlp_width=mlp_width(t["width"], int(t["width"] * t.get("mlp_ratio", 4.0))))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{source}: not an open_clip config ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# -----------------------------------------------------------------------------
# Reading a model folder

# The weights file of each folder layout we read, and the config beside it.
HF_FILES = ("model.safetensors", "config.json")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_config.json")


def load_safetensors_model(file):
    """
    (params, cfg) from a CLIP safetensors file under either family of names: transformers' CLIPModel
    ("vision_model.*", read with config.json beside it) or OpenAI's, which open_clip uses ("visual.*",
    read with open_clip_config.json). Without its config file, the shape comes from the tensors' shapes.
    """
    tensors = read_sharded_safetensors(file) if file.endswith(".index.json") else read_safetensors(file)
    folder = os.path.dirname(os.path.abspath(file))
    if any(k.startswith(("visual.", "text.")) for k in tensors):             # OpenAI's and open_clip's names
        # open_clip's CustomTextCLIP keeps the text tower under "text."; its tensors are OpenAI's below it.
        params = {k.removeprefix("text."): v for k, v in tensors.items()}
        if params.get("logit_scale", numpy.empty(0)).size == 1:             # a scalar, stored as () or (1,)
            params["logit_scale"] = params["logit_scale"].reshape(())
        cfg_file, from_json = os.path.join(folder, OPEN_CLIP_FILES[1]), config_from_open_clip
    else:
        hf = {k.removeprefix("clip."): v for k, v in tensors.items() if not k.endswith("position_ids")}
        del tensors                                     # hf_to_openai lets each q, k and v go once stacked
        try:
            params = hf_to_openai(hf)
        except KeyError as e:
            raise ValueError(f"{file}: not a CLIP model: tensor {e} is missing") from None
        cfg_file, from_json = os.path.join(folder, HF_FILES[1]), config_from_hf
    if os.path.isfile(cfg_file):
        cfg = from_json(read_json(cfg_file), cfg_file)
    else:
        try:
            cfg = config_from_params(params)
        except KeyError as e:
            raise ValueError(f"{file}: not a CLIP model: tensor {e} is missing") from None
    check_params(params, cfg, file)
    return params, cfg


def weights_file(path):
    """
    The weights of a model folder in either layout (Hugging Face's first): its safetensors file, or
    the index of its shards (model.safetensors.index.json, as transformers writes a large model), or
    path itself.
    """
    if not os.path.isdir(path):
        return path
    for name, _ in (HF_FILES, OPEN_CLIP_FILES):
        for candidate in (name, name + ".index.json"):
            if os.path.isfile(os.path.join(path, candidate)):
                return os.path.join(path, candidate)
    raise ValueError(f"{path}: neither {HF_FILES[0]} nor {OPEN_CLIP_FILES[0]} there, nor a shard index "
                     "(pytorch_model.bin and open_clip_pytorch_model.bin are not read: they are pickles)")


def model_folder(path):
    """The folder of a model: path itself, or the folder of the weights file it names."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def load_weights(path, dtype=numpy.float32):
    """
    (params, cfg) from our .npz checkpoint, a Hugging Face or open_clip model folder, or the
    safetensors file in one, with params as arrays of the current backend. Raises ValueError with a
    readable message on a bad or foreign file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if os.path.isdir(path) or path.endswith((".safetensors", ".safetensors.index.json")):
        params, cfg = load_safetensors_model(weights_file(path))
    else:
        params, cfg, _, _ = load_checkpoint(path)
    for k in list(params):                              # one tensor at a time, each let go once converted
        params[k] = mc.xp.asarray(params.pop(k), dtype=dtype)
    return params, cfg


def read_preprocessor(folder, cfg):
    """
    (resize, crop, mean, std): from a Hugging Face preprocessor_config.json, else from the
    "preprocess_cfg" of an open_clip_config.json, else CLIP's defaults. Both families resize the short
    side with bicubic filtering and take the centered square, as mc.preprocess does.
    """
    size, crop, mean, std = cfg.image_size, cfg.image_size, mc.CLIP_MEAN, mc.CLIP_STD
    hf, oc = os.path.join(folder, PREPROCESSOR_FILE), os.path.join(folder, OPEN_CLIP_FILES[1])
    path = hf if os.path.isfile(hf) else oc if os.path.isfile(oc) else None
    try:
        if path == hf:
            pc = read_json(hf)
            size = pc.get("size", size)
            size = size.get("shortest_edge", size) if isinstance(size, dict) else size
            crop = pc.get("crop_size", crop)
            crop = crop.get("height", crop) if isinstance(crop, dict) else crop
            mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
        elif path == oc:
            pc = read_json(oc).get("preprocess_cfg", {})
            for key, ours in OPEN_CLIP_PREPROCESS.items():
                if pc.get(key, ours) != ours:
                    raise ValueError(f"preprocess_cfg {key} {pc[key]!r}; miniclip resizes as {ours!r}")
            mean, std = tuple(pc.get("mean", mean)), tuple(pc.get("std", std))
        size, crop = int(size), int(crop)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean {mean} and std {std} need 3 values each")
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: not a readable preprocessing config ({e})") from None
    if crop != cfg.image_size:
        raise ValueError(f"{path}: crops {crop} pixels but the model takes {cfg.image_size}")
    return size, crop, mean, std


# -----------------------------------------------------------------------------
# Export: a checkpoint of ours as a folder that transformers' CLIPModel.from_pretrained and
# CLIPProcessor.from_pretrained read, or as open_clip's folder. Each holds the weights, the config,
# the preprocessing (resize the short side to the model's input, center crop, CLIP's mean and std,
# as training and zeroshot.py do) and the tokenizer's vocab.json and merges.txt.

PREPROCESSOR_FILE = "preprocessor_config.json"
OPEN_CLIP_PREPROCESS = {"interpolation": "bicubic", "resize_mode": "shortest"}
LAYOUTS = ("hf", "open_clip")


def write_safetensors(path, tensors, metadata=None):
    """Float32 (or integer) NumPy arrays to a safetensors file, atomically. The header is padded with
    spaces to a multiple of 8 bytes, as the safetensors library writes it, so the data is aligned."""
    kinds = {numpy.dtype(v): k for k, v in SAFETENSORS_DTYPES.items() if k != "BF16"}
    header, offset = {}, 0
    arrays = {k: numpy.asarray(v, order="C") for k, v in tensors.items()}
    for name, a in arrays.items():
        a = arrays[name] = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": kinds[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for a in arrays.values():
            f.write(memoryview(a.reshape(-1).view(numpy.uint8)))


def hf_config(cfg, tok):
    """config.json of transformers' CLIPModel for cfg. The text tower pools at the first <|endoftext|>
    (eos_token_id), which is where miniclip pools: the highest id in each row."""
    common = dict(hidden_act=cfg.activation, layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.embed_dim,
                  attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0)
    text = dict(common, model_type="clip_text_model", hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp,
                num_attention_heads=cfg.text_heads, num_hidden_layers=cfg.text_layers,
                max_position_embeddings=cfg.context_length, vocab_size=cfg.vocab_size,
                bos_token_id=tok.sot, eos_token_id=tok.eot, pad_token_id=tok.eot)
    vision = dict(common, model_type="clip_vision_model", hidden_size=cfg.vision_width,
                  intermediate_size=cfg.vision_mlp, num_attention_heads=cfg.vision_heads,
                  num_hidden_layers=cfg.vision_layers, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  num_channels=3)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "torch_dtype": "float32",
            "text_config": text, "vision_config": vision}


def open_clip_mlp_ratio(D, F):
    """open_clip's mlp_ratio for an MLP F wide at width D. open_clip builds int(D * ratio) units, and
    F / D can land a hair under F (6144 / 1408 * 1408 = 6143.99...), so a ratio other than 4 is
    F + 1/2 over D: int() gives F whatever the rounding."""
    return 4.0 if F == 4 * D else round((F + 0.5) / D, 8)


def open_clip_config(cfg):
    """open_clip_config.json: the model config open_clip's CLIP takes, and the preprocessing."""
    return {"model_cfg": {
                "embed_dim": cfg.embed_dim, "quick_gelu": cfg.activation == "quick_gelu",
                "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
                               "layers": cfg.vision_layers, "head_width": cfg.vision_width // cfg.vision_heads,
                               "mlp_ratio": open_clip_mlp_ratio(cfg.vision_width, cfg.vision_mlp),
                               "norm_kwargs": {"eps": cfg.layer_norm_eps}},
                "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size,
                             "width": cfg.text_width, "heads": cfg.text_heads, "layers": cfg.text_layers,
                             "mlp_ratio": open_clip_mlp_ratio(cfg.text_width, cfg.text_mlp),
                             "norm_kwargs": {"eps": cfg.layer_norm_eps}}},
            "preprocess_cfg": {"mean": list(mc.CLIP_MEAN), "std": list(mc.CLIP_STD), **OPEN_CLIP_PREPROCESS}}


def preprocessor_config(cfg):
    """preprocessor_config.json of transformers' CLIPImageProcessor: what zeroshot.py does to a picture."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": cfg.image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mc.CLIP_MEAN),
            "image_std": list(mc.CLIP_STD), "do_convert_rgb": True}


SPECIAL_TOKENS = {"bos_token": bpe.SOT, "eos_token": bpe.EOT, "unk_token": bpe.EOT, "pad_token": bpe.EOT}


def tokenizer_config(cfg):
    """tokenizer_config.json: CLIPTokenizer's special tokens, and the model's context as its length."""
    return {"tokenizer_class": "CLIPTokenizer", "model_max_length": cfg.context_length, "do_lower_case": True,
            **SPECIAL_TOKENS, "errors": "replace"}


def write_json(path, obj):
    bpe.write_atomic(path, json.dumps(obj, indent=2) + "\n")


def export(checkpoint, out, layout="hf"):
    """
    Write checkpoint's model to the folder out in layout "hf" or "open_clip". Everything is checked
    and written into a temporary folder beside out first, which is then renamed to out: out either
    appears whole or is not touched. out must not exist, or be an empty folder.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ValueError(f"{out}: already exists and is not an empty folder; export writes a new one")
    if not os.path.isfile(checkpoint):
        raise ValueError(f"{checkpoint}: no such checkpoint")
    params, cfg, meta, _ = load_checkpoint(checkpoint)
    if cfg.objective != "contrastive":
        raise ValueError(f"{checkpoint}: a {cfg.objective!r} model has no text tower; CLIP's layouts need both")
    if cfg.text_layers == 0:
        raise ValueError(f"{checkpoint}: its text encoder is a bag of words (0 text layers); CLIP's layouts "
                         "have a text transformer")
    if "tokenizer" not in meta:
        raise ValueError(f"{checkpoint}: the checkpoint holds no tokenizer")
    tok = bpe.from_list(meta["tokenizer"])
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"{checkpoint}: its tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp{os.getpid()}")
    os.makedirs(tmp)
    try:
        if layout == "hf":
            write_safetensors(os.path.join(tmp, HF_FILES[0]), openai_to_hf(params, cfg), {"format": "pt"})
            write_json(os.path.join(tmp, HF_FILES[1]), hf_config(cfg, tok))
            write_json(os.path.join(tmp, PREPROCESSOR_FILE), preprocessor_config(cfg))
        else:
            write_safetensors(os.path.join(tmp, OPEN_CLIP_FILES[0]), params, {"format": "pt"})
            write_json(os.path.join(tmp, OPEN_CLIP_FILES[1]), open_clip_config(cfg))
        tok.save_hf(tmp)
        write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config(cfg))
        write_json(os.path.join(tmp, "special_tokens_map.json"), SPECIAL_TOKENS)
        if os.path.isdir(out):
            os.rmdir(out)                               # empty, checked above
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a miniclip checkpoint as a Hugging Face or open_clip model folder.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="checkpoint -> model folder")
    e.add_argument("checkpoint", help="a checkpoint written by train.py")
    e.add_argument("out", help="the folder to write (new, or empty)")
    e.add_argument("--layout", choices=LAYOUTS, default="hf",
                   help="hf: transformers' CLIPModel (default); open_clip: open_clip's CLIP")
    args = p.parse_args(argv)
    try:
        export(args.checkpoint, args.out, args.layout)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.layout} layout)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
