"""Package layout: namespace mapping, console script, torch-free core."""
import pathlib
import subprocess
import sys
import tomllib

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
