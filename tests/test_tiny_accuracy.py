"""
The README's `python train.py --tiny`, run in full, and the held-out zero-shot accuracy it prints:
at least 90% on color-shape pairs never seen in training. It takes about four minutes, so it runs
where MINICLIP_FULL_TINY=1 (CI sets it) and is skipped otherwise. It checks accuracy, not time.

The bar was 95% while batches came from one sequential random stream (95.8%). Since batches became a
function of (seed, step), for exact streaming resume, and weight decay took in the embedding tables
(the paper's and open_clip's rule), the same recipe gives 92.1%; weight decays of 0.1, 0.3 and 0.4
gave 91.2%, 94.3% and 93.4%, and the old decay rule 93.0%: a spread of 3 points from the draw alone.
90% sits below that spread and far above chance (1 in 48).
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
