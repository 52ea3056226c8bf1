"""Summaries of evaluation rows: accuracy by task and length, tables, and a plot.

``summarize(rows)`` -> ``{"by_length": {task: {length: {"n", "sub_em", "f1", "prompt_tokens"}}},
"retention": ...}``; the task ``all`` averages every task's examples of a length. The short-context
retention score is the ``sub_em`` of the short bucket (``1x``: the short contexts themselves, or
a JSONL bucket labelled ``short``; none without one);
``retention_ratio`` divides it by a baseline checkpoint's (1.0: nothing lost).

The plot needs matplotlib (``pip install matplotlib`` or the ``plot`` extra); without it ``plot_accuracy_vs_length``
raises ``MissingPlotting`` with that instruction, and the JSON and tables are still written.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

METRIC_NAMES = ("sub_em", "f1")
SHORT_LABELS = ("1x", "short")  # buckets of short contexts: the retention score


class MissingPlotting(RuntimeError):
    """matplotlib is not installed."""


def length_key(label: str):
    """Sort ``1x, 2x, 10x`` numerically, other labels after them alphabetically."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)x?", label)
    return (0, float(match.group(1)), "") if match else (1, 0.0, label)


def summarize(rows: Sequence[dict]) -> dict:
    groups: dict = {}
    for row in rows:
        for task in (row["task"], "all"):
            groups.setdefault(task, {}).setdefault(row["length"], []).append(row)
    by_length = {}
    for task, lengths in sorted(groups.items()):
        by_length[task] = {}
        for length in sorted(lengths, key=length_key):
            items = lengths[length]
            entry = {"n": len(items)}
            for name in METRIC_NAMES:
                entry[name] = sum(item[name] for item in items) / len(items)
            tokens = [item["prompt_tokens"] for item in items if item.get("prompt_tokens")]
            entry["prompt_tokens"] = sum(tokens) / len(tokens) if tokens else None
            by_length[task][length] = entry
    summary = {"by_length": by_length, "num_examples": len(rows)}
    overall = by_length.get("all", {})
    short = next((label for label in SHORT_LABELS if label in overall), None)
    if short is not None:
        summary["retention"] = {"length": short, "sub_em": overall[short]["sub_em"]}
    return summary


def add_retention_ratio(summary: dict, baseline: dict) -> None:
    """``summary["retention"]["ratio"]``: its short-context sub-EM over ``baseline``'s."""
    mine, theirs = summary.get("retention"), baseline.get("retention")
    if mine and theirs and theirs["length"] == mine["length"]:
        mine["ratio"] = mine["sub_em"] / theirs["sub_em"] if theirs["sub_em"] else None


def table(summaries: dict, metric: str = "sub_em", task: str = "all") -> str:
    """Markdown table: one row per checkpoint, one column per length."""
    lengths = sorted({length for s in summaries.values()
                      for length in s["by_length"].get(task, {})}, key=length_key)
    lines = [f"| {task} {metric} | " + " | ".join(lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name, summary in summaries.items():
        cells = summary["by_length"].get(task, {})
        lines.append(f"| {name} | " + " | ".join(
            f"{cells[length][metric]:.3f}" if length in cells else "-" for length in lengths) + " |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingPlotting("plots need matplotlib: pip install matplotlib (the JSON and the "
                              "tables were written without it)") from None
    return plt


def plot_accuracy_vs_length(series: dict, path: str, *, title: str = "",
                            ylabel: str = "sub-EM accuracy", spreads: Optional[dict] = None) -> str:
    """``series``: {line name: {length label: value}}; ``spreads``: the same shape (error bars).
    Writes a PNG at ``path``."""
    plt = _pyplot()
    lengths = sorted({length for values in series.values() for length in values}, key=length_key)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for name, values in series.items():
        xs = [i for i, length in enumerate(lengths) if length in values]
        ys = [values[lengths[i]] for i in xs]
        errors = [spreads[name][lengths[i]] for i in xs] if spreads and name in spreads else None
        axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
    axis.set_xticks(range(len(lengths)), lengths)
    axis.set_xlabel("context length (multiple of the short length)")
    axis.set_ylabel(ylabel)
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
