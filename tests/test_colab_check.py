"""scripts/colab_check.py links torch into the fresh environment instead of installing it a second time."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("colab_check", ROOT / "scripts" / "colab_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shared_torch_is_importable_and_installed_for_pip_without_a_copy(tmp_path):
    cc = _load()
    names = [d.metadata["Name"] for d in cc._shared_dists()]
    assert "torch" in names
    if any(n.startswith("nvidia-") for n in names):  # a CUDA build: its libraries go with it
        assert "triton" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = cc._venv_python(venv)
    shared = venv / "shared-site-packages"
    listed = cc.share_torch(py, shared)
    assert len(listed) == len(names)
    # torch's small pure-Python requirements (sympy, jinja2, ...) are pip's to install, so no import here
    probe = ("import importlib.metadata as m, importlib.util as u, sys; print(u.find_spec('torch').origin); "
             "print(m.version('torch')); print(m.version('torchvision')); print(sys.prefix)")
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    import torch
    import torchvision
    assert Path(out[0]).parent == shared / "torch"  # found through the link, not in a copy
    assert out[1] == torch.__version__.split("+")[0] or out[1] == torch.__version__
    assert out[2].split("+")[0] == torchvision.__version__.split("+")[0]
    assert Path(out[3]).resolve() == venv.resolve()
    assert all(p.is_symlink() for p in shared.iterdir())
    own = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert not (Path(own) / "torch").exists()

