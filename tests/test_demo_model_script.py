"""scripts/train_demo_model.py: what it may delete, and the recipe its model card records."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_directory_with_other_files_is_never_replaced(tmp_path):
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--steps", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "refusing to replace" in result.stderr and "notes.txt" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me" and (out / "src").is_dir()
    assert "corpus:" not in result.stdout  # refused before training, not after


def test_the_default_output_is_the_bundled_checkpoint_from_any_directory(script):
    from neo_serve.serve.config import DEMO_CHECKPOINT

    assert Path(script.parse_args([]).out) == DEMO_CHECKPOINT
    script.check_output_dir(DEMO_CHECKPOINT)  # what it holds is what the script writes


def test_the_reproduce_command_records_every_changed_recipe_argument(script):
    args = script.parse_args(["--vocab", "300", "--warmup", "1", "--threads", "2", "--out", "/tmp/x", "--minutes", "3"])
    command = script.reproduce_command(args, steps=57)
    assert command == "python scripts/train_demo_model.py --steps 57 --seed 1234 --threads 2 --vocab 300 --warmup 1"
    assert script.parse_args(command.split()[2:]).vocab == 300  # it parses back
