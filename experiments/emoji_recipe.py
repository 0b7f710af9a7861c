"""
The emoji recipe over seeds: CLIP trained from scratch on Noto and Twemoji art, tested on emoji it
never saw and on OpenMoji's style, which training never sees; against the tiny model on the same data.

    python data.py emoji *.tgz --out data/emoji                 first, once (README, "Real images")
    python experiments/emoji_recipe.py --data data/emoji        3 seeds of both models: about an hour on 2 cores
    python experiments/emoji_recipe.py --data data/emoji --seeds 0     one seed
    python experiments/emoji_recipe.py --from-results                  the table and the figure again, from results.json

Each run is `python train.py` and then `python zeroshot.py --test` on the evaluation CSVs, each in its
own process, as a user would run them. A run's scores are written to experiments/emoji/results.json
when it finishes and a rerun skips what is there; a run cut short resumes from its checkpoint. So the
grid can be spread over several sittings.

The recipe was chosen on val.csv (validation concepts, in the training vendors) alone. The held-out
concepts and OpenMoji are scored once per finished run, for the numbers reported.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = {"validation concepts": "val.csv", "held-out concepts": "test_concepts.csv",
         "OpenMoji, seen concepts": "test_vendor_seen.csv", "OpenMoji, held-out concepts": "test_vendor_unseen.csv"}
TEMPLATES = ["an emoji of {}", "{}"]
# The two models as train.py options: "tiny" is train.py's tiny preset with its defaults, what a user
# tries first; "recipe" is what the validation concepts chose (README, "Real images").
ARMS = {
    "recipe": ["--preset", "emoji", "--steps", "6000"],
    "tiny": ["--preset", "tiny"],
}


def train_command(arm, seed, data_dir, ck):
    """train.py's arguments for one run, or --resume's when a checkpoint of it is already there."""
    if os.path.exists(ck):
        return ["--resume", ck]
    return ["--data", os.path.join(data_dir, "train.csv"), "--val", os.path.join(data_dir, "val.csv"),
            "--labels-file", os.path.join(data_dir, "labels.txt"), *[a for t in TEMPLATES for a in ("--template", t)],
            *ARMS[arm], "--seed", str(seed), "--out", ck]


def run(arm, seed, data_dir, out_dir):
    """Train one arm on one seed, then score it: {arm, seed, seconds, tests: {test name: metrics}}."""
    ck = os.path.join(out_dir, f"{arm}-seed{seed}.npz")
    t0 = time.time()
    with open(os.path.join(out_dir, f"{arm}-seed{seed}.log"), "a") as log:
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *train_command(arm, seed, data_dir, ck)],
                       stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    seconds = time.time() - t0
    scored = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), "--checkpoint", ck, "--json",
                             *[a for name in TESTS.values() for a in ("--test", os.path.join(data_dir, name))]],
                            capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return {"arm": arm, "seed": seed, "seconds": seconds, "tests": dict(zip(TESTS, map(json.loads, scored.splitlines())))}


METRICS = {"zeroshot_top1": "top-1", "zeroshot_top5": "top-5", "i2t_r1": "image->text R@1", "t2i_r1": "text->image R@1"}


def table(results):
    """A Markdown table: each arm and test, each metric's mean over seeds with its range."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    lines = ["| model | evaluated on | images, labels | " + " | ".join(METRICS.values()) + " |",
             "|---" * (3 + len(METRICS)) + "|"]
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        for test in TESTS:
            first = runs[0]["tests"][test]
            cells = []
            for key in METRICS:
                v = 100 * np.array([r["tests"][test][key] for r in runs])
                cells.append(f"{v.mean():.1f}" + (f" ({v.min():.1f}-{v.max():.1f})" if len(v) > 1 else ""))
            lines.append(f"| {arm} ({len(runs)} seed{'s' * (len(runs) > 1)}) | {test} | "
                         f"{first['images']:,}, {first['labels']:,} | " + " | ".join(cells) + " |")
    minutes = {arm: np.mean([r["seconds"] for r in results if r["arm"] == arm]) / 60 for arm in arms}
    lines.append("")
    lines.append("Wall time per run, training and scoring: " + ", ".join(f"{a} {m:.1f} min" for a, m in minutes.items()))
    return "\n".join(lines)


def grid(ck, data_dir, path, n=8, seed=0):
    """
    The README's picture: n held-out emoji in Noto's art (a training vendor) and the same n in
    OpenMoji's (never trained on), each with zeroshot.py's top three among the held-out names, green
    where right. The emoji are a seeded sample of the held-out ones, not picked by result.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    with open(os.path.join(data_dir, "test_vendor_unseen.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    n = min(n, len(rows))
    chosen = [rows[i] for i in sorted(np.random.default_rng(seed).choice(len(rows), n, replace=False))]
    images = [os.path.join(data_dir, r["filepath"].replace("/openmoji/", f"/{vendor}/"))
              for vendor in ("google", "openmoji") for r in chosen]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), "--checkpoint", ck, "--json", "--topk", "3",
                          "--labels-file", os.path.join(data_dir, "labels_test.txt"), *images],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    predictions = [json.loads(line)["predictions"] for line in out.splitlines()]
    fig, axes = plt.subplots(2, n, figsize=(2.1 * n, 5.6), squeeze=False)
    for ax, image, truth, guesses in zip(axes.flat, images, [r["label"] for r in chosen] * 2, predictions):
        ax.imshow(Image.open(image))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(textwrap.fill(truth, 24), fontsize=7.5)
        for k, g in enumerate(guesses):
            ax.text(0.5, -0.08 - 0.13 * k, textwrap.shorten(f"{g['label']} {g['prob']:.0%}", 30), fontsize=7,
                    ha="center", va="top", transform=ax.transAxes, color="green" if g["label"] == truth else "firebrick")
    axes[0, 0].set_ylabel("Noto (trained style)", fontsize=9)
    axes[1, 0].set_ylabel("OpenMoji (never seen)", fontsize=9)
    fig.suptitle("Held-out emoji, concepts never trained on: the name above, the model's top 3 of "
                 f"{sum(1 for _ in open(os.path.join(data_dir, 'labels_test.txt'), encoding='utf-8'))} held-out names below",
                 fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.86, bottom=0.08, hspace=0.75, wspace=0.15)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path, value):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--data", default=os.path.join(ROOT, "data", "emoji"), help="the folder data.py emoji wrote")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--checkpoints", default=os.path.join(ROOT, "checkpoints", "emoji"), help="where the runs are saved")
    p.add_argument("--results", default=os.path.join(HERE, "emoji"), help="results.json, table.md and the figure")
    p.add_argument("--from-results", action="store_true", help="only rebuild the table and the figure")
    args = p.parse_args(argv)
    os.makedirs(args.results, exist_ok=True)
    os.makedirs(args.checkpoints, exist_ok=True)
    path = os.path.join(args.results, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else []
    if not args.from_results:
        if not os.path.isfile(os.path.join(args.data, "splits.json")):
            sys.exit(f"error: {args.data}: no emoji data set here (python data.py emoji ... --out {args.data})")
        for seed in args.seeds:
            for arm in args.arms:
                if any(r["arm"] == arm and r["seed"] == seed for r in results):
                    continue
                r = run(arm, seed, args.data, args.checkpoints)
                results.append(r)
                write_json(path, results)
                print(f"{arm} seed {seed}: {r['seconds']:.0f}s; " + ", ".join(
                    f"{k} {v['zeroshot_top1']:.1%}" for k, v in r["tests"].items()), flush=True)
    if not results:
        sys.exit(f"error: {path}: no results yet")
    text = table(sorted(results, key=lambda r: (list(ARMS).index(r["arm"]), r["seed"])))
    with open(os.path.join(args.results, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    first = min((r["seed"] for r in results if r["arm"] == "recipe"), default=None)
    ck = os.path.join(args.checkpoints, f"recipe-seed{first}.npz")
    if first is not None and os.path.exists(ck):
        print(f"figure: {grid(ck, args.data, os.path.join(args.results, 'heldout_grid.png'))}")


if __name__ == "__main__":
    main()
