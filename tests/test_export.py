"""weights.py export: a trained checkpoint as transformers' and open_clip's folders, read back by them and by us."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import bpe
import miniclip as mc
import train
import weights
import zeroshot
from conftest import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["red star", "blue cross", "white circle", "green square", "yellow triangle"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def trained(request, tmp_path_factory):
    """A tiny checkpoint after a few steps (enough that the probabilities are not uniform), in each activation,
    and two pictures: a training sample and a larger, non-square one that the preprocessing must resize."""
    folder = tmp_path_factory.mktemp(request.param)
    assert train.main(["--preset", "tiny", "--steps", "6", "--n-train", "256", "--n-eval", "48", "--batch-size", "32",
                       "--activation", request.param, "--out", str(folder / "tiny.npz")]) == 0
    wide = folder / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 71, 3), dtype=np.uint8)).save(wide)
    return folder, [sorted((folder / "samples").iterdir())[0], wide]


def zeroshot_logprobs(capsys, checkpoint_args, images):
    """zeroshot.py's --json answer for the images, in process: {image: log-probabilities in LABELS' order}."""
    capsys.readouterr()
    assert zeroshot.main([*map(str, images), *map(str, checkpoint_args), "--json", "--labels", ",".join(LABELS),
                          "--template", TEMPLATE]) == 0
    out = {}
    for line in capsys.readouterr().out.splitlines():
        r = json.loads(line)
        probs = {d["label"]: d["prob"] for d in r["predictions"]}
        out[r["image"]] = np.log([probs[label] for label in LABELS])
    return out


def test_transformers_reads_the_export_as_zeroshot_reads_the_checkpoint(trained, tmp_path, capsys):
    """CLIPModel.from_pretrained and CLIPProcessor.from_pretrained on the exported folder give the
    probabilities that zeroshot.py gives on the checkpoint, to float32 rounding; compared as log
    probabilities (logits up to a constant), which keep small probabilities' errors visible."""
    torch, transformers = reference("torch"), reference("transformers")
    folder, images = trained
    out = tmp_path / "hf"
    assert weights.main(["export", str(folder / "tiny.npz"), str(out)]) == 0
    ours = zeroshot_logprobs(capsys, ["--checkpoint", folder / "tiny.npz"], images)
    model = transformers.CLIPModel.from_pretrained(out, attn_implementation="eager").eval()
    processor = transformers.CLIPProcessor.from_pretrained(out)
    for image in images:
        inputs = processor(text=[TEMPLATE.format(label) for label in LABELS], images=Image.open(image),
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            theirs = torch.log_softmax(model(**inputs).logits_per_image[0].double(), -1).numpy()
        got = ours[str(image)]
        assert np.ptp(got) > 0.05, "the probabilities are too close to uniform to compare"
        # measured: at most 1.1e-6 apart (float32 rounding in different orders of summation)
        assert np.abs(got - theirs).max() < 1e-5, (got, theirs)
    # zeroshot.py on the export itself reads the same preprocessing, tokenizer and weights
    exported = zeroshot_logprobs(capsys, ["--weights", out], images)
    for image in images:
        assert np.abs(exported[str(image)] - ours[str(image)]).max() < 1e-5


@pytest.mark.parametrize("layout", weights.LAYOUTS)
def test_round_trip_is_bit_exact(trained, tmp_path, layout):
    """ours -> folder -> ours: every tensor bit for bit, the config and the tokenizer's merges equal; an
    independent reader (the safetensors package) sees the same tensors in the file."""
    load_file = reference("safetensors.numpy").load_file
    folder, _ = trained
    params, cfg, meta, _ = weights.load_checkpoint(folder / "tiny.npz")
    out = tmp_path / layout
    weights.export(folder / "tiny.npz", out, layout)
    got, got_cfg = weights.load_weights(out)
    assert got_cfg == cfg and set(got) == set(params)
    assert all(got[k].dtype == params[k].dtype and np.array_equal(got[k], params[k]) for k in params)
    assert bpe.load(out).merges == bpe.from_list(meta["tokenizer"]).merges
    name = weights.HF_FILES[0] if layout == "hf" else weights.OPEN_CLIP_FILES[0]
    tensors = load_file(str(out / name))
    want = weights.openai_to_hf(params, cfg) if layout == "hf" else params
    assert set(tensors) == set(want) and all(np.array_equal(tensors[k], want[k]) for k in want)
    assert weights.read_preprocessor(str(out), cfg) == (cfg.image_size, cfg.image_size, mc.CLIP_MEAN, mc.CLIP_STD)


@pytest.mark.parametrize("D, F", [(1408, 6144), (1664, 8192), (1280, 5120), (48, 160), (96, 384), (7, 3)])
def test_configs_round_trip_with_any_mlp_width(D, F):
    """Both config files read back to the config that wrote them, whatever the MLP's width: open_clip
    builds int(width * mlp_ratio) units, so the ratio written must land on F."""
    cfg = mc.Config(image_size=32, patch_size=8, vision_width=D, vision_heads=1, text_width=D, text_heads=1,
                    vision_layers=2, text_layers=1, vocab_size=600, context_length=20, embed_dim=16,
                    vision_mlp_width=weights.mlp_width(D, F), text_mlp_width=weights.mlp_width(D, F),
                    activation="gelu")
    assert int(D * weights.open_clip_mlp_ratio(D, F)) == F
    assert weights.config_from_open_clip(weights.open_clip_config(cfg), "x") == cfg
    tok = bpe.Tokenizer([])
    assert weights.config_from_hf(weights.hf_config(cfg, tok), "x") == cfg


def export_cli(*args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "weights.py"), "export", *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_export_refuses_bad_input_with_one_line_and_writes_nothing(trained, tmp_path):
    folder, _ = trained
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    bow = tmp_path / "bow" / "bow.npz"
    bag = tmp_path / "bow" / "bag.npz"
    for flags, out in ((["--tiny", "--objective", "bow"], bow), (["--preset", "tiny", "--text-layers", "0"], bag)):
        assert train.main([*flags, "--steps", "1", "--n-train", "64", "--n-eval", "48", "--batch-size", "16",
                           "--out", str(out)]) == 0
    cases = [((tmp_path / "none.npz", tmp_path / "a"), "no such checkpoint"),
             ((folder / "tiny.npz", full), "already exists and is not an empty folder"),
             ((bow, tmp_path / "b"), "has no text tower"),
             ((bag, tmp_path / "d"), "its text encoder is a bag of words"),
             ((folder / "wide.png", tmp_path / "c"), "not a readable miniclip checkpoint")]
    for args, message in cases:
        p = export_cli(*args)
        assert p.returncode == 1 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["bow", "full"] and os.listdir(full) == ["keep.txt"]
    p = export_cli(folder / "tiny.npz", tmp_path / "ok", "--layout", "open_clip")
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path / "ok")) == ["merges.txt", "open_clip_config.json", "open_clip_model.safetensors",
                                                   "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
