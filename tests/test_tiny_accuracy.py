"""
The README's `python train.py --tiny`, run in full, and the held-out zero-shot accuracy it prints:
at least 90% on color-shape pairs never seen in training (chance: 2%). It takes a few minutes, so it
runs where MINICLIP_FULL_TINY=1 (CI sets it) and is skipped otherwise. It checks accuracy, not time.

The bound holds for every run measured, not for one machine's: the CPU, the thread count and the
speed devices' rounding change the run. Seeds 1-4 stay at 95.8% or above in every run measured; seed 0,
the default, holds out the hardest pairs and gave 92.3-96.8% over eleven runs (AMD EPYCs of two
families and an Intel Xeon, 1 and 2 threads, three roundings; docs/tiny.md), 92.1% at half the peak learning rate.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.environ.get("MINICLIP_FULL_TINY") != "1",
                    reason="the full --tiny run takes minutes; set MINICLIP_FULL_TINY=1 to run it")
def test_full_tiny_run_reaches_90_percent_zero_shot(tmp_path, capsys):
    p = subprocess.run([sys.executable, "train.py", "--tiny", "--out", str(tmp_path / "tiny.npz")],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    final = [line for line in p.stdout.splitlines() if line.startswith("eval at step 1500:")]
    assert final, p.stdout[-2000:]
    accuracy = float(re.search(r"zeroshot_top1 ([0-9.]+)", final[0]).group(1))
    with capsys.disabled():
        print(f"\nfull --tiny run: {final[0]}")
    assert accuracy >= 0.90, final[0]
