"""Package layout: namespace mapping, console script, torch-free core."""
import json
import os
import pathlib
import subprocess
import sys
import tomllib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for top, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([top, *rel.parts]) if rel.parts else top)
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_import_geomprobe_does_not_import_torch_or_dask_or_umap():
    code = (
        "import sys, geomprobe, geomprobe.analysis, geomprobe.io, geomprobe.alignment; "
        "bad = [m for m in ('torch', 'dask', 'distributed', 'umap', 'matplotlib') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_and_trainers_live_in_the_geomprobe_namespace():
    import geomprobe.cli.main as m

    assert pathlib.Path(m.__file__).resolve().parent == ROOT / "cli"
    code = "import importlib.util as u; print(u.find_spec('cli'), u.find_spec('trainers'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "None None"


# --- python -m geomprobe ----------------------------------------------------------------------------

def test_python_m_geomprobe_is_the_command_line(tmp_path):
    import geomprobe

    out = subprocess.run([sys.executable, "-m", "geomprobe", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"geomprobe {geomprobe.__version__}"
    missing = tmp_path / "missing.npz"
    out = subprocess.run([sys.executable, "-m", "geomprobe", "analyze", str(missing), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "missing.npz" in out.stderr and "Traceback" not in out.stderr


# --- numba JIT cache ---------------------------------------------------------------------------------

_JIT_DECORATORS = {"njit", "jit", "vectorize", "guvectorize", "cfunc", "stencil"}


def _jit_decorators(path: pathlib.Path):
    """(function name, decorator node) of every numba decorator in a kernel module."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            target = dec.func if isinstance(dec, ast.Call) else dec
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name in _JIT_DECORATORS:
                yield node.name, dec


def test_every_kernel_is_compiled_with_cache_true():
    """A kernel without cache=True is recompiled by every fresh process (seconds per call site);
    parallel kernels are cached too (numba 0.68 caches parfors; tests below load them)."""
    import ast

    files = sorted((ROOT / "geomprobe" / "_kernels").glob("*.py"))
    found, uncached = 0, []
    for f in files:
        for name, dec in _jit_decorators(f):
            found += 1
            kw = {k.arg: k.value for k in dec.keywords} if isinstance(dec, ast.Call) else {}
            if not (isinstance(kw.get("cache"), ast.Constant) and kw["cache"].value is True):
                uncached.append(f"{f.name}:{name}")
    assert found >= 10  # the parser sees the kernels (alignment, probes, mftma_*)
    assert uncached == [], f"kernels without cache=True: {uncached}"


_CACHE_CHILD = r"""
import json, sys
import numpy as np
import geomprobe as gp
from geomprobe._kernels import alignment as k

rng = np.random.default_rng(0)
X = rng.standard_normal((1100, 33)).astype(np.float32)  # three 512-row chunks
y = rng.integers(0, 3, 1100)
r = gp.alignment(X, y)
stats = {"class_sums": k.class_sums.stats}
print(json.dumps({"omega": r.omega, "per_class": [float(v) for v in r.per_class],
                  "hits": {f: sum(s.cache_hits.values()) for f, s in stats.items()},
                  "misses": {f: sum(s.cache_misses.values()) for f, s in stats.items()}}))
"""


def _numpy_omega(X):
    X = X.astype(np.float64)
    n = X.shape[0]
    norms = np.linalg.norm(X, axis=1)
    mean_pair = (np.sum(X.sum(0) ** 2) - np.sum(norms ** 2)) / (n * (n - 1.0))
    return mean_pair / norms.mean() ** 2


@pytest.mark.slow  # three cold compilations at once: ~20 s on an idle 2-core machine
def test_jit_cache_is_safe_for_concurrent_cold_processes(tmp_path):
    """Three processes start at once on an empty NUMBA_CACHE_DIR (all compile the parallel
    alignment kernel and write the same cache files; numba writes each file to a temporary name and
    renames it); all give the numpy answer. A fourth process then loads the kernel from the cache
    (no compilation) and gives the same numbers. Slow: run with ``pytest -m slow``."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    env.pop("NUMBA_DISABLE_JIT", None)
    procs = [subprocess.Popen([sys.executable, "-c", _CACHE_CHILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert list((tmp_path / "numba-cache").rglob("alignment.class_sums-*.nbc"))
    warm = subprocess.run([sys.executable, "-c", _CACHE_CHILD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert warm.returncode == 0, warm.stderr
    w = json.loads(warm.stdout.strip().splitlines()[-1])
    assert w["misses"] == {"class_sums": 0} and w["hits"]["class_sums"] >= 1

    rng = np.random.default_rng(0)
    X = rng.standard_normal((1100, 33)).astype(np.float32)
    y = rng.integers(0, 3, 1100)
    expected = [_numpy_omega(X[y == c]) for c in range(3)]
    for r in results + [w]:
        assert r["omega"] == pytest.approx(_numpy_omega(X), rel=1e-9, abs=1e-12)
        assert r["per_class"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert all(r["per_class"] == results[0]["per_class"] for r in results + [w])  # bit for bit


# --- distributables ---------------------------------------------------------------------------------

@pytest.mark.slow  # builds an sdist and a wheel (~10-30 s); .ci/run does the same plus a fresh venv
def test_sdist_and_wheel_build_pass_twine_check_and_install_without_an_index(tmp_path):
    """python -m build (from the sdist, as PyPI users get it) -> twine check -> the wheel installed
    with pip --no-index --no-deps into a target folder imports the core, the CLI and the trainers'
    package from there and declares the console script."""
    import zipfile

    dist = tmp_path / "dist"
    # --no-isolation: setuptools from this environment (no index needed in the test)
    b = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                       capture_output=True, text=True, timeout=900)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    t = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, sdists + wheels)],
                       capture_output=True, text=True, timeout=300)
    assert t.returncode == 0 and t.stdout.count("PASSED") == 2, t.stdout + t.stderr

    names = zipfile.ZipFile(wheels[0]).namelist()
    for module in ("geomprobe/__init__.py", "geomprobe/__main__.py", "geomprobe/_kernels/alignment.py",
                   "geomprobe/cli/main.py", "geomprobe/trainers/__init__.py"):
        assert module in names, module
    assert not any(n.startswith(("cli/", "trainers/", "tests/")) for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "geomprobe = geomprobe.cli.main:main" in zipfile.ZipFile(wheels[0]).read(entry).decode()

    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site),
                          str(wheels[0])], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    code = ("import geomprobe, geomprobe.cli.main, importlib.util as u; "
            "print(geomprobe.__file__); print(u.find_spec('geomprobe.trainers').origin)")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    core, trainers = out.stdout.split()
    assert core.startswith(str(site)) and trainers.startswith(str(site))
