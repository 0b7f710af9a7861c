"""
The scenes world of experiments/paper.py, harder than train.py --tiny's shapes: one to three objects
side by side, with captions that count ("two red circles"), bind colors to shapes ("a red circle and a blue star") and
relate ("a red circle left of a blue star"). The held-out color-shape pairs of split_pairs never
appear in a training scene. A second rendering style, outlines instead of filled shapes, is used only
for evaluation: the distribution-shift test.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from data import COLORS, LABELS, Pairs, Strings, load_size, object_column, shape_polygon, split_pairs  # noqa: E402


NUMBERS = ("one", "two", "three")
STYLES = ("solid", "outline")


def plural(kind):
    return kind + ("es" if kind.endswith("s") else "s")


def draw_scene(rng, objects, side, style="solid"):
    """
    side x side uint8 RGB: a dark background (a random vertical gradient with noise) and the objects,
    a list of (color, shape), in equal slots from left to right. Each shape is drawn as a mask at 4x
    the size and box-downsampled (anti-aliased edges); "outline" draws its border only.
    """
    big, n = side * 4, len(objects)
    margin = big / 9                        # a random crop of 8/9 of the side never cuts an object
    slot = (big - 2 * margin) / n
    t = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
    image = rng.integers(0, 70, 3) * (1 - t) + rng.integers(0, 70, 3) * t + rng.normal(0, 4, (side, side, 3))
    for i, (color, kind) in enumerate(objects):
        r = slot * rng.uniform(0.32, 0.42)
        cx = margin + slot * (i + 0.5) + rng.uniform(-0.08, 0.08) * slot
        cy = big / 2 + rng.uniform(-1, 1) * (big / 2 - margin - r)
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        pen = {"fill": 255} if style == "solid" else {"outline": 255, "width": max(2, int(r * 0.22))}
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], **pen)
        else:
            draw.polygon(shape_polygon(kind, cx, cy, r), **pen)
        alpha = np.asarray(mask.resize((side, side), Image.BOX), dtype=np.float32)[:, :, None] / 255
        fill = np.clip(np.array(COLORS[color]) + rng.integers(-15, 16, 3), 0, 255)
        image = image * (1 - alpha) + fill * alpha
    return np.clip(image, 0, 255).astype(np.uint8)


def scene_caption(rng, objects):
    """A caption for a count scene (n copies of one object) or a pair scene (two different objects)."""
    (c1, s1), n = objects[0], len(objects)
    if n == 1 or objects[1] == objects[0]:
        what = f"a {c1} {s1}" if n == 1 else f"{NUMBERS[n - 1]} {c1} {plural(s1)}"
        return ("a photo of {}", "{}", "a picture of {}", "there are {}" if n > 1 else "there is {}")[
            rng.integers(4)].format(what)
    c2, s2 = objects[1]
    return (f"a {c1} {s1} and a {c2} {s2}", f"a {c2} {s2} and a {c1} {s1}", f"a {c1} {s1} left of a {c2} {s2}",
            f"a {c2} {s2} right of a {c1} {s1}", f"a photo of a {c1} {s1} next to a {c2} {s2}")[rng.integers(5)]


def random_scene(rng, pairs):
    """A count scene (1 to 3 copies of one pair) or a pair scene (two different pairs), half and half."""
    if rng.random() < 0.5:
        return [pairs[rng.integers(len(pairs))]] * int(rng.integers(1, 4))
    i, j = rng.choice(len(pairs), 2, replace=False)
    return [pairs[i], pairs[j]]


def scenes_world(n_train, seed, image_size):
    """
    Training pairs of the scenes world, held in memory, and the held-out color-shape pairs (never in a
    training scene). keys are the scenes' object lists, for retrieval's notion of a match.
    """
    train_pairs, held = split_pairs(seed)
    side = load_size(image_size)
    rng = np.random.default_rng([seed, 2])
    images = np.empty((n_train, side, side, 3), dtype=np.uint8)
    captions, keys = [], []
    for i in range(n_train):
        objects = random_scene(rng, train_pairs)
        images[i] = draw_scene(rng, objects, side)
        captions.append(scene_caption(rng, objects))
        keys.append(tuple(objects))
    return Pairs(Strings.of(captions), np.arange(n_train), object_column(keys), images=images,
                 source="generated scenes"), held


def scene_tests(n, seed, image_size, style, pairs, tasks=("color_shape", "count", "binding", "relation")):
    """
    Multiple-choice tests on fresh scenes of the given color-shape pairs, each a dict with images
    (n, S', S', 3) uint8 (S' = load_size), the candidate captions of each image and the right one's index:
      "color_shape"  one object; candidates: the 48 labels, "{color} {shape}"        (48-way)
      "count"        1-3 copies of one object; candidates: "one/two/three ..."       (3-way)
      "binding"      two objects; the caption against the one with colors swapped    (2-way)
      "relation"     two objects; "A left of B" against "B left of A"                (2-way)
    """
    rng = np.random.default_rng([seed, 3, STYLES.index(style)])
    side = load_size(image_size)
    tests = {}
    for task in tasks:
        images = np.empty((n, side, side, 3), dtype=np.uint8)
        candidates, answers = [], []
        for i in range(n):
            if task in ("color_shape", "count"):
                color, kind = pairs[rng.integers(len(pairs))]
                k = 1 if task == "color_shape" else int(rng.integers(1, 4))
                objects = [(color, kind)] * k
                options = list(LABELS) if task == "color_shape" else \
                    [f"a {color} {kind}"] + [f"{NUMBERS[m]} {color} {plural(kind)}" for m in (1, 2)]
                answer = LABELS.index(f"{color} {kind}") if task == "color_shape" else k - 1
            else:
                while True:                         # two objects that differ in color and in shape
                    (c1, s1), (c2, s2) = (pairs[j] for j in rng.choice(len(pairs), 2, replace=False))
                    if c1 != c2 and s1 != s2:
                        break
                objects = [(c1, s1), (c2, s2)]
                options = ([f"a {c1} {s1} and a {c2} {s2}", f"a {c2} {s1} and a {c1} {s2}"] if task == "binding"
                           else [f"a {c1} {s1} left of a {c2} {s2}", f"a {c2} {s2} left of a {c1} {s1}"])
                answer = 0
            images[i] = draw_scene(rng, objects, side, style)
            candidates.append(options)
            answers.append(answer)
        tests[task] = {"images": images, "candidates": candidates, "answers": np.array(answers)}
    return tests
