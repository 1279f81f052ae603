"""The run report: per-iteration metrics as a markdown table and plots (the paper's Figure 2a,
and Figure 2b when an LLM judge ran: the win rate vs the base model per iteration).

Built from stored results only (the evaluation and training manifests under a run prefix), so
`sami report DIR_OR_URI` rebuilds it any time, for a local run or one on a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sami_operator.models import Metrics, WinRate
from sami_worker import storage

_EVALUATE = re.compile(r"^iterations/(\d+)/evaluate/_manifest\.json$")
_TRAIN = re.compile(r"^iterations/(\d+)/train/_manifest\.json$")

PLOTS = [
    ("mi_lower_bound.png", "miLowerBound", "MI lower bound (nats, InfoNCE)"),
    ("plug_in_mi.png", "plugInMi", "MI, plug-in estimate (nats)"),
    ("response_tokens.png", "meanResponseTokens", "Mean response length (tokens)"),
]
WIN_RATE_PLOT = "win_rate.png"
BASELINE = "base"


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


def win_rate(metrics: Metrics | None, baseline: str = BASELINE) -> WinRate | None:
    """The metrics' win rate against `baseline`, if judged."""
    if metrics is None:
        return None
    return next((w for w in metrics.win_rates if w.baseline == baseline), None)


def _fmt_rate(rate: float | None, low: float | None, high: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.2f} [{low:.2f}, {high:.2f}]"


def _win_cells(metrics: Metrics | None) -> list[str]:
    w = win_rate(metrics)
    if w is None:
        return ["-", "-"]
    return [
        _fmt_rate(w.rate, w.low, w.high),
        _fmt_rate(w.length_corrected, w.length_corrected_low, w.length_corrected_high),
    ]


def judge_counts(results: list[IterationResult]) -> list[str]:
    """One line per judged iteration and principle set: items, ties, unparsable verdicts."""
    lines = []
    for r in results:
        for name, metrics in (("training", r.metrics), ("held-out", r.held_out)):
            if (w := win_rate(metrics)) is not None:
                lines.append(
                    f"- iteration {r.iteration}, {name} principles: {w.items} items judged; "
                    f"{w.ties} ties and {w.unparsable} unparsable verdicts (each counts 0.5)"
                )
    return lines


def render_table(results: list[IterationResult]) -> str:
    """Markdown table, one row per iteration (0 is the base model). Win-rate columns appear
    when some iteration was judged, held-out ones when held-out principles were judged."""
    judged = any(win_rate(r.metrics) for r in results)
    judged_held_out = any(win_rate(r.held_out) for r in results)
    header = [
        "iteration",
        "MI lower bound (nats)",
        "plug-in MI (nats)",
        "response tokens",
        "held-out MI lower bound",
        "train loss (first → last)",
    ]
    if judged:
        header += ["win rate vs base", "length-corrected"]
    if judged_held_out:
        header += ["held-out win rate", "held-out length-corrected"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        m = r.metrics
        loss = "-"
        if r.train:
            loss = f"{r.train['first_loss']:.3f} → {r.train['final_loss']:.3f}"
        cells = [
            f"{r.iteration}{' (base)' if r.iteration == 0 else ''}",
            _fmt(m.mi_lower_bound) if m else "-",
            _fmt(m.plug_in_mi) if m else "-",
            _fmt(m.mean_response_tokens) if m else "-",
            _fmt(r.held_out.mi_lower_bound) if r.held_out else "-",
            loss,
        ]
        if judged:
            cells += _win_cells(m)
        if judged_held_out:
            cells += _win_cells(r.held_out)
        lines.append("| " + " | ".join(cells) + " |")
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
    if path := write_win_rate_plot(results, directory, plt):
        paths.append(path)
    return paths


def write_win_rate_plot(results: list[IterationResult], directory: Path, plt) -> Path | None:
    """The paper's Figure 2b: win rate vs the base model per iteration with 95% intervals,
    raw and length-corrected, training and held-out principles, and the 0.5 line (no
    better than the base model)."""
    series = []
    for label, pick, field, style in [
        ("raw", lambda r: r.metrics, "", "o-"),
        ("length-corrected", lambda r: r.metrics, "length_corrected", "s-"),
        ("held-out, raw", lambda r: r.held_out, "", "o--"),
        ("held-out, length-corrected", lambda r: r.held_out, "length_corrected", "s--"),
    ]:
        xs, ys, lows, highs = [], [], [], []
        for r in results:
            w = win_rate(pick(r))
            value = w and getattr(w, field or "rate")
            if value is not None:
                xs.append(r.iteration)
                ys.append(value)
                lows.append(value - getattr(w, f"{field}_low" if field else "low"))
                highs.append(getattr(w, f"{field}_high" if field else "high") - value)
        if xs:
            series.append((label, style, xs, ys, lows, highs))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    # Side by side within an iteration, so the intervals do not hide each other.
    offsets = [0.06 * (i - (len(series) - 1) / 2) for i in range(len(series))]
    for (label, style, xs, ys, lows, highs), dx in zip(series, offsets, strict=True):
        ax.errorbar([x + dx for x in xs], ys, yerr=[lows, highs], fmt=style, capsize=3, label=label)
    ax.set_xticks(sorted({x for s in series for x in s[2]}))
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("win rate vs base model")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = directory / WIN_RATE_PLOT
    fig.savefig(path)
    plt.close(fig)
    return path


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
    counts = judge_counts(results)
    markdown = "\n".join(
        [
            "# SAMI run report",
            "",
            f"Run data: {run.uri()}",
            "",
            table,
            "MI lower bound: log C - column loss on held-out queries (InfoNCE, at most log K).",
            "Plug-in MI: the paper's plotted estimate. ± is one standard error over queries.",
            *(
                [
                    "Win rate: an LLM judge's pairwise preference for the iteration's response "
                    "over the base model's (ties and unparsable verdicts count 0.5), with a 95% "
                    "Wilson interval; length-corrected: the win rate at equal response length "
                    "(logistic regression on the standardised length difference), 95% interval.",
                    "",
                    *counts,
                ]
                if counts
                else []
            ),
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
