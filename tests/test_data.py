"""data.py: the generated world, CSV and shard indexes, the batch plan, and the loader's workers."""
import csv
import io
import os
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

import data


def shape_pixels(img):
    """The pixels of the shape: the background is darker than 70 + noise in every channel."""
    return img.max(axis=2) > 110


@pytest.mark.parametrize("color", list(data.COLORS))
def test_generator_colors_match_pixels(color):
    rng = np.random.default_rng(0)
    for kind in data.SHAPES:
        img = data.draw_shape(rng, color, kind, "large", "center", 36).astype(float)
        mean = img[shape_pixels(img)].mean(axis=0)
        nearest = min(data.COLORS, key=lambda c: np.sum((np.array(data.COLORS[c]) - mean) ** 2))
        assert nearest == color, (kind, mean)


def test_generator_shapes_sizes_and_positions_match_pixels():
    rng = np.random.default_rng(1)

    def stats(kind, size="large", where="center"):
        mask = shape_pixels(data.draw_shape(rng, "white", kind, size, where, 36))
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))     # share of the bounding box covered
        return fill, mask.sum(), xs.mean(), ys.mean()

    fills = {k: np.mean([stats(k)[0] for _ in range(5)]) for k in data.SHAPES}
    assert fills["square"] > 0.9 > fills["circle"] > 0.7 > fills["cross"] > fills["star"]
    assert 0.4 < fills["triangle"] < 0.65 and 0.4 < fills["diamond"] < 0.65
    assert stats("circle", "large")[1] > 2.5 * stats("circle", "small")[1]
    assert stats("square", "small", "left")[2] < 14 < 22 < stats("square", "small", "right")[2]
    assert stats("square", "small", "top")[3] < 14 < 22 < stats("square", "small", "bottom")[3]
    assert 15 < stats("circle", "small", "center")[2] < 21


def test_held_out_pairs_keep_every_word_in_training():
    for seed in range(5):
        seen, held = data.split_pairs(seed)
        assert len(held) == 12 and len(seen) == 36 and not set(seen) & set(held)
        assert all(sum(s == shape for _, s in held) == 2 for shape in data.SHAPES)
        assert all(sum(c == color for c, _ in held) <= 2 for color in data.COLORS)
    assert data.split_pairs(0) == data.split_pairs(0) != data.split_pairs(1)


def test_captions_name_their_color_and_shape_only():
    _, captions, attrs = data.make_shapes(300, [("red", "star"), ("blue", "cross")], seed=0, side=36)
    for caption, (color, kind, _, _) in zip(captions, attrs):
        words = set(caption.split())
        assert {color, kind} <= words and not words & (set(data.COLORS) | set(data.SHAPES)) - {color, kind}


def write_shards(folder, n_shards, per_shard, seed=0, broken=()):
    """
    webdataset shards folder/{0..n_shards-1}.tar, sample k of shard s keyed f"{s:03d}{k:04d}": a JPEG
    or PNG of random size and its caption. Keys in `broken` get a caption and no image. Returns the
    brace pattern that names them all.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s}.tar", "w") as tar:
            for k in range(per_shard):
                key = f"{s:03d}{k:04d}"
                files = {f"{key}.txt": f"sample {key} of shard {s}".encode()}
                if key not in broken:
                    raw = io.BytesIO()
                    ext = "jpg" if k % 2 else "png"
                    Image.fromarray(rng.integers(0, 256, (rng.integers(20, 50), rng.integers(20, 50), 3),
                                                 dtype=np.uint8)).save(raw, "JPEG" if ext == "jpg" else "PNG")
                    files[f"{key}.{ext}"] = raw.getvalue()
                for name, blob in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return str(folder / f"{{0..{n_shards - 1}}}.tar")


def test_expand_braces():
    assert data.expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert data.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert data.expand_braces("x.tar::y/{0..1}.tar") == ["x.tar", "y/0.tar", "y/1.tar"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(data.DataError, match="counts down"):
        data.expand_braces("{5..1}.tar")


def test_shards_index_every_complete_sample(tmp_path, capsys):
    pattern = write_shards(tmp_path, 3, 5, broken={"0010003"})
    pairs = data.read_shards([pattern])
    assert len(pairs) == 14 and "skipped 1 samples" in capsys.readouterr().out
    assert pairs.captions[0] == "sample 0000000 of shard 0" and "sample 0010003 of shard 1" not in pairs.captions
    path, offset, size, name = pairs.locators[1]
    with open(path, "rb") as f:                         # the recorded byte range is the image file itself
        f.seek(offset)
        assert Image.open(io.BytesIO(f.read(size))).format == "JPEG" and name == "0000001.jpg"
    # The same shards as a list of paths give the same index.
    again = data.read_shards([str(tmp_path / f"{s}.tar") for s in range(3)])
    assert again.fingerprint() == pairs.fingerprint()


def test_shard_errors(tmp_path):
    with pytest.raises(data.DataError, match="no such shard"):
        data.read_shards([str(tmp_path / "{0..1}.tar")])
    write_shards(tmp_path, 1, 2)
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "0.tar", "0.tar")
    os.rename(tmp_path / "z.tar.gz", tmp_path / "z.tar")
    with pytest.raises(data.DataError, match="z.tar: not a readable uncompressed tar file"):
        data.read_shards([str(tmp_path / "z.tar")])


def test_csv_separator_as_typed():
    assert data.csv_separator("\\t") == "\t" and data.csv_separator(";") == ";"
    with pytest.raises(data.DataError, match="one character"):
        data.csv_separator("ab")


def test_strings_hold_a_list_of_str():
    words = ["", "a", "h\u00e9llo", "two words", "\u65e5\u672c", ""]
    s = data.Strings.of(words)
    assert len(s) == 6 and list(s) == words and [s[i] for i in range(6)] == words and s[1:4] == words[1:4]
    assert list(s.take(np.array([4, 0, 2]))) == [words[4], words[0], words[2]]
    both = data.Strings.concat([data.Strings.of(words[:2]), data.Strings.of(words[2:])])
    assert list(both) == words and list(both.take(np.array([5, 3]))) == [words[5], words[3]]


def random_csv(rng, kind, width=3, rows=60):
    """CSV text: plain fields; the same with old Macintosh line ends (CR); quoted fields (separators,
    quotes, line breaks) from a third of the way in; or unquoted lines with the wrong number of fields,
    blank lines and CRs."""
    def field(alphabet):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    for i in range(rows):
        if kind in ("plain", "cr") or (kind == "quoted" and i < rows // 3):
            out.write(",".join(field("ab c") for _ in range(width)) + rng.choice(["\r"] if kind == "cr" else ["\n", "\r\n"]))
        elif kind == "quoted":
            writer.writerow([field(['a', ' ', ',', '"', '\n', '\u00e9']) for _ in range(width)])
        else:
            out.write(",".join(field("ab ") for _ in range(rng.choice([0, 1, width, width, width + 1])))
                      + rng.choice(["\n", "\n", "\r\n", "\r"]))
    return out.getvalue().rstrip("\r\n") if rng.random() < 0.5 else out.getvalue()    # the last line with no line break, or one


@pytest.mark.parametrize("kind", ["plain", "cr", "quoted", "ragged"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk", [1, 40])
def test_csv_columns_read_what_the_csv_module_reads(tmp_path, monkeypatch, kind, seed, chunk):
    """The fast path (str.split) and the csv module agree, chunk boundaries included (chunks of one
    line, and of a few); plain text never reaches the csv module."""
    width = 3
    path = tmp_path / "p.csv"
    path.write_text(random_csv(random.Random(seed), kind, width), newline="")
    with open(path, newline="") as f:
        expected = [(row + [""] * width)[:width] for row in csv.reader(f)]
    calls, csv_reader = [], csv.reader
    monkeypatch.setattr(data, "CSV_BYTES", chunk)
    monkeypatch.setattr(data.csv, "reader", lambda *a, **k: calls.append(1) or csv_reader(*a, **k))
    with open(path, newline="") as f:
        chunks = list(data.csv_columns(f, ",", width))
    got = [list(row) for chunk in chunks for row in zip(*chunk)]
    assert got == expected and len(chunks) > 3
    assert (calls == []) == (kind == "plain")


def test_split_caps_validation():
    captions = data.Strings.of([str(i) for i in range(1000)])
    pairs = data.Pairs(captions, np.arange(1000), captions)
    train, val = data.split(pairs, 0.1, 30, seed=0)
    assert len(val) == 30 and len(train) == 970 and not set(train.captions) & set(val.captions)
    assert data.split(pairs, 0.0, 30, seed=0)[1] is None


def test_batch_plan_covers_each_epoch_once():
    n, B = 103, 10                                      # 10 batches an epoch; 3 pairs wait for the next
    steps = [data.batch_plan(s, n, B, seed=4, slack=4) for s in range(20)]
    for epoch in range(2):
        seen = np.concatenate([idx for idx, _ in steps[10 * epoch:10 * epoch + 10]])
        assert len(set(seen)) == 100
    assert not np.array_equal(steps[0][0], steps[10][0])        # a new order each epoch
    offsets = np.concatenate([o for _, o in steps])
    assert offsets.min() == 0 and offsets.max() == 4
    again = data.batch_plan(13, n, B, seed=4, slack=4)          # a pure function of the step
    assert np.array_equal(again[0], steps[13][0]) and np.array_equal(again[1], steps[13][1])


def test_workers_decode_what_the_main_process_decodes(tmp_path):
    pairs = data.read_shards([write_shards(tmp_path, 2, 6)])
    requests = [data.batch_plan(s, len(pairs), 4, seed=0, slack=4) for s in range(5)]
    plain = data.Loader(32, workers=0)
    pooled = data.Loader(32, workers=2)
    try:
        for (a, ia), (b, ib) in zip(plain.batches(pairs, requests), pooled.batches(pairs, requests)):
            assert a.shape == (4, 32, 32, 3) and np.array_equal(a, b) and np.array_equal(ia, ib)
    finally:
        pooled.close()
    assert plain.decoded == pooled.decoded == 20


@pytest.mark.skipif(not hasattr(os, "nice"), reason="POSIX priorities")
def test_workers_run_at_the_lowest_priority():
    """A decoding worker takes the cores BLAS leaves idle (nice 19), and leaves Ctrl-C to the main process."""
    import signal
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, initializer=data.start_worker) as pool:
        assert pool.submit(os.nice, 0).result() == 19
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
    assert os.nice(0) < 19                              # this process keeps its priority


def test_prefetch_is_bounded(tmp_path):
    pairs = data.read_shards([write_shards(tmp_path, 1, 8)])
    pulled = []

    def requests():
        for s in range(50):
            pulled.append(s)
            yield data.batch_plan(s, len(pairs), 2, seed=0, slack=4)
    loader = data.Loader(32, workers=1, prefetch=3)
    try:
        batches = loader.batches(pairs, requests())
        next(batches)
        assert len(pulled) == 4                         # the batch handed out and 3 ahead of it
        next(batches)
        assert len(pulled) == 5
    finally:
        loader.close()


def test_in_memory_pairs_are_cropped_at_their_offsets():
    images = np.random.default_rng(0).integers(0, 256, (5, 36, 36, 3), dtype=np.uint8)
    pairs = data.Pairs(data.Strings.of(list("abcde")), np.arange(5), data.object_column(list("abcde")), images=images)
    offsets = np.array([[0, 4], [3, 1]])
    (crops, idx), = data.Loader(32, workers=2).batches(pairs, [(np.array([4, 1]), offsets)])
    assert np.array_equal(crops[0], images[4, 0:32, 4:36]) and np.array_equal(crops[1], images[1, 3:35, 1:33])


def test_csv_rows_checked_against_folder_listings(tmp_path):
    """A CSV row is good when its path names a file: relative, absolute, through a symlink, or with "..";
    a folder, a missing file, or a file in a missing folder is a bad row, and --skip-bad skips it."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "sub").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    (tmp_path / "img" / "link.png").symlink_to(tmp_path / "img" / "a.png")
    rows = ["img/a.png,relative", f"{tmp_path}/img/a.png,absolute", "img/link.png,symlink",
            "img/sub/../a.png,dotdot", "img/sub,a folder", "img/b.png,missing", "nope/a.png,no folder", "img/a.png,"]
    (tmp_path / "p.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    with pytest.raises(data.DataError, match="4 bad rows, first: line 6: img/sub: no such file; line 7: img/b.png"):
        data.read_csv(str(tmp_path / "p.csv"), "filepath", "title", ",", skip_bad=False)
    pairs = data.read_csv(str(tmp_path / "p.csv"), "filepath", "title", ",", skip_bad=True)
    assert list(pairs.captions) == ["relative", "absolute", "symlink", "dotdot"]
    assert list(pairs.locators) == [f"{tmp_path}/img/a.png", f"{tmp_path}/img/a.png", f"{tmp_path}/img/link.png",
                                    f"{tmp_path}/img/sub/../a.png"]


@pytest.mark.parametrize("names", [["a.png", "img/b.png"], ["/x/a.png", "/b.png"], ["a.png", "/x/b.png", "c/d.png"], []])
def test_paths_under_prefixes_the_relative_names_only(names):
    expected = [n if n.startswith("/") else "/root/" + n for n in names]
    assert list(data.paths_under("/root/", names)) == expected

