"""
Peak memory while loading a model folder: resident memory at its highest during weights.load_weights,
above what the process held just before, as a multiple of the weights file's size. A float32 file
should cost about its size once (each tensor is read straight into its array); a reader that maps the
file and then converts each tensor holds it about twice.

    python benchmarks/load_memory.py                    a random CLIP, both towers 768 wide, 12 layers: 806 MiB
    python benchmarks/load_memory.py --width 256 --layers 2 --dtype bfloat16

The model is written by transformers' save_pretrained into a temporary folder; the load runs in a
fresh process so that nothing else it did is counted.
"""
import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Linux's VmRSS and VmHWM (the resident high-water mark) of this process; writing 5 to clear_refs resets
# the mark to the current resident size, so the mark read after the load is the load's own peak.
MEASURE = """
import sys
sys.path.insert(0, sys.argv[2])
import weights

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
params, cfg = weights.load_weights(sys.argv[1])
print(before, status("VmHWM"), sum(p.nbytes for p in params.values()))
"""


def random_folder(folder, width, layers, heads, dtype):
    """A random transformers CLIPModel saved in folder, both towers width x layers; the weights file's path."""
    import torch
    import transformers
    torch.manual_seed(0)
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    config = transformers.CLIPConfig(text_config=tower, vision_config=dict(tower, image_size=224, patch_size=32),
                                     projection_dim=512)
    transformers.CLIPModel(config).to(getattr(torch, dtype)).save_pretrained(folder)
    return os.path.join(folder, "model.safetensors")


def peak_over_size(folder):
    """(peak resident memory above the start of the load, the file's size, the loaded arrays' bytes)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, folder, ROOT], capture_output=True, text=True,
                         check=True).stdout.split()
    before, peak, loaded = map(int, out)
    return peak - before, os.path.getsize(os.path.join(folder, "model.safetensors")), loaded


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--width", type=int, default=768, help="both towers' width (ViT-B/32's image tower: 768)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        random_folder(folder, args.width, args.layers, args.heads, args.dtype)
        grown, size, loaded = peak_over_size(folder)
    print(f"{args.dtype} file of {size / 2**20:.0f} MiB, loaded as {loaded / 2**20:.0f} MiB of float32: peak resident "
          f"memory {grown / 2**20:.0f} MiB above the start, {grown / size:.2f}x the file, {grown / loaded:.2f}x the arrays")


if __name__ == "__main__":
    main()
