"""The built wheel contains every module of the checkout under its installed name.

(``scripts/check-wheel.sh``, run by CI, goes further: it installs the wheel into a fresh
virtual environment and calibrates and serves a tiny model from it.)
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# repository folder -> installed package (pyproject.toml's [tool.setuptools.package-dir])
ROOTS = {"vllm_sab": "vllm_sab", "calibrate": "vllm_sab/calibrate", "kernels": "vllm_sab/kernels"}


def _expected_files() -> set[str]:
    """Installed paths of every module and C++ source in the checkout (independent of setup.py)."""
    out = set()
    for folder, installed in ROOTS.items():
        for f in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in f.parts:
                out.add(f"{installed}/{f.relative_to(REPO / folder).as_posix()}")
    for pattern in ("*.cpp", "*.h"):
        for f in (REPO / "kernels" / "csrc").glob(pattern):
            out.add(f"vllm_sab/kernels/csrc/{f.name}")
    return out


def test_wheel_ships_every_subpackage_and_the_kernel_sources(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(REPO)],
        check=True, cwd=REPO, capture_output=True,
    )
    (wheel,) = tmp_path.glob("vllm_sab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _expected_files()
    assert "vllm_sab/calibrate/methods/__init__.py" in expected  # the folder the old package list missed
    missing = sorted(expected - names)
    assert not missing, f"{wheel.name} lacks {missing}"
    # nothing from the checkout's top-level folders leaks in under its repository name
    assert not {n for n in names if n.split("/")[0] in ("calibrate", "kernels", "tests")}
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    ).decode()
    assert "sab-calibrate = vllm_sab.calibrate.cli:main" in entry_points
    assert "sab = vllm_sab:register" in entry_points
