"""The run report: per-iteration metrics as a markdown table and plots (the paper's Figure 2a).

Built from stored results only (the evaluation and training manifests under a run prefix), so
`sami report DIR_OR_URI` rebuilds it any time, for a local run or one on a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sami_operator.models import Metrics
from sami_worker import storage

_EVALUATE = re.compile(r"^iterations/(\d+)/evaluate/_manifest\.json$")
_TRAIN = re.compile(r"^iterations/(\d+)/train/_manifest\.json$")

PLOTS = [
    ("mi_lower_bound.png", "miLowerBound", "MI lower bound (nats, InfoNCE)"),
    ("plug_in_mi.png", "plugInMi", "MI, plug-in estimate (nats)"),
    ("response_tokens.png", "meanResponseTokens", "Mean response length (tokens)"),
]


@dataclass
class IterationResult:
    iteration: int
    metrics: Metrics | None = None
    held_out: Metrics | None = None
    train: dict | None = None


def collect_results(run: storage.Storage) -> list[IterationResult]:
    """Every evaluated or trained iteration under a run prefix, in order."""
    results: dict[int, IterationResult] = {}
    for info in run.list("iterations"):
        key = f"iterations/{info.key}" if not info.key.startswith("iterations/") else info.key
        if m := _EVALUATE.match(key):
            meta = storage.read_manifest(run, key.removesuffix("/_manifest.json")).meta
            entry = results.setdefault(int(m[1]), IterationResult(int(m[1])))
            entry.metrics = Metrics.model_validate(meta["metrics"])
            if meta.get("heldOutMetrics"):
                entry.held_out = Metrics.model_validate(meta["heldOutMetrics"])
        elif m := _TRAIN.match(key):
            meta = storage.read_manifest(run, key.removesuffix("/_manifest.json")).meta
            results.setdefault(int(m[1]), IterationResult(int(m[1]))).train = meta
    return [results[t] for t in sorted(results)]


def _fmt(estimate) -> str:
    if estimate is None:
        return "-"
    if estimate.stderr is None:
        return f"{estimate.value:.3f}"
    return f"{estimate.value:.3f} ± {estimate.stderr:.3f}"


def render_table(results: list[IterationResult]) -> str:
    """Markdown table, one row per iteration (0 is the base model)."""
    lines = [
        "| iteration | MI lower bound (nats) | plug-in MI (nats) | response tokens "
        "| held-out MI lower bound | train loss (first → last) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.metrics
        loss = "-"
        if r.train:
            loss = f"{r.train['first_loss']:.3f} → {r.train['final_loss']:.3f}"
        lines.append(
            f"| {r.iteration}{' (base)' if r.iteration == 0 else ''} "
            f"| {_fmt(m.mi_lower_bound) if m else '-'} | {_fmt(m.plug_in_mi) if m else '-'} "
            f"| {_fmt(m.mean_response_tokens) if m else '-'} "
            f"| {_fmt(r.held_out.mi_lower_bound) if r.held_out else '-'} | {loss} |"
        )
    return "\n".join(lines) + "\n"


def write_plots(results: list[IterationResult], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in results if r.metrics]
    paths = []
    for filename, field, label in PLOTS:
        xs, ys, errs = [], [], []
        for r in evaluated:
            estimate = r.metrics.model_dump(by_alias=True).get(field)
            if estimate is not None:
                xs.append(r.iteration)
                ys.append(estimate["value"])
                errs.append(estimate["stderr"] or 0.0)
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4)
        ax.set_xticks(xs)
        ax.set_xlabel("iteration (0 = base model)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = directory / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def build_report(run: storage.Storage, directory: Path) -> str:
    """Write summary.md and the plots into `directory`; return the markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    results = collect_results(run)
    table = render_table(results)
    plots = write_plots(results, directory)
    checkpoints = [
        f"- iteration {r.iteration}: {run.uri(f'iterations/{r.iteration}/train/checkpoint')}"
        for r in results
        if r.train
    ]
    markdown = "\n".join(
        [
            "# SAMI run report",
            "",
            f"Run data: {run.uri()}",
            "",
            table,
            "MI lower bound: log C - column loss on held-out queries (InfoNCE, at most log K).",
            "Plug-in MI: the paper's plotted estimate. ± is one standard error over queries.",
            "",
            "## Checkpoints (Hugging Face format)",
            *(checkpoints or ["- none yet"]),
            "",
            "## Plots",
            *(f"![{p.stem}]({p.name})" for p in plots),
            "",
        ]
    )
    (directory / "summary.md").write_text(markdown)
    return markdown
