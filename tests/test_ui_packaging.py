"""The playground ships inside the wheel: `ui/` is the package `neo_serve.ui`, and a plain
`pip install` of the built wheel (not a checkout) can import it and build the app."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)


def declared_packages() -> tuple[list[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["packages"], setuptools.get("package-dir", {})


def test_every_package_on_disk_is_declared():
    """The package list is explicit (ui/ maps to neo_serve.ui): a new subpackage must be added."""
    packages, package_dir = declared_packages()
    assert package_dir == {"neo_serve.ui": "ui"}
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "neo_serve").rglob("__init__.py")}
    on_disk.add("neo_serve.ui")
    assert (ROOT / "ui" / "__init__.py").is_file()
    assert sorted(packages) == sorted(on_disk)


def test_wheel_installs_the_playground(tmp_path):
    # Built from a copy: setuptools builds in the source tree (build/, egg-info), not in the checkout.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", "bench-out"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "-w", str(wheels), "--no-deps",
                    "--no-build-isolation", "--quiet", "--disable-pip-version-check"], check=True, cwd=tmp_path)
    [wheel] = wheels.glob("neo_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "backend", "blocks", "bridge", "deployment"):
        assert f"neo_serve/ui/{module}.py" in names
    assert "neo_serve/demo_model/model.safetensors" in names
    assert not any(name.startswith("ui/") for name in names)
    requires = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: gradio>=6" in requires

    # A fresh venv (dependencies from the system site-packages, the package from the wheel),
    # run outside the checkout: the import must come from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
                    str(wheel)], check=True, cwd=tmp_path)
    check = (
        "import neo_serve, neo_serve.ui.blocks as blocks\n"
        "from ray.serve._private.build_app import build_app as build_graph\n"
        "from neo_serve.app import build_app\n"
        "print(neo_serve.__file__); print(blocks.__file__)\n"
        "print(sorted(d.name for d in build_graph(build_app({'num_stages': 2}), name='x').deployments))\n"
    )
    out = subprocess.run([str(python), "-c", check], check=True, cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}).stdout.splitlines()
    site = str(venv / "lib")
    assert out[0].startswith(site) and out[1].startswith(site), out
    assert out[1].endswith("neo_serve/ui/blocks.py")
    assert out[2] == "['Pipeline-neo-demo', 'Playground', 'Router']"
