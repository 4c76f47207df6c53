"""The checkout must not shadow installed packages when its root is on sys.path (`python -m ...` from the
repository root puts it there): a top-level folder with an __init__.py, or a top-level .py file, whose name
is a top-level module of an installed distribution would replace that module for every import."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _importable_from_root() -> set[str]:
    names = {p.parent.name for p in REPO.glob("*/__init__.py")}
    return names | {p.stem for p in REPO.glob("*.py")}


def test_no_top_level_name_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = {n: installed[n] for n in _importable_from_root() - {"resampling_forcing"} if n in installed}
    assert not clashes, f"top-level names of the checkout shadow installed distributions: {clashes}"
    assert "kernels" not in _importable_from_root(), "kernels/ must stay a plain folder (see kernels/README.md)"


def test_kernels_import_name_is_the_package_and_the_root_does_not_shadow():
    code = ("import importlib.util, resampling_forcing.kernels as k; "
            "s = importlib.util.find_spec('kernels'); "
            "print(k.__name__, k.HAS_TRITON, s is None or s.origin is None or 'site-packages' in s.origin)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["resampling_forcing.kernels", "True", "True"], out
