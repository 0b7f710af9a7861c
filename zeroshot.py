"""
Zero-shot image classification, and its other direction, text-to-image retrieval.

    python zeroshot.py checkpoints/samples/green_star.png                  the model train.py --tiny wrote
    python zeroshot.py cat.jpg --weights clip-vit-base-patch32 --labels "cat,dog,car"
    python zeroshot.py --images-from photos/ --weights clip-vit-base-patch32 --query "a dog on a beach"

Classification: each label is written into prompt templates ("a photo of a {}."), the prompts are
embedded by the text tower, and each label's embeddings are averaged (CLIP's prompt ensembling). An
image's probabilities are the softmax over labels of exp(logit_scale) times the cosine similarity, as
in CLIP's own zero-shot code. Retrieval: each --query is embedded as written, and the images are
ranked by the same logits, the softmax now taken over the images (transformers' logits_per_text).
"""
import argparse
import json
import os
import sys

import numpy as np

import bpe
import miniclip as mc
from train import UserError, prompt_ids

DEFAULT_CHECKPOINT = os.path.join("checkpoints", "tiny.npz")
DEFAULT_TEMPLATE = "a photo of a {}."


def load_model(args):
    """(params, cfg, tokenizer, labels, templates, preprocessing settings) from --weights or --checkpoint."""
    if args.weights:
        params, cfg = mc.load_weights(args.weights)
        folder = mc.model_folder(args.weights)
        return params, cfg, bpe.load(folder), None, [DEFAULT_TEMPLATE], read_preprocessor(folder, cfg)
    path = args.checkpoint or DEFAULT_CHECKPOINT
    if not os.path.exists(path):
        if args.checkpoint:
            raise UserError(f"{path}: no such checkpoint")
        raise UserError(f"no checkpoint at {path}: run `python train.py --tiny` first, or pass --checkpoint "
                        f"or --weights")
    params, cfg, meta, _ = mc.load_checkpoint(path)
    if cfg.objective != "contrastive":
        raise UserError(f"{path}: a {cfg.objective!r} model has no text tower to compare with; "
                        "train.py evaluates it")
    if "tokenizer" not in meta:
        raise UserError(f"{path}: the checkpoint holds no tokenizer")
    params = mc.to_device({k: v.astype(np.float32) for k, v in params.items()})
    return (params, cfg, bpe.from_list(meta["tokenizer"]), meta.get("labels") or None,
            meta.get("templates") or [DEFAULT_TEMPLATE], (cfg.image_size, cfg.image_size, mc.CLIP_MEAN, mc.CLIP_STD))


def read_preprocessor(folder, cfg):
    """
    (resize, crop, mean, std): from a Hugging Face preprocessor_config.json, else from the
    "preprocess_cfg" of an open_clip_config.json, else CLIP's defaults. Both families resize the short
    side with bicubic filtering and take the centered square, as mc.preprocess does.
    """
    size, crop, mean, std = cfg.image_size, cfg.image_size, mc.CLIP_MEAN, mc.CLIP_STD
    hf, oc = os.path.join(folder, "preprocessor_config.json"), os.path.join(folder, mc.OPEN_CLIP_FILES[1])
    path = hf if os.path.isfile(hf) else oc if os.path.isfile(oc) else None
    try:
        if path == hf:
            pc = mc.read_json(hf)
            size = pc.get("size", size)
            size = size.get("shortest_edge", size) if isinstance(size, dict) else size
            crop = pc.get("crop_size", crop)
            crop = crop.get("height", crop) if isinstance(crop, dict) else crop
            mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
        elif path == oc:
            pc = mc.read_json(oc).get("preprocess_cfg", {})
            for key, ours in (("interpolation", "bicubic"), ("resize_mode", "shortest")):
                if pc.get(key, ours) != ours:
                    raise UserError(f"{oc}: preprocess_cfg {key} {pc[key]!r}; zeroshot.py resizes as {ours!r}")
            mean, std = tuple(pc.get("mean", mean)), tuple(pc.get("std", std))
        size, crop = int(size), int(crop)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean {mean} and std {std} need 3 values each")
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise UserError(f"{path}: not a readable preprocessing config ({e})") from None
    if crop != cfg.image_size:
        raise UserError(f"{path}: crops {crop} pixels but the model takes {cfg.image_size}")
    return size, crop, mean, std


def read_labels(args, default):
    if args.labels_file:
        try:
            with open(args.labels_file, encoding="utf-8") as f:
                labels = [line.strip() for line in f]
        except OSError as e:
            raise UserError(f"{args.labels_file}: cannot read labels ({e.strerror})") from None
    elif args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
    elif default is None:
        raise UserError("the checkpoint stores no labels: give --labels \"cat,dog\" or --labels-file FILE")
    else:
        labels = default
    labels = [label for label in labels if label]
    if not labels:
        raise UserError("the label list is empty")
    return labels


def classifier(params, cfg, tok, labels, templates):
    """The (labels, E) class embeddings, computed once per call."""
    return mc.class_embeddings(params, cfg, prompt_ids(tok, cfg, labels, templates), len(templates))


def print_table(path, labels, probs, topk):
    print(path)
    order = np.argsort(-probs)[:topk]
    width = max(len(labels[i]) for i in order)
    for rank, i in enumerate(order, start=1):
        bar = "#" * int(round(probs[i] * 30))
        print(f"  {rank:2d}. {labels[i]:<{width}}  {100 * probs[i]:6.2f}%  {bar}")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_paths(args):
    """The images named on the command line, then those of --images-from: a folder (searched
    recursively for image files, in sorted order) or a text file with one path per line."""
    paths = list(args.images)
    src = args.images_from
    if src and os.path.isdir(src):
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(src) for name in names
                       if name.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise UserError(f"{src}: no image files in this folder ({', '.join(IMAGE_EXTENSIONS)})")
        paths += found
    elif src:
        try:
            with open(src, encoding="utf-8") as f:
                paths += [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            raise UserError(f"{src}: no such file or folder") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{src}: cannot read the list of images ({e})") from None
    if not paths:
        raise UserError("no images: name them, or give --images-from FILE_OR_FOLDER")
    return paths


def check_embeddings_path(path):
    """--save-embeddings must name a new or replaceable .npz in a folder that exists: checked before any work."""
    if not path.endswith(".npz"):
        raise UserError(f"--save-embeddings {path}: the file name must end in .npz")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--save-embeddings {path}: no folder {folder}")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise UserError(f"--save-embeddings {path}: cannot write there")


def embed_images(params, cfg, paths, preprocessing, batch_size):
    """
    Yield (paths, unit image embeddings (n, E)) a batch at a time. An image that cannot be read gets
    one line on stderr and is left out; the others go on.
    """
    size, crop, mean, std = preprocessing
    for start in range(0, len(paths), batch_size):
        good, pixels = [], []
        for path in paths[start:start + batch_size]:
            try:
                pixels.append(mc.preprocess(mc.open_image(path), size, crop, mean, std))
                good.append(path)
            except ValueError as e:
                print(f"error: {path}: {e}", file=sys.stderr)
        if good:
            yield good, mc.l2_normalize(mc.encode_image(params, cfg, mc.to_device(np.stack(pixels))))


def classify(batches, classes, scale, labels, args):
    """Print each image's labels as they are computed: the list of images can be any length."""
    for paths, img in batches:
        probs = mc.to_numpy(mc.softmax_forward(scale * (img @ classes.T))[0]).astype(np.float64)   # (n, labels)
        for path, pr in zip(paths, probs):
            if args.json:
                order = np.argsort(-pr)[:args.topk or len(labels)]
                print(json.dumps({"image": path, "predictions": [{"label": labels[i], "prob": float(pr[i])}
                                                                 for i in order]}))
            else:
                print_table(path, labels, pr, args.topk or 5)
        yield paths, img


def retrieve(paths, images, queries, texts, scale, args):
    """For each query, the images ranked by similarity: softmax over the images of scale * cosine."""
    logits = scale * (texts @ images.T)                                         # (queries, images)
    probs = mc.to_numpy(mc.softmax_forward(logits)[0]).astype(np.float64)
    logits = mc.to_numpy(logits).astype(np.float64)
    for q, query in enumerate(queries):
        order = np.argsort(-logits[q], kind="stable")[:args.topk or (len(paths) if args.json else 5)]
        if args.json:
            print(json.dumps({"query": query, "results": [
                {"image": paths[i], "score": float(logits[q, i] / scale), "prob": float(probs[q, i])} for i in order]}))
        else:
            print(query)
            for rank, i in enumerate(order, start=1):
                print(f"  {rank:2d}. {paths[i]}  cosine {logits[q, i] / scale:.4f}  {100 * probs[q, i]:6.2f}%")


def save_embeddings(path, paths, images, text_key, texts, text_embeddings, scale):
    """One .npz, written whole or not at all: unit image and text embeddings with their paths and texts."""
    mc.write_npz(path, {"image_embeddings": images, "image_paths": np.array(paths, dtype=str),
                        "text_embeddings": mc.to_numpy(text_embeddings), text_key: np.array(texts, dtype=str),
                        "logit_scale": np.float64(scale)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--images-from", metavar="FILE_OR_FOLDER",
                   help="more images: every image file under a folder, or a text file with one path per line")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--checkpoint", help=f"a checkpoint from train.py (default: {DEFAULT_CHECKPOINT})")
    w.add_argument("--weights", help="a CLIP model folder, Hugging Face's or open_clip's layout, or its .safetensors file")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog,car"')
    what.add_argument("--labels-file", help="a file with one label per line")
    what.add_argument("--query", action="append", help="rank the images by this text instead; repeat for more")
    p.add_argument("--template", action="append",
                   help='a prompt template with {} for the label; repeat to ensemble (default: the '
                        f'checkpoint\'s, or "{DEFAULT_TEMPLATE}")')
    p.add_argument("--topk", type=int, help="show the K best labels or images (default: 5 in the table, all in --json)")
    p.add_argument("--json", action="store_true", help="one JSON object per image (per query with --query) and line")
    p.add_argument("--save-embeddings", metavar="PATH.npz",
                   help="also write the unit image embeddings, the label or query embeddings, and the paths")
    p.add_argument("--device", choices=["cpu", "gpu"], help="default: $MINICLIP_DEVICE or cpu")
    p.add_argument("--batch-size", type=int, default=32, help="images encoded at a time")
    args = p.parse_args(argv)

    try:
        if args.batch_size < 1 or (args.topk is not None and args.topk < 1):
            raise UserError("--batch-size and --topk must be at least 1")
        paths = image_paths(args)
        if args.save_embeddings:
            check_embeddings_path(args.save_embeddings)
        if args.weights and args.labels is None and args.labels_file is None and not args.query:
            raise UserError("--weights needs labels or queries: give --labels \"cat,dog\", --labels-file FILE "
                            "or --query TEXT")
        if args.device:
            mc.set_device(args.device)
        params, cfg, tok, default_labels, templates, preprocessing = load_model(args)
        if args.query:
            texts = [q.strip() for q in args.query]
            if not all(texts):
                raise UserError("a --query is empty")
            text_embeddings = mc.l2_normalize(mc.encode_text(params, cfg, mc.to_device(
                tok.tokenize(texts, cfg.context_length, truncate=True))))          # (queries, E)
        else:
            texts = read_labels(args, default_labels)
            templates = args.template or templates
            bad = [t for t in templates if "{}" not in t]
            if bad:
                raise UserError(f"template {bad[0]!r} has no {{}} for the label")
            text_embeddings = classifier(params, cfg, tok, texts, templates)     # (labels, E)
    except (UserError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    scale = mc.logit_scale_value(params)

    batches = embed_images(params, cfg, paths, preprocessing, args.batch_size)
    if not args.query:
        batches = classify(batches, text_embeddings, scale, texts, args)
    kept, embeddings = [], []
    for good, img in batches:
        kept += good
        if args.query or args.save_embeddings:                  # else nothing is kept: any number of images
            embeddings.append(mc.to_numpy(img).astype(np.float32))
    images = np.concatenate(embeddings) if embeddings else np.zeros((0, cfg.embed_dim), np.float32)
    if args.query and kept:
        retrieve(kept, mc.to_device(images), texts, text_embeddings, scale, args)
    if args.save_embeddings:
        save_embeddings(args.save_embeddings, kept, images, "queries" if args.query else "labels", texts,
                        text_embeddings, scale)
        print(f"saved {len(kept)} image embeddings to {args.save_embeddings}", file=sys.stderr)
    return 1 if len(kept) < len(paths) else 0


if __name__ == "__main__":
    sys.exit(main())
