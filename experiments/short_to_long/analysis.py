"""The experiment's results: JSON, a markdown table (mean and spread over seeds), plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from megatron_solopo.evaluation import report


def _mean_std(values: list) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(results: dict) -> dict:
    """Per method: per (task, length) mean and sample std of sub-EM over seeds; cost per step."""
    methods: dict = {}
    for run in results["runs"]:
        methods.setdefault(run["method"], []).append(run)
    table = {}
    for method, runs in methods.items():
        entry = {"seeds": sorted(run["seed"] for run in runs), "accuracy": {}}
        for task in runs[0]["eval"]["by_length"]:
            entry["accuracy"][task] = {}
            for length in runs[0]["eval"]["by_length"][task]:
                values = [run["eval"]["by_length"][task][length]["sub_em"] for run in runs
                          if length in run["eval"]["by_length"].get(task, {})]
                mean, std = _mean_std(values)
                entry["accuracy"][task][length] = {"mean": mean, "std": std, "values": values}
        step_times = [run["train"]["step_time_s"] / run["train"]["steps"] for run in runs]
        tokens = [run["train"]["tokens"] / run["train"]["steps"] for run in runs]
        entry["seconds_per_step"] = _mean_std(step_times)
        entry["tokens_per_step"] = _mean_std(tokens)
        entry["reference_s"] = _mean_std([run["train"]["reference_s"] for run in runs])
        entry["train_s"] = _mean_std([run["train"]["step_time_s"] for run in runs])
        entry["pairs"] = _mean_std([run["pairs"]["pairs"] for run in runs])
        entry["skipped_steps"] = sum(run["train"]["skipped_steps"] for run in runs)
        norms = [n for run in runs for n in run["train"].get("grad_norms", []) if n is not None]
        entry["max_grad_norm"] = max(norms) if norms else None
        entry["final_loss"] = _mean_std([run["train"]["losses"][-1] for run in runs])
        table[method] = entry
    return table


def markdown(results: dict, table: dict) -> str:
    sft = results["sft"]["eval"]["by_length"]["all"]
    lengths = list(sft)
    lines = ["| method | seeds | " + " | ".join(f"sub-EM {length}" for length in lengths) + " |",
             "|---|---:|" + "---:|" * len(lengths)]
    lines.append("| SFT start | - | " + " | ".join(f"{sft[length]['sub_em']:.3f}"
                                                   for length in lengths) + " |")
    for method, entry in table.items():
        cells = entry["accuracy"]["all"]
        lines.append(
            f"| {method} | {len(entry['seeds'])} | "
            + " | ".join(f"{cells[length]['mean']:.3f} ± {cells[length]['std']:.3f}"
                         if length in cells else "-" for length in lengths) + " |")
    lines += ["", "| method | s/step | tokens/step | reference pass s | final loss | max grad norm "
              "| skipped steps |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, entry in table.items():
        norm = entry.get("max_grad_norm")
        lines.append(f"| {method} | {entry['seconds_per_step'][0]:.3f} ± "
                     f"{entry['seconds_per_step'][1]:.3f} | {entry['tokens_per_step'][0]:.0f} | "
                     f"{entry['reference_s'][0]:.1f} | {entry['final_loss'][0]:.4f} | "
                     + (f"{norm:.3g}" if norm is not None else "-")
                     + f" | {entry['skipped_steps']} |")
    per_task = []
    tasks = [task for task in results["sft"]["eval"]["by_length"] if task != "all"]
    for task in tasks:
        sft_task = results["sft"]["eval"]["by_length"][task]
        per_task += ["", f"**{task}** (sub-EM, mean ± std over seeds)", "",
                     "| method | " + " | ".join(sft_task) + " |",
                     "|---|" + "---:|" * len(sft_task),
                     "| SFT start | " + " | ".join(f"{sft_task[length]['sub_em']:.3f}"
                                                  for length in sft_task) + " |"]
        for method, entry in table.items():
            cells = entry["accuracy"].get(task, {})
            per_task.append(f"| {method} | " + " | ".join(
                f"{cells[length]['mean']:.3f} ± {cells[length]['std']:.3f}" if length in cells
                else "-" for length in sft_task) + " |")
    tokens = {length: cell.get("prompt_tokens") for length, cell in sft.items()}
    token_line = ", ".join(f"{length}: {value:.0f}" for length, value in tokens.items() if value)
    return "\n".join(lines + per_task + ["", f"Mean prompt tokens per length: {token_line}."])


def plots(out: Path, results: dict, table: dict) -> list[str]:
    written = []
    sft = results["sft"]["eval"]["by_length"]["all"]
    series = {"SFT start": {length: cell["sub_em"] for length, cell in sft.items()}}
    spreads = {"SFT start": {length: 0.0 for length in sft}}
    for method, entry in table.items():
        series[method] = {length: cell["mean"] for length, cell in entry["accuracy"]["all"].items()}
        spreads[method] = {length: cell["std"] for length, cell in entry["accuracy"]["all"].items()}
    written.append(report.plot_accuracy_vs_length(
        series, str(out / "accuracy_vs_length.png"), spreads=spreads,
        title="sub-EM vs context length (mean ± std over seeds)"))
    # accuracy vs wall-clock: each run a point (training step time, mean sub-EM beyond 1x)
    plt = report._pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method in table:
        xs, ys = [], []
        for run in results["runs"]:
            if run["method"] != method:
                continue
            cells = run["eval"]["by_length"]["all"]
            long_cells = [cell["sub_em"] for length, cell in cells.items() if length != "1x"]
            if not long_cells:
                continue
            xs.append(run["train"]["step_time_s"] + run["train"]["reference_s"])
            ys.append(sum(long_cells) / len(long_cells))
        axis.scatter(xs, ys, label=method)
    axis.set_xlabel("training wall-clock, s (steps + reference pass)")
    axis.set_ylabel("sub-EM, mean over lengths > 1x")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = out / "accuracy_vs_wallclock.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(str(path))
    return written


def write_all(out: Path, results: dict) -> None:
    table = aggregate(results) if results["runs"] else {}
    payload = dict(results, aggregate=table)
    tmp = out / f"results.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out / "results.json")
    text = markdown(results, table)
    tmp = out / f"results.md.tmp{os.getpid()}"
    tmp.write_text(text + "\n")
    os.replace(tmp, out / "results.md")
    if table:
        try:
            plots(out, results, table)
        except report.MissingPlotting as err:
            print(f"[s2l] {err}", flush=True)
