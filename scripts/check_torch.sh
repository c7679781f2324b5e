#!/usr/bin/env bash
# Run the unit tests and every notebook against another release of torch (README: "Versions tested").
#
#   bash scripts/check_torch.sh VENV "torch==2.11.*" "torchvision==0.26.*"
#   bash scripts/check_torch.sh VENV "torch==2.3.*" "torchvision==0.18.*" "numpy<2" "diffusers==0.31.*" "huggingface_hub<0.26" "safetensors<0.5"
#
# VENV: a folder outside the repository for the environment (created when missing; several GB, since
# PyPI's torch wheels for x86_64 carry CUDA). The other arguments are pip requirements installed with the
# package, so that its own ranges are resolved around them. Then: pytest tests/ (all but the browser test,
# which does not depend on torch) and scripts/colab_check.py with that environment (every notebook under
# nbval from a freshly built wheel). Old torch needs old neighbours: torch < 2.4 was built against numpy 1,
# and today's diffusers (a test-only dependency) needs torch >= 2.6.
set -eu
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,12p "$0"; exit 2; }
venv=$1; shift
case "$(cd "$(dirname "$venv")" 2>/dev/null && pwd)/" in
  "$PWD"/*) echo "check_torch.sh: $venv is inside the repository; use a folder outside it" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# the pins, the package's dependencies and the test tools, resolved together
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" -e . pytest pytest-xdist pytest-timeout nbval \
  ipykernel ipywidgets diffusers
"$venv/bin/python" -c "import torch, torchvision, numpy; print('torch', torch.__version__, '| torchvision', \
torchvision.__version__, '| numpy', numpy.__version__)"
status=0
OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest tests/ -n 2 -q -p no:cacheprovider --deselect tests/test_site.py || status=1
OMP_NUM_THREADS=1 "$venv/bin/python" scripts/colab_check.py -n 2 --venv "$venv" || status=1
exit $status
