"""
The emoji recipe over seeds: CLIP trained from scratch on Noto and Twemoji art, tested on emoji it
never saw and on OpenMoji's style, which training never sees; against the tiny model on the same data.

    python data.py emoji *.tgz --out data/emoji                 first, once (README, "Real images")
    python experiments/emoji_recipe.py --data data/emoji        3 seeds of both models: about an hour on 2 cores
    python experiments/emoji_recipe.py --data data/emoji --seeds 0     one seed
    python experiments/emoji_recipe.py --data data/emoji --arms recipe+fluent    with Fluent as a third artist
    python experiments/emoji_recipe.py --data data/emoji --arms recipe+bag       with a bag-of-words text encoder
    python experiments/emoji_recipe.py --from-results                  the table and the figure again, from results.json
    python experiments/emoji_recipe.py --breakdown checkpoints/emoji/recipe-seed0.npz     where its errors are

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
import re
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402
import data                                             # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = {"validation concepts": "val.csv", "held-out concepts": "test_concepts.csv",
         "OpenMoji, seen concepts": "test_vendor_seen.csv", "OpenMoji, held-out concepts": "test_vendor_unseen.csv"}
# Each model as its training CSV and train.py's options: "tiny" is train.py's tiny preset with its
# defaults, what a user tries first; "recipe" is what the validation concepts chose (README, "Real
# images"); "recipe+fluent" is the recipe with a third training artist, for a data set prepared with
# fluentui-emoji's tarball too (asked for by --arms, as it needs that); "recipe+bag" is the recipe with
# a bag-of-words text encoder (--text-layers 0; asked for by --arms).
ARMS = {
    "recipe": ("train.csv", ["--preset", "emoji", "--steps", "6000"]),
    "tiny": ("train.csv", ["--preset", "tiny"]),
    "recipe+fluent": ("train_with_fluent.csv", ["--preset", "emoji", "--steps", "6000"]),
    "recipe+bag": ("train.csv", ["--preset", "emoji", "--steps", "6000", "--text-layers", "0"]),
}


def train_command(arm, seed, data_dir, ck):
    """train.py's arguments for one run, or --resume's when a checkpoint of it is already there."""
    if os.path.exists(ck):
        return ["--resume", ck]
    train_csv, options = ARMS[arm]
    return ["--data", os.path.join(data_dir, train_csv), "--val", os.path.join(data_dir, "val.csv"),
            "--labels-file", os.path.join(data_dir, "labels.txt"), *[a for t in data.EMOJI_TEMPLATES for a in ("--template", t)],
            *options, "--seed", str(seed), "--out", ck]


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


def grid(ck, data_dir, path, right=3, wrong=5, seed=0):
    """
    The README's picture: held-out emoji in Noto's art (a training style) above the same emoji in
    OpenMoji's (never trained on), each with zeroshot.py's top three among the 549 held-out names,
    green where right. zeroshot.py classifies every held-out emoji first; then `right` of them are
    drawn at random from those it named right in Noto's art and `wrong` from the others, so the
    picture shows both kinds, and says how many of each there are.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    with open(os.path.join(data_dir, "test_vendor_unseen.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    images = [os.path.join(data_dir, r["filepath"].replace("/openmoji/", f"/{vendor}/"))
              for vendor in ("google", "openmoji") for r in rows]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "zeroshot.py"), "--checkpoint", ck, "--json", "--topk", "3",
                          "--labels-file", os.path.join(data_dir, "labels_test.txt"), *images],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    guesses = [json.loads(line)["predictions"] for line in out.splitlines()]            # Noto's, then OpenMoji's
    hit = [g[0]["label"] == r["label"] for g, r in zip(guesses, rows)]
    rng = np.random.default_rng(seed)
    pick = lambda pool, k: list(rng.choice(pool, min(k, len(pool)), replace=False))
    chosen = sorted(pick([i for i, h in enumerate(hit) if h], right) + pick([i for i, h in enumerate(hit) if not h], wrong))
    fig, axes = plt.subplots(2, len(chosen), figsize=(2.1 * len(chosen), 6.2), squeeze=False)
    for col, i in enumerate(chosen):
        for row, k in enumerate((i, len(rows) + i)):
            ax = axes[row, col]
            ax.imshow(Image.open(images[k]))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(textwrap.fill(rows[i]["label"], 24), fontsize=7.5)
            for n, g in enumerate(guesses[k]):
                ax.text(0.5, -0.06 - 0.12 * n, textwrap.shorten(f"{g['prob']:.0%} {g['label']}", 32, placeholder="..."),
                        fontsize=6.5, ha="center", va="top", transform=ax.transAxes,
                        color="green" if g["label"] == rows[i]["label"] else "firebrick")
    axes[0, 0].set_ylabel("Noto (a trained style)", fontsize=9)
    axes[1, 0].set_ylabel("OpenMoji (never seen)", fontsize=9)
    fig.suptitle(f"Emoji of held-out concepts, top 3 of {len(rows)} held-out names. Noto: {sum(hit)} of {len(rows)} "
                 f"right; shown, {min(right, sum(hit))} drawn from those and {min(wrong, len(rows) - sum(hit))} "
                 f"from the rest. OpenMoji: {sum(g[0]['label'] == r['label'] for g, r in zip(guesses[len(rows):], rows))} right",
                 fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.86, bottom=0.11, hspace=0.85, wspace=0.15)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def words(text):
    """The lowercase words of a name or a caption: "flag: Côte d'Ivoire" -> {'flag', 'côte', 'd', 'ivoire'}."""
    return set(re.findall(r"[^\W\d_]+", text.lower()))


def breakdown(ck, data_dir, names=("val.csv", "test_concepts.csv")):
    """
    What a checkpoint gets right on held-out concepts, and where the rest goes, as Markdown: zero-shot
    top-1 among each CSV's own labels (as `zeroshot.py --test` scores it), split by whether every word
    of the right name occurs in some training caption, and top-1 counting any skin tone or gender
    form of the right concept as right (data.emoji_concept).
    """
    import zeroshot
    params, cfg, tok, _, templates, _ = zeroshot.load_model(checkpoint=ck)
    with open(os.path.join(data_dir, "train.csv"), newline="", encoding="utf-8") as f:
        seen = set().union(*(words(r["title"]) for r in csv.DictReader(f)))
    lines = ["| evaluated on | images, labels | top-1 | names of seen words: images, top-1 | names with an "
             "unseen word: images, top-1 | right concept, any form |", "|---" * 6 + "|"]
    for name in names:
        pairs = data.read_csv(os.path.join(data_dir, name), "filepath", "title", ",", False, "label", flags=False)
        concept = {label: data.emoji_concept(os.path.basename(pairs.locators[i])[:-len(".png")])
                   for i, label in enumerate(pairs.labels)}            # label id -> its code's concept
        loader = data.Loader(cfg.image_size, 0)
        try:
            img = zeroshot.embed_pairs(params, cfg, pairs, loader)
        finally:
            loader.close()
        scores = img @ mc.to_numpy(zeroshot.classifier(params, cfg, tok, pairs.label_names, templates)).T
        hit = zeroshot.label_ranks(scores, pairs.labels) == 0                  # as --test counts a top-1 hit
        all_seen = np.array([words(pairs.label_names[label]) <= seen for label in pairs.labels])
        guess = scores.argmax(axis=1)
        same_concept = np.array([concept[g] == concept[label] for g, label in zip(guess, pairs.labels)])
        share = lambda hits: f"{hits.mean():.1%}" if len(hits) else "-"
        lines.append(f"| {name} | {len(hit):,}, {len(pairs.label_names):,} | {share(hit)} | {all_seen.sum():,}, "
                     f"{share(hit[all_seen])} | {(~all_seen).sum():,}, {share(hit[~all_seen])} | {share(same_concept)} |")
    return "\n".join(lines)


def write_json(path, value):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--data", default=os.path.join(ROOT, "data", "emoji"), help="the folder data.py emoji wrote")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["recipe", "tiny"], choices=list(ARMS))
    p.add_argument("--checkpoints", default=os.path.join(ROOT, "checkpoints", "emoji"), help="where the runs are saved")
    p.add_argument("--results", default=os.path.join(HERE, "emoji"), help="results.json, table.md and the figure")
    p.add_argument("--from-results", action="store_true", help="only rebuild the table and the figure")
    p.add_argument("--breakdown", metavar="CHECKPOINT",
                   help="only break this checkpoint's top-1 on the validation and held-out concepts down by "
                        "unseen words and by concept")
    args = p.parse_args(argv)
    mc.cpu_settings()
    if not args.from_results and not os.path.isfile(os.path.join(args.data, "splits.json")):
        sys.exit(f"error: {args.data}: no emoji data set here (python data.py emoji ... --out {args.data})")
    if args.breakdown:
        try:
            print(breakdown(args.breakdown, args.data))
        except (data.UserError, ValueError) as e:                   # a missing or unreadable checkpoint
            sys.exit(f"error: {e}")
        return
    for arm in [] if args.from_results else args.arms:
        if not os.path.isfile(os.path.join(args.data, ARMS[arm][0])):
            sys.exit(f"error: {args.data}: no {ARMS[arm][0]}, which the arm {arm} trains on (data.py emoji writes "
                     "train_with_fluent.csv when given fluentui-emoji's tarball too)")
    os.makedirs(args.results, exist_ok=True)
    os.makedirs(args.checkpoints, exist_ok=True)
    path = os.path.join(args.results, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else []
    if not args.from_results:
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
