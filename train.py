"""
Train CLIP with miniclip.

    python train.py --tiny                         a small CLIP on generated shapes, on a CPU, in minutes
    python train.py --data pairs.csv --steps 5000  your own image-caption pairs

--tiny makes its own data: solid shapes (8 colors x 6 kinds) on dark backgrounds, with captions such
as "a drawing of a big blue star on the left". A quarter of the color-shape pairs never appear in
training. The run ends by classifying images of exactly those unseen pairs among all 48 "<color>
<shape>" labels, zero-shot, so its accuracy measures composition ("purple" + "star"), not memory.

Training follows the CLIP paper: AdamW (beta2 0.98, eps 1e-6), weight decay on matrices only, linear
warmup then cosine decay, a learned temperature clipped at 100, and a random square crop as the only
augmentation. A checkpoint holds the weights, the optimizer, the step, the random state, the
tokenizer, and the labels and templates for zeroshot.py; --resume continues a run exactly.
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback
import zlib

# Under an MPI launcher the processes on one machine share its cores. Unless the user chose, give each
# its share of BLAS threads, as torchrun does: with more threads than cores, OpenBLAS's busy-waiting
# threads fight, and a data-parallel step of --tiny ran 3 to 12 times slower. This must happen before
# NumPy loads.
LOCAL_PROCESSES = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
if LOCAL_PROCESSES and not any(k in os.environ for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")):
    os.environ["OMP_NUM_THREADS"] = str(max(1, os.cpu_count() // int(LOCAL_PROCESSES)))

import numpy as np
from PIL import Image, ImageDraw

import bpe
import miniclip as mc


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit status 1."""


class GroupError(UserError):
    """A UserError raised on every process of a data-parallel run at once (as on the only one of a plain run)."""


# -----------------------------------------------------------------------------
# The generated shapes data set

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (240, 220, 50),
          "purple": (150, 60, 200), "orange": (250, 140, 30), "white": (240, 240, 240), "pink": (250, 140, 200)}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = {"small": ("small", "little", "tiny"), "large": ("big", "large", "huge")}
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
             "center": "in the middle"}
CAPTIONS = ("a photo of a {size} {color} {shape}{where}", "a drawing of a {size} {color} {shape}{where}",
            "a {color} {shape}{where}", "a picture of a {color} {shape}", "a {size} {shape} colored {color}{where}",
            "there is a {color} {shape}{where}", "a {shape} that is {color}", "an image of a {color} {shape}",
            "{size} {color} {shape}", "a {color} {shape} on a dark background")
LABELS = [f"{c} {s}" for c in COLORS for s in SHAPES]


# Prompt ensembling at evaluation, as CLIP does: each label goes into every template, and the
# normalized text embeddings are averaged.
TEMPLATES = ("a photo of a {}", "a drawing of a {}", "a picture of a {}", "an image of a {}", "a {}")


def split_pairs(seed):
    """
    Choose the 12 color-shape pairs (a quarter of 48) kept out of training: for each shape, 2 of its 8
    colors, with no color losing more than 2 of its 6 shapes. So every word is still learned from other
    pairs, and no shape or color is held out much more than another.
    """
    rng = np.random.default_rng(seed)
    while True:
        held = [(str(c), s) for s in SHAPES for c in rng.choice(list(COLORS), 2, replace=False)]
        if max(sum(h[0] == c for h in held) for c in COLORS) <= 2:
            pairs = [(c, s) for c in COLORS for s in SHAPES]
            return [p for p in pairs if p not in held], held


def shape_polygon(kind, cx, cy, r):
    """The outline of a shape centered at (cx, cy) with radius r, as PIL polygon points."""
    if kind == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":                                  # five points, inner radius 0.4 r
        return [(cx + (r if i % 2 == 0 else 0.4 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else 0.4 * r) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    if kind == "cross":                                 # a plus sign with arms 0.5 r wide
        w = 0.25 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(kind)


def draw_shape(rng, color, kind, size, where, side):
    """
    One image, side x side uint8 RGB: a dark background (a random vertical gradient with noise) and one
    shape. The shape is drawn as a mask at 4x the size and box-downsampled, which anti-aliases its
    edges; the mask then blends the shape's color over the background.
    """
    big = side * 4
    r = big * (rng.uniform(0.16, 0.20) if size == "small" else rng.uniform(0.26, 0.32))
    # Keep the shape side/9 away from every edge: a training crop of 8/9 of the side then never cuts it.
    lo, hi = r + big / 9, big - r - big / 9
    mid = big / 2 + rng.uniform(-0.05, 0.05, 2) * big
    side_lo, side_hi = rng.uniform(lo, max(lo, 0.34 * big)), rng.uniform(min(hi, 0.66 * big), hi)
    cx, cy = {"left": (side_lo, mid[1]), "right": (side_hi, mid[1]), "top": (mid[0], side_lo),
              "bottom": (mid[0], side_hi), "center": mid}[where]
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(shape_polygon(kind, cx, cy, r), fill=255)
    alpha = np.asarray(mask.resize((side, side), Image.BOX), dtype=np.float32)[:, :, None] / 255  # (side, side, 1)
    t = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
    bg = rng.integers(0, 70, 3) * (1 - t) + rng.integers(0, 70, 3) * t + rng.normal(0, 4, (side, side, 3))
    fill = np.clip(np.array(COLORS[color]) + rng.integers(-15, 16, 3), 0, 255)
    return np.clip(bg * (1 - alpha) + fill * alpha, 0, 255).astype(np.uint8)


def make_shapes(n, pairs, seed, side):
    """
    n images of the given (color, shape) pairs with a caption each. Returns (images (n, side, side, 3)
    uint8, captions, attributes) where attributes are (color, shape, size, position) tuples.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, side, side, 3), dtype=np.uint8)
    captions, attrs = [], []
    for i in range(n):
        color, kind = pairs[rng.integers(len(pairs))]
        size = "small" if rng.random() < 0.5 else "large"
        where = list(POSITIONS)[rng.integers(len(POSITIONS))]
        images[i] = draw_shape(rng, color, kind, size, where, side)
        template = CAPTIONS[rng.integers(len(CAPTIONS))]
        where_words = f" {POSITIONS[where]}" if rng.random() < 0.7 else ""
        captions.append(template.format(size=SIZES[size][rng.integers(3)], color=color, shape=kind, where=where_words))
        attrs.append((color, kind, size, where))
    return images, captions, attrs


# -----------------------------------------------------------------------------
# Data sets: images kept as uint8 at a little over the model's size, so a random crop is cheap.


@dataclasses.dataclass
class Data:
    images: np.ndarray          # (n, L, L, 3) uint8, L = load_size(image_size)
    captions: list              # n strings
    keys: list                  # n hashables: retrieval counts a hit when the keys match
    labels: np.ndarray = None   # (n,) index into the label list, for zero-shot accuracy


def load_size(image_size):
    """Training crops image_size squares out of images resized to 9/8 of it, as a random crop needs slack."""
    return image_size + image_size // 8


def read_csv(path, img_key, caption_key, separator, side, skip_bad):
    """
    Read image-caption pairs from a CSV (paths relative to the CSV). Every image is opened, resized so
    its short side is `side`, and center-cropped. Bad rows (missing or unreadable image, empty caption)
    stop the run with a list of the first ones, or are skipped and counted with skip_bad.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such CSV file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        fields = reader.fieldnames or []
        for key in (img_key, caption_key):
            if key not in fields:
                raise UserError(f"{path}: no column {key!r}; the columns are {fields} "
                                f"(set --csv-img-key, --csv-caption-key, --csv-separator)")
        rows = list(reader)
    base = os.path.dirname(os.path.abspath(path))
    images, captions, bad = [], [], []
    for line, row in enumerate(rows, start=2):
        caption = (row[caption_key] or "").strip()
        image_path = os.path.join(base, row[img_key] or "")
        if not caption:
            bad.append(f"line {line}: empty caption")
            continue
        try:
            images.append(np.asarray(mc.resize_and_crop(mc.open_image(image_path), side)))
            captions.append(caption)
        except ValueError as e:
            bad.append(f"line {line}: {row[img_key]}: {e}")
    if bad and not skip_bad:
        raise UserError(f"{path}: {len(bad)} bad rows, first: " + "; ".join(bad[:5]) + " (--skip-bad skips them)")
    if bad:
        print(f"skipped {len(bad)} bad rows of {path}, first: {bad[0]}")
    if not images:
        raise UserError(f"{path}: no usable image-caption pairs")
    return Data(np.stack(images), captions, list(captions))


def batch_pixels(images, rng, size, shard=slice(None)):
    """
    Crop a size x size square from each image: at random with rng, centered when rng is None. Only
    the images of `shard` are cropped, but the random offsets are drawn for all of them, so the
    processes of a data-parallel run, each cropping its own shard, draw the same numbers and stay in step.
    """
    n, L = images.shape[0], images.shape[1]
    if rng is None:
        o = (L - size) // 2
        return mc.normalize(images[shard, o:o + size, o:o + size])
    ys, xs = rng.integers(0, L - size + 1, n), rng.integers(0, L - size + 1, n)
    return mc.normalize(np.stack([im[y:y + size, x:x + size] for im, y, x in zip(images[shard], ys[shard], xs[shard])]))


def trim(ids):
    """
    Drop the columns after the longest text in the batch. Attention is causal and the feature is read
    at EOT, so padding after EOT never changes the result, and the text tower does less work.
    """
    return ids[:, :int((ids != 0).sum(axis=1).max())]


# -----------------------------------------------------------------------------
# Evaluation


def image_embeddings(params, cfg, pixels):
    """Normalized image embeddings as NumPy, (N, E)."""
    return mc.to_numpy(mc.normalized(mc.encode_image(params, cfg, mc.to_device(pixels))))


def text_embeddings(params, cfg, ids):
    """Normalized text embeddings as NumPy, (N, E)."""
    return mc.to_numpy(mc.normalized(mc.encode_text(params, cfg, mc.to_device(trim(ids)))))


def recall_at(sim, query_keys, item_keys, ks=(1, 5)):
    """Fraction of queries whose top-k items (by similarity, rows of sim) include one with the query's key."""
    order = np.argsort(-sim, axis=1)[:, :max(ks)]
    item_keys = np.array([hash(k) for k in item_keys])
    hits = item_keys[order] == np.array([hash(k) for k in query_keys])[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def evaluate(params, cfg, tok, data, labels, templates):
    """Zero-shot top-1 over `labels` (when the data has labels) and retrieval recall in both directions."""
    img = image_embeddings(params, cfg, batch_pixels(data.images, None, cfg.image_size))
    txt = text_embeddings(params, cfg, tok.tokenize(data.captions, cfg.context_length, truncate=True))
    sim = img @ txt.T
    i2t, t2i = recall_at(sim, data.keys, data.keys), recall_at(sim.T, data.keys, data.keys)
    out = {"i2t_r1": i2t[1], "i2t_r5": i2t[5], "t2i_r1": t2i[1], "t2i_r5": t2i[5]}
    if data.labels is not None:
        prompts = tok.tokenize([t.format(label) for label in labels for t in templates], cfg.context_length,
                               truncate=True)
        classes = mc.to_numpy(mc.class_embeddings(params, cfg, mc.to_device(prompts), len(templates)))
        out["zeroshot_top1"] = float(((img @ classes.T).argmax(axis=1) == data.labels).mean())
    return out


# -----------------------------------------------------------------------------
# Data-parallel training on MPI
#
# `mpirun -n K python train.py ...` starts K copies of this script, which share every global batch of
# N pairs: each process encodes its own n = N / K of them. The loss must still contrast each image with
# all N texts, since a bigger batch means more negatives and that is what CLIP's batch size buys. So the
# processes all-gather their normalized features, and each computes the loss rows of its own pairs
# against the whole batch (clip_loss_forward with rows): open_clip's "local loss with gathered
# features". Each row of the loss needs only its own row of logits, so this is exact.
#
# The gradient, derived. Let f_j be the normalized features (image and text) of pair j, and L_r the loss
# of process r's rows, so the loss of the batch is L = (1/K) sum_r L_r. L_r depends on its own f_j as
# rows of logits, and on all N of them as columns, so for every pair j
#     dL/df_j = (1/K) sum_r dL_r/df_j
# Process r can compute dL_r/df for all N pairs (clip_loss_backward returns (N, E)). Summing these over
# the processes and handing each its own n rows is one reduce-scatter. The common mistake is to treat
# the gathered features as constants, keeping only process r's terms for its own pairs: that drops every
# gradient a feature gets as a negative in another process's rows, (K - 1) / K of its negatives.
# Each process then backpropagates its n rows through its encoders, which gives
#     g_r = sum_{j in r} (df_j/dtheta)^T sum_q dL_q/df_j
# and the gradient of L is (1/K) sum_r g_r: an all-reduce, averaged. logit_scale enters every L_r
# directly, and its gradient is averaged with the rest.

# Set by the launchers: MPICH's mpirun (PMI_SIZE), Open MPI's (OMPI_COMM_WORLD_SIZE), and Slurm's srun
# (PMI_SIZE or PMIX_RANK). Without one of them, train.py runs as one process and never imports mpi4py.
LAUNCHER_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class MPIGroup:
    """
    The K processes of one data-parallel run (mpi4py's COMM_WORLD) and the collectives training uses.
    On a GPU, arrays go through host memory unless device_arrays is set, for an MPI that reads GPU
    memory itself (a CUDA-aware build).
    """

    def __init__(self, MPI, device_arrays=False):
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.rank, self.comm.size
        self.device_arrays = device_arrays

    def _out(self, x):
        """x as the kind of buffer MPI is handed, contiguous."""
        if not self.device_arrays:
            return np.ascontiguousarray(mc.to_numpy(x))
        if mc.xp is not np:
            mc.xp.cuda.get_current_stream().synchronize()   # MPI must not read memory a kernel is still writing
        return mc.xp.ascontiguousarray(x)

    def _empty(self, shape, dtype):
        return (mc.xp if self.device_arrays else np).empty(shape, dtype)

    def allgather(self, x):
        """(n, ...) on every process -> (K n, ...) on every process, in rank order."""
        x = self._out(x)
        out = self._empty((self.size * x.shape[0],) + x.shape[1:], x.dtype)
        self.comm.Allgather(x, out)
        return mc.to_device(out)

    def reduce_scatter(self, x):
        """(K n, ...) on every process -> this process's n rows of the sum over processes."""
        x = self._out(x)
        out = self._empty((x.shape[0] // self.size,) + x.shape[1:], x.dtype)
        self.comm.Reduce_scatter_block(x, out, op=self.MPI.SUM)
        return mc.to_device(out)

    def mean(self, arrays):
        """A dict of arrays averaged over the processes, in one all-reduce of one flat buffer."""
        flat = self._out(mc.xp.concatenate([a.reshape(-1) for a in arrays.values()]))
        self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
        flat = mc.to_device(flat) / self.size
        out, at = {}, 0
        for k, a in arrays.items():
            out[k] = flat[at:at + a.size].reshape(a.shape)
            at += a.size
        return out

    def any(self, flag):
        """True on every process if it is true on any."""
        return self.comm.allreduce(bool(flag), op=self.MPI.LOR)

    def agree(self, fn):
        """
        Run fn() on every process. If it raises a user's error on any, every process raises, so none
        waits forever for the others, and the first process's message is the one reported.
        """
        try:
            result, message = fn(), None
        except (UserError, ValueError) as e:
            result, message = None, str(e)
        failed = [(r, m) for r, m in enumerate(self.comm.allgather(message)) if m is not None]
        if failed:
            r, m = failed[0]
            raise GroupError(m if r == 0 else f"process {r}: {m}")
        return result


def launcher_rank():
    """This process's number as the MPI launcher gave it, before MPI starts (0 without a launcher)."""
    return int(os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMIX_RANK") or 0)


def mpi_group():
    """The data-parallel group when an MPI launcher started more than one process, else None."""
    if not any(k in os.environ for k in LAUNCHER_VARS):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise GroupError("an MPI launcher started this, but mpi4py is not installed: "
                        "pip install -r requirements-dist.txt") from None
    if MPI.COMM_WORLD.size == 1:
        return None
    return MPIGroup(MPI, device_arrays=os.environ.get("MINICLIP_CUDA_AWARE_MPI") == "1")


def data_parallel_loss_and_grads(params, cfg, pixels, ids, group):
    """
    mc.loss_and_grads for a global batch spread over the processes of `group`: pixels and ids are
    this process's n pairs, rank r holding pairs r n ... (r + 1) n - 1 of the batch. Returns the loss
    and gradients of the whole batch of K n pairs, the same on every process.
    """
    (img, txt), cache = mc.features_forward(params, cfg, pixels, ids)   # (n, E) each
    n, E = img.shape
    both = group.allgather(mc.xp.concatenate([img, txt], axis=1))      # (N, 2E): both in one message
    mine = slice(group.rank * n, (group.rank + 1) * n)
    loss, loss_cache = mc.clip_loss_forward(both[:, :E], both[:, E:], params["logit_scale"], mine)
    dimg, dtxt, dt = mc.clip_loss_backward(loss_cache)                 # (N, E) each: dL_r/df of every pair
    d = group.reduce_scatter(mc.xp.concatenate([dimg, dtxt], axis=1))  # (n, 2E): sum_q dL_q/df, own pairs
    grads = mc.features_backward(d[:, :E], d[:, E:], cache, params)    # g_r
    grads["logit_scale"] = dt
    grads = group.mean({"loss": mc.xp.asarray(loss, dtype=dt.dtype), **grads})
    return float(grads.pop("loss")), grads


# -----------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1500             # optimizer steps in all
    batch_size: int = 128         # pairs per step; the contrastive loss sees batch_size^2 pairs
    lr: float = 1e-3              # peak learning rate, after warmup
    warmup: int = 100             # steps of linear warmup from 0
    weight_decay: float = 0.2     # AdamW's decoupled decay, on weight matrices only (the paper's 0.2)
    seed: int = 0
    n_train: int = 24000          # --tiny: generated training images
    n_eval: int = 1200            # --tiny: generated held-out images (of the unseen pairs)
    log_every: int = 50
    eval_every: int = 500         # evaluate and save a checkpoint this often


def lr_at(step, tc):
    """Linear warmup to tc.lr over tc.warmup steps, then cosine decay to 0 at tc.steps."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return 0.5 * tc.lr * (1 + math.cos(math.pi * progress))


def build_data(args, cfg, tc):
    """The training and evaluation sets, and the labels and templates zero-shot evaluation uses."""
    side = load_size(cfg.image_size)
    if args.data is None:
        train_pairs, held = split_pairs(tc.seed)
        t0 = time.time()
        images, captions, attrs = make_shapes(tc.n_train, train_pairs, tc.seed, side)
        train = Data(images, captions, attrs)
        images, captions, attrs = make_shapes(tc.n_eval, held, tc.seed + 1, side)
        val = Data(images, captions, attrs, np.array([LABELS.index(f"{a[0]} {a[1]}") for a in attrs]))
        print(f"data: {tc.n_train} generated training images of {len(train_pairs)} color-shape pairs, "
              f"{tc.n_eval} of the {len(held)} held-out pairs ({', '.join(' '.join(p) for p in held)}); "
              f"{time.time() - t0:.1f}s")
        return train, val, LABELS, list(TEMPLATES), held
    data = read_csv(args.data, args.csv_img_key, args.csv_caption_key, args.csv_separator, side, args.skip_bad)
    n_val = max(1, int(len(data.captions) * args.val_frac)) if args.val_frac > 0 and len(data.captions) > 1 else 0
    order = np.random.default_rng(tc.seed).permutation(len(data.captions))
    pick = lambda idx: Data(data.images[idx], [data.captions[i] for i in idx], [data.keys[i] for i in idx])
    val = pick(order[:n_val]) if n_val else None
    print(f"data: {len(data.captions) - n_val} training pairs, {n_val} validation pairs from {args.data}")
    return pick(order[n_val:]), val, [], list(TEMPLATES), []


def make_model(args, train, seed):
    """(params, cfg, tok, meta) for a fresh run: from --init weights or a preset, with a tokenizer."""
    tok = bpe.load(args.tokenizer) if args.tokenizer else None
    if args.init:
        params, cfg = mc.load_weights(args.init)
        if tok is None:
            if os.path.isdir(args.init) or args.init.endswith(".safetensors"):
                tok = bpe.load(args.init if os.path.isdir(args.init) else os.path.dirname(args.init))
            else:
                tok = bpe.from_list(mc.load_checkpoint(args.init)[2]["tokenizer"])
    else:
        cfg = mc.PRESETS[args.preset]
        if tok is None:
            t0 = time.time()
            tok = bpe.train(train.captions, args.vocab_size or cfg.vocab_size)
            print(f"tokenizer: {len(tok.merges)} merges learned from the captions, {tok.vocab_size} tokens; "
                  f"{time.time() - t0:.1f}s")
        cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
        params = mc.init_params(cfg, seed=seed)
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}")
    return params, cfg, tok


def save_samples(folder, val, held, image_size):
    """A few held-out images as PNG, the model's exact input size, for trying zeroshot.py."""
    os.makedirs(folder, exist_ok=True)
    o = (val.images.shape[1] - image_size) // 2
    crops = val.images[:, o:o + image_size, o:o + image_size]
    written = []
    for color, kind in held[:4]:
        i = next(j for j, k in enumerate(val.keys) if k[:2] == (color, kind))
        path = os.path.join(folder, f"{color}_{kind}.png")
        Image.fromarray(crops[i]).save(path)
        written.append(path)
    return written


DATA_ARGS = ("data", "csv_img_key", "csv_caption_key", "csv_separator", "val_frac", "skip_bad")


def setup(args):
    """Everything the loop needs, fresh or from --resume: a dict of the run's state."""
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                        if getattr(args, f.name) is not None})
    if not args.resume:
        train_set, val, labels, templates, held = build_data(args, mc.PRESETS[args.preset], tc)
        params, cfg, tok = make_model(args, train_set, tc.seed)
        params = mc.to_device(params)
        rng = np.random.default_rng(tc.seed)
        return dict(tc=tc, train_set=train_set, val=val, labels=labels, templates=templates, held=held,
                    params=params, cfg=cfg, tok=tok, opt=mc.AdamW(params, weight_decay=tc.weight_decay),
                    step=0, rng=rng, order=rng.permutation(len(train_set.captions)), cursor=0)

    params, cfg, meta, extra = mc.load_checkpoint(args.resume)
    if "adam_t" not in meta:
        raise UserError(f"{args.resume}: holds weights only, no training state to resume (use --init)")
    overrides = {k: getattr(args, k) for k in ("steps", "log_every", "eval_every") if getattr(args, k) is not None}
    tc = dataclasses.replace(TrainConfig(**meta["train_config"]), **overrides)
    for k in DATA_ARGS:                                 # the data of the interrupted run
        setattr(args, k, meta["data_args"][k])
    train_set, val, labels, templates, held = build_data(args, cfg, tc)
    params = mc.to_device(params)
    opt = mc.AdamW(params, weight_decay=tc.weight_decay)
    opt.m = mc.to_device({k: extra[f"adam.m.{k}"] for k in params})
    opt.v = mc.to_device({k: extra[f"adam.v.{k}"] for k in params})
    opt.t = meta["adam_t"]
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng"]
    print(f"resumed from {args.resume} at step {meta['step']}")
    return dict(tc=tc, train_set=train_set, val=val, labels=labels, templates=templates, held=held,
                params=params, cfg=cfg, tok=bpe.from_list(meta["tokenizer"]), opt=opt, step=meta["step"],
                rng=rng, order=np.array(meta["order"]), cursor=meta["cursor"])


def train(args, group=None):
    """Train; with a group, as one of its processes. Returns the exit status."""
    if args.device:
        mc.set_device(args.device)
    if group is not None and mc.xp is not np:           # one GPU per process, taken in turn on each machine
        local_rank = group.comm.Split_type(group.MPI.COMM_TYPE_SHARED).rank
        mc.xp.cuda.Device(local_rank % mc.xp.cuda.runtime.getDeviceCount()).use()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        if group is None:
            return train_loop(args, setup(args))
        run = group.agree(lambda: setup(args))
        check_same_start(run, group)
        return train_loop(args, run, group)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def check_same_start(run, group):
    """Every process of a data-parallel run must start from the same weights, step and data."""
    data = zlib.crc32(run["train_set"].images) ^ zlib.crc32("\n".join(run["train_set"].captions).encode())
    start = (run["step"], data, sum(float(abs(run["params"][k]).sum()) for k in sorted(run["params"])))
    if len(set(group.comm.allgather(start))) > 1:
        raise GroupError("the processes start from different weights, steps or data: every machine must "
                         "run the same code on the same files")


def train_loop(args, run, group=None):
    tc, cfg, params, opt, rng, train_set, val = (run[k] for k in ("tc", "cfg", "params", "opt", "rng", "train_set", "val"))
    K, rank = (group.size, group.rank) if group else (1, 0)
    if tc.batch_size % K:
        raise GroupError(f"the batch of {tc.batch_size} does not split evenly over {K} processes")
    shard = slice(rank * tc.batch_size // K, (rank + 1) * tc.batch_size // K)
    lead = rank == 0                                    # only process 0 prints, evaluates and saves
    ids = run["tok"].tokenize(train_set.captions, cfg.context_length, truncate=True)
    n_params = sum(int(np.prod(v.shape)) for v in params.values())
    print(f"model: {n_params / 1e6:.2f}M parameters, {cfg}")
    if group:
        print(f"data-parallel: {K} processes, {tc.batch_size // K} pairs each of every batch of {tc.batch_size}")
    out = args.out or args.resume or "checkpoints/tiny.npz"
    if lead:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            metrics = open(os.path.splitext(out)[0] + ".metrics.jsonl", "a" if args.resume else "w")
        except OSError as e:
            raise UserError(f"cannot write beside {out}: {e.strerror} ({e.filename})") from None

    def log(record):
        if lead:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def save():
        if lead:
            save_checkpoint(out, run, {k: getattr(args, k) for k in DATA_ARGS})

    # Ctrl-C or SIGTERM ends the run after the step in progress, so the saved state is consistent.
    # A second Ctrl-C stops at once, without saving (main() reports it). In a data-parallel run the
    # processes agree after each step, so they stop together even if only one got the signal.
    stop = []

    def request_stop(signum, frame):
        stop.append(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    stop_at = min(tc.steps, args.stop_at or tc.steps)
    n = len(train_set.captions)
    t_start, seen, t_log = time.time(), 0, time.time()
    stopping = False
    while run["step"] < stop_at and not stopping:
        if run["cursor"] + tc.batch_size > n:           # a new epoch: a new order
            run["order"], run["cursor"] = rng.permutation(n), 0
        idx = run["order"][run["cursor"]:run["cursor"] + tc.batch_size]  # the batch, the same on every process
        run["cursor"] += tc.batch_size
        pixels = mc.to_device(batch_pixels(train_set.images[idx], rng, cfg.image_size, shard))
        batch_ids = mc.to_device(trim(ids[idx[shard]]))
        with np.errstate(all="ignore"):                 # a non-finite loss is reported just below
            if group:
                loss, grads = data_parallel_loss_and_grads(params, cfg, pixels, batch_ids, group)
            else:
                loss, grads = mc.loss_and_grads(params, cfg, pixels, batch_ids)
        if not math.isfinite(loss):                     # the loss is the batch's, so every process stops here
            raise GroupError(f"the loss became {loss} at step {run['step'] + 1}; stopping. The last good checkpoint "
                             f"is {out if os.path.exists(out) else '(none saved yet)'}; try a lower --lr")
        lr = lr_at(run["step"], tc)
        opt.step(params, grads, lr)
        run["step"] += 1
        step = run["step"]
        seen += len(idx)
        stopping = group.any(stop) if group else bool(stop)
        if step % tc.log_every == 0 or step == stop_at:
            now = time.time()
            rate = seen / (now - t_log)
            eta = (stop_at - step) * tc.batch_size / rate
            scale = math.exp(min(float(params["logit_scale"]), math.log(mc.MAX_LOGIT_SCALE)))
            print(f"step {step:5d}/{tc.steps} | loss {loss:.4f} | lr {lr:.2e} | logit scale {scale:6.2f} | "
                  f"{rate:6.0f} img/s | ETA {eta:4.0f}s")
            log({"step": step, "loss": loss, "lr": lr, "logit_scale": scale, "img_per_s": rate})
            seen, t_log = 0, now
        if step % tc.eval_every == 0 or step == tc.steps:
            if val is not None and lead:
                m = evaluate(params, cfg, run["tok"], val, run["labels"], run["templates"])
                print(f"eval at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
                log({"step": step, "eval": m})
            save()
    if stopping:
        print(f"interrupted ({stop[0] if stop else 'a signal to another process'}) at step {run['step']}")
    if run["step"] % tc.eval_every and run["step"] != tc.steps:
        save()
    print(f"saved {out} at step {run['step']} ({time.time() - t_start:.0f}s of training)")
    if run["step"] < tc.steps:
        print(f"resume with: python train.py --resume {out}")
        return 130 if stopping else 0
    if run["held"] and lead:
        samples = save_samples(os.path.join(os.path.dirname(out), "samples"), val, run["held"], cfg.image_size)
        print(f"held-out samples: {' '.join(samples)}")
        print(f"try: python zeroshot.py {samples[0]}")
    return 0


def save_checkpoint(path, run, data_args):
    """Everything a resumed run needs (optimizer moments, step, random state, data order), and zeroshot.py too."""
    opt = run["opt"]
    meta = {"tokenizer": run["tok"].to_list(), "labels": run["labels"], "templates": run["templates"],
            "held_out_pairs": [" ".join(p) for p in run["held"]], "train_config": dataclasses.asdict(run["tc"]),
            "data_args": data_args, "step": run["step"], "adam_t": opt.t, "rng": run["rng"].bit_generator.state,
            "order": run["order"].tolist(), "cursor": run["cursor"]}
    extra = {**{f"adam.m.{k}": v for k, v in opt.m.items()}, **{f"adam.v.{k}": v for k, v in opt.v.items()}}
    mc.save_weights(path, run["params"], run["cfg"], meta=meta, extra=extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data")
    src.add_argument("--tiny", action="store_true", help="train on generated shapes (the default without --data)")
    src.add_argument("--data", help="a CSV of image paths and captions (paths relative to the CSV)")
    src.add_argument("--csv-img-key", default="filepath", help="image path column (default: filepath)")
    src.add_argument("--csv-caption-key", default="title", help="caption column (default: title)")
    src.add_argument("--csv-separator", default=",", help="CSV field separator (default: ,)")
    src.add_argument("--val-frac", type=float, default=0.1, help="share of --data kept for validation")
    src.add_argument("--skip-bad", action="store_true", help="skip rows with a missing image or empty caption")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=sorted(mc.PRESETS), help="model shape (default: tiny)")
    m.add_argument("--init", help="start from these weights (our checkpoint or a Hugging Face CLIP folder)")
    m.add_argument("--tokenizer", help="a tokenizer file for bpe.load; default: train one on the captions")
    m.add_argument("--vocab-size", type=int, help="vocabulary size when training the tokenizer")
    o = p.add_argument_group("optimization")
    for f in dataclasses.fields(TrainConfig):
        o.add_argument("--" + f.name.replace("_", "-"), type=f.type, help=f"default {f.default}")
    o.add_argument("--device", choices=["cpu", "gpu"], help="default: $MINICLIP_DEVICE or cpu")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--out", help="checkpoint path (default: the --resume file, else checkpoints/tiny.npz)")
    c.add_argument("--resume", help="continue the run saved in this checkpoint")
    c.add_argument("--stop-at", type=int, help="save and stop after this step (the run can be resumed)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    group = None
    try:
        group = mpi_group()
        if group and group.rank:
            sys.stdout = open(os.devnull, "w")          # only process 0 prints
        return train(args, group)
    except GroupError as e:                             # every process raised it: process 0 reports it
        if (group.rank if group else launcher_rank()) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except (UserError, ValueError, OSError) as e:      # OSError: a checkpoint or log that cannot be written
        print(f"error: {e}" if group is None else f"error on process {group.rank}: {e}", file=sys.stderr)
        if group:
            group.comm.Abort(1)                         # the others may be waiting for this one: end them all
        return 1
    except KeyboardInterrupt:
        print("interrupted twice: stopped without saving; the last checkpoint is as it was", file=sys.stderr)
        return 130
    except Exception:
        if group:                                       # a bug, perhaps on this process only
            traceback.print_exc()
            group.comm.Abort(1)
        raise


if __name__ == "__main__":
    sys.exit(main())
