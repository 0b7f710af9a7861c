"""
The data miniclip trains on, and how its images reach the model: streamed.

A data set here is an index (Pairs): for each image-caption pair, its caption and a locator that says
where its image is: a file path, a byte range inside a tar file, or a row of an array in memory. The
index costs about 100 bytes a pair (its text kept as Strings); the images themselves are not kept.
Training asks for a batch by its pair numbers and crop offsets, and background worker processes
(Loader) open, decode, resize and crop those images a few batches ahead of the step that needs them.
So memory does not grow with the number of pairs, and the CPU decodes while the model computes.

Three kinds of data, one interface:
    shapes_world()   the generated shapes of train.py --tiny, drawn once into memory (93 MB for --tiny)
    read_csv()       a CSV of image paths and captions, open_clip's convention
    read_shards()    webdataset tar shards, as large public image-text sets ship: key.jpg beside key.txt

Every batch is a pure function of the seed and the step (batch_plan): the order of each epoch and
each crop offset come from generators seeded with (seed, epoch) and (seed, step). A resumed run asks
for the same batches as an uninterrupted one, and the K processes of a data-parallel run, each
decoding only its own slice of every batch, together see exactly what one process would.
"""
import argparse
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tarfile
import time
import unicodedata
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from PIL import Image, ImageDraw

import miniclip as mc


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit status 1."""


class DataError(UserError, ValueError):
    """Bad data or a bad data option: reported as one line naming the file."""


def read_lines(path, what):
    """The non-empty lines of a UTF-8 text file, stripped (a label list, say); what names them in errors."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: cannot read {what} (not UTF-8 text: {e.reason} at byte {e.start})") from None


class Strings:
    """
    A read-only list of strings kept as one string and where each of them starts and ends. A million
    captions take their characters plus 16 bytes each, where a list of str would take about 65 more
    each, and a subset gathers positions with NumPy and shares the characters.
    """

    def __init__(self, text, starts, ends):
        self.text, self.starts, self.ends = text, starts, ends     # str, (n,) int64, (n,) int64

    @staticmethod
    def of(strings, prefix=""):
        """From a list of str, each with prefix put before it (joined in C)."""
        lengths = np.fromiter(map(len, strings), np.int64, len(strings)) + len(prefix)
        ends = np.cumsum(lengths)
        return Strings(prefix + prefix.join(strings), ends - lengths, ends)

    @staticmethod
    def concat(parts):
        """Several Strings as one, in order (their texts are joined whole)."""
        shift = np.cumsum([0] + [len(p.text) for p in parts[:-1]])
        return Strings("".join(p.text for p in parts), np.concatenate([p.starts + s for p, s in zip(parts, shift)]),
                       np.concatenate([p.ends + s for p, s in zip(parts, shift)]))

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.text[a:b] for a, b in zip(self.starts[i].tolist(), self.ends[i].tolist())]
        return self.text[self.starts[i]:self.ends[i]]

    def __iter__(self):
        return (self.text[a:b] for a, b in zip(self.starts.tolist(), self.ends.tolist()))

    def take(self, idx):
        return Strings(self.text, self.starts[idx], self.ends[idx])


def object_column(values):
    """A list as a NumPy array of its objects (tuples stay whole), to gather from like any column."""
    return np.fromiter(values, object, len(values))


@dataclasses.dataclass
class Pairs:
    """
    The index of a data set. Pair i is (captions[i], the image at locators[i]). A locator is a file
    path (str), a (tar path, byte offset, byte count, member name) tuple, or, when `images` holds the
    decoded pixels, a row of it (int). Each column is Strings or a NumPy array, so a subset of a
    million pairs is a few gathers.
    """
    captions: Strings               # n strings
    locators: object                # n locators: Strings of paths, or an array of tuples or ints
    keys: object                    # n hashables, retrieval's notion of a match: the captions, or an object array
    labels: np.ndarray = None       # (n,) index into label_names, for zero-shot accuracy
    label_names: list = None        # the classes of zero-shot accuracy, as the prompts name them
    images: np.ndarray = None       # (m, L, L, 3) uint8, only for data held in memory
    source: str = ""                # what the user named, for messages

    def __len__(self):
        return len(self.captions)

    def subset(self, idx):
        """The pairs at the positions idx, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        captions = self.captions.take(idx)
        return dataclasses.replace(self, captions=captions, locators=self.locators.take(idx),
                                   keys=captions if self.keys is self.captions else self.keys.take(idx),
                                   labels=None if self.labels is None else self.labels[idx])

    def fingerprint(self):
        """A hash of every caption and locator: a resumed run checks it still reads the same data."""
        h = hashlib.blake2b(digest_size=8)
        for values in (self.captions, self.locators):
            if isinstance(values, Strings):
                for part in (values.text.encode(), values.starts, values.ends):
                    h.update(part)
            else:
                h.update("\0".join(map(str, values)).encode() + b"\0")
        if self.images is not None:
            h.update(self.images)
        return h.hexdigest()


def load_size(image_size):
    """Images are kept or decoded at 9/8 of the model's side, the slack a random square crop needs."""
    return image_size + image_size // 8


def center_crop(images, size):
    """The centered size x size square of each image: (n, L, L, 3) -> (n, size, size, 3), a view."""
    o = (images.shape[1] - size) // 2
    return images[:, o:o + size, o:o + size]


class Progress:
    """
    Prints `message: done/total (seconds, rate/s, ETA)` every 5 seconds of a long phase, and when it
    ends; a short phase prints nothing. To stdout, or to `file` (zeroshot.py keeps stdout for answers).
    """

    def __init__(self, message, total=None, file=None):
        self.message, self.total, self.file, self.t0, self.last = message, total, file, time.time(), time.time()
        self.shown = False

    def update(self, done):
        now = time.time()
        if now - self.last >= 5 or (done == self.total and self.shown):
            self.last, self.shown = now, True
            elapsed = now - self.t0
            of = f"/{self.total:,}" if self.total else ""
            rate = f", {done / elapsed:,.0f}/s" if elapsed > 0 else ""
            eta = f", ETA {(self.total - done) * elapsed / done:.0f}s" if self.total and 0 < done < self.total else ""
            print(f"{self.message}: {done:,}{of} ({elapsed:.0f}s{rate}{eta})", file=self.file or sys.stdout, flush=True)


# -----------------------------------------------------------------------------
# The generated shapes world (train.py --tiny)

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


def shapes_world(n_train, n_eval, seed, image_size):
    """
    --tiny's data: n_train images of 36 color-shape pairs for training, and n_eval of the 12 held-out
    pairs for zero-shot evaluation. Returns (train, val, held-out pairs), both Pairs held in memory.
    """
    train_pairs, held = split_pairs(seed)
    side = load_size(image_size)
    t0 = time.time()
    images, captions, attrs = make_shapes(n_train, train_pairs, seed, side)
    train_set = Pairs(Strings.of(captions), np.arange(n_train), object_column(attrs), images=images,
                      source="generated shapes")
    images, captions, attrs = make_shapes(n_eval, held, seed + 1, side)
    labels = np.array([LABELS.index(f"{a[0]} {a[1]}") for a in attrs])
    val = Pairs(Strings.of(captions), np.arange(n_eval), object_column(attrs), labels, LABELS, images=images,
                source="generated shapes")
    print(f"data: {n_train} generated training images of {len(train_pairs)} color-shape pairs, "
          f"{n_eval} of the {len(held)} held-out pairs ({', '.join(' '.join(p) for p in held)}); "
          f"{time.time() - t0:.1f}s")
    return train_set, val, held


# -----------------------------------------------------------------------------
# CSV: one row per pair, an image path (relative to the CSV) and a caption, open_clip's convention.


def csv_separator(text):
    r"""The --csv-separator as typed: '\t' (a backslash and a t, as a shell passes it) means a tab."""
    sep = text.encode().decode("unicode_escape") if "\\" in text else text
    if len(sep) != 1:
        raise DataError(f"--csv-separator must be one character, got {text!r} (a tab is '\\t')")
    return sep


class FileLister:
    """
    Which of many image names are files, answered from one listing of each folder they name instead
    of a stat() per name: an index of a million rows in a few folders reads a few directories, not a
    million inodes. Names are as a CSV holds them: relative to `root`, or absolute.
    """

    def __init__(self, root):
        self.root, self.files, self.listed = root, set(), set()    # names found so far; folders listed

    def missing(self, names):
        """The positions of the names that are not files."""
        unknown = set(names) - self.files               # one pass in C, and usually empty
        for folder in {n[:n.rfind(os.sep) + 1] for n in unknown} - self.listed:    # "img/", "/abs/" or ""
            self.listed.add(folder)
            try:
                with os.scandir(os.path.join(self.root, folder)) as entries:
                    self.files.update(folder + e.name for e in entries if e.is_file())
            except OSError:                             # no such folder, or not one we may read
                pass
        unknown -= self.files
        return [i for i, n in enumerate(names) if n in unknown] if unknown else []


def paths_under(folder, names):
    """
    Strings of the paths that names (relative to folder, which ends in a separator, or absolute)
    stand for. When they are all relative, or all absolute, the text is built by one str.join, in C.
    """
    absolute = ("\0" + "\0".join(names)).count("\0" + os.sep)    # names of files hold no NUL
    if absolute == len(names):
        return Strings.of(names)
    if absolute:
        return Strings.of([n if n.startswith(os.sep) else folder + n for n in names])
    return Strings.of(names, folder)


CSV_BYTES = 1 << 20     # text parsed at a time: about 13,000 rows of a caption and a path


def csv_columns(f, separator, width):
    """
    The rows of an open CSV after its header, as columns (`width` lists of str), about CSV_BYTES of
    text at a time. Text without quotes, lone carriage returns or NULs, in which every line has
    `width` fields, is split by str.split alone, several times faster than the csv module; from the
    first text that is not, the csv module reads the rest. A short row gets empty fields, as
    csv.DictReader reads it.
    """
    while chunk := f.read(CSV_BYTES) + f.readline():    # whole lines
        text = chunk.replace("\r\n", "\n")
        text += "" if text.endswith("\n") else "\n"
        n = text.count("\n")
        # Each line's end becomes a field of its own, "\0": it lands every width + 1 fields exactly
        # when every line has width fields.
        fields = text.replace("\n", f"{separator}\0{separator}").split(separator)
        if any(c in text for c in '"\r\0') or len(fields) != n * (width + 1) + 1 \
                or fields[width::width + 1].count("\0") != n:
            break
        yield [fields[i:-1:width + 1] for i in range(width)]
    else:
        return
    reader = csv.reader(itertools.chain(io.StringIO(chunk, newline=""), f), delimiter=separator)
    while rows := list(itertools.islice(reader, max(1, CSV_BYTES // 80))):     # rows of about 80 bytes
        yield [list(c) for c in zip(*(row + [""] * (width - len(row)) for row in rows))][:width]


def read_csv(path, img_key, caption_key, separator, skip_bad, label_key=None, flags=True):
    """
    Index a CSV of image paths and captions; images are not opened here. A row with an empty caption
    or an image path that is not a file is bad: the run stops with a list of the first ones, or skips
    and counts them with skip_bad. The errors name train.py's options for columns and bad rows when
    flags is true; zeroshot.py's --test, whose columns are fixed, has none of them. A byte-order
    mark, as spreadsheet programs write, is allowed.
    When the CSV has the column label_key, each pair also gets a label (its zero-shot class, and its
    key for retrieval: a caption of the same class is a hit); an empty label makes a row bad.
    Each chunk of rows is handled a column at a time, in loops that run in C (str.split, set
    difference, str.join), so 300,000 rows index in about 0.18 s here; what is kept is two Strings.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such CSV file")
    base = os.path.dirname(os.path.abspath(path))
    prefix = base if base.endswith(os.sep) else base + os.sep
    captions, locators, labels, n_bad, first_bad = [], [], [], 0, []    # per chunk; bad rows
    index = {}                                          # label -> its number, in order of first appearance
    files = FileLister(prefix)
    shown = Progress(f"indexing {path}, rows")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            fields = next(csv.reader([f.readline()], delimiter=separator), [])
            for key in (img_key, caption_key):
                if key not in fields:
                    raise DataError(f"{path}: no column {key!r}; the columns are {fields}" + (
                                    " (set --csv-img-key, --csv-caption-key, --csv-separator)" if flags else ""))
            i_img, i_cap = fields.index(img_key), fields.index(caption_key)
            i_lab = fields.index(label_key) if label_key in fields else None
            line = 2                                    # of the chunk's first row; the header is line 1
            for columns in csv_columns(f, separator, len(fields)):
                names, caps = columns[i_img], list(map(str.strip, columns[i_cap]))
                labs = list(map(str.strip, columns[i_lab])) if i_lab is not None else []
                absent = files.missing(names)
                empty = [i for i, c in enumerate(caps) if not c] if "" in caps else []
                unlabeled = [i for i, c in enumerate(labs) if not c] if "" in labs else []
                if empty or absent or unlabeled:
                    problem = ({i: f"{names[i]}: no such file" for i in absent} | {i: "empty label" for i in unlabeled}
                               | {i: "empty caption" for i in empty})
                    n_bad += len(problem)
                    first_bad += [f"line {line + i}: {problem[i]}" for i in sorted(problem)[:5 - len(first_bad)]]
                    caps = [c for i, c in enumerate(caps) if i not in problem]
                    names = [n for i, n in enumerate(names) if i not in problem]
                    labs = [c for i, c in enumerate(labs) if i not in problem]
                captions.append(Strings.of(caps))
                locators.append(paths_under(prefix, names))
                labels.append(np.fromiter((index.setdefault(x, len(index)) for x in labs), np.int64, len(labs)))
                line += len(columns[i_img])
                shown.update(line - 2)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    bad = f"{n_bad} bad row" + "s" * (n_bad != 1)
    if n_bad and not skip_bad:
        hint = " (--skip-bad skips them)" if flags else ""
        raise DataError(f"{path}: {bad}, first: " + "; ".join(first_bad) + hint)
    if n_bad:
        print(f"skipped {bad} of {path}, first: {first_bad[0]}")
    if not captions or not sum(map(len, captions)):
        raise DataError(f"{path}: no usable image-caption pairs")
    captions = Strings.concat(captions)
    if not index:
        return Pairs(captions, Strings.concat(locators), captions, source=path)
    codes = np.concatenate(labels)
    return Pairs(captions, Strings.concat(locators), codes, codes, label_names=list(index), source=path)


# -----------------------------------------------------------------------------
# webdataset shards: tar files in which the files of one sample share a key, the name up to the first
# dot of the base name ("000123.jpg" and "000123.txt" are sample "000123"). Indexing reads each tar's
# headers and its small .txt members and seeks past the images, whose byte ranges it records.

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_braces(pattern):
    """
    open_clip's shard patterns: "{00000..00002}" counts (keeping the zero padding) and "{a,b}" lists,
    any number of them; "::" joins several patterns.
    "s/{0..2}.tar" -> ["s/0.tar", "s/1.tar", "s/2.tar"];  "{a,b}{1..2}" -> ["a1", "a2", "b1", "b2"]
    """
    if "::" in pattern:
        return [p for part in pattern.split("::") for p in expand_braces(part)]
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise DataError(f"{pattern}: the range {{{body}}} counts down")
        items = [str(i).zfill(len(r.group(1))) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def read_shards(patterns):
    """Index webdataset tar shards (paths or brace patterns). Samples lacking an image or a caption are counted and skipped."""
    paths = [p for pattern in patterns for p in expand_braces(pattern)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{missing[0]}: no such shard" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    captions, locators, incomplete = [], [], 0
    shown = Progress("indexing shards", len(paths))
    for done, path in enumerate(paths, start=1):
        images, texts = {}, {}
        try:
            with tarfile.open(path, "r:") as tar:      # "r:" reads plain tar only, where seeking is cheap
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    key, ext = f"{folder}/{stem}" if folder else stem, ext.lower()
                    if ext in IMAGE_EXTS:
                        images[key] = (path, member.offset_data, member.size, member.name)
                    elif ext == "txt":
                        texts[key] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{path}: not a readable uncompressed tar file ({e})") from None
        for key, loc in images.items():
            if texts.get(key):
                captions.append(texts[key])
                locators.append(loc)
        incomplete += len(images.keys() ^ texts.keys()) + sum(1 for k in images if k in texts and not texts[k])
        shown.update(done)
    if incomplete:
        print(f"skipped {incomplete} samples without both an image and a non-empty caption")
    if not captions:
        raise DataError(f"{patterns[0]}: no samples with an image ({'/'.join(IMAGE_EXTS)}) and a caption (txt)")
    captions = Strings.of(captions)
    return Pairs(captions, object_column(locators), captions, source=" ".join(patterns))


# -----------------------------------------------------------------------------
# Emoji: real images with real captions. Three npm packages draw the same ~3,800 emoji, each in one
# artist's style: Google's Noto and Twitter's Twemoji (as 64-pixel PNGs, listed in emoji.json) and
# OpenMoji (as SVGs, with data/openmoji.csv giving each emoji its CLDR English name and tags). An
# emoji is known everywhere by its code point sequence ("1F481-200D-2640-FE0F"), which matches it
# across vendors once the variation selector FE0F is dropped. This is Icons-50's setting
# (Hendrycks & Dietterich, 2019): one concept in several styles, one style kept out to test
# robustness. prepare_emoji turns the three .tgz files, as `npm pack` writes them, into PNGs and
# the CSVs that --data reads; nothing here downloads. A fourth package may be given: fluentui-emoji,
# Microsoft's Fluent Emoji (MIT), a third artist for training only (train_with_fluent.csv). It names
# its SVGs by CLDR name, not code point ("farmer-light.svg" is "farmer: light skin tone"), so its
# drawings are matched by name, and emoji without a match (flags, couples) have none.

EMOJI_PACKAGES = {"emoji-datasource-google": "google", "emoji-datasource-twitter": "twitter", "openmoji": "openmoji"}
EXTRA_PACKAGES = {"fluentui-emoji": "fluent"}                   # optional
TRAIN_VENDORS, HELD_OUT_VENDOR, EXTRA_VENDOR = ("google", "twitter"), "openmoji", "fluent"
EMOJI_LICENSES = {"google": "Noto Emoji, Apache-2.0", "twitter": "Twemoji, CC-BY 4.0", "openmoji": "OpenMoji, CC BY-SA 4.0",
                  "fluent": "Fluent Emoji by Microsoft, MIT"}
FLUENT_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
# man/woman -> person, boy/girl -> child, old man/woman -> older person: one concept's gender forms.
UNGENDERED = {"1F468": "1F9D1", "1F469": "1F9D1", "1F466": "1F9D2", "1F467": "1F9D2", "1F474": "1F9D3", "1F475": "1F9D3"}
ZWJ, FEMALE, MALE = "200D", "2640", "2642"
# The caption forms of a training image. Several, so that a prompt is not a copy of one caption:
# the name alone, in a sentence, and with CLDR's tags, the words that the names of unseen emoji share
# with seen ones ("grinning face" is tagged "happy, smile, teeth").
EMOJI_CAPTIONS = ("{name}", "an emoji of {name}", "{name}: {tags}", "a {tags} emoji of {name}")
EMOJI_TEMPLATES = ("an emoji of {}", "{}")      # the recipe's prompts (experiments/emoji_recipe.py)
EMOJI_MARGIN = 1 / 16           # of the side, around each drawing scaled to fill the square


def emoji_code(sequence):
    """'1f481-200d-2640-fe0f' -> '1F481-200D-2640': the sequence that names one emoji in every package."""
    return "-".join(p for p in sequence.upper().split("-") if p != "FE0F")


def emoji_concept(code):
    """
    The concept an emoji belongs to: its code without skin tones or gender, so a concept's skin tones
    and gender forms are held out together. 'woman tipping hand: dark skin tone' (1F481-1F3FF-200D-2640)
    and 'man tipping hand' (1F481-200D-2642) both give 1F481; 'woman farmer' (1F469-200D-1F33E) gives
    'farmer' (1F9D1-200D-1F33E). A skin tone swatch on its own (1F3FB) stays itself.
    """
    parts = [UNGENDERED.get(p, p) for p in code.split("-") if p not in SKIN_TONES]
    kept = []
    for p in parts:
        if p in (FEMALE, MALE) and kept and kept[-1] == ZWJ:
            kept.pop()                                  # "ZWJ female sign" marks a gender form
        else:
            kept.append(p)
    return "-".join(kept) or code


def fluent_file(name, available):
    """
    The member of fluentui-emoji drawing the CLDR name, or None: 'farmer: light skin tone' ->
    icons/flat/farmer-light.svg, 'farmer' -> farmer.svg or, when it has skin tones, farmer-default.svg;
    'piñata' -> pinata.svg. Of its three styles, the flat one: color, like the other vendors'.
    """
    def slug(text):
        ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    base, _, tone = name.partition(": ")
    tone = tone.removesuffix(" skin tone").replace(" ", "-")
    stems = [f"{slug(base)}-{tone}"] if tone in FLUENT_TONES else [slug(name), f"{slug(name)}-default"]
    return next((m for m in (f"package/icons/flat/{stem}.svg" for stem in stems) if m in available), None)


class EmojiPackages:
    """The three tarballs and the optional fourth, each found by the name in its package.json (not its file name)."""

    def __init__(self, paths):
        self.paths, self.versions = {}, {}
        for path in paths:
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file")
            try:
                with tarfile.open(path, "r:gz") as tar:
                    about = json.load(tar.extractfile("package/package.json"))
                    name = about.get("name")
            # Finding package.json reads every member's header, so a file cut short anywhere ends here.
            except EOFError:
                raise DataError(f"{path}: the file ends early (an interrupted download? fetch it again)") from None
            except (tarfile.TarError, OSError, KeyError, ValueError, AttributeError) as e:
                raise DataError(f"{path}: not an npm package tarball ({e})") from None
            vendor = {**EMOJI_PACKAGES, **EXTRA_PACKAGES}.get(name)
            if vendor is None:
                raise DataError(f"{path}: holds the npm package {name!r}, not one of "
                                f"{', '.join(EMOJI_PACKAGES)} (or {', '.join(EXTRA_PACKAGES)})")
            if vendor in self.paths:
                raise DataError(f"{path}: a second tarball of {name}")
            self.paths[vendor] = path
            self.versions[vendor] = f"{name}@{about.get('version')}"
        missing = [p for p, v in EMOJI_PACKAGES.items() if v not in self.paths]
        if missing:
            raise DataError(f"no tarball of {', '.join(missing)} given (npm pack {' '.join(missing)} fetches them)")

    def names(self, vendor):
        """The file members of vendor's tarball."""
        with tarfile.open(self.paths[vendor], "r:gz") as tar:
            return {m.name for m in tar if m.isfile()}

    def members(self, vendor, wanted):
        """{name: bytes} of the members of vendor's tarball named in wanted, in one pass over the gzip stream."""
        found = {}
        with tarfile.open(self.paths[vendor], "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name in wanted:
                    found[member.name] = tar.extractfile(member).read()
        return found


def emoji_table(packages):
    """
    Every emoji that all three vendors draw, as {code: dict(name, tags, concept, group, files)}, where
    files maps each vendor to its member name (Fluent's where it has one); and the codes skipped, with
    why. Names and tags come from openmoji.csv (CLDR); a skin tone variant has no tags of its own and
    takes its base's.
    """
    sheet = "package/data/openmoji.csv"
    text = packages.members("openmoji", {sheet}).get(sheet)
    if text is None:
        raise DataError(f"{packages.paths['openmoji']}: no {sheet[8:]}")
    rows = {emoji_code(r["hexcode"]): r for r in csv.DictReader(io.StringIO(text.decode("utf-8")))}
    listed = {}
    for vendor in TRAIN_VENDORS:
        raw = packages.members(vendor, {"package/emoji.json"}).get("package/emoji.json")
        if raw is None:
            raise DataError(f"{packages.paths[vendor]}: no emoji.json")
        try:
            entries = json.loads(raw)
        except ValueError as e:
            raise DataError(f"{packages.paths[vendor]}: emoji.json is not JSON ({e})") from None
        for entry in entries:
            for e in [entry, *(entry.get("skin_variations") or {}).values()]:
                if e.get(f"has_img_{vendor}"):
                    listed.setdefault(emoji_code(e["unified"]), {})[vendor] = f"package/img/{vendor}/64/{e['image']}"
    table, skipped = {}, []
    for code, files in listed.items():
        row = rows.get(code)
        if len(files) < len(TRAIN_VENDORS):
            skipped.append((code, f"not drawn by {' and '.join(v for v in TRAIN_VENDORS if v not in files)}"))
        elif row is None or not row["annotation"].strip():
            skipped.append((code, "no CLDR name in openmoji.csv"))
        else:
            base = rows.get(emoji_code(row["skintone_base_hexcode"] or code), row)
            tags = [t.strip() for t in (row["tags"] or base["tags"]).split(",") if t.strip()]
            files["openmoji"] = f"package/color/svg/{row['hexcode']}.svg"
            table[code] = dict(name=row["annotation"].strip(), tags=tags, concept=emoji_concept(code),
                               group=row["group"], files=files)
    if EXTRA_VENDOR in packages.paths:
        available = packages.names(EXTRA_VENDOR)
        matched = {code: fluent_file(e["name"], available) for code, e in table.items()}
        claims = Counter(matched.values())
        for code, member in matched.items():
            if member and claims[member] == 1:          # a file two names would claim is neither's
                table[code]["files"][EXTRA_VENDOR] = member
    return table, skipped


def fill_square(rgba, size, background):
    """
    An RGBA drawing -> size x size RGB: cropped to where it is not transparent, scaled to fill the
    square but a margin, centered, and composited onto the background. Vendors frame their art
    differently (OpenMoji's faces span two thirds of the canvas, Noto's nearly all of it); this way
    they differ in art, not in scale.
    """
    box = rgba.getchannel("A").getbbox()
    if box is None:
        raise ValueError("the image is fully transparent")
    art = rgba.crop(box)
    inner = size - 2 * round(size * EMOJI_MARGIN)
    scale = inner / max(art.size)
    art = art.resize((max(1, round(art.width * scale)), max(1, round(art.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), background + (255,))
    canvas.alpha_composite(art, ((size - art.width) // 2, (size - art.height) // 2))
    return canvas.convert("RGB")


def rasterizer():
    """OpenMoji's SVGs -> RGBA PIL images, by resvg (an optional dependency of this step only)."""
    try:
        import resvg_py
    except ImportError:
        raise DataError("rasterizing OpenMoji's SVGs needs resvg-py: pip install resvg-py==0.5.0") from None

    def render(svg, side):
        return Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(svg_string=svg.decode("utf-8"), width=side,
                                                                 height=side)))).convert("RGBA")
    return render


def emoji_images(packages, table, size, background):
    """{(vendor, code): size x size RGB} for every drawing of the table; an image that does not decode is an error naming it."""
    render, images = rasterizer(), {}
    for vendor in packages.paths:
        wanted = {e["files"][vendor]: code for code, e in table.items() if vendor in e["files"]}
        found = packages.members(vendor, wanted)
        shown = Progress(f"emoji: {vendor}, images", len(wanted))
        for done, (member, code) in enumerate(wanted.items(), start=1):
            if member not in found:
                raise DataError(f"{packages.paths[vendor]}: no {member[8:]} for {table[code]['name']!r}")
            try:
                if member.endswith(".svg"):             # drawn at 4x, so the crop to the art loses nothing
                    rgba = render(found[member], 4 * size)
                else:
                    rgba = Image.open(io.BytesIO(found[member]))
                    rgba.load()
                    rgba = rgba.convert("RGBA")
                images[vendor, code] = fill_square(rgba, size, background)
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"{packages.paths[vendor]}: {member[8:]} does not decode ({e})") from None
            shown.update(done)
    return images


def emoji_splits(table, seed, test_frac=1 / 7, val_frac=1 / 14):
    """
    {code: "train" | "val" | "test"}, by concept: a seeded test_frac of the concepts is held out for
    the final numbers, val_frac more for choosing a recipe, and the rest trains. Every emoji of a
    concept (its skin tones and gender forms) lands where its concept does.
    """
    concepts = sorted({e["concept"] for e in table.values()})
    order = np.random.default_rng(seed).permutation(len(concepts))
    n_test, n_val = round(len(concepts) * test_frac), round(len(concepts) * val_frac)
    where = {concepts[i]: "test" if k < n_test else "val" if k < n_test + n_val else "train"
             for k, i in enumerate(order)}
    return {code: where[e["concept"]] for code, e in table.items()}


def emoji_caption(rng, form, entry):
    tags = [t for t in entry["tags"] if t.lower() not in entry["name"].lower()] or entry["tags"] or [entry["group"]]
    picked = rng.choice(len(tags), min(len(tags), 3), replace=False)
    return form.format(name=entry["name"], tags=", ".join(tags[i] for i in sorted(picked)))


def write_csv_rows(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def prepare_emoji(tarballs, out, seed=0, size=64, background=(255, 255, 255)):
    """
    The emoji data set in the folder out, from the three package tarballs (or four):
        images/<vendor>/<code>.png     every emoji of every vendor, size x size RGB
        train.csv                      Noto and Twemoji images of the training concepts, one row per
                                       caption form (filepath, title, label)
        train_with_fluent.csv          given fluentui-emoji: train.csv and Fluent's drawings of the
                                       training concepts, captioned the same way
        val.csv                        the validation concepts in the training vendors, for choosing a
                                       recipe (filepath, title, label: the caption is "an emoji of <name>")
        test_concepts.csv              the held-out concepts in the training vendors
        test_vendor_seen.csv           OpenMoji's drawings of the training concepts (a style never trained on)
        test_vendor_unseen.csv         OpenMoji's drawings of the held-out concepts
        labels_<split>.txt, labels.txt the CLDR names of each split's emoji, and of all of them
        splits.json                    the seed, each concept's split, the counts and what was skipped
    Everything is read and decoded before anything is written, and the folder appears whole: it is
    built under a temporary name and renamed.
    """
    if os.path.exists(out):
        raise DataError(f"{out}: already exists; remove it or choose another --out")
    packages = EmojiPackages(tarballs)
    table, skipped = emoji_table(packages)
    if not table:
        raise DataError("the packages share no emoji with a CLDR name")
    images = emoji_images(packages, table, size, background)
    split_of = emoji_splits(table, seed)
    rng, fluent_rng = np.random.default_rng([seed, 4]), np.random.default_rng([seed, 5])
    rows = {name: [] for name in ("train", "val", "test_concepts", "test_vendor_seen", "test_vendor_unseen")}
    fluent_rows = []
    for code, e in table.items():
        split = split_of[code]
        for vendor in EMOJI_PACKAGES.values():
            path = f"images/{vendor}/{code}.png"
            if vendor == HELD_OUT_VENDOR:
                if split != "val":
                    rows["test_vendor_seen" if split == "train" else "test_vendor_unseen"].append(
                        (path, f"an emoji of {e['name']}", e["name"]))
            elif split == "train":
                rows["train"] += [(path, emoji_caption(rng, form, e), e["name"]) for form in EMOJI_CAPTIONS]
            else:
                rows["val" if split == "val" else "test_concepts"].append((path, f"an emoji of {e['name']}", e["name"]))
        if split == "train" and EXTRA_VENDOR in e["files"]:
            fluent_rows += [(f"images/{EXTRA_VENDOR}/{code}.png", emoji_caption(fluent_rng, form, e), e["name"])
                            for form in EMOJI_CAPTIONS]
    if EXTRA_VENDOR in packages.paths:
        rows["train_with_fluent"] = rows["train"] + fluent_rows
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        for vendor in packages.paths:
            os.makedirs(os.path.join(tmp, "images", vendor))
        for (vendor, code), img in images.items():
            img.save(os.path.join(tmp, "images", vendor, f"{code}.png"))
        for name, r in rows.items():
            write_csv_rows(os.path.join(tmp, f"{name}.csv"), ("filepath", "title", "label"), r)
        names = {s: [e["name"] for c, e in table.items() if split_of[c] == s] for s in ("train", "val", "test")}
        concepts = {s: sorted({table[c]["concept"] for c in table if split_of[c] == s}) for s in names}
        for file, lines in [*((f"labels_{s}.txt", n) for s, n in names.items()),
                            ("labels.txt", [e["name"] for e in table.values()])]:
            with open(os.path.join(tmp, file), "w", encoding="utf-8") as f:
                f.write("".join(x + "\n" for x in lines))
        summary = {"seed": seed, "size": size, "background": list(background), "train_vendors": list(TRAIN_VENDORS),
                   "held_out_vendor": HELD_OUT_VENDOR, "caption_forms": list(EMOJI_CAPTIONS),
                   "templates": list(EMOJI_TEMPLATES), "licenses": {v: EMOJI_LICENSES[v] for v in packages.paths},
                   "packages": packages.versions,
                   "counts": {**{f"{k}_rows": len(v) for k, v in rows.items()}, **{f"{s}_names": len(n) for s, n in names.items()},
                              "concepts": {s: len(c) for s, c in concepts.items()}},
                   "skipped": [f"{c}: {why}" for c, why in skipped], "concepts": concepts}
        with open(os.path.join(tmp, "splits.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, ensure_ascii=False)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def read_data(data, img_key="filepath", caption_key="title", separator=",", skip_bad=False, label_key=None):
    """--data as given: shards when every entry names .tar files, else one CSV."""
    if all(p.endswith(".tar") for p in data):
        return read_shards(data)
    if len(data) > 1:
        raise DataError("--data takes one CSV, or any number of .tar shards")
    return read_csv(data[0], img_key, caption_key, csv_separator(separator), skip_bad, label_key)


def split(pairs, val_frac, val_max, seed):
    """(train, val): a seeded val_frac of the pairs, at most val_max, held out for evaluation (val None if none)."""
    n = len(pairs)
    n_val = min(int(n * val_frac), val_max) if n > 1 else 0
    if val_frac > 0 and n > 1:
        n_val = max(1, n_val)
    order = np.random.default_rng(seed).permutation(n)
    return pairs.subset(order[n_val:]), (pairs.subset(order[:n_val]) if n_val else None)


# -----------------------------------------------------------------------------
# Batches: which pairs, and where each is cropped, as a pure function of (seed, step).


def batch_plan(step, n, batch_size, seed, slack, random_crop=True):
    """
    The batch of optimizer step `step` (0-based) over n training pairs: (pair numbers (B,), crop
    offsets (B, 2)). Each epoch is a fresh seeded permutation; the n % B pairs left at its end wait for
    the next epoch's order. Crop offsets are uniform in [0, slack], y then x, or all slack // 2 (the
    center crop) without random_crop.
    """
    per_epoch = n // batch_size
    epoch, j = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 0, epoch]).permutation(n)
    offsets = np.random.default_rng([seed, 1, step]).integers(0, slack + 1, (batch_size, 2)) if random_crop \
        else np.full((batch_size, 2), slack // 2)
    return order[j * batch_size:(j + 1) * batch_size], offsets


def open_located(locator):
    """The image at a file or tar locator as 8-bit RGB PIL, or ValueError saying why not."""
    if isinstance(locator, str):
        return mc.open_image(locator)
    path, offset, size, _ = locator
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(size)
    return mc.open_image(io.BytesIO(raw))


def describe(locator):
    return locator if isinstance(locator, str) else f"{locator[0]}: {locator[3]}"


def decode_crops(locators, side, size, offsets):
    """
    Runs in a worker: open each image, resize its short side to `side` and center-crop it square (as
    the model's preprocessing does), then cut the size x size square at its offset.
    Returns (crops (n, size, size, 3) uint8, [(position, message)] of the images that failed).
    """
    out = np.zeros((len(locators), size, size, 3), dtype=np.uint8)
    failed = []
    for i, (loc, (y, x)) in enumerate(zip(locators, offsets)):
        try:
            out[i] = np.asarray(mc.resize_and_crop(open_located(loc), side))[y:y + size, x:x + size]
        except (ValueError, OSError) as e:
            failed.append((i, f"{describe(loc)}: {e}"))
    return out, failed


def start_worker():
    """
    Each decoding worker, as it starts. It leaves Ctrl-C to the main process, which stops the run
    cleanly and then ends the workers. And it runs at the lowest priority (nice 19), so it decodes
    on the cores the model leaves idle instead of taking one from BLAS: a matrix product's threads
    wait for each other, so a worker that preempts one of them stalls them all. The decoded batches
    are the same; zeroshot.py over 500 photos with ViT-B/32 on 2 cores took 23.3 s instead of 24.9,
    and the --tiny preset trained at 1,650 images/s instead of 1,590.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):                            # POSIX only
        os.nice(19 - os.nice(0))


class Loader:
    """
    Decodes batches of images in `workers` background processes, at most `prefetch` batches ahead of
    the one being consumed; with no workers, in this process when asked. Pairs held in memory are
    cropped directly. `decoded` counts the images this process has decoded, which is how a
    data-parallel run shows that each process reads only its own share.
    """

    def __init__(self, image_size, workers, prefetch=None, skip_bad=False):
        self.size, self.side = image_size, load_size(image_size)
        self.workers, self.skip_bad, self.decoded = workers, skip_bad, 0
        self.prefetch = prefetch or 2 * max(1, workers)
        self.pool = None

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def _submit(self, pairs, idx, offsets):
        if pairs.images is not None:                                    # in memory: nothing to decode
            S = self.size
            return np.stack([pairs.images[i, y:y + S, x:x + S] for i, (y, x) in zip(idx, offsets)]), []
        locators = [pairs.locators[i] for i in idx]
        self.decoded += len(idx)
        if not self.workers:
            return decode_crops(locators, self.side, self.size, offsets)
        if self.pool is None:
            # forkserver: workers start from a fresh process, not a copy of this one with its MPI
            # state, model and optimizer.
            ctx = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=start_worker)
        return self.pool.submit(decode_crops, locators, self.side, self.size, offsets)

    def _finish(self, pairs, idx, result):
        """(uint8 crops, the pair numbers they show): a failed image stops the run, or with skip_bad is replaced by another of its batch."""
        try:
            crops, failed = result if isinstance(result, tuple) else result.result()
        except BrokenProcessPool:
            raise DataError("a data worker process died (out of memory?); try fewer --workers") from None
        idx = np.array(idx)
        if failed and (not self.skip_bad or len(failed) == len(idx)):
            raise DataError(f"{failed[0][1]} (in {pairs.source}; --skip-bad skips such images)")
        if failed:
            bad = {i for i, _ in failed}
            good = [i for i in range(len(idx)) if i not in bad]
            for k, (i, message) in enumerate(failed):               # deterministic: the same files fail again
                crops[i], idx[i] = crops[good[k % len(good)]], idx[good[k % len(good)]]
                print(f"skipped an unreadable image: {message}")
        return crops, idx

    def batches(self, pairs, requests):
        """For each (pair numbers, crop offsets) of `requests`, in order: (uint8 crops (B, S, S, 3), pair numbers)."""
        pending = deque()
        for idx, offsets in requests:
            pending.append((idx, self._submit(pairs, idx, offsets)))
            if len(pending) > self.prefetch:
                yield self._finish(pairs, *pending.popleft())
        while pending:
            yield self._finish(pairs, *pending.popleft())

    def center_crops(self, pairs, chunk):
        """All the pairs' images, center-cropped, in batches of up to `chunk` (evaluation)."""
        o = (self.side - self.size) // 2                # center_crop's offsets
        requests = ((np.arange(i, min(i + chunk, len(pairs))), np.full((min(chunk, len(pairs) - i), 2), o))
                    for i in range(0, len(pairs), chunk))
        return self.batches(pairs, requests)


def main(argv=None):
    """python data.py emoji TARBALL... : prepare the emoji data set (the other data sets need no step)."""
    p = argparse.ArgumentParser(description="Prepare a data set for train.py --data.")
    sub = p.add_subparsers(dest="dataset", required=True)
    e = sub.add_parser("emoji", help="emoji art of three vendors, from the tarballs `npm pack "
                       "emoji-datasource-google emoji-datasource-twitter openmoji` writes "
                       "(and fluentui-emoji's, for a third training artist)")
    e.add_argument("tarballs", nargs="+", help="the three .tgz files (or four), in any order")
    e.add_argument("--out", default=os.path.join("data", "emoji"), help="a new folder (default: data/emoji)")
    e.add_argument("--seed", type=int, default=0, help="chooses the held-out and validation concepts (default 0)")
    e.add_argument("--size", type=int, default=64, help="side of the written images in pixels (default 64)")
    args = p.parse_args(argv)
    if args.size < 8:
        print(f"error: --size must be at least 8, got {args.size}", file=sys.stderr)
        return 1
    t0 = time.time()
    try:
        s = prepare_emoji(args.tarballs, args.out, args.seed, args.size)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    c = s["counts"]
    if s["skipped"]:
        print(f"skipped {len(s['skipped'])} emoji, first: {s['skipped'][0]}")
    print(f"wrote {args.out} in {time.time() - t0:.0f}s: {c['train_rows']:,} training rows ({c['train_names']:,} emoji, "
          f"{c['concepts']['train']:,} concepts, {len(EMOJI_CAPTIONS)} captions each in "
          f"{' and '.join(TRAIN_VENDORS)}); {c['val_names']:,} validation emoji; held out: {c['test_names']:,} emoji "
          f"({c['concepts']['test']:,} concepts), and every {HELD_OUT_VENDOR} drawing")
    if "train_with_fluent_rows" in c:
        print(f"train_with_fluent.csv: {c['train_with_fluent_rows']:,} rows, of which "
              f"{c['train_with_fluent_rows'] - c['train_rows']:,} of Fluent's drawings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
