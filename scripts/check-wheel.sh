#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a fresh virtual environment, and run the
# installed product from outside the checkout: `sab-calibrate` on a tiny model, then a vLLM
# load of the result whose greedy tokens must equal the dequantized transformers reference.
#
# Usage (from anywhere):   bash scripts/check-wheel.sh
#
# Needs the development environment of scripts/setup-cpu.sh (.venv). The heavy dependencies
# (torch, vLLM, transformers, ...) are not downloaded again: the fresh venv sees them through a
# folder of links to .venv's installed distributions, minus vllm-sab itself (its editable
# finder, .pth files and metadata are left out), appended to the fresh venv's sys.path after
# its own site-packages. So vllm_sab can only come from the wheel; the script checks that
# every vllm_sab module it imported lives inside the fresh venv.
#
# Environment overrides:
#   VENV   the development venv to borrow dependencies from (default: .venv of the checkout)
#   KEEP   1 = keep the scratch folder (printed) instead of deleting it
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
DEV_PY="$VENV/bin/python"
[[ -x "$DEV_PY" ]] || { echo "[check-wheel] ERROR: $DEV_PY missing; run scripts/setup-cpu.sh first" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sab-check-wheel.XXXXXX")"
cleanup() { if [[ "${KEEP:-0}" == 1 ]]; then echo "[check-wheel] kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
log() { printf '[check-wheel] %s\n' "$*"; }

# --- 1. the wheel -------------------------------------------------------------------------
log "building the wheel"
(cd "$REPO_ROOT" && "$DEV_PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" .)
WHEEL="$(ls "$WORK"/dist/vllm_sab-*.whl)"
log "built $(basename "$WHEEL")"

# --- 2. a fresh venv with the wheel; dependencies linked from the dev venv -----------------
"$DEV_PY" -m venv "$WORK/venv"
NEW_PY="$WORK/venv/bin/python"
NEW_SITE="$("$NEW_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DEV_SITE="$("$DEV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir "$WORK/deps"
for entry in "$DEV_SITE"/*; do
    name="$(basename "$entry")"
    case "$name" in
        vllm_sab*|__editable__*|*.pth|pip|pip-*|setuptools|setuptools-*|_distutils_hack|pkg_resources) continue ;;
    esac
    ln -s "$entry" "$WORK/deps/$name"
done
# A plain path line: appended to sys.path after the venv's own site-packages.
echo "$WORK/deps" > "$NEW_SITE/zz_dev_venv_dependencies.pth"
"$NEW_PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index "$WHEEL"
log "installed into $WORK/venv"

# --- fixtures: a tiny random LLaVA and a test image, built by the development environment -----
# tests/tiny_models.py is a development fixture, not part of the wheel; what it writes (a plain
# Hugging Face folder and a PNG) is only the input of the checks below.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$DEV_PY" "$REPO_ROOT/tests/tiny_models.py" llava "$WORK/tiny-llava" >/dev/null
"$DEV_PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); from tiny_models import tiny_image; tiny_image(0).save(sys.argv[2])' \
    "$REPO_ROOT/tests" "$WORK/tiny-image.png"

# Everything below runs outside the checkout, with no path into it.
cd "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0
export VLLM_CACHE_ROOT="$WORK/cache/vllm" TORCHINDUCTOR_CACHE_DIR="$WORK/cache/inductor"
unset PYTHONPATH

"$NEW_PY" - "$WORK/venv" "$REPO_ROOT" <<'EOF'
import importlib, importlib.metadata as md, pathlib, sys
venv, repo = (pathlib.Path(p).resolve() for p in sys.argv[1:])
for name in ("vllm_sab", "vllm_sab.calibrate", "vllm_sab.calibrate.methods", "vllm_sab.calibrate.cli",
             "vllm_sab.kernels", "vllm_sab.config", "vllm_sab.linear_method"):
    f = pathlib.Path(importlib.import_module(name).__file__).resolve()
    if not f.is_relative_to(venv):
        sys.exit(f"[check-wheel] ERROR: {name} imported from {f}, not from the wheel in {venv}")
dist = md.distribution("vllm-sab")
if not pathlib.Path(dist.locate_file("")).resolve().is_relative_to(venv):
    sys.exit(f"[check-wheel] ERROR: vllm-sab metadata found at {dist.locate_file('')}, not in {venv}")
if any(pathlib.Path(p or ".").resolve().is_relative_to(repo) for p in sys.path):
    sys.exit(f"[check-wheel] ERROR: sys.path reaches into the checkout {repo}: {sys.path}")
print("[check-wheel] vllm_sab", md.version("vllm-sab"), "imports from", venv)
EOF

# --- 3. calibrate a tiny model with the installed console script ---------------------------
"$WORK/venv/bin/sab-calibrate" --model "$WORK/tiny-llava" --output "$WORK/tiny-llava-sab" \
    --method sab --data builtin --num-samples 4 --max-seq-len 192 --device cpu --no-progress

# --- 4. vLLM loads the result; tokens equal the dequantized transformers model -------------
"$NEW_PY" - "$WORK/tiny-llava-sab" "$WORK/tiny-image.png" <<'EOF'
import sys
import torch
from PIL import Image
from transformers import AutoProcessor
from vllm import LLM, SamplingParams
from vllm_sab.calibrate.reference_model import load_dequantized

ckpt = sys.argv[1]
proc = AutoProcessor.from_pretrained(ckpt)
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
image = Image.open(sys.argv[2]).convert("RGB")  # tiny_image(0), saved losslessly

llm = LLM(ckpt, quantization="sab", dtype="float32", enforce_eager=True, max_model_len=512,
          kv_cache_memory_bytes=64 << 20, limit_mm_per_prompt={"image": 1}, seed=0)
out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}},
                   SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
got = list(out[0].outputs[0].token_ids)

ref = load_dequantized(ckpt, torch.float32)
inputs = proc(text=[prompt], images=[image], return_tensors="pt")
with torch.no_grad():
    want = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
if not got or got != want:
    sys.exit(f"[check-wheel] ERROR: vLLM tokens {got} != dequantized transformers tokens {want}")
print(f"[check-wheel] vLLM served the sab checkpoint from the wheel: {len(got)} tokens, equal to transformers")
EOF
log "ok"
