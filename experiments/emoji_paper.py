"""
The CLIP paper's findings on real images: the emoji of three artists (data.py emoji), trained on
Noto's and Twemoji's art, with OpenMoji's as the shift that training never sees.

    python data.py emoji *.tgz --out data/emoji                     first, once (README, "Real images")
    python experiments/emoji_paper.py --data data/emoji --quick     1 seed, 2 lengths: 8 minutes on 2 cores
    python experiments/emoji_paper.py --data data/emoji             3 seeds, 3 lengths: 81 minutes here
    python experiments/emoji_paper.py --from-results                the claims and the figures again, from the results

Four of the paper's questions:
- Effective robustness (Figures 13-14). Supervised models (experiments/supervised.py: the same image
  tower with a linear head over the seen classes) of four widths and several lengths give a line in
  logit space, logit(shifted accuracy) = a logit(in-distribution accuracy) + b. A model's effective
  robustness is how far above that line it sits. Zero-shot CLIP models of the same widths and lengths,
  and linear probes on their features, are measured against it.
- The compute frontier (Figure 9): zero-shot error on the held-out concepts against training FLOPs,
  four widths each trained to several lengths, and a power law fitted to the frontier.
- Prompts (Figure 4): the bare name, one template, and an ensemble of templates unlike the training captions.
- Contrastive against bag-of-words prediction (Figure 2), at equal training FLOPs: the contrastive
  arm with the paper's bag-of-words text encoder (train.py --text-layers 0), and with miniclip's text
  transformer beside it.

In-distribution and shifted sets. A class is an emoji without its skin tone ("woman swimming"); the
supervised models learn all the seen ones (1,482 with data.py emoji's seed 0). Of every training emoji
that comes in skin tones, two toned variants, drawn once with HOLD_OUT_SEED, are kept out of every run's
training: their Noto and Twemoji drawings are the in-distribution test, their OpenMoji drawings the
shifted one. Every model classifies them among the classes that come in skin tones (240: people and
hands), a set where the shifted accuracy is well clear of zero (among all 1,482, a 300-step CLIP got
2 of 480 OpenMoji drawings right).

Nothing here is tuned: every run takes train.py's defaults (batch 128, peak learning rate 2e-3 after
100 warmup steps, cosine decay, weight decay 0.2, a random crop of 8/9 of the side) and the emoji
preset's shape at the grid's widths; the supervised models the same. The linear probes choose their
L2 strength on a fifth of the training images (probe.linear_probe). The held-out concepts, the unused
skin tones and OpenMoji are only scored. A verdict is paper.verdict's: a difference counts only when it
is larger than the spread over seeds.

Each finished run is written to --out's emoji_paper.json at once, and a rerun skips the runs that are
there, so the grid can be spread over several sittings. Runs go two at a time, each in its own process
with single-threaded BLAS.
"""
import argparse
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402
import bpe                                              # noqa: E402
import data                                             # noqa: E402
import train                                            # noqa: E402
import zeroshot                                         # noqa: E402
import paper                                            # noqa: E402
import probe                                            # noqa: E402
import supervised                                       # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE = mc.PRESETS["emoji"].image_size
WIDTHS = (32, 64, 96, 128)      # both towers; heads 32 wide
BASE_WIDTH = 96                 # the emoji preset's: its runs also get the prompt tests and the probes
HOLD_OUT_SEED = 0               # which skin tones are kept out: the same for every run and seed
TONES_HELD = 2                  # of each toned emoji's five
PROMPTS = {"bare name": ("{}",), "one template": ("an emoji of {}",),
           # unlike every training caption form (data.EMOJI_CAPTIONS), as the paper's 80 are unlike alt-text
           "ensemble": ("a {} icon", "a drawing of {}", "a picture of {}", "a sticker of {}", "a cartoon of {}",
                        "a small image of {}", "a symbol for {}", "an illustration of {}")}
# The probes' L2 strengths, chosen among on a fifth of the training images: decades, fewer than
# probe.PROBE_CS's 25 half-decades, each fit taking seconds here.
PROBE_CS = (0.1, 1.0, 10.0, 100.0)
BATCH = 128                     # train.py's default


@dataclasses.dataclass
class Scale:
    """How much work: --quick or the full grid."""
    seeds: tuple
    lengths: tuple              # optimizer steps of batch 128, for every width and kind


QUICK = Scale(seeds=(0,), lengths=(250, 750))
FULL = Scale(seeds=(0, 1, 2), lengths=(250, 750, 1800))


# -----------------------------------------------------------------------------
# The world: which images train, which test, and the classes, from the data set's CSVs


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def code_of(filepath):
    """images/google/1F481-1F3FD-200D-2640.png -> 1F481-1F3FD-200D-2640"""
    return os.path.splitext(os.path.basename(filepath))[0]


def untoned(code):
    return "-".join(p for p in code.split("-") if p not in data.SKIN_TONES)


def split_tones(train_rows, seed=HOLD_OUT_SEED, n_held=TONES_HELD):
    """
    (classes, held): classes maps each seen class (an emoji code without skin tones, drawn in the
    training set) to its name; held is the set of toned codes kept out of training, n_held of each
    class's toned variants, drawn with seed.
    """
    names = {code_of(r["filepath"]): r["label"] for r in train_rows}
    variants = {}
    for code in sorted(names):
        if untoned(code) != code:
            variants.setdefault(untoned(code), []).append(code)
    classes = {c: names[c] for c in names if untoned(c) == c}
    rng = np.random.default_rng(seed)
    held = set()
    for base, codes in sorted(variants.items()):
        if base in classes and len(codes) > n_held:
            held.update(rng.choice(codes, n_held, replace=False).tolist())
    return classes, held


@dataclasses.dataclass
class World:
    """Everything a run reads: the training sets, the tokenizer and the test sets, images in memory."""
    captioned: data.Pairs       # CLIP's and bag-of-words' training pairs: train.csv without the held tones
    labeled: data.Pairs         # the supervised models': each training image once, labels = its class
    tok: bpe.Tokenizer
    class_names: list           # the seen classes, which the supervised models learn
    candidates: np.ndarray      # the classes that come in skin tones: the in-distribution and shifted tests' choices
    tests: dict                 # name -> (uint8 center crops (n, S, S, 3), labels (n,), label names)


def load_images(paths, side):
    return np.stack([np.asarray(mc.resize_and_crop(mc.open_image(p), side)) for p in paths])


def build_world(data_dir, work):
    """The World of the data set in data_dir. The decoded images and the tokenizer are kept in work and reused."""
    train_rows = read_rows(os.path.join(data_dir, "train.csv"))
    classes, held = split_tones(train_rows)
    class_of = {code: i for i, code in enumerate(classes)}
    kept = [r for r in train_rows if code_of(r["filepath"]) not in held]
    images_once = sorted({r["filepath"] for r in kept if untoned(code_of(r["filepath"])) in class_of})
    held_paths = sorted({r["filepath"] for r in train_rows if code_of(r["filepath"]) in held})
    shifted = [f"images/{data.HELD_OUT_VENDOR}/{code_of(p)}.png" for p in held_paths
               if f"/{data.TRAIN_VENDORS[0]}/" in p]     # data.py emoji's layout: images/<vendor>/<code>.png
    tests_csv = {"held-out concepts": "test_concepts.csv", "OpenMoji, seen concepts": "test_vendor_seen.csv"}
    test_rows = {name: read_rows(os.path.join(data_dir, file)) for name, file in tests_csv.items()}
    paths = sorted({r["filepath"] for r in kept} | set(held_paths) | set(shifted) |
                   {r["filepath"] for rows in test_rows.values() for r in rows})
    side = data.load_size(IMAGE)
    cache = os.path.join(work, f"images{side}.npz")
    os.makedirs(work, exist_ok=True)
    if os.path.exists(cache):
        saved = np.load(cache)
        if saved["paths"].tolist() != paths:
            raise data.DataError(f"{cache} holds other images than {data_dir}; remove it")
        pixels = saved["pixels"]
    else:
        pixels = load_images([os.path.join(data_dir, p) for p in paths], side)
        np.savez(cache + ".tmp.npz", paths=np.array(paths), pixels=pixels)
        os.replace(cache + ".tmp.npz", cache)
    at = {p: i for i, p in enumerate(paths)}
    crops = data.center_crop(pixels, IMAGE)

    def pairs(files, captions, source):
        return data.Pairs(data.Strings.of(captions), np.arange(len(files)), data.Strings.of(captions),
                          images=pixels[[at[f] for f in files]], source=source)
    captioned = pairs([r["filepath"] for r in kept], [r["title"] for r in kept], "train.csv, tones kept out")
    labeled = pairs(images_once, [classes[untoned(code_of(p))] for p in images_once], "train.csv, one row per image")
    labeled.labels = np.array([class_of[untoned(code_of(p))] for p in images_once])
    tok_file = os.path.join(work, "tokenizer.json")
    if os.path.exists(tok_file):
        with open(tok_file) as f:
            tok = bpe.from_list(json.load(f))
    else:
        tok = train.learn_tokenizer(list(captioned.captions), mc.PRESETS["emoji"].vocab_size, 0)
        bpe.write_atomic(tok_file, json.dumps(tok.to_list()))
    candidates = np.array(sorted({class_of[untoned(code)] for code in held}), dtype=np.int64)
    choice = {c: i for i, c in enumerate(candidates.tolist())}
    names = [list(classes.values())[c] for c in candidates]
    choices = lambda files: np.array([choice[class_of[untoned(code_of(p))]] for p in files], dtype=np.int64)
    tests = {"in-distribution": (crops[[at[p] for p in held_paths]], choices(held_paths), names),
             "shifted": (crops[[at[p] for p in shifted]], choices(shifted), names)}
    for name, rows in test_rows.items():                # zero-shot among the CSV's own labels, as zeroshot.py --test
        labels = list(dict.fromkeys(r["label"] for r in rows))
        index = {label: i for i, label in enumerate(labels)}
        tests[name] = (crops[[at[r["filepath"]] for r in rows]], np.array([index[r["label"]] for r in rows]), labels)
    return World(captioned, labeled, tok, list(classes.values()), candidates, tests)


# -----------------------------------------------------------------------------
# One run: train a model, then score it (in a worker process)


# The kinds of run: contrastive with the text transformer ("clip") or with a bag-of-words text encoder
# ("bag"), bag-of-words prediction ("bow"), and the supervised classifier.
CONTRASTIVE = ("clip", "bag")


def model_config(width, kind, vocab_size):
    """The emoji preset with both towers `width` wide, in heads of 32."""
    return dataclasses.replace(mc.PRESETS["emoji"], vision_width=width, text_width=width, vision_heads=max(1, width // 32),
                               text_heads=max(1, width // 32), vocab_size=vocab_size,
                               text_layers=0 if kind == "bag" else mc.PRESETS["emoji"].text_layers,
                               objective="bow" if kind == "bow" else "contrastive")


def mean_tokens(world):
    """A training caption's mean length in tokens, start and end included: what the text tower reads."""
    return float(np.mean([len(world.tok.encode(c)) + 2 for c in world.captioned.captions]))


def run_flops(kind, cfg, steps, world):
    """Training FLOPs of a run (paper.train_flops): the towers it trains and its head."""
    head = {"bow": cfg.vocab_size, "supervised": len(world.class_names)}.get(kind, 0)
    tokens = mean_tokens(world) if kind == "clip" else 0
    return paper.train_flops(cfg, steps * BATCH, text_tokens=tokens, head=head)


def train_model(kind, width, steps, seed, world):
    """One run of train.py's loop on the world's data: kind is clip, bag, bow or supervised. Returns (params, cfg)."""
    cfg = model_config(width, kind, world.tok.vocab_size)
    tc = train.TrainConfig(steps=steps, seed=seed, batch_size=BATCH)
    pairs = world.labeled if kind == "supervised" else world.captioned
    if kind == "supervised":
        params = mc.to_device(supervised.init_params(cfg, len(world.class_names), seed))
    else:
        params = mc.to_device(mc.init_params(cfg, seed=seed))
    opt = train.optimizer(params, tc)
    slack = data.load_size(IMAGE) - IMAGE
    plan = (data.batch_plan(s, len(pairs), tc.batch_size, seed, slack, tc.random_crop) for s in range(steps))
    for step, (crops, idx) in enumerate(data.Loader(IMAGE, workers=0).batches(pairs, plan)):
        if kind == "supervised":
            pixels = mc.to_device(mc.normalize_pixels(crops))
            loss, grads = supervised.loss_and_grads(params, cfg, pixels, mc.to_device(pairs.labels[idx]))
        else:
            pixels, ids = train.batch_inputs(crops, [pairs.captions[i] for i in idx], world.tok, cfg)
            loss, grads = mc.loss_and_grads(params, cfg, pixels, ids)
        if not math.isfinite(loss):
            raise RuntimeError(f"{kind} width {width} seed {seed}: the loss became {loss} at step {step + 1}")
        opt.step(params, grads, train.lr_at(step, tc))
        if kind in CONTRASTIVE:
            mc.clamp_logit_scale(params)
    return params, cfg


def over_crops(fn, crops, chunk=256):
    """fn of the model's input for uint8 crops (n, S, S, 3), chunk by chunk, as one NumPy array."""
    return np.concatenate([mc.to_numpy(fn(mc.to_device(mc.normalize_pixels(crops[i:i + chunk]))))
                           for i in range(0, len(crops), chunk)])


def image_features(params, cfg, crops, unit=True):
    """(n, E) NumPy features of uint8 center crops; unit rows for zero-shot, raw for the probes."""
    feats = over_crops(lambda pixels: mc.encode_image(params, cfg, pixels), crops)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True) if unit else feats


def zero_shot(params, cfg, tok, feats, labels, names, templates):
    """Top-1 accuracy of CLIP's zero-shot classifier among names, each written into every template."""
    classes = mc.to_numpy(mc.class_embeddings(params, cfg, zeroshot.prompt_ids(tok, cfg, names, templates), len(templates)))
    return float(((feats @ classes.T).argmax(axis=1) == labels).mean())


def bow_zero_shot(params, cfg, tok, crops, labels, names, templates):
    """Top-1 of the bag-of-words model: the name whose prompts' words it finds most probable."""
    prompts = zeroshot.prompt_ids(tok, cfg, names, templates)
    scores = over_crops(lambda pixels: mc.bow_label_scores(params, cfg, pixels, prompts, len(templates)), crops)
    return float((scores.argmax(axis=1) == labels).mean())


def evaluate(kind, width, params, cfg, world):
    """The run's scores: {test or claim metric: accuracy}."""
    tests, tok, out = world.tests, world.tok, {}
    if kind == "supervised":
        for name in ("in-distribution", "shifted"):
            crops, labels, _ = tests[name]
            scores = over_crops(lambda pixels: supervised.class_scores(params, cfg, pixels), crops)
            out[name] = float((scores[:, world.candidates].argmax(axis=1) == labels).mean())
        return out
    if kind == "bow":
        crops, labels, names = tests["held-out concepts"]
        return {"held-out concepts": bow_zero_shot(params, cfg, tok, crops, labels, names, data.EMOJI_TEMPLATES)}
    if kind == "bag":                                   # Figure 2's arm: the held-out concepts only
        crops, labels, names = tests["held-out concepts"]
        return {"held-out concepts": zero_shot(params, cfg, tok, image_features(params, cfg, crops), labels, names,
                                               data.EMOJI_TEMPLATES)}
    feats = {name: image_features(params, cfg, crops) for name, (crops, _, _) in tests.items()}
    for name, (_, labels, names) in tests.items():
        if name != "OpenMoji, seen concepts":
            out[name] = zero_shot(params, cfg, tok, feats[name], labels, names, data.EMOJI_TEMPLATES)
    if width != BASE_WIDTH:
        return out
    for test in ("held-out concepts", "OpenMoji, seen concepts"):
        _, labels, names = tests[test]
        for prompt, templates in PROMPTS.items():
            out[f"{test}, {prompt}"] = zero_shot(params, cfg, tok, feats[test], labels, names, templates)
    # A linear probe on the raw image features of the training images of the candidate classes (a
    # probe of all 1,482 classes takes minutes per strength), scored on the same in-distribution and
    # shifted images as every model.
    fit = np.isin(world.labeled.labels, world.candidates)
    train_feats = image_features(params, cfg, data.center_crop(world.labeled.images[fit], IMAGE), unit=False)
    targets = np.searchsorted(world.candidates, world.labeled.labels[fit])
    raw = [image_features(params, cfg, tests[name][0], unit=False) for name in ("in-distribution", "shifted")]
    predicted = probe.linear_probe(train_feats, targets, np.concatenate(raw), cs=PROBE_CS)
    for name, part in zip(("in-distribution", "shifted"), np.split(predicted, [len(raw[0])])):
        out[f"probe {name}"] = float((part == tests[name][1]).mean())
    return out


def job_key(job):
    return f"{job['kind']} width {job['width']} steps {job['steps']} seed {job['seed']}"


WORLD = {}                      # a worker's World, built once per process


def run(job, data_dir, work):
    """Train and score one run: job = dict(kind, width, steps, seed). Returns it with its scores and cost."""
    if data_dir not in WORLD:
        WORLD[data_dir] = build_world(data_dir, work)
    world = WORLD[data_dir]
    t0 = time.time()
    params, cfg = train_model(job["kind"], job["width"], job["steps"], job["seed"], world)
    seconds = time.time() - t0
    return {**job, "seconds": round(seconds, 1), "flops": run_flops(job["kind"], cfg, job["steps"], world),
            "scores": evaluate(job["kind"], job["width"], params, cfg, world)}


def run_in_worker(args):
    mc.cpu_settings()
    return run(*args)


def jobs(scale, steps_of):
    """Every run of the grid, seed by seed, the longest first within each (so two workers finish together).
    steps_of(kind, s): the steps of a run of that kind at the base width with the FLOPs of s contrastive steps."""
    out = []
    for seed in scale.seeds:
        grid = [dict(kind=k, width=w, steps=s, seed=seed)
                for k in ("clip", "supervised") for w in WIDTHS for s in scale.lengths]
        grid += [dict(kind=k, width=BASE_WIDTH, steps=steps_of(k, s), seed=seed)
                 for k in ("bow", "bag") for s in scale.lengths]
        out += sorted(grid, key=lambda j: -j["steps"] * j["width"] ** 2)
    return out


def equal_compute_steps(world):
    """steps_of(kind, s): a bag-of-words run's steps (prediction, or the contrastive bag) of the same training
    FLOPs as a contrastive run of s steps with the text transformer, at the base width."""
    flops = lambda kind: run_flops(kind, model_config(BASE_WIDTH, kind, world.tok.vocab_size), 1, world)
    return lambda kind, s: int(round(s * flops("clip") / flops(kind)))


# -----------------------------------------------------------------------------
# The claims


def logit(p, n):
    """log(p / (1 - p)), with p kept half a test item from 0 and 1 (n items) so that it stays finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.5 / n, 1 - 0.5 / n)
    return np.log(p / (1 - p))


def fit_line(x, y):
    """Least squares y = a x + b: (a, b, R^2)."""
    a, b = np.polyfit(x, y, 1)
    residual = y - (a * x + b)
    total = ((y - y.mean()) ** 2).sum()
    return float(a), float(b), float(1 - (residual ** 2).sum() / total) if total > 0 else 1.0


def robustness(results, n_id, n_shift):
    """
    Per seed: the supervised models' line in logit space, and the effective robustness (distance
    above it, in logits) of every zero-shot CLIP run and every probe. {seed: dict}
    """
    out = {}
    for seed in sorted({r["seed"] for r in results}):
        mine = [r for r in results if r["seed"] == seed]
        sup = [r for r in mine if r["kind"] == "supervised"]
        clip = [r for r in mine if r["kind"] == "clip"]
        if len(sup) < 2 or not clip:
            continue
        point = lambda a, b: (logit(a, n_id), logit(b, n_shift))
        x, y = point([r["scores"]["in-distribution"] for r in sup], [r["scores"]["shifted"] for r in sup])
        a, b, r2 = fit_line(x, y)
        above = lambda ids, shifts: (lambda u, v: v - (a * u + b))(*point(ids, shifts))
        probes = [r for r in clip if "probe shifted" in r["scores"]]
        out[seed] = {"slope": a, "intercept": b, "r2": r2, "supervised residual": float(np.mean(y - (a * x + b))),
                     "clip": above([r["scores"]["in-distribution"] for r in clip],
                                   [r["scores"]["shifted"] for r in clip]).tolist(),
                     "clip base width": above([r["scores"]["in-distribution"] for r in probes],
                                              [r["scores"]["shifted"] for r in probes]).tolist(),
                     "probe": above([r["scores"]["probe in-distribution"] for r in probes],
                                    [r["scores"]["probe shifted"] for r in probes]).tolist()}
    return out


def frontier(points):
    """The points (flops, error) that no cheaper point beats: sorted by flops, each below all before it."""
    best, out = math.inf, []
    for f, e in sorted(points):
        if e < best:
            out.append((f, e))
            best = e
    return out


def compute_fits(results):
    """Per seed and for the mean over seeds: the frontier of held-out-concept error against FLOPs and
    its log-log fit (slope, intercept, R^2), over the contrastive runs."""
    clip = [r for r in results if r["kind"] == "clip"]
    errors = {}                                         # (flops, width, steps) -> {seed: error}
    for r in clip:
        errors.setdefault((r["flops"], r["width"], r["steps"]), {})[r["seed"]] = 1 - r["scores"]["held-out concepts"]
    seeds = sorted({r["seed"] for r in clip})
    groups = {seed: [(k[0], e[seed]) for k, e in errors.items() if seed in e] for seed in seeds}
    groups["mean"] = [(k[0], float(np.mean(list(e.values())))) for k, e in errors.items()]
    fits = {}
    for name, points in groups.items():
        pts = frontier(points)
        if len(pts) >= 2:
            slope, intercept, r2 = fit_line(np.log10([p[0] for p in pts]), np.log10([p[1] for p in pts]))
        else:                                           # no costlier run did better than the cheapest
            slope, intercept, r2 = 0.0, float(np.log10(pts[0][1])), None
        fits[name] = {"frontier": pts, "slope": slope, "intercept": intercept, "r2": r2}
    return fits


def by_seed(results, kind, width, steps, metric):
    return np.array([r["scores"][metric] for r in sorted(results, key=lambda r: r["seed"])
                     if r["kind"] == kind and r["width"] == width and r["steps"] == steps and metric in r["scores"]])


def claims(results, n_id, n_shift):
    out = []

    def add(name, paper_says, a_name, a, b_name, b, a_wins=True, note=""):
        if len(a) and len(a) == len(b):                 # a value for every seed on both sides
            out.append(paper.judged(name, paper_says, a_name, a, b_name, b, a_wins, note))

    er = robustness(results, n_id, n_shift)
    if er:
        fit = "; ".join(f"seed {s}: logit(shifted) = {e['slope']:.2f} logit(in-dist.) {e['intercept']:+.2f}, "
                        f"R^2 {e['r2']:.2f}" for s, e in er.items())
        add("zero-shot CLIP is effectively robust", "zero-shot CLIP models sit above the line that models trained "
            "on the in-distribution labels follow, closing up to 75% of the gap under shift (Figures 13-14)",
            "zero-shot CLIP, mean distance above the supervised line (logits)", [np.mean(e["clip"]) for e in er.values()],
            "supervised models, the same (0 by the fit)", [e["supervised residual"] for e in er.values()],
            note=f"every width and length; {fit}")
        if all(e["probe"] for e in er.values()):
            add("zero-shot is more robust than a probe on its features", "adapting CLIP's features to the "
                "in-distribution labels (a linear probe) brings it back toward the supervised line (Figure 14)",
                "zero-shot CLIP at width 96, distance above the line", [np.mean(e["clip base width"]) for e in er.values()],
                "linear probe on the same features, the same", [np.mean(e["probe"]) for e in er.values()])
    fits = compute_fits(results)
    per_seed = [f for k, f in fits.items() if k != "mean"]
    if per_seed:
        m = fits["mean"]
        flat = all(len(f["frontier"]) == 1 for f in per_seed)
        add("zero-shot error falls with compute", "zero-shot error falls as a power law in training compute, "
            "over 44x of it (Figure 9)", "frontier slope of log error on log FLOPs, negated",
            [-f["slope"] for f in per_seed],
            "no change with compute", [0.0] * len(per_seed),
            note="no run beat the cheapest one" if flat else
            f"mean over seeds: error = {10 ** m['intercept']:.3g} x FLOPs^{m['slope']:.4f}, R^2 {m['r2']:.2f} over "
            f"{len(m['frontier'])} frontier points spanning {m['frontier'][-1][0] / m['frontier'][0][0]:.0f}x of compute")
        if flat:                                        # a slope of 0 against 0 would read "within noise"
            out[-1]["verdict"] = "does not hold" + (" (1 seed)" if len(per_seed) < 2 else "")
    longest = max((r["steps"] for r in results if r["kind"] == "clip" and r["width"] == BASE_WIDTH), default=None)
    for test in ("held-out concepts", "OpenMoji, seen concepts"):
        get = lambda prompt: by_seed(results, "clip", BASE_WIDTH, longest, f"{test}, {prompt}")
        add(f"prompt engineering, {test}", "a prompt template adds 1.3 points over the bare label (Figure 4)",
            "one template", get("one template"), "bare name", get("bare name"))
        add(f"prompt ensembling, {test}", "an ensemble of prompts adds 3.5 points more (Figure 4)",
            "ensemble of 8 templates unlike the captions", get("ensemble"), "one template", get("one template"))
    last = lambda kind: max((r["steps"] for r in results if r["kind"] == kind), default=None)
    bow, bag = last("bow"), last("bag")
    figure = "zero-shot top-1 on the held-out concepts, width 96; the curves in emoji_contrastive_vs_bow.png"
    if bow and bag:
        add("contrastive beats predictive", "at equal compute, contrasting a bag-of-words encoding of the caption "
            "with the image reaches a zero-shot accuracy about 4x sooner than predicting the caption's bag of words "
            "(Figure 2)", f"contrastive, bag-of-words text encoder, {bag} steps",
            by_seed(results, "bag", BASE_WIDTH, bag, "held-out concepts"),
            f"bag-of-words prediction, {bow} steps (the same FLOPs)",
            by_seed(results, "bow", BASE_WIDTH, bow, "held-out concepts"), note=figure)
    if bow and longest:
        add("contrastive beats predictive, with a text transformer", "as above, with miniclip's text transformer in "
            "the contrastive arm (the paper's CLIP; Figure 2 itself has the bag of words)",
            f"contrastive, text transformer, {longest} steps",
            by_seed(results, "clip", BASE_WIDTH, longest, "held-out concepts"),
            f"bag-of-words prediction, {bow} steps (the same FLOPs)",
            by_seed(results, "bow", BASE_WIDTH, bow, "held-out concepts"), note=figure)
    return out, er, fits


# -----------------------------------------------------------------------------
# Figures


def figures(results, er, fits, n_id, n_shift, folder):
    writer = paper.figure_writer(folder, "emoji_paper.json")
    if writer is None:
        return []
    plt, save, written = writer
    import matplotlib.ticker

    # Effective robustness, the paper's Figure 13 in form: both axes logit-scaled, ticks in percent.
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    sets = [("supervised", "in-distribution", "shifted", "tab:gray", "s", "supervised (image tower + head)"),
            ("clip", "in-distribution", "shifted", "tab:red", "o", "zero-shot CLIP"),
            ("clip", "probe in-distribution", "probe shifted", "tab:blue", "^", "linear probe on CLIP's features")]
    xs, ys = [], []
    for kind, x_key, y_key, color, marker, label in sets:
        rs = [r for r in results if r["kind"] == kind and x_key in r["scores"]]
        if rs:
            x, y = logit([r["scores"][x_key] for r in rs], n_id), logit([r["scores"][y_key] for r in rs], n_shift)
            ax.scatter(x, y, c=color, marker=marker, s=[12 + r["width"] / 3 for r in rs], alpha=0.75, label=label)
            xs += list(x)
            ys += list(y)
    if not xs:
        plt.close(fig)
        return written
    lo, hi = min(xs) - 0.4, max(xs) + 0.4
    if er:
        a, b = np.mean([e["slope"] for e in er.values()]), np.mean([e["intercept"] for e in er.values()])
        ax.plot([lo, hi], [a * lo + b, a * hi + b], color="tab:gray", ls="--", label="fit to the supervised models")
    if lo < max(ys) + 0.4:                              # y = x crosses the plot
        ax.plot([lo, hi], [lo, hi], color="black", ls=":", lw=0.8, label="no loss under shift (y = x)")
    ticks = np.array([0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    for axis, (low, high) in ((ax.xaxis, (lo, hi)), (ax.yaxis, (min(ys) - 0.4, max(ys) + 0.4))):
        where = np.log(ticks / (1 - ticks))
        keep = (where >= low) & (where <= high)
        axis.set_ticks(where[keep], [f"{t:.1%}" if t < 0.01 else f"{t:.0%}" for t in ticks[keep]])
    ax.set(xlim=(lo, hi), ylim=(min(ys) - 0.4, max(ys) + 0.4))
    ax.set(xlabel="Noto + Twemoji, unused skin tones (top-1, logit axis)", ylabel="OpenMoji, the same emoji (logit axis)",
           title="Effective robustness: size = width")
    ax.legend(fontsize=7, loc="upper left")
    save(fig, "emoji_robustness.png")

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    clip = [r for r in results if r["kind"] == "clip"]
    for w in WIDTHS:
        rs = sorted((r for r in clip if r["width"] == w), key=lambda r: r["steps"])
        steps = sorted({r["steps"] for r in rs})
        if steps:
            f = [next(r["flops"] for r in rs if r["steps"] == s) for s in steps]
            e = [np.mean([1 - r["scores"]["held-out concepts"] for r in rs if r["steps"] == s]) for s in steps]
            ax.plot(f, e, marker="o", label=f"width {w}")
    if "mean" in fits and fits["mean"]["r2"] is not None:
        m = fits["mean"]
        xs = np.array([m["frontier"][0][0], m["frontier"][-1][0]])
        ax.plot(xs, 10 ** m["intercept"] * xs ** m["slope"], "k--",
                label=f"frontier fit: slope {m['slope']:.3f}, R$^2$ {m['r2']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel="zero-shot error, held-out concepts",
           title="Error against compute (mean over seeds)")
    low, high = ax.get_ylim()                           # a narrow range: ticks in plain percent
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(np.linspace(low, high, 6)[1:-1], [f"{t:.1%}" for t in np.linspace(low, high, 6)[1:-1]])
    ax.legend(fontsize=7)
    save(fig, "emoji_compute.png")

    longest = max((r["steps"] for r in clip if r["width"] == BASE_WIDTH), default=None)
    base = [r for r in clip if r["width"] == BASE_WIDTH and r["steps"] == longest]
    if base and any(f"held-out concepts, {p}" in r["scores"] for r in base for p in PROMPTS):
        fig, ax = plt.subplots(figsize=(5.6, 3.6))
        for k, test in enumerate(("held-out concepts", "OpenMoji, seen concepts")):
            for j, (prompt, color) in enumerate(zip(PROMPTS, ("tab:gray", "tab:blue", "tab:green"))):
                v = np.array([r["scores"][f"{test}, {prompt}"] for r in base])
                ax.bar(4 * k + j, v.mean(), yerr=v.std() if len(v) > 1 else None, capsize=3, color=color,
                       label=prompt if k == 0 else None)
        ax.set_xticks([1, 5], ["held-out concepts (549-way)", "OpenMoji, seen (2,945-way)"])
        ax.set(ylabel="zero-shot top-1", title=f"Prompts, width {BASE_WIDTH}, {longest} steps")
        ax.legend(fontsize=8)
        save(fig, "emoji_prompts.png")

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for kind, label in (("bag", "contrastive, bag-of-words encoder"), ("clip", "contrastive, text transformer"),
                        ("bow", "bag-of-words prediction")):
        rs = [r for r in results if r["kind"] == kind and r["width"] == BASE_WIDTH]
        steps = sorted({r["steps"] for r in rs})
        if steps:
            v = [np.array([r["scores"]["held-out concepts"] for r in rs if r["steps"] == s]) for s in steps]
            ax.errorbar([next(r["flops"] for r in rs if r["steps"] == s) for s in steps], [x.mean() for x in v],
                        yerr=[x.std() for x in v], marker="o", capsize=3, label=label)
    ax.set(xscale="log", xlabel="training compute (FLOPs)", ylabel="zero-shot top-1, held-out concepts",
           title="Contrastive vs predictive, width 96")
    ax.legend(fontsize=8)
    save(fig, "emoji_contrastive_vs_bow.png")
    return written


# -----------------------------------------------------------------------------


def save_results(path, saved):
    bpe.write_atomic(path, json.dumps(saved, indent=1))


def report(saved, folder):
    """The claims, their table and the figures, from the saved runs alone."""
    results, n_id, n_shift = saved["runs"], saved["sizes"]["in-distribution"], saved["sizes"]["shifted"]
    claim_list, er, fits = claims(results, n_id, n_shift)
    saved.update(claims=claim_list, robustness=er, compute=fits)
    save_results(os.path.join(folder, "emoji_paper.json"), saved)
    print(paper.markdown(claim_list))
    for path in figures(results, er, fits, n_id, n_shift, folder):
        print("wrote", path)
    return claim_list


def finished_runs(todo, data_dir, work, n_jobs):
    """Each run's result as it finishes: with one job at a time in this process, else in worker processes."""
    if n_jobs == 1:
        yield from (run(job, data_dir, work) for job in todo)
        return
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")   # each process: one core
    with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(run_in_worker, (job, data_dir, work)) for job in todo]):
            yield future.result()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--data", default=os.path.join("data", "emoji"),
                   help="the folder data.py emoji wrote (default data/emoji)")
    p.add_argument("--quick", action="store_true", help="1 seed and 2 lengths (8 minutes on 2 cores)")
    p.add_argument("--out", default=os.path.join(HERE, "emoji"), help="folder for emoji_paper.json and the figures")
    p.add_argument("--work", default=os.path.join("checkpoints", "emoji_paper"),
                   help="folder for the decoded images and the tokenizer, reused by later runs")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one process each (default 2; 1: in this process)")
    p.add_argument("--from-results", action="store_true",
                   help="train nothing: the claims and figures from --out's emoji_paper.json")
    args = p.parse_args(argv)
    mc.cpu_settings()
    path = os.path.join(args.out, "emoji_paper.json")
    if args.from_results:
        with open(path) as f:
            report(json.load(f), args.out)
        return
    if not os.path.exists(os.path.join(args.data, "train.csv")):
        raise SystemExit(f"{args.data}: no train.csv; prepare the data first: python data.py emoji *.tgz --out {args.data}")
    scale = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    world = WORLD[args.data] = build_world(args.data, args.work)    # decodes and learns once, for the workers too
    saved = {"scale": dataclasses.asdict(scale), "runs": []}
    if os.path.exists(path):
        with open(path) as f:
            saved["runs"] = json.load(f)["runs"]
    saved["sizes"] = {name: len(t[1]) for name, t in world.tests.items()}
    saved["classes"] = len(world.class_names)
    done = {job_key(r) for r in saved["runs"]}
    todo = [j for j in jobs(scale, equal_compute_steps(world)) if job_key(j) not in done]
    print(f"{len(todo)} runs to go ({len(done)} done before), {args.jobs} at a time; "
          f"{len(world.captioned):,} training pairs, {saved['classes']:,} classes, "
          f"{saved['sizes']['in-distribution']} in-distribution and {saved['sizes']['shifted']} shifted test images",
          flush=True)
    for r in finished_runs(todo, args.data, args.work, args.jobs):
        saved["runs"].append(r)
        save_results(path, saved)
        scores = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items() if "," not in k)
        print(f"[{len(saved['runs'])} after {time.time() - t0:.0f}s] {job_key(r)}: {scores} ({r['seconds']:.0f}s)", flush=True)
    saved["runs"].sort(key=lambda r: (r["seed"], r["kind"], r["width"], r["steps"]))
    report(saved, args.out)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
