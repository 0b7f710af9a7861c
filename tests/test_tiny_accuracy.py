"""
The README's `python train.py --tiny`, run in full, and the held-out zero-shot accuracy it prints:
at least 95% on color-shape pairs never seen in training. It takes about three minutes, so it runs
where MINICLIP_FULL_TINY=1 (CI sets it) and is skipped otherwise. It checks accuracy, not time.

The recipe (train.py's TrainConfig) was chosen over seeds, not on seed 0 alone: at peak learning rate
2e-3 seeds 0-4 reach 95.7%, 99.4%, 96.6% (and seeds 3, 4 in the README); at 1e-3 seed 0 reached
92.1% and seed 1 97.4%. Which pairs a seed holds out moves the result by a few points.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.environ.get("MINICLIP_FULL_TINY") != "1",
                    reason="the full --tiny run takes minutes; set MINICLIP_FULL_TINY=1 to run it")
def test_full_tiny_run_reaches_95_percent_zero_shot(tmp_path, capsys):
    p = subprocess.run([sys.executable, "train.py", "--tiny", "--out", str(tmp_path / "tiny.npz")],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    final = [line for line in p.stdout.splitlines() if line.startswith("eval at step 1500:")]
    assert final, p.stdout[-2000:]
    accuracy = float(re.search(r"zeroshot_top1 ([0-9.]+)", final[0]).group(1))
    with capsys.disabled():
        print(f"\nfull --tiny run: {final[0]}")
    assert accuracy >= 0.95, final[0]
