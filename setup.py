"""Package list for setuptools, found by discovery (all other metadata is in pyproject.toml).

The repository keeps the product's parts at the top level (``calibrate/``, ``kernels/``) but
installs them under the ``vllm_sab`` namespace (``[tool.setuptools.package-dir]`` in
pyproject.toml): ``kernels`` and ``calibrate`` are too generic for site-packages. pyproject.toml
cannot express "discover the packages under this folder and prefix their names", so this file
does it: every package below ``calibrate/`` and ``kernels/`` (``calibrate/methods/`` included)
is installed as ``vllm_sab.calibrate.*`` / ``vllm_sab.kernels.*``, and a new subpackage needs no
edit here. ``scripts/check-wheel.sh`` builds the wheel and runs it from a fresh environment.
"""

from setuptools import find_packages, setup

# installed name -> folder in the repository; must match [tool.setuptools.package-dir]
_ROOTS = {"vllm_sab": "vllm_sab", "vllm_sab.calibrate": "calibrate", "vllm_sab.kernels": "kernels"}


def _packages() -> list[str]:
    """Installed package names: each root plus every subpackage discovered below its folder."""
    out = []
    for name, folder in _ROOTS.items():
        out.append(name)
        out += [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(set(out))


setup(packages=_packages())
