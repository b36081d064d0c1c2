"""The step path names no device: the gateway computes wherever its model is (CUDA or the CPU), and
only the wire code moves tensors to the host. A `"cpu"` or a `.cpu()` in the step path would pin it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "moe_service"
# the step path: the model, the engine, the dispatch plan, and the gateway's per-layer code
STEP_PATH = sorted([*PKG.glob("model/*.py"), *PKG.glob("engine/*.py"), *PKG.glob("routing/*.py"),
                    PKG / "serving" / "gateway" / "remote.py"])


def device_pins(source: str) -> list[str]:
    """Each `"cpu"` string and `.cpu()` call, as `line: code`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value == "cpu":
            found.append(f"{node.lineno}: the string 'cpu'")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cpu":
            found.append(f"{node.lineno}: .cpu()")
    return found


@pytest.mark.parametrize("path", STEP_PATH, ids=lambda p: str(p.relative_to(PKG)))
def test_step_path_hard_codes_no_device(path: Path):
    assert not device_pins(path.read_text()), f"{path.relative_to(PKG)}: {device_pins(path.read_text())}"


def test_the_check_sees_a_pin():
    assert sorted(device_pins('x = t.to("cpu")\ny = t.cpu()\n')) == ["1: the string 'cpu'", "2: .cpu()"]
