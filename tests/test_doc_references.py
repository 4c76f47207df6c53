"""Every .md file the Makefile, the code, the configs and the docs name exists (they cited
docs/install.md and environment.md, which did not)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def _sources():
    yield REPO / "Makefile"
    yield REPO / "README.md"
    for pattern in ("resampling_forcing/**/*.py", "train/*.py", "sample/*.py", "bench/*.py", "kernels/*.py",
                    "configs/**/*.yaml", "docs/*.md", "notebooks/*.ipynb"):
        yield from sorted(REPO.glob(pattern))


def test_cited_markdown_files_exist():
    missing = []
    for src in _sources():
        for ref in set(REF.findall(src.read_text(errors="replace"))):
            if "://" in ref or ref.startswith("."):
                continue
            candidates = [REPO / ref, REPO / "docs" / ref, src.parent / ref]
            if not any(c.is_file() for c in candidates):
                missing.append(f"{src.relative_to(REPO)}: {ref}")
    assert not missing, missing
