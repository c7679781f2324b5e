"""Colab-readiness check: run every notebook as a reader outside the repository would.

    python scripts/colab_check.py [-n JOBS] [--keep] [--venv DIR] [--report FILE] [NOTEBOOK ...]

1. builds a wheel of ddpm_lib (``pip wheel --no-deps`` on a clean copy of ``pyproject.toml``,
   ``README.md`` and ``ddpm_lib/``);
2. creates a fresh virtual environment outside the repository (a temporary folder, or ``--venv``)
   and installs the wheel with its ``[book]`` extra and its dependencies from the package index,
   plus nbval, pytest and pytest-xdist. torch, torchvision and the CUDA libraries they require come
   pre-installed, as on Colab: they are linked from the environment running this script (about 5.5 GB
   of CUDA build that a second copy would add to the disk; a CI run once ran out of disk there), and
   pip must accept them as they are. ``--no-share-torch`` installs them too;
3. copies the notebooks (``book/**/*.ipynb``, or those named) into a temporary working folder
   outside the repository, keeping their sub-folders;
4. runs ``pytest --nbval-lax`` there with ``DDPM_BOOK_QUICK=1`` and the fresh environment's kernel
   (``--nbval-current-env``), no ``PYTHONPATH``, so that ``import ddpm_lib`` can only find the wheel;
5. prints the time of each notebook and exits with pytest's status.

This is ``make test-notebooks``: the one nbval run of ``make test``. It shows that no notebook depends
on the repository's layout (relative paths, ``sys.path`` changes, files that are not installed).
``--venv DIR`` reuses (or creates) an environment there, skipping step 2's install when the same
wheel is already in it: faster for repeated runs, but not a fresh environment.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ipykernel < 7: its 7.x releases can drop a request and hang the run on an idle kernel (see requirements.txt)
EXTRA = ["nbval>=0.10", "pytest>=7.4", "pytest-xdist>=3.3", "pytest-timeout>=2.1", "ipykernel>=6.0,<7"]


def _run(cmd, quiet=False, **kwargs):
    """Run a command; with quiet, show its output only when it fails (pip's warnings are noisy)."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    if not quiet:
        return subprocess.run([str(c) for c in cmd], check=True, **kwargs)
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], flush=True)
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return proc


def _outside_repo(path: Path) -> Path:
    path = path.resolve()
    if path == ROOT or ROOT in path.parents:
        raise SystemExit(f"{path} is inside the repository {ROOT}; the check must run outside it")
    return path


def _package_source(dest: Path) -> Path:
    """A clean copy of what the wheel is built from (no stale build/ folder, no caches)."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "ddpm_lib", dest / "ddpm_lib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return dest


def _can_build_here() -> bool:
    """Whether this environment can build the wheel itself (no download of the build backend): setuptools
    >= 64 (pyproject.toml's floor) with ``bdist_wheel``, built in from setuptools 70.1 on, else from ``wheel``."""
    try:
        import setuptools
    except ImportError:
        return False
    try:
        version = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
    except ValueError:
        return False
    if version < (64, 0):
        return False
    if version >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


def build_wheel(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    src = _package_source(out.parent / "src")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)]
    if _can_build_here():
        cmd.append("--no-build-isolation")
    _run(cmd, quiet=True, cwd=out)
    wheels = sorted(out.glob("ddpm_lib-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one ddpm_lib wheel in {out}, found {wheels}")
    return wheels[0]


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


# Shared with the fresh environment rather than installed into it: these, and what they require whose name
# starts with one of the prefixes (the CUDA libraries of a CUDA build of torch).
SHARED_ROOTS = ("torch", "torchvision")
SHARED_PREFIXES = ("nvidia-", "cuda-", "triton")


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _shared_dists() -> list:
    """The installed distributions of SHARED_ROOTS and, transitively, of their requirements named by
    SHARED_PREFIXES (those of extras too: torch names its CUDA libraries as extras of cuda-toolkit), in the
    environment running this script (none where it has no torch)."""
    from importlib import metadata
    installed = {}
    for dist in metadata.distributions():
        installed.setdefault(_dist_key(dist.metadata["Name"] or ""), dist)
    todo = [_dist_key(n) for n in SHARED_ROOTS]
    found = {}
    while todo:
        key = todo.pop()
        dist = installed.get(key)
        if key in found or dist is None or dist.files is None:
            continue
        found[key] = dist
        for req in dist.requires or []:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            if m and _dist_key(m.group(1)).startswith(SHARED_PREFIXES):
                todo.append(_dist_key(m.group(1)))
    return [found[k] for k in sorted(found)]


def share_torch(py: Path, dest: Path) -> list:
    """Make torch and its CUDA libraries importable, and known to pip as installed, in the environment of
    ``py`` without copying them: symbolic links to their top-level folders and ``.dist-info`` folders in
    ``dest``, and a ``.pth`` file in that environment's site-packages naming ``dest``. Returns the names."""
    dists = _shared_dists()
    if not dists:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    for dist in dists:
        site = Path(dist.locate_file(""))
        for top in sorted({f.parts[0] for f in dist.files if f.parts and f.parts[0] != ".."}):
            link, target = dest / top, site / top
            if target.exists() and not link.exists():
                link.symlink_to(target, target_is_directory=target.is_dir())
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "ddpm-colab-check-shared.pth").write_text(f"{dest}\n")
    return [f"{d.metadata['Name']} {d.version}" for d in dists]


def make_venv(venv: Path, wheel: Path, share: bool = True) -> Path:
    stamp = venv / ".ddpm-wheel"
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    py = _venv_python(venv)
    if py.exists() and stamp.is_file() and stamp.read_text() == digest:
        print(f"reusing {venv} (same wheel)", flush=True)
        return py
    if not py.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        _run([base, "-m", "venv", venv])
        if share:
            names = share_torch(py, venv / "shared-site-packages")
            print(f"pre-installed as on Colab, linked from {sys.prefix}: {', '.join(names) or 'nothing (no torch)'}",
                  flush=True)
    start = time.perf_counter()
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--force-reinstall", "--no-deps", wheel],
         quiet=True)
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[book]", *EXTRA], quiet=True)
    print(f"installed the wheel and its dependencies in {time.perf_counter() - start:.0f} s", flush=True)
    stamp.write_text(digest)
    return py


def copy_notebooks(names, work: Path) -> list[Path]:
    book = ROOT / "book"
    if names:
        paths = [Path(n).resolve() for n in names]
    else:
        paths = sorted(p for p in book.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    copies = []
    for p in paths:
        rel = p.relative_to(book) if book in p.parents else Path(p.name)
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)  # the notebook only: no figures, data or library beside it
        copies.append(dest)
    (work / "pytest.ini").write_text("[pytest]\n")  # no configuration from any folder above
    return copies


def clean_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP", "JUPYTER_PATH"}}
    env["PATH"] = str(_venv_python(venv).parent) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(venv)
    env["DDPM_BOOK_QUICK"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def per_notebook_times(junit: Path) -> dict:
    times: dict = {}
    counts: dict = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("file") or case.get("classname", "?")
        name = name.replace(".ipynb", "").replace(".", "/") + ".ipynb" if not name.endswith(".ipynb") else name
        times[name] = times.get(name, 0.0) + float(case.get("time", 0.0))
        bad = any(child.tag in {"failure", "error"} for child in case)
        counts.setdefault(name, [0, 0])[bad] += 1
    return {k: {"seconds": round(v, 1), "cells_passed": counts[k][0], "cells_failed": counts[k][1]}
            for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", help="notebooks to check (default: book/**/*.ipynb)")
    ap.add_argument("-n", "--jobs", default=os.environ.get("JOBS", "2"), help="pytest-xdist workers (0: none)")
    ap.add_argument("--venv", type=Path, help="use (or create) this environment instead of a fresh temporary one")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--no-share-torch", dest="share_torch", action="store_false",
                    help="install torch and its CUDA libraries into the fresh environment too (about 5.5 GB of "
                         "disk for a CUDA build) instead of linking those of the environment running this script")
    ap.add_argument("--report", type=Path, help="write per-notebook times as JSON here")
    ap.add_argument("--cell-timeout", default="900", help="seconds per cell (nbval)")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    tmp = _outside_repo(Path(tempfile.mkdtemp(prefix="ddpm-colab-check-")))
    venv = _outside_repo(args.venv) if args.venv else tmp / "venv"
    work = tmp / "work"
    status = 1
    try:
        wheel = build_wheel(tmp / "dist")
        print(f"wheel: {wheel.name}", flush=True)
        py = make_venv(venv, wheel, share=args.share_torch)
        t_setup = time.perf_counter() - start
        env = clean_env(venv)
        where = subprocess.run([py, "-c", "import ddpm_lib, sys; print(ddpm_lib.__file__)"], cwd=tmp,
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        if ROOT in Path(where).resolve().parents:
            raise SystemExit(f"ddpm_lib resolves to the repository ({where}), not the wheel")
        print(f"ddpm_lib in the fresh environment: {where}", flush=True)
        copies = copy_notebooks(args.notebooks, work)
        junit = tmp / "nbval.xml"
        cmd = [py, "-m", "pytest", "--nbval-lax", "--nbval-current-env", f"--nbval-cell-timeout={args.cell_timeout}",
               "-p", "no:cacheprovider", "-q", "--rootdir", work, "-c", work / "pytest.ini",
               f"--junitxml={junit}", "-o", "junit_family=xunit1"]
        if str(args.jobs) not in {"0", "1"}:
            cmd += ["-n", str(args.jobs), "--dist", "loadfile"]
        cmd += [c.relative_to(work) for c in copies]
        t0 = time.perf_counter()
        status = subprocess.run([str(c) for c in cmd], cwd=work, env=env).returncode
        t_run = time.perf_counter() - t0
        if junit.is_file():
            times = per_notebook_times(junit)
            print("\nper notebook (cell time summed; with several workers they overlap):")
            for name, r in times.items():
                flag = "" if not r["cells_failed"] else f"   {r['cells_failed']} FAILED"
                print(f"  {r['seconds']:7.1f} s  {name}{flag}")
            summary = {"setup_seconds": round(t_setup, 1), "nbval_seconds": round(t_run, 1),
                       "total_seconds": round(time.perf_counter() - start, 1), "jobs": args.jobs,
                       "status": status, "notebooks": times}
            if args.report:
                args.report.parent.mkdir(parents=True, exist_ok=True)
                args.report.write_text(json.dumps(summary, indent=1))
        print(f"\ncolab check: wheel + fresh venv {t_setup:.0f} s, nbval {t_run:.0f} s, "
              f"total {time.perf_counter() - start:.0f} s; pytest status {status}", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
