"""
The streaming data path, measured: how fast one worker decodes, against how fast the model consumes;
the share of each step spent waiting for images with 0, 1 and 2 workers; and the memory and time to
the first step as the CSV grows ten times.

    python benchmarks/data_loading.py          about 3 minutes on 2 cores

Images are JPEGs written here (quality 90): "small", 256 x 256, and "photo", 640 x 480, both smooth
gradients with noise, which decode like photographs rather than like pure noise.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import miniclip as mc  # noqa: E402  before NumPy: it makes OpenBLAS's settings (mc.cpu_settings)
import numpy as np  # noqa: E402
import data                                             # noqa: E402


def write_jpegs(folder, n, w, h, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        base = rng.uniform(0, 255, 3) * (1 - x[..., None]) + rng.uniform(0, 255, 3) * y[..., None]
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(os.path.join(folder, f"{w}x{h}_{i}.jpg"))
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def decode_rate(paths, image_size, repeats=2):
    """Images per second that one process decodes, resizes and crops for a model of image_size."""
    side = data.load_size(image_size)
    offsets = np.zeros((len(paths), 2), dtype=int)
    t0 = time.perf_counter()
    for _ in range(repeats):
        data.decode_crops(paths, side, image_size, offsets)
    return repeats * len(paths) / (time.perf_counter() - t0)


def step_rate(preset, n):
    """Pairs per second of a train step of the preset at batch n (median of 3 after a warm-up)."""
    cfg = mc.PRESETS[preset]
    params = mc.init_params(cfg)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((n, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    ids = rng.integers(1, cfg.vocab_size - 1, (n, 16))
    ids[:, -1] = cfg.vocab_size - 1
    times = []
    for _ in range(4 if preset == "tiny" else 2):
        t0 = time.perf_counter()
        mc.loss_and_grads(params, cfg, pixels, ids)
        times.append(time.perf_counter() - t0)
    return n / float(np.median(times[1:]))


def write_csv(path, images, rows):
    with open(path, "w") as f:
        f.write("filepath,title\n")
        for i in range(rows):
            f.write(f"{images[i % len(images)]},picture {i} of a thing number {i % 977}\n")


# train.py run as __main__, then its peak resident memory as the kernel counts it for this process
# image (VmHWM): ru_maxrss would also count the benchmark's own memory, inherited across fork and exec.
TRAIN_THEN_PEAK = f"""
import runpy, sys
sys.argv[0] = {os.path.join(ROOT, "train.py")!r}
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("peak_kib", peak, flush=True)
"""


def run_train(args):
    """train.py in a subprocess: (seconds to the first step line, its peak resident MiB, the log)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_THEN_PEAK, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first, lines, peak = None, [], None
    for line in proc.stdout:
        lines.append(line)
        if first is None and line.startswith("step"):
            first = time.perf_counter() - t0
        if line.startswith("peak_kib"):
            peak = int(line.split()[1]) / 1024
    assert proc.wait() == 0, "".join(lines[-5:])
    return first, peak, "".join(lines)


def main():
    mc.cpu_settings()                                   # the model's step rate as train.py's process runs it
    with tempfile.TemporaryDirectory() as tmp:
        small, photo = write_jpegs(tmp, 64, 256, 256), write_jpegs(tmp, 64, 640, 480, seed=1)
        print("## Decoding, one worker (images/s) against the model's train step (pairs/s)\n")
        tiny_rate, b32_rate = step_rate("tiny", 128), step_rate("ViT-B/32", 8)
        print("| images | for tiny (32 px) | for ViT-B/32 (224 px) |")
        print("|---|---|---|")
        for name, paths in (("256x256 JPEG", small), ("640x480 JPEG", photo)):
            print(f"| {name} | {decode_rate(paths, 32):.0f} | {decode_rate(paths, 224):.0f} |")
        print(f"| model step | {tiny_rate:.0f} (batch 128) | {b32_rate:.1f} (batch 8) |\n")

        print("## Share of the step spent waiting for images: tiny model, 256x256 JPEGs, batch 128\n")
        csv_path = os.path.join(tmp, "pairs.csv")
        write_csv(csv_path, small, 2048)
        print("| workers | data wait | pairs/s |")
        print("|---|---|---|")
        for workers in (0, 1, 2):
            _, _, log = run_train(["--data", csv_path, "--steps", "24", "--batch-size", "128", "--log-every", "8",
                                   "--val-frac", "0", "--workers", str(workers), "--out", os.path.join(tmp, "c.npz")])
            rows = re.findall(r"\|\s+(\d+) img/s \| data\s+(\d+)%", log)[1:]   # after the first, warm-up interval
            print(f"| {workers} | {np.mean([float(w) for _, w in rows]):.0f}% | "
                  f"{np.mean([float(r) for r, _ in rows]):.0f} |")

        print("\n## A CSV ten times larger: time to the first step and peak memory (tiny, 2 workers)\n")
        print("The tokenizer learns from min(rows, 25,000) captions, so only the second pair has the same tokenizer work.\n")
        print("| rows | time to first step (median of 5) | peak resident memory of the training process |")
        print("|---|---|---|")
        for rows in (20_000, 200_000, 30_000, 300_000):
            write_csv(csv_path, small, rows)
            runs = [run_train(["--data", csv_path, "--steps", "1", "--batch-size", "128", "--val-frac", "0",
                               "--out", os.path.join(tmp, "c.npz")]) for _ in range(5)]
            first, peak = np.median([r[0] for r in runs]), max(r[1] for r in runs)
            print(f"| {rows:,} | {first:.2f} s | {peak:.0f} MiB |")


if __name__ == "__main__":
    main()
