"""benchmarks/gpu_check.py, the one command for a GPU machine, runs end to end (small, on CPU)."""

import subprocess
import sys

from wsss.paths import REPO_ROOT


def test_gpu_check_runs_small_on_cpu_and_prints_one_table():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--quick"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 4 + 2 + 1 + 1 + 1, proc.stdout  # header, co-attention, classifiers, maps, segmenter, bf16
    for what in ("co-attention fused", "classifier step, vgg16", "classifier step, resnet101", "maps of one image",
                 "segmenter step, deeplabv3_resnet101", "bf16 autocast vs float32"):
        assert any(what in row for row in rows), what
    assert "(ok: tolerance" in rows[-1]
