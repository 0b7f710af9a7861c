"""
The README's `python train.py --tiny`, run in full, and the held-out zero-shot accuracy it prints:
at least 93% on color-shape pairs never seen in training (chance: 2%). It takes about three minutes,
so it runs where MINICLIP_FULL_TINY=1 (CI sets it) and is skipped otherwise. It checks accuracy, not
time.

The bound holds for every run measured, not for one machine's: the CPU and the thread count change
the rounding, and so the run. Seed 0 gave 95.8% with 2 threads on an AMD EPYC, 94.6% with 2 threads
on an Intel Xeon, and 93.2% single-threaded; seeds 1-4 single-threaded 98.8, 95.8, 99.1 and 99.3%
(docs/tiny.md). The lowest seen, 92.1%, was seed 0 at half the peak learning rate.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.environ.get("MINICLIP_FULL_TINY") != "1",
                    reason="the full --tiny run takes minutes; set MINICLIP_FULL_TINY=1 to run it")
def test_full_tiny_run_reaches_93_percent_zero_shot(tmp_path, capsys):
    p = subprocess.run([sys.executable, "train.py", "--tiny", "--out", str(tmp_path / "tiny.npz")],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    final = [line for line in p.stdout.splitlines() if line.startswith("eval at step 1500:")]
    assert final, p.stdout[-2000:]
    accuracy = float(re.search(r"zeroshot_top1 ([0-9.]+)", final[0]).group(1))
    with capsys.disabled():
        print(f"\nfull --tiny run: {final[0]}")
    assert accuracy >= 0.93, final[0]
