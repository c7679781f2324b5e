"""Install the Triton that this environment's torch asks for, when it is missing (used by `make test`).

tests/test_kernels.py runs ddpm_lib's Triton kernel on the CPU under Triton's interpreter; a CUDA build of
torch names its Triton in its requirements but an install from a local index may lack it. Never fails:
without Triton those tests skip and say why.
"""
import importlib.metadata as md
import importlib.util
import subprocess
import sys


def wanted() -> str:
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    for req in md.requires("torch") or []:
        if not req.replace(" ", "").lower().startswith("triton"):
            continue
        if Requirement is None:
            return req.split(";")[0].strip()
        r = Requirement(req)
        if r.marker is None or r.marker.evaluate():
            return f"{r.name}{r.specifier}"
    return ""


def main() -> int:
    if importlib.util.find_spec("triton") is not None:
        return 0
    spec = wanted()
    if not spec:
        print("ensure_triton: this torch names no Triton for this platform; the kernel tests will skip")
        return 0
    print(f"ensure_triton: installing {spec} (for the kernel tests under Triton's interpreter)")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", spec])
    if r.returncode:
        print(f"ensure_triton: could not install {spec}; the kernel tests will skip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
