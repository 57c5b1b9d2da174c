"""docs/configuration.md and docs/limits.md against pie/config.py's SETTINGS.

configuration.md must have exactly one row per setting, with the right flag and
default; limits.md's rows must name settings and constants that exist, with
the defaults the code has. A setting added, renamed or re-defaulted without its
docs fails here.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from twisted.trial import unittest

from pie.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
BY_KEY = {setting.key: setting for setting in SETTINGS}
NOT_SETTINGS = {
    "localhost"
}  # limits.md: "a pattern naming the address (IP literal or `localhost`)"
UNITS = {"": 1, "bytes": 1, "characters": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def rows(doc: str, header: str) -> list[list[str]]:
    """The body rows of every table in `doc` whose first header cell is `header`."""
    found, in_table = [], False
    for line in (ROOT / "docs" / doc).read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            in_table = False
        elif cells[0] == header:
            in_table = True
        elif in_table and not set(cells[0]) <= {"-", ":"}:
            found.append(cells)
    return found


def documented_default(cell: str) -> str:
    """The default as configuration.md writes it: the first `code` span after the type."""
    spans = re.findall(r"`([^`]*)`", cell)
    return spans[0] if spans else ""


def toml_text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def limit_value(setting_key: str, text: str) -> int | None:
    """A limits.md default such as `16 MiB`, `30 s` or `256`, in the setting's own unit."""
    match = re.fullmatch(r"(\d+) ?(bytes|characters|KiB|MiB|GiB|ms|s|)", text)
    if match is None:
        return None
    number, unit = int(match[1]), match[2]
    if unit in ("s", "ms"):
        per_ms = {"s": 1000, "ms": 1}[unit]
        return number * per_ms if setting_key.endswith("_ms") else number * per_ms // 1000
    return number * UNITS[unit]


class ConfigurationTableTests(unittest.TestCase):
    def setUp(self):
        self.rows = rows("configuration.md", "key (TOML)")

    def test_every_setting_has_exactly_one_row_and_every_row_a_setting(self):
        keys = Counter(row[0].strip("`") for row in self.rows)
        self.assertEqual({key for key, n in keys.items() if n > 1}, set(), "duplicate rows")
        self.assertEqual(set(keys) - set(BY_KEY), set(), "rows of no setting")
        self.assertEqual(set(BY_KEY) - set(keys), set(), "settings with no row")

    def test_each_row_has_the_flag_and_the_default_of_the_code(self):
        for key, flag, type_default, _meaning in self.rows:
            setting = BY_KEY[key.strip("`")]
            expected_flag = "--no-auth" if setting.kind is bool else f"--{setting.flag}"
            self.assertEqual(flag, f"`{expected_flag}`", setting.key)
            if setting.default == "":
                # home's default is filled in at start ($PIE_HOME or ~/.cache/pie)
                if setting.key != "home":
                    self.assertIn("empty", type_default, setting.key)
                continue
            self.assertEqual(
                documented_default(type_default),
                toml_text(setting.default),
                setting.key,
            )


class LimitsTableTests(unittest.TestCase):
    def setUp(self):
        self.rows = rows("limits.md", "limit")

    def test_the_tables_are_found(self):
        self.assertGreater(len(self.rows), 40)

    def test_no_duplicate_rows(self):
        limits = Counter(row[0] for row in self.rows)
        self.assertEqual({limit for limit, n in limits.items() if n > 1}, set())

    def test_each_named_setting_and_constant_exists(self):
        sources = "\n".join(path.read_text() for path in (ROOT / "pie").rglob("*.py"))
        for row in self.rows:
            for name in re.findall(r"`([A-Za-z_]+)`", row[1]):
                if name.isupper():
                    self.assertRegex(sources, rf"\b{name}\b\s*(:[^=\n]*)?=", row[0])
                elif name not in NOT_SETTINGS:
                    self.assertIn(name, BY_KEY, row[0])

    def test_the_defaults_of_single_setting_rows_are_the_codes(self):
        checked = 0
        for limit, setting_cell, default, *_ in self.rows:
            # a row whose setting cell starts with one setting holds that setting's default
            names = re.findall(r"`([a-z_]+)`", setting_cell)
            single = len(names) == 1 and setting_cell.startswith("`")
            value = limit_value(names[0], default) if single else None
            if value is None:
                continue
            self.assertEqual(value, BY_KEY[names[0]].default, limit)
            checked += 1
        self.assertGreater(checked, 25)
