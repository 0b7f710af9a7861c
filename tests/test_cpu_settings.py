"""miniclip.cpu_settings: made at import before NumPy loads, and applied by every entry point."""
import os
import subprocess
import sys

import pytest

import miniclip as mc
import train
import zeroshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = ("OPENBLAS_THREAD_TIMEOUT", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MPI_LOCAL", "OMPI_")


def python(code, **env):
    """Run code in a fresh interpreter at the repository root, without any of the settings in its environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER)}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**clean, **env})
    assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("entry", ["train", "zeroshot", "weights", "experiments/paper.py", "experiments/emoji_recipe.py",
                                   "benchmarks/bench.py", "benchmarks/data_loading.py", "benchmarks/activation_memory.py"])
def test_every_entry_point_makes_the_settings_before_numpy_loads(entry):
    """Importing the program sets OpenBLAS's thread timeout, and NumPy was not loaded before it was set."""
    load = (f"import runpy; sys.path.insert(0, {os.path.dirname(entry)!r}); runpy.run_path({entry!r}, run_name='probe')"
            if entry.endswith(".py") else f"import {entry}")        # a script's folder is on its path, as python FILE does
    code = ("import builtins, os, sys\n"
            "real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'numpy' and 'numpy' not in sys.modules:\n"
            "        print('numpy loads with', os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n" + load)
    assert python(code).stdout.splitlines()[0] == "numpy loads with 4"


def test_numpy_first_gets_nothing_and_a_warning():
    """A script that imports NumPy before miniclip: too late for OpenBLAS; cpu_settings says so."""
    p = python("import numpy, os, warnings, miniclip\n"
               "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
               "blas = numpy.__config__.CONFIG['Build Dependencies']['blas']['name']\n"
               "with warnings.catch_warnings(record=True) as w:\n"
               "    warnings.simplefilter('always')\n"
               "    miniclip.cpu_settings()\n"
               "print(('openblas' in blas) == any('import miniclip first' in str(x.message) for x in w))")
    assert p.stdout.split() == ["None", "True"]


def test_processes_under_a_launcher_share_the_cores():
    cores = os.cpu_count()
    p = python("import miniclip, os; print(os.environ['OMP_NUM_THREADS'], miniclip.cpu_threads())", MPI_LOCALNRANKS="2")
    assert p.stdout.split() == [str(max(1, cores // 2))] * 2
    p = python("import miniclip, os; print(os.environ['OMP_NUM_THREADS'])", MPI_LOCALNRANKS="2", OMP_NUM_THREADS="1")
    assert p.stdout.split() == ["1"]                    # the user's choice stands


@pytest.mark.parametrize("main, argv", [(train.main, ["--steps", "0"]), (zeroshot.main, ["--batch-size", "0", "x.png"])])
def test_main_applies_the_settings(monkeypatch, main, argv):
    called = []
    monkeypatch.setattr(mc, "cpu_settings", lambda: called.append(1))
    assert main(argv) == 1                              # refused: nothing runs, but the settings came first
    assert called == [1]
