"""The experiment entry points run end to end (small settings)."""

import pathlib
import subprocess
import sys


EXP = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def run(args, tmp_path, timeout=300):
    out = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_memory_report_minilm_prints_breakdown(tmp_path):
    out = run([str(EXP / "memory_report.py"), "--model", "minilm", "--batch-size", "2",
               "--seq-len", "16", "--crosscheck", "--warmup", "0"], tmp_path)
    assert "| **total** |" in out and "ledger/independent = 1.0000" in out
    assert "parameters == 4 bytes x 22,713,986: True" in out


def test_example_lightning_script_runs(tmp_path):
    out = run([str(EXP / "example_lightning.py")], tmp_path)
    assert "frozen per step" in out


def test_memory_report_rejects_bad_arguments(tmp_path):
    out = subprocess.run([sys.executable, str(EXP / "memory_report.py"), "--batch-size", "0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--batch-size must be >= 1" in out.stderr
    out = subprocess.run([sys.executable, str(EXP / "memory_report.py"), "--model", "gpt9"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice: 'gpt9'" in out.stderr


def test_compression_benchmark_smoke(tmp_path):
    out = run(["-m", "slimfit.experiments.bench_compression", "--model", "minilm", "--batch-sizes",
               "2", "4", "--seq-len", "16", "--timed-steps", "1", "--extrapolate", "8"], tmp_path)
    assert "| 4 | slimfit |" in out and "Extrapolation to batch 8" in out


def test_gpu_check_smoke_on_cpu(tmp_path):
    """The GPU check's code path (methods, sessions, the $OUT copy) runs with the
    ledger standing in for the allocator; the device machine runs the same code."""
    env_out = tmp_path / "out"
    out = subprocess.run([sys.executable, "-m", "slimfit.experiments.gpu_check", "--device", "cpu",
                          "--models", "minilm", "--batch-sizes", "2", "--steps", "1",
                          "--arms", "full", "lora", "slimfit", "--out", str(env_out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    table = (env_out / "gpu_check.md").read_text()
    assert "| full |" in table and "| lora |" in table and "| slimfit |" in table
