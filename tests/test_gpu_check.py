"""benchmarks/gpu_check.py end to end on CPU in quick mode: the command a lent GPU runs, so that it works the first
time it meets one."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_in_quick_mode(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["cuda_tests"]["status"].startswith("skipped")
    rows = result["training"]
    assert [(r["config"], r["precision"]) for r in rows] == [
        (config, precision) for config in ("configs/vp_cifar.py", "configs/ddpm_cifar.py")
        for precision in ("fp32", "tf32", "bf16", "bf16+compile")]
    assert all(r["images_per_s"] > 0 and r["forward_gflops"] > 0 and r["loss"] == r["loss"] for r in rows)
    assert [r["ratio_to_fp32"] for r in rows[::4]] == [1.0, 1.0]
    assert result["sampling"]["nfe"] == 20 and result["sampling"]["fid_50k_projected_minutes"] > 0
    torch_row, scipy_row = result["likelihood"]
    assert (torch_row["backend"], scipy_row["backend"]) == ("torch", "scipy")
    assert abs(torch_row["bpd_mean"] - scipy_row["bpd_mean"]) < 0.05
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## Training" in table and "| configs/ddpm_cifar.py | bf16+compile |" in table


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path, capsys):
    """Its main() in this process (the script's command line runs above: a second interpreter would only import
    torch again)."""
    import importlib.util
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the default --device cuda is valid here")
    spec = importlib.util.spec_from_file_location("gpu_check_script", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--device cpu --quick" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before measuring anything
