"""The docs name only files that exist, and docs/architecture.md names every module of pie/.

Module paths in prose go stale silently when code moves; these checks make a
rename or a new module fail the fast tier until the docs follow.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

# A repository path such as `pie/server/uploads.py` or bench/run.py: not part of a longer
# path, no wildcards or placeholders (`tests/*_doubles.py` and `<name>` are left alone).
PATH = re.compile(
    r"(?<![\w./<>*-])((?:pie|bench|inferlets|tests|scripts|twisted)/[\w/]*\w\.(?:py|sh|wit))\b"
)
# A dotted name under pie: `pie.service.local.LocalWorker`, `pie.engine.batch`.
DOTTED = re.compile(r"(?<![\w.])pie(?:\.[A-Za-z_]\w*)+")
# Dotted words that are file names or key prefixes, not Python names.
NOT_PYTHON = {"pie.kv", "pie.log", "pie.pid", "pie.sock", "pie.toml"}

# Files the docs show in someone else's tree, not in this repository.
ELSEWHERE = {"pie/plugins/pie_echo.py"}  # docs/plugins.md: a third-party plugin package's module


def named_paths(text: str) -> set[str]:
    return set(PATH.findall(text))


def unresolved(dotted: str) -> bool:
    """True unless `dotted` is a module under pie/, or a module followed by a name it defines."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:end])
        source = (
            base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        )
        if source.is_file():
            if end == len(parts):
                return False
            return re.search(rf"\b{parts[end]}\b", source.read_text()) is None
    return True


def pie_modules() -> set[str]:
    """Every module under pie/ but the package markers, as repository paths."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "pie").rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }


class DocPathTests(unittest.TestCase):
    def test_the_pattern_finds_paths_and_skips_globs(self):
        text = "see `pie/server/uploads.py`, bench/x.py, scripts/t.sh, tests/*_doubles.py, docs/pie/a.py"
        self.assertEqual(named_paths(text), {"pie/server/uploads.py", "bench/x.py", "scripts/t.sh"})

    def test_every_path_named_in_the_docs_exists(self):
        missing = {
            f"{doc.relative_to(ROOT)}: {path}"
            for doc in DOCS
            for path in named_paths(doc.read_text())
            if path not in ELSEWHERE and not (ROOT / path).is_file()
        }
        self.assertEqual(missing, set())

    def test_every_dotted_pie_name_in_the_docs_resolves(self):
        stale = {
            f"{doc.relative_to(ROOT)}: {name}"
            for doc in DOCS
            for name in set(DOTTED.findall(doc.read_text()))
            if name not in NOT_PYTHON and unresolved(name)
        }
        self.assertEqual(stale, set())

    def test_a_stale_dotted_name_is_caught(self):
        self.assertFalse(unresolved("pie.service.local.LocalWorker"))
        self.assertFalse(unresolved("pie.engine.batch"))
        self.assertTrue(unresolved("pie.engine.worker.NoSuchWorker"))
        self.assertTrue(unresolved("pie.inferlet.template.compiled"))

    def test_architecture_names_every_module(self):
        architecture = named_paths((ROOT / "docs" / "architecture.md").read_text())
        self.assertEqual(pie_modules() - architecture, set())
