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
import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import miniclip as mc  # first: it makes OpenBLAS's settings before NumPy loads (mc.cpu_settings)
import numpy as np

import bpe
import data
import weights
from data import UserError

DEFAULT_CHECKPOINT = os.path.join("checkpoints", "tiny.npz")
DEFAULT_TEMPLATE = "a photo of a {}."


def load_model(weights_path=None, checkpoint=None):
    """
    (params, cfg, tokenizer, labels, templates, preprocessing settings) from published weights (--weights)
    or one of our checkpoints (--checkpoint; the tiny model's when neither is given).
    """
    if weights_path:
        params, cfg = weights.load_weights(weights_path)
        folder = weights.model_folder(weights_path)
        return params, cfg, bpe.load(folder), None, [DEFAULT_TEMPLATE], weights.read_preprocessor(folder, cfg)
    path = checkpoint or DEFAULT_CHECKPOINT
    if not os.path.exists(path):
        if checkpoint:
            raise UserError(f"{path}: no such checkpoint")
        raise UserError(f"no checkpoint at {path}: run `python train.py --tiny` first, or pass --checkpoint "
                        f"or --weights")
    params, cfg, meta, _ = weights.load_checkpoint(path)
    if cfg.objective != "contrastive":
        raise UserError(f"{path}: a {cfg.objective!r} model has no text tower to compare with; "
                        "train.py evaluates it")
    if "tokenizer" not in meta:
        raise UserError(f"{path}: the checkpoint holds no tokenizer")
    params = mc.to_device({k: v.astype(np.float32) for k, v in params.items()})
    return (params, cfg, bpe.from_list(meta["tokenizer"]), meta.get("labels") or None,
            meta.get("templates") or [DEFAULT_TEMPLATE], (cfg.image_size, cfg.image_size, mc.CLIP_MEAN, mc.CLIP_STD))


def read_labels(args, default):
    if args.labels_file:
        labels = data.read_lines(args.labels_file, "labels")
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


def decode_images(paths, preprocessing):
    """
    Runs in a worker process (or here): each image opened, resized and center-cropped as the model's
    preprocessing says. Returns (the paths that decoded, their pixels (n, crop, crop, 3) uint8, an
    error line for each that did not).
    """
    size, crop, _, _ = preprocessing
    good, crops, errors = [], [], []
    for path in paths:
        try:
            crops.append(np.asarray(mc.resize_and_crop(mc.open_image(path), size, crop)))
            good.append(path)
        except ValueError as e:
            errors.append(f"error: {path}: {e}")
    return good, np.stack(crops) if crops else np.zeros((0, crop, crop, 3), np.uint8), errors


def decoded_batches(paths, preprocessing, batch_size, workers):
    """decode_images of each batch of paths, in order: decoded by `workers` background processes, at
    most two batches each ahead of the one being encoded, so decoding overlaps encoding; or, with no
    workers, here, one batch after another."""
    chunks = (paths[i:i + batch_size] for i in range(0, len(paths), batch_size))
    if not workers or len(paths) <= batch_size:                 # one batch: starting workers costs more
        yield from (decode_images(chunk, preprocessing) for chunk in chunks)
        return
    ctx = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=data.start_worker) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.submit(decode_images, chunk, preprocessing))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def embed_images(params, cfg, paths, preprocessing, batch_size, workers):
    """
    Yield (paths, unit image embeddings (n, E)) a batch at a time. An image that cannot be read gets
    one line on stderr and is left out; the others go on. A long run shows its progress on stderr.
    """
    _, _, mean, std = preprocessing
    shown, done = data.Progress("images", len(paths), file=sys.stderr), 0
    for good, crops, errors in decoded_batches(paths, preprocessing, batch_size, workers):
        for line in errors:
            print(line, file=sys.stderr)
        if good:
            yield good, mc.l2_normalize(mc.encode_image(params, cfg, mc.to_device(mc.normalize_pixels(crops, mean, std))))
        done += len(good) + len(errors)
        shown.update(done)


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
    weights.write_npz(path, {"image_embeddings": images, "image_paths": np.array(paths, dtype=str),
                             "text_embeddings": mc.to_numpy(text_embeddings), text_key: np.array(texts, dtype=str),
                             "logit_scale": np.float64(scale)})


# -----------------------------------------------------------------------------
# Evaluation on labeled pairs: train.py's during training, and --test's on any labeled CSV. In
# blocks, so memory grows linearly with the evaluation set, never with its square.

EVAL_CHUNK = 256                # images or texts embedded at a time
RECALL_BLOCK = 1024             # queries whose similarities to every item are held at once


def trim(ids):
    """
    Drop the columns after the last end-of-text token in the batch. Attention is causal and the
    feature is read at EOT, so padding after EOT never changes the result, and the text tower does
    less work. EOT has the highest id, so its position is argmax; counting nonzero ids instead would
    be wrong, because id 0 is a real token ("!" in CLIP's byte order).
    """
    return ids[:, :int(ids.argmax(axis=1).max()) + 1]


def embed_pairs(params, cfg, pairs, loader):
    """Normalized embeddings of every image of pairs, center-cropped, as NumPy (N, E)."""
    shown, out = data.Progress("evaluating, images", len(pairs)), []
    for crops, _ in loader.center_crops(pairs, EVAL_CHUNK):
        pixels = mc.to_device(mc.normalize_pixels(crops))
        out.append(mc.to_numpy(mc.l2_normalize(mc.encode_image(params, cfg, pixels))))
        shown.update(sum(len(o) for o in out))
    return np.concatenate(out)


def embed_texts(params, cfg, tok, texts):
    """Normalized text embeddings as NumPy, (N, E)."""
    return np.concatenate([mc.to_numpy(mc.l2_normalize(mc.encode_text(params, cfg, mc.to_device(trim(
        tok.tokenize(texts[i:i + EVAL_CHUNK], cfg.context_length, truncate=True))))))
        for i in range(0, len(texts), EVAL_CHUNK)])


def recall_at(queries, items, query_keys, item_keys, ks=(1, 5)):
    """
    The fraction of queries whose k nearest items (by cosine similarity) include one with the query's
    key. queries: (Q, E), items: (N, E), unit rows; keys: integer arrays. The similarities are formed
    RECALL_BLOCK queries at a time, and only the best max(ks) of each row are sorted.
    """
    k_max = min(max(ks), len(items))
    hits = dict.fromkeys(ks, 0)
    for b in range(0, len(queries), RECALL_BLOCK):
        sim = queries[b:b + RECALL_BLOCK] @ items.T                             # (b, N)
        top = np.argpartition(-sim, k_max - 1, axis=1)[:, :k_max]               # (b, k): the best, unordered
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sim, top, 1), axis=1), 1)  # best first
        match = item_keys[top] == query_keys[b:b + RECALL_BLOCK, None]          # (b, k)
        for k in ks:
            hits[k] += int(match[:, :k].any(axis=1).sum())
    return {k: hits[k] / len(queries) for k in ks}


def prompt_ids(tok, cfg, labels, templates):
    """
    Every label in every template, label-major, as token ids on the device: (labels * templates, T).
    A prompt longer than the context is cut, with one warning for all of them.
    """
    prompts = [t.format(label) for label in labels for t in templates]
    long = [(p, n) for p in prompts if (n := len(tok.encode(p)) + 2) > cfg.context_length]
    if long:
        more = f" (and {len(long) - 1} more prompts)" if len(long) > 1 else ""
        print(f"warning: prompt {long[0][0][:60]!r} is {long[0][1]} tokens, over the context of {cfg.context_length}; "
              f"truncated{more}", file=sys.stderr)
    return mc.to_device(tok.tokenize(prompts, cfg.context_length, truncate=True))


def label_ranks(scores, labels):
    """(n,): how many classes each row of scores (n, classes) puts above its right one; 0 is a top-1 hit."""
    return (scores > np.take_along_axis(scores, labels[:, None], 1)).sum(axis=1)


def evaluate(params, cfg, tok, val, labels, templates, loader):
    """
    Retrieval recall in both directions (a hit: the same key) and, when the pairs have labels, the
    zero-shot top-1 and top-5 accuracy among `labels`, each label's prompts ensembled.
    """
    if cfg.objective == "bow":
        return evaluate_bow(params, cfg, tok, val, labels, templates, loader)
    img = embed_pairs(params, cfg, val, loader)
    txt = embed_texts(params, cfg, tok, val.captions)
    codes = {k: i for i, k in enumerate(dict.fromkeys(val.keys))}
    keys = np.array([codes[k] for k in val.keys])
    i2t, t2i = recall_at(img, txt, keys, keys), recall_at(txt, img, keys, keys)
    out = {"i2t_r1": i2t[1], "i2t_r5": i2t[5], "t2i_r1": t2i[1], "t2i_r5": t2i[5]}
    if val.labels is not None:
        classes = mc.to_numpy(classifier(params, cfg, tok, labels, templates))                  # (labels, E)
        ranks = np.concatenate([label_ranks(img[i:i + RECALL_BLOCK] @ classes.T, val.labels[i:i + RECALL_BLOCK])
                                for i in range(0, len(img), RECALL_BLOCK)])
        out["zeroshot_top1"], out["zeroshot_top5"] = float((ranks < 1).mean()), float((ranks < 5).mean())
    return out


def evaluate_bow(params, cfg, tok, val, labels, templates, loader):
    """The bag-of-words model has no text embeddings, so no retrieval: zero-shot top-1 and top-5 only."""
    if val.labels is None:
        return {}
    prompts = prompt_ids(tok, cfg, labels, templates)
    scores = np.concatenate([mc.to_numpy(mc.bow_label_scores(params, cfg, mc.to_device(mc.normalize_pixels(crops)),
                                                             prompts, len(templates)))
                             for crops, _ in loader.center_crops(val, EVAL_CHUNK)])
    ranks = label_ranks(scores, val.labels)
    return {"zeroshot_top1": float((ranks < 1).mean()), "zeroshot_top5": float((ranks < 5).mean())}


def test(params, cfg, tok, path, labels, templates, workers):
    """
    Score a labeled CSV (columns filepath, title, label) as train.py's evaluation does: the images
    center-cropped from 9/8 of the model's side, zero-shot top-1 and top-5 among `labels` (default:
    the CSV's own labels), and retrieval of the CSV's captions, a hit being a caption of the same label.
    """
    pairs = data.read_csv(path, "filepath", "title", ",", False, "label", flags=False)
    if pairs.label_names is None:
        raise UserError(f"{path}: no 'label' column (--test takes a CSV with filepath, title and label)")
    if labels is not None:
        index = {label: i for i, label in enumerate(labels)}
        unknown = [x for x in pairs.label_names if x not in index]
        if unknown:
            raise UserError(f"{path}: {len(unknown)} labels are not in the label list, first: {unknown[0]!r}")
        pairs.labels = np.array([index[x] for x in pairs.label_names])[pairs.labels]
        pairs.label_names = labels
    loader = data.Loader(cfg.image_size, workers)
    try:
        metrics = evaluate(params, cfg, tok, pairs, pairs.label_names, templates, loader)
    finally:
        loader.close()
    return {"test": path, "images": len(pairs), "labels": len(pairs.label_names), **metrics}


def print_test(result):
    r = result
    print(f"{r['test']}: {r['images']:,} images, {r['labels']:,} labels | zero-shot top-1 {r['zeroshot_top1']:.1%} "
          f"top-5 {r['zeroshot_top5']:.1%} | image->text R@1 {r['i2t_r1']:.1%} R@5 {r['i2t_r5']:.1%} | "
          f"text->image R@1 {r['t2i_r1']:.1%} R@5 {r['t2i_r5']:.1%}")


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
    p.add_argument("--test", action="append", metavar="CSV",
                   help="score a labeled CSV (filepath, title, label) instead: zero-shot top-1 and top-5 among its "
                        "labels (or --labels/--labels-file's) and retrieval recall; repeat for more")
    p.add_argument("--workers", type=int, default=2,
                   help="processes decoding images while the model encodes (default 2; 0: decode in this process)")
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
    mc.cpu_settings()
    try:
        if args.batch_size < 1 or (args.topk is not None and args.topk < 1):
            raise UserError("--batch-size and --topk must be at least 1")
        if args.workers < 0:
            raise UserError(f"--workers must be at least 0, got {args.workers}")
        if args.test and (args.images or args.images_from or args.query or args.save_embeddings):
            raise UserError("--test scores its CSVs: it takes no images, --query or --save-embeddings")
        paths = [] if args.test else image_paths(args)
        if args.save_embeddings:
            check_embeddings_path(args.save_embeddings)
        if args.weights and args.labels is None and args.labels_file is None and not args.query and not args.test:
            raise UserError("--weights needs labels or queries: give --labels \"cat,dog\", --labels-file FILE "
                            "or --query TEXT")
        if args.device:
            mc.set_device(args.device)
        params, cfg, tok, default_labels, templates, preprocessing = load_model(args.weights, args.checkpoint)
        templates = args.template or templates
        bad = [t for t in templates if "{}" not in t]
        if bad:
            raise UserError(f"template {bad[0]!r} has no {{}} for the label")
        if args.test:
            labels = read_labels(args, None) if args.labels or args.labels_file else None
            for path in args.test:
                result = test(params, cfg, tok, path, labels, templates, args.workers)
                if args.json:
                    print(json.dumps(result))
                else:
                    print_test(result)
            return 0
        if args.query:
            texts = [q.strip() for q in args.query]
            if not all(texts):
                raise UserError("a --query is empty")
            text_embeddings = mc.l2_normalize(mc.encode_text(params, cfg, mc.to_device(
                tok.tokenize(texts, cfg.context_length, truncate=True))))          # (queries, E)
        else:
            texts = read_labels(args, default_labels)
            text_embeddings = classifier(params, cfg, tok, texts, templates)     # (labels, E)
    except (UserError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    scale = mc.logit_scale_value(params)

    batches = embed_images(params, cfg, paths, preprocessing, args.batch_size, args.workers)
    if not args.query:
        batches = classify(batches, text_embeddings, scale, texts, args)
    kept, embeddings = [], []
    try:
        for good, img in batches:
            kept += good
            if args.query or args.save_embeddings:              # else nothing is kept: any number of images
                embeddings.append(mc.to_numpy(img).astype(np.float32))
    except BrokenProcessPool:
        print("error: a decoding worker process died (out of memory?); try fewer --workers, or 0", file=sys.stderr)
        return 1
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
