"""docs/model.md's "What loads from where" tables stay true to the loaders (issue 11, point 8)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from twisted.trial.unittest import TestCase

from pie.engine.llama import HF_FAMILIES
from pie.engine.loaders.gguf_loader import SUPPORTED_ARCHITECTURES

DOC = Path(__file__).resolve().parent.parent / "docs" / "model.md"


def section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def family_rows() -> list[list[str]]:
    """The cells of the family table (the one whose header starts with `family`)."""
    lines = section("What loads from where").splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| family |"))
    rows = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def leading_names(cell: str) -> set[str]:
    """The backticked names before any parenthesis: "`gemma3_text`, `gemma3` (its ...)"."""
    return set(re.findall(r"`([a-z0-9_]+)`", cell.split("(")[0]))


class ModelDocTables(TestCase):
    def test_every_family_the_code_accepts_is_a_row_and_no_other(self):
        documented = set().union(*(leading_names(row[1]) for row in family_rows()))
        self.assertEqual(documented - {"gemma3"}, set(HF_FAMILIES))  # gemma3: the wrapper

    def test_every_gguf_architecture_is_a_row_and_no_other(self):
        documented = set().union(*(leading_names(row[2]) for row in family_rows()))
        self.assertEqual(documented, set(SUPPORTED_ARCHITECTURES))

    def test_every_gguf_tensor_type_named_dequantizes(self):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        weights_row = next(
            line
            for line in section("What loads from where").splitlines()
            if line.startswith("| weights |")
        )
        named = re.findall(r"\b(F32|F16|BF16|Q\d_[0-9K]|MXFP4)\b", weights_row)
        self.assertGreaterEqual(len(named), 14, named)
        for name in named:
            kind = GGMLQuantizationType[name]
            _, size = GGML_QUANT_SIZES[kind]
            data = np.zeros((2, size), dtype=np.uint8)
            self.assertEqual(dequantize(data, kind).shape[0], 2, name)
