"""
End to end on a folder of photos, as a user meets it: `zeroshot.py --images-from DIR --weights FOLDER
--labels ... --json` against a transformers script doing the same work (load the model, decode,
preprocess, encode, classify, print one JSON line per image), each a whole process, in alternating rounds.

    python benchmarks/folder.py                   500 JPEGs of mixed sizes, ViT-B/32 and the tiny model, 3 rounds
    python benchmarks/folder.py --images 100 --rounds 1 --models tiny --workers 0,2

The photos are made here (smooth random fields with grain, 400 to 1,600 pixels on the long side, JPEG
quality 90), and both models are random-weight miniclip checkpoints exported by weights.py with
CLIP's vocabulary, so both sides load one Hugging Face folder. transformers runs as a user gets it:
CLIPModel.from_pretrained with its default attention, CLIPProcessor, torch's threads = the cores.
"""
import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402

LABELS = "a dog,a cat,a car,a beach,a mountain,a city street,a bowl of food,a person,a flower,a boat"
BATCH = 32

# The transformers side: the same work as zeroshot.py's classification, in a script a user would write.
TRANSFORMERS = """
import json, os, sys, torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor
folder, images, labels = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
torch.set_num_threads(os.cpu_count())
model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
paths = sorted(os.path.join(images, n) for n in os.listdir(images))
with torch.no_grad():
    text = model.get_text_features(**processor(text=[f"a photo of a {l}." for l in labels], return_tensors="pt",
                                               padding=True)).pooler_output   # transformers 5: projected
    text = text / text.norm(dim=-1, keepdim=True)
    for i in range(0, len(paths), %d):
        batch = paths[i:i + %d]
        pixels = processor(images=[Image.open(p).convert("RGB") for p in batch], return_tensors="pt")
        img = model.get_image_features(**pixels).pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        probs = (model.logit_scale.exp() * img @ text.T).softmax(-1)
        for p, pr in zip(batch, probs.tolist()):
            order = sorted(range(len(labels)), key=lambda j: -pr[j])
            print(json.dumps({"image": p, "predictions": [{"label": labels[j], "prob": pr[j]} for j in order]}))
""" % (BATCH, BATCH)


def write_photos(folder, n, seed=0):
    """n JPEG photos of mixed sizes: a smooth random field (upsampled noise) with grain, as a camera's."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    for i in range(n):
        long = int(rng.integers(400, 1601))
        w, h = (long, long * 3 // 4) if rng.random() < 0.6 else (long * 3 // 4, long) if rng.random() < 0.5 else \
            (long, long * 9 // 16)
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        grain = rng.normal(0, 12, (h, w, 3))
        pixels = np.clip(np.asarray(small, np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"photo{i:04d}.jpg"), quality=90)


def clip_tokenizer():
    """CLIP's 49,408-token BPE, from the copy open_clip ships (pip install open-clip-torch)."""
    import importlib.util
    import bpe
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        sys.exit("benchmarks/folder.py needs CLIP's vocabulary from open_clip: pip install --no-deps open-clip-torch==3.3.0")
    return bpe.load(os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz"))


def model_folder(name, folder):
    """A random-weight model of the named shape, as weights.py exports it (Hugging Face's layout)."""
    import weights
    cfg = mc.PRESETS[name]
    tok = clip_tokenizer() if cfg.vocab_size == 49408 else None
    if tok is None:                                     # the tiny model: a vocabulary learned from a few captions
        import bpe
        import data
        tok = bpe.learn([t.format(label) for t in data.TEMPLATES for label in LABELS.split(",")], cfg.vocab_size)
        cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    ckpt = folder + ".npz"
    weights.save_weights(ckpt, mc.init_params(cfg, seed=0), cfg, meta={"tokenizer": tok.to_list()})
    weights.export(ckpt, folder)
    return folder


def wall(cmd):
    """Seconds for the whole process, stdout discarded (it is checked once per side: one line per image)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{cmd[:3]} failed: {p.stderr[-2000:]}")
    return seconds, p.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", default="ViT-B/32,tiny")
    p.add_argument("--workers", help="zeroshot.py --workers, or a comma-separated list of values each measured as a "
                                      "side of its own (default: zeroshot.py's)")
    p.add_argument("--zeroshot", action="append",
                   help="a zeroshot.py to run, repeatable: another checkout's, for a before/after in one run "
                        "(default: this checkout's)")
    args = p.parse_args()
    import platform
    import torch
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}, "
          f"torch {torch.__version__}; {args.images} photos, {args.rounds} alternating rounds\n")
    programs = args.zeroshot or [os.path.join(ROOT, "zeroshot.py")]
    counts = args.workers.split(",") if args.workers else [None]
    variants = [(z, w) for z in programs for w in counts]
    names = [" ".join(["zeroshot.py", *([f"({os.path.dirname(os.path.abspath(z))})"] if len(programs) > 1 else []),
                       *([f"--workers {w}"] if w is not None else [])]) for z, w in variants]
    print("| model | program | images/s (median s) | time ratio to transformers: median (each round) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        photos = os.path.join(tmp, "photos")
        write_photos(photos, args.images)
        for model in args.models.split(","):
            folder = model_folder(model, os.path.join(tmp, model.replace("/", "-")))
            sides = {name: [sys.executable, z, "--images-from", photos, "--weights", folder, "--labels", LABELS, "--json",
                            "--batch-size", str(BATCH), *(["--workers", w] if w is not None else [])]
                     for name, (z, w) in zip(names, variants)}
            sides["transformers"] = [sys.executable, "-c", TRANSFORMERS, folder, photos, LABELS]
            times = {name: [] for name in sides}
            for r in range(args.rounds):
                for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    seconds, out = wall(sides[name])
                    assert len(out.splitlines()) == args.images, f"{name}: {len(out.splitlines())} answers"
                    times[name].append(seconds)
            for name, ts in times.items():
                ratios = [a / b for a, b in zip(ts, times["transformers"])]
                shown = "" if name == "transformers" else \
                    f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})"
                print(f"| {model} | {name} | {args.images / statistics.median(ts):.1f} ({statistics.median(ts):.1f} s) "
                      f"| {shown} |", flush=True)

if __name__ == "__main__":
    main()
