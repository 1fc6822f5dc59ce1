"""Markdown tables for summaries and reports (pandas' ``to_markdown`` needs an extra package)."""

from __future__ import annotations

import math

import pandas as pd


def cell(value, digits: int = 4) -> str:
    """One table cell: floats to ``digits`` significant figures, missing values as ``–``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """``df`` as a GitHub Markdown table (numbers right-aligned)."""
    cols = list(df.columns)
    align = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in cols]
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join(align) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v, digits) for v in row) + " |")
    return "\n".join(lines) + "\n"
