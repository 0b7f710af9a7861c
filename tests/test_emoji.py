"""The emoji data set: prepared from small tarballs built here in the npm packages' layout (no network)."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import data
import miniclip as mc
import weights
import train
import zeroshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
         "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}

# The fake packages' emoji: (code as emoji.json writes it, CLDR name, tags, skin tones?). The concept
# of each is written out by hand in CONCEPT, so a wrong grouping cannot agree with itself.
BASES = [("1F44B", "waving hand", "hand, wave", True), ("1F44D", "thumbs up", "hand, up, yes", True),
         ("1F481", "person tipping hand", "hand, help", True),
         ("1F481-200D-2642-FE0F", "man tipping hand", "hand, help, man", True),
         ("1F481-200D-2640-FE0F", "woman tipping hand", "hand, help, woman", True),
         ("1F9D1-200D-1F33E", "farmer", "gardener", False), ("1F468-200D-1F33E", "man farmer", "farmer, man", False),
         ("1F469-200D-1F33E", "woman farmer", "farmer, woman", False)] + \
        [(f"1F3{i:02X}", f"thing {i}", f"thing, number {i}, item, object, stuff", False) for i in range(0x10, 0x10 + 16)]
CONCEPT = {"waving hand": "wave", "thumbs up": "thumbs", "person tipping hand": "tip", "man tipping hand": "tip",
           "woman tipping hand": "tip", "farmer": "farm", "man farmer": "farm", "woman farmer": "farm"}
COLORS = [(220, 40, 40), (40, 180, 60), (50, 90, 235), (240, 220, 50)]


def all_emoji():
    """[(code in emoji.json's case, name, tags, base code or '')] with the skin tone variants."""
    out = []
    for code, name, tags, toned in BASES:
        out.append((code, name, tags, ""))
        for tone, words in TONES.items() if toned else ():
            parts = code.split("-")
            out.append(("-".join([parts[0], tone] + parts[1:]), f"{name}: {words}", "", code))
    return out


def png_bytes(i, size=64, mode="RGBA"):
    """A transparent square with a colored disc, different for each i."""
    img = Image.new(mode, (size, size), (0, 0, 0, 0) if mode == "RGBA" else (255, 255, 255))
    from PIL import ImageDraw
    r = 8 + i % 20
    ImageDraw.Draw(img).ellipse([32 - r, 32 - r, 32 + r, 32 + r], fill=COLORS[i % 4] + ((255,) if mode == "RGBA" else ()))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


SVG = ('<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"><circle cx="36" cy="36" r="{r}" '
       'fill="#{c:06X}" stroke="#000" stroke-width="2"/></svg>')


def add(tar, name, raw):
    info = tarfile.TarInfo("package/" + name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def make_fluent(folder, broken_svg=None):
    """fluentui-emoji's tarball: SVGs named by CLDR name in three styles, none for "tipping" emoji."""
    path = folder / "fluentui-emoji-1.0.0.tgz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "package.json", json.dumps({"name": "fluentui-emoji", "version": "1.0.0"}).encode())
        for i, (code, name, tags, base) in enumerate(all_emoji()):
            toned = any(c == code for c, _, _, t in BASES if t)
            stem = name.replace(" ", "-").replace(":-", "-").replace("-skin-tone", "") + ("-default" if toned else "")
            if "tipping" not in name:
                raw = b"<svg" if name == broken_svg else SVG.format(r=12 + i % 20, c=0xF0A030 + 40 * i).encode()
                for style in ("flat", "high-contrast"):
                    add(tar, f"icons/{style}/{stem}.svg", raw)
    return str(path)


def make_packages(folder, drop_annotation=None, broken_png=None, name_of=None):
    """The three tarballs, as `npm pack` writes them; returns their paths."""
    emoji = all_emoji()
    paths = []
    for package, vendor in data.EMOJI_PACKAGES.items():
        path = folder / f"{package}-1.0.0.tgz"
        with tarfile.open(path, "w:gz") as tar:
            add(tar, "package.json", json.dumps({"name": (name_of or {}).get(package, package), "version": "1.0.0"}).encode())
            if vendor == "openmoji":
                rows = io.StringIO()
                w = csv.writer(rows)
                w.writerow(["emoji", "hexcode", "group", "subgroups", "annotation", "tags", "skintone_base_hexcode"])
                for i, (code, name, tags, base) in enumerate(emoji):
                    hexcode = code.upper()
                    w.writerow(["?", hexcode, "people-body", "hand", "" if name == drop_annotation else name,
                                tags, base.upper()])
                    add(tar, f"color/svg/{hexcode}.svg", SVG.format(r=10 + i % 20, c=0x3060F0 + 40 * i).encode())
                add(tar, "data/openmoji.csv", rows.getvalue().encode())
            else:
                entries = {}
                for i, (code, name, tags, base) in enumerate(emoji):
                    image = code.lower() + ".png"
                    e = {"unified": code, "image": image, f"has_img_{vendor}": True}
                    if base:
                        entries[base].setdefault("skin_variations", {})[code.split("-")[1]] = e
                    else:
                        entries[code] = {**e, "name": name.upper()}
                    raw = b"not a png" if (vendor, name) == broken_png else png_bytes(i + (vendor == "twitter"))
                    add(tar, f"img/{vendor}/64/{image}", raw)
                add(tar, "emoji.json", json.dumps(list(entries.values())).encode())
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emoji")
    tarballs = make_packages(folder)
    assert data.main(["emoji", *tarballs, "--out", str(folder / "data"), "--size", "32"]) == 0
    return folder / "data", tarballs


@pytest.fixture(scope="module")
def prepared_with_fluent(tmp_path_factory, prepared):
    folder = tmp_path_factory.mktemp("emoji_fluent")
    tarballs = [*make_packages(folder), make_fluent(folder)]
    assert data.main(["emoji", *tarballs, "--out", str(folder / "data"), "--size", "32"]) == 0
    return folder / "data"


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_emoji_concept_drops_skin_tones_and_gender():
    assert data.emoji_code("1f481-200d-2640-fe0f") == "1F481-200D-2640"
    assert data.emoji_concept("1F481-1F3FF-200D-2640") == "1F481"             # woman tipping hand: dark skin tone
    assert data.emoji_concept("1F481-200D-2642") == "1F481"                    # man tipping hand
    assert data.emoji_concept("1F469-200D-1F33E") == "1F9D1-200D-1F33E"        # woman farmer -> farmer
    assert data.emoji_concept("1F466") == data.emoji_concept("1F467") == "1F9D2"   # boy, girl -> child
    assert data.emoji_concept("2640") == "2640"                                # the female sign alone stays
    assert data.emoji_concept("1F3FB") == "1F3FB"                              # a skin tone swatch alone stays


def test_prepared_files_and_images(prepared):
    out, _ = prepared
    s = json.loads((out / "splits.json").read_text())
    n = len(all_emoji())
    assert s["counts"]["train_names"] + s["counts"]["val_names"] + s["counts"]["test_names"] == n
    assert s["skipped"] == [] and s["packages"]["openmoji"] == "openmoji@1.0.0"
    train_rows = read_rows(out / "train.csv")
    assert len(train_rows) == 2 * len(data.EMOJI_CAPTIONS) * s["counts"]["train_names"]
    assert {r["filepath"].split("/")[1] for r in train_rows} == set(data.TRAIN_VENDORS)   # never OpenMoji
    # Every caption form of an image names the emoji; the tag forms add words of its tags.
    by_image = {}
    for r in train_rows:
        by_image.setdefault(r["filepath"], []).append(r["title"])
    for path, titles in by_image.items():
        label = next(r["label"] for r in train_rows if r["filepath"] == path)
        assert len(set(titles)) == len(data.EMOJI_CAPTIONS) and all(label in t for t in titles)
    seen = read_rows(out / "test_vendor_seen.csv")
    assert {r["label"] for r in seen} == {r["label"] for r in train_rows}
    assert all(r["filepath"].startswith("images/openmoji/") for r in seen + read_rows(out / "test_vendor_unseen.csv"))
    assert (out / "labels.txt").read_text().splitlines() == [e[1] for e in all_emoji()]
    # Images: size x size RGB, transparency onto white, the drawing scaled to fill the square.
    for vendor in data.EMOJI_PACKAGES.values():
        img = Image.open(out / "images" / vendor / "1F44B.png")
        a = np.asarray(img)
        assert img.mode == "RGB" and img.size == (32, 32)
        assert (a[0, 0] == 255).all()                           # the corner is background
        ink = np.argwhere((a < 250).any(axis=2))
        margin = round(32 * data.EMOJI_MARGIN)
        assert ink.min() >= margin - 1 and ink.max() <= 32 - margin and ink.max() - ink.min() >= 32 - 2 * margin - 2


def test_split_keeps_every_form_of_a_held_out_concept_out_of_training(prepared):
    out, _ = prepared
    split_of = {}
    for split, name in (("train", "train"), ("val", "val"), ("test", "test_concepts")):
        for r in read_rows(out / f"{name}.csv"):
            split_of.setdefault(r["label"], set()).add(split)
    assert all(len(s) == 1 for s in split_of.values())
    where = {}
    for label, (split,) in split_of.items():
        base = label.split(":")[0]
        where.setdefault(CONCEPT.get(base, base), set()).add(split)
    assert all(len(s) == 1 for s in where.values()), where      # skin tones and gender forms stay together
    assert {s for (s,) in where.values()} == {"train", "val", "test"}


def test_fluent_file_matches_cldr_names():
    have = {f"package/icons/flat/{n}.svg" for n in ("farmer-default", "farmer-light", "farmer-medium-dark", "pinata",
                                                      "keycap-0", "red-apple", "1st-place-medal")}
    assert data.fluent_file("farmer: light skin tone", have) == "package/icons/flat/farmer-light.svg"
    assert data.fluent_file("farmer: medium-dark skin tone", have) == "package/icons/flat/farmer-medium-dark.svg"
    assert data.fluent_file("farmer", have) == "package/icons/flat/farmer-default.svg"
    assert data.fluent_file("piñata", have) == "package/icons/flat/pinata.svg"
    assert data.fluent_file("keycap: 0", have) == "package/icons/flat/keycap-0.svg"
    assert data.fluent_file("1st place medal", have) == "package/icons/flat/1st-place-medal.svg"
    assert data.fluent_file("farmer: dark skin tone", have) is None
    assert data.fluent_file("kiss: woman, man, light skin tone, dark skin tone", have) is None


def test_fluent_adds_a_training_artist_and_changes_nothing_else(prepared, prepared_with_fluent):
    plain, out = prepared[0], prepared_with_fluent
    for name in ("train", "val", "test_concepts", "test_vendor_seen", "test_vendor_unseen"):
        assert (out / f"{name}.csv").read_bytes() == (plain / f"{name}.csv").read_bytes()
    assert (out / "labels.txt").read_bytes() == (plain / "labels.txt").read_bytes()
    train_rows, extra = read_rows(out / "train.csv"), read_rows(out / "train_with_fluent.csv")
    assert extra[:len(train_rows)] == train_rows
    fluent = extra[len(train_rows):]
    assert fluent and all(r["filepath"].startswith("images/fluent/") for r in fluent)
    # Only training concepts, each drawing under every caption form; none of a "tipping" emoji (no file).
    train_labels = {r["label"] for r in train_rows}
    drawn = {r["label"] for r in fluent}
    assert drawn == {n for n in train_labels if "tipping" not in n}
    assert len(fluent) == len(data.EMOJI_CAPTIONS) * len(drawn)
    for r in fluent:
        assert r["label"] in r["title"] and (out / r["filepath"]).is_file()
    s = json.loads((out / "splits.json").read_text())
    assert s["packages"]["fluent"] == "fluentui-emoji@1.0.0" and "MIT" in s["licenses"]["fluent"]
    assert s["counts"]["train_with_fluent_rows"] == len(extra)
    img = Image.open(out / "images" / "fluent" / "1F44B-1F3FD.png")    # waving hand: medium skin tone
    assert img.mode == "RGB" and img.size == (32, 32) and np.asarray(img)[0, 0].tolist() == [255, 255, 255]


def test_a_fluent_file_two_names_claim_is_neither_s(tmp_path, monkeypatch):
    tarballs = [*make_packages(tmp_path), make_fluent(tmp_path)]
    clash = {"thing 16", "thing 17"}
    real = data.fluent_file
    monkeypatch.setattr(data, "fluent_file", lambda name, have: "package/icons/flat/thing-16.svg" if name in clash
                        else real(name, have))
    table, _ = data.emoji_table(data.EmojiPackages(tarballs))
    fluent = {e["name"] for e in table.values() if "fluent" in e["files"]}
    assert not fluent & clash and "thing 18" in fluent


def test_split_is_seeded(tmp_path, prepared):
    _, tarballs = prepared
    table, _ = data.emoji_table(data.EmojiPackages(tarballs))
    assert data.emoji_splits(table, 0) == data.emoji_splits(table, 0) != data.emoji_splits(table, 1)


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_bad_packages_get_one_line_and_write_nothing(tmp_path):
    good = make_packages(tmp_path)
    other = tmp_path / "other"
    os.makedirs(other)
    renamed = make_packages(other, name_of={"openmoji": "left-pad"})
    broken = tmp_path / "broken"
    os.makedirs(broken)
    cut = broken / "cut.tgz"                            # a download stopped halfway
    with open(good[2], "rb") as f:
        cut.write_bytes(f.read()[:os.path.getsize(good[2]) // 2])
    cases = [(good[:2], "no tarball of openmoji given"),
             ([*good[:2], tmp_path / "absent.tgz"], "absent.tgz: no such file"),
             ([*good[:2], renamed[2]], "holds the npm package 'left-pad', not one of"),
             ([*good[:2], good[0]], "a second tarball of emoji-datasource-google"),
             ([*good[:2], cut], "cut.tgz: the file ends early (an interrupted download? fetch it again)"),
             (make_packages(broken, broken_png=("twitter", "thumbs up")), "img/twitter/64/1f44d.png does not decode"),
             ([*good, make_fluent(tmp_path), make_fluent(other)], "a second tarball of fluentui-emoji"),
             ([*good, make_fluent(broken, broken_svg="thing 17")], "icons/flat/thing-17.svg does not decode")]
    for tarballs, message in cases:
        p = run("emoji", *tarballs, "--out", tmp_path / "out")
        assert p.returncode == 1 and message in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("error: ") and not os.path.exists(tmp_path / "out")
        assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]
    os.makedirs(tmp_path / "out")
    p = run("emoji", *good, "--out", tmp_path / "out")
    assert p.returncode == 1 and "already exists" in p.stderr and os.listdir(tmp_path / "out") == []


def test_an_emoji_without_a_name_is_skipped_and_counted(tmp_path):
    tarballs = make_packages(tmp_path, drop_annotation="thing 20")
    s = data.prepare_emoji(tarballs, str(tmp_path / "out"))
    assert s["skipped"] == ["1F314: no CLDR name in openmoji.csv"]
    assert "thing 20" not in (tmp_path / "out" / "labels.txt").read_text().splitlines()


def test_train_and_zeroshot_on_the_prepared_data(prepared, tmp_path, capsys):
    out, _ = prepared
    ck = tmp_path / "emoji.npz"
    tiny = ["--steps", "4", "--batch-size", "16", "--log-every", "2", "--eval-every", "4", "--workers", "0"]
    assert train.main(["--data", str(out / "train.csv"), "--val", str(out / "val.csv"), *tiny,
                       "--template", "an emoji of {}", "--labels-file", str(out / "labels.txt"), "--out", str(ck)]) == 0
    log = capsys.readouterr().out
    val_names = len((out / "labels_val.txt").read_text().splitlines())
    assert f"validation pairs from {out / 'train.csv'} and {out / 'val.csv'}, of {val_names} labels" in log
    assert "zeroshot_top5" in log
    meta = weights.load_checkpoint(ck)[2]
    assert meta["labels"] == (out / "labels.txt").read_text().splitlines()
    assert meta["templates"] == ["an emoji of {}"] and meta["data_args"]["val"] == str(out / "val.csv")

    # --test scores a labeled CSV exactly as the training run's evaluation does.
    assert zeroshot.main(["--checkpoint", str(ck), "--test", str(out / "val.csv"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    final = [json.loads(line)["eval"] for line in open(tmp_path / "emoji.metrics.jsonl") if "eval" in line][-1]
    assert result["labels"] == val_names and result["images"] == 2 * val_names
    assert {k: result[k] for k in final} == final

    # The checkpoint's own labels and templates classify an emoji PNG; --query ranks a folder.
    image = out / "images" / "openmoji" / "1F44B.png"
    assert zeroshot.main(["--checkpoint", str(ck), str(image), "--json", "--topk", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got["predictions"]) == 3 and all(p["label"] in meta["labels"] for p in got["predictions"])
    assert zeroshot.main(["--checkpoint", str(ck), "--images-from", str(out / "images" / "google"),
                          "--query", "a waving hand", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)["results"]
    assert len(ranked) == len(os.listdir(out / "images" / "google"))


def test_zeroshot_test_counts_hits_by_hand(tmp_path, capsys, monkeypatch):
    """Three images of two labels, with class embeddings chosen so that the right answers are known."""
    os.makedirs(tmp_path / "img")
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "t.csv").write_text("filepath,title,label\nimg/0.png,a,cat\nimg/1.png,b,dog\nimg/2.png,c,dog\n")
    images = np.array([[1.0, 0], [1, 0], [0, 1]])              # image 1 (a dog) looks like a cat
    monkeypatch.setattr(zeroshot, "embed_pairs", lambda *a: images)
    monkeypatch.setattr(zeroshot, "embed_texts", lambda *a: images)
    monkeypatch.setattr(zeroshot, "prompt_ids", lambda *a: None)
    monkeypatch.setattr(mc, "class_embeddings", lambda *a: mc.to_device(np.array([[1.0, 0], [0, 1]])))
    r = zeroshot.test(None, mc.PRESETS["tiny"], None, str(tmp_path / "t.csv"), None, ["{}"], 0)
    assert r["images"] == 3 and r["labels"] == 2
    assert r["zeroshot_top1"] == pytest.approx(2 / 3) and r["zeroshot_top5"] == 1.0
    # With the labels given in another order, and one more, the same images are right.
    monkeypatch.setattr(mc, "class_embeddings", lambda *a: mc.to_device(np.array([[0, 1.0], [1, 0], [-1, -1]])))
    r = zeroshot.test(None, mc.PRESETS["tiny"], None, str(tmp_path / "t.csv"), ["dog", "cat", "cow"], ["{}"], 0)
    assert r["zeroshot_top1"] == pytest.approx(2 / 3) and r["labels"] == 3
    with pytest.raises(data.UserError, match="1 labels are not in the label list, first: 'cat'"):
        zeroshot.test(None, mc.PRESETS["tiny"], None, str(tmp_path / "t.csv"), ["dog"], ["{}"], 0)
