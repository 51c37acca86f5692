"""Several models scored on the same data: tables, bar charts, and the best one (candidates of a
pipeline; versions of a registered model)."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("mIoU", "mDice")


def best_of(rows: list[dict], metric: str = "mDice") -> dict:
    """The row with the highest ``metric`` (ties: the first listed)."""
    return max(rows, key=lambda r: r[metric])


def table(rows: list[dict], metric: str = "mDice") -> str:
    """Markdown, best first; the winner in bold."""
    best = best_of(rows, metric)["candidate"]
    lines = ["| candidate | " + " | ".join(f"{c} %" for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row in sorted(rows, key=lambda r: -r[metric]):
        name = f"**{row['candidate']}**" if row["candidate"] == best else row["candidate"]
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], out_png: Path, title: str = "Candidates on the target val subset") -> Path:
    """Horizontal bars of mIoU and mDice per candidate, best at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = sorted(rows, key=lambda r: r["mDice"])
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5), dpi=100)
    for k, column in enumerate(COLUMNS):
        ax.barh(y + (k - 0.5) * 0.38, [100 * r[column] for r in rows], 0.38, label=column)
    ax.set_yticks(y, [r["candidate"] for r in rows])
    ax.set_xlabel("%")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def versions_table(labels: list[str], table: dict[str, dict]) -> str:
    """Markdown: one row per metric, one column per model version (as registry.comparison gives them)."""
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for metric, values in table.items():
        cells = [f"{100 * values[label]:.2f}" if label in values else "-" for label in labels]
        lines.append(f"| {metric} % | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def versions_chart(labels: list[str], table: dict[str, dict], out_png, title: str = "Registered versions"):
    """Grouped bars: one group per metric, one bar per version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = list(table)
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(metrics) + 2), 4), dpi=100)
    for k, label in enumerate(labels):
        ax.bar(x + k * width, [100 * table[m].get(label, 0.0) for m in metrics], width, label=label)
    ax.set_xticks(x + width * (len(labels) - 1) / 2, metrics, rotation=45, ha="right")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
