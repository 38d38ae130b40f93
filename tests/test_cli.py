"""The command line as a user meets it: help texts, clear errors, and an edge side without torch."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from memseg_edge.cli import main


@pytest.mark.parametrize("command", ["train", "eval", "synth-preview"])
def test_every_command_explains_itself(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "--data" in result.output and "Usage:" in result.output


def test_importing_the_cli_never_imports_torch():
    code = "import sys, memseg_edge.cli, memseg_edge.preprocess, memseg_edge.scoring; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_missing_category_is_a_clear_error(bottle_root, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(bottle_root), "--category", "bottel", "--out",
                                       str(tmp_path / "r"), "--backbone-weights", "none", "--no-textures"])
    assert result.exit_code != 0
    assert "bottle" in result.output  # the categories that do exist are listed


def test_synth_preview_writes_a_grid_of_samples_and_masks(bottle_root, tmp_path):
    import cv2

    from conftest import DTD

    out = tmp_path / "preview.png"
    result = CliRunner().invoke(main, ["synth-preview", "--data", str(bottle_root), "--category", "bottle",
                                       "--textures", str(DTD), "--count", "8", "--image-size", "128",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    grid = cv2.imread(str(out))
    assert grid.shape == (2 * 128, 4 * 2 * 128, 3)
    assert "threshold" in result.output  # the bottle preset is shown, so the user knows what was used


@pytest.mark.parametrize("online", [True, False])
def test_demo_takes_imagenet_weights_the_torchvision_way_and_says_so_when_offline(monkeypatch, online):
    import socket
    import urllib.error

    torchvision = pytest.importorskip("torchvision")
    from memseg_edge.train.encoders import DOWNLOAD_TIMEOUT_S, imagenet_weights

    seen = {}

    def get_state_dict(self, progress=True, check_hash=True):
        seen["timeout"] = socket.getdefaulttimeout()
        if not online:
            raise urllib.error.URLError("Name or service not known")
        return {}

    monkeypatch.setattr(torchvision.models.MobileNet_V2_Weights, "get_state_dict", get_state_dict)
    before = socket.getdefaulttimeout()
    lines: list[str] = []
    assert imagenet_weights(lines.append) == ("imagenet" if online else "none")
    assert seen["timeout"] == DOWNLOAD_TIMEOUT_S and socket.getdefaulttimeout() == before   # offline never hangs
    if online:
        assert lines == []
    else:
        assert len(lines) == 1 and "no ImageNet weights" in lines[0] and "download failed" in lines[0]


def test_no_edge_module_imports_torch_even_lazily():
    """The edge side (memseg_edge/, not the trainer in train/) never names torch in an import, so a Jetson
    without PyTorch can run every edge code path, not only import the CLI."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "memseg_edge"
    pattern = re.compile(r"^\s*(import|from)\s+(torch|torchvision)\b", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
