#!/usr/bin/env bash
# The oldest versions the package claims (setup.cfg: install_requires), installed from the
# package index into a second virtual environment, with the built wheel (or the checkout), and
# a defined subset of the library's tests run there: the tests of the statistic and its
# implementations, the backbones and checkpoints, the loss module, DDP and torch.compile.
#
# torch 2.8.0 pins triton 3.4.0 for its own GPU compiler; the tests run the Triton kernels
# through Triton's CPU interpreter, which needs triton >= 3.7 (setup.cfg's [test] extra: 3.4's
# interpreter has no float64 tl.dot and fails with numpy >= 2.4), so triton 3.7.1 is
# installed over it without dependencies.
#
# Usage: bash .ci/oldest-versions.sh   (from anywhere; .ci/run calls it as a stage)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=2.8.0
TORCHVISION=0.23.0
TIMM=1.0.21
TRITON=3.7.1
VENV=.venv-oldest

rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==$TORCH" "torchvision==$TORCHVISION" "timm==$TIMM" "pytest>=7"
"$PY" -m pip install -q --no-deps "triton==$TRITON"
wheel=$(ls dist/d2sm_loss-*.whl 2>/dev/null | head -n 1 || true)
"$PY" -m pip install -q --no-deps "${wheel:-.}"
"$PY" -m pip list 2>/dev/null | grep -iE '^(d2sm-loss|torch|torchvision|timm|triton|numpy) '
"$PY" - <<PYCHECK
import torch, torchvision, timm
want = {"torch": "$TORCH", "torchvision": "$TORCHVISION", "timm": "$TIMM"}
got = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}
for name, version in want.items():
    assert got[name].split("+")[0] == version, f"{name} {got[name]} installed, {version} wanted"
PYCHECK

# The console script, from the checkout root: it imports the installed d2sm_loss, not the
# checkout (tests/ is on sys.path for helpers.py and conftest.py).
"$VENV/bin/pytest" -q -p no:cacheprovider \
    tests/test_checks.py tests/test_numeric_edges.py tests/test_streaming.py tests/test_triton_kernels.py \
    tests/test_backbones.py tests/test_checkpoint_errors.py tests/test_edges.py tests/test_distributed.py \
    tests/test_compile.py \
    --deselect tests/test_distributed.py::test_ddp_example_runs_under_torchrun
