"""scripts/gpu_check.sh (the checks a lent GPU machine runs) stays runnable: its CPU dry run passes
every check here, it writes its file after every check (so a kill keeps what was done), and without a
GPU the real run says so and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support import eventually

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
CHECKS = ("parity", "grouped_gemm", "expert_server", "remote_experts", "fp8_experts", "promotion", "layer_timings")


def _env(out_dir: Path) -> dict:
    return {**os.environ, "OUT": str(out_dir)}


def test_dry_run_on_the_cpu_passes_every_check(tmp_path):
    proc = subprocess.run([str(SCRIPT), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    env = report["environment"]
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert all(env[p] for p in ("grpcio", "protobuf", "transformers"))
    for check in CHECKS:
        assert "error" not in report[check], report[check]
    assert report["parity"]["fp32_ok"] and report["parity"]["bf16_first_differing_position"] is None
    assert all(b["relative_difference"] < 1e-5 for b in report["expert_server"]["batches"].values())
    assert all(b["relative_difference_to_loop"] < 1e-5 for b in report["grouped_gemm"]["batches"].values())
    remote = report["remote_experts"]["batches"]
    assert set(remote) == {"1", "256"} and all(b["relative_difference"] < 1e-5 for b in remote.values())
    assert set(report["layer_timings"]["batches"]) == {"1", "8"}
    assert all(b["relative_difference_to_dequantized"] < 1e-5 for b in report["fp8_experts"]["batches"].values())
    assert report["promotion"]["max_difference"] == 0.0 and report["promotion"]["promotion_s"] > 0


def test_a_run_killed_halfway_leaves_the_checks_done_so_far(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.Popen([str(SCRIPT), "--device", "cpu"], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def first_check_done() -> dict | None:
            report = json.loads(out.read_text()) if out.exists() else {}
            return report if "parity" in report else None

        eventually(first_check_done, timeout=240)
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to tidy up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    report = json.loads(out.read_text())  # whole: every write replaces the file at once
    assert "environment" in report and "error" not in report["parity"] and report["parity"]["fp32_ok"]
    assert "layer_timings" not in report


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script runs its checks instead")
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text())["environment"]["cuda_available"] is False
