"""The run report: per-iteration metrics as a markdown table and plots (the MI estimates and
the mean response length per iteration, and, when an LLM judge ran, the win rate per iteration,
one plot per baseline: the base model, and the reference model when evaluation.judge.reference
is set; docs/paper.md says how these compare with the paper's figures).

Built from stored results only (the evaluation and training manifests under a run prefix), so
`sami report DIR_OR_URI` rebuilds it any time, for a local run or one on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sami_operator.models import BASELINE_BASE, BASELINE_REFERENCE, Metrics, WinRate
from sami_worker import layout, storage

PLOTS = [
    ("mi_lower_bound.png", "miLowerBound", "MI lower bound (nats, InfoNCE)"),
    ("plug_in_mi.png", "plugInMi", "MI, plug-in estimate (nats)"),
    ("response_tokens.png", "meanResponseTokens", "Mean response length (tokens)"),
]
WIN_RATE_PLOT = "win_rate.png"  # vs the base model; win_rate_<baseline>.png for the others
_BASELINE_MODELS = {BASELINE_BASE: "base model", BASELINE_REFERENCE: "reference model"}


def win_rate_plot(baseline: str) -> str:
    return WIN_RATE_PLOT if baseline == BASELINE_BASE else f"win_rate_{baseline}.png"


@dataclass
class IterationResult:
    iteration: int
    metrics: Metrics | None = None
    held_out: Metrics | None = None
    train: dict | None = None
    model: str | None = None  # the evaluated model's URI, when recorded


def collect_results(run: storage.Storage) -> list[IterationResult]:
    """Every evaluated or trained iteration under a run prefix, in order."""
    results: dict[int, IterationResult] = {}
    for info in run.list(layout.ITERATIONS):  # keys relative to the run prefix
        prefix, _, file = info.key.rpartition("/")
        stage = layout.parse_stage_key(prefix) if file == storage.MANIFEST_NAME else None
        if stage is None or stage[0] not in ("evaluate", "train"):
            continue
        name, iteration = stage
        meta = storage.read_manifest(run, prefix).meta
        entry = results.setdefault(iteration, IterationResult(iteration))
        if name == "evaluate":
            _read_evaluation(entry, meta)
        else:
            entry.train = meta
    return [results[t] for t in sorted(results)]


def collect_reference(run: storage.Storage) -> IterationResult | None:
    """The reference model's evaluation (the 'reference' stage), if the run has one."""
    manifest = storage.read_manifest(run, layout.REFERENCE)
    if manifest is None:
        return None
    entry = IterationResult(0)
    _read_evaluation(entry, manifest.meta)
    return entry


def _read_evaluation(entry: IterationResult, meta: dict) -> None:
    entry.metrics = Metrics.model_validate(meta["metrics"])
    if meta.get("heldOutMetrics"):
        entry.held_out = Metrics.model_validate(meta["heldOutMetrics"])
    entry.model = meta.get("model")


def _fmt(estimate) -> str:
    """value ± the standard error over queries (seeds ± the one over generation seeds)."""
    if estimate is None:
        return "-"
    text = f"{estimate.value:.3f}"
    if estimate.stderr is not None:
        text += f" ± {estimate.stderr:.3f}"
    if estimate.seed_stderr is not None:
        text += f" (seeds ± {estimate.seed_stderr:.3f})"
    return text


def win_rate(metrics: Metrics | None, baseline: str = BASELINE_BASE) -> WinRate | None:
    """The metrics' win rate against `baseline`, if judged."""
    if metrics is None:
        return None
    return next((w for w in metrics.win_rates if w.baseline == baseline), None)


def baselines_judged(results: list[IterationResult]) -> list[str]:
    """Every baseline some iteration was judged against: base first, then as they come."""
    names = [w.baseline for r in results for m in (r.metrics, r.held_out) if m for w in m.win_rates]
    order = {BASELINE_BASE: 0, BASELINE_REFERENCE: 1}
    return sorted(dict.fromkeys(names), key=lambda b: order.get(b, len(order)))


def _fmt_rate(rate: float | None, low: float | None, high: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.2f} [{low:.2f}, {high:.2f}]"


def _win_cells(metrics: Metrics | None, baseline: str) -> list[str]:
    w = win_rate(metrics, baseline)
    if w is None:
        return ["-", "-"]
    return [
        _fmt_rate(w.rate, w.low, w.high),
        _fmt_rate(w.length_corrected, w.length_corrected_low, w.length_corrected_high),
    ]


JUDGED = {  # WinRate.constitutions
    "kept": "all-kept constitution",
    "all": "every evaluation constitution",
}


def judge_counts(results: list[IterationResult]) -> list[str]:
    """One line per judged iteration, baseline and principle set: whose responses were judged,
    items, ties, unparsable verdicts."""
    lines = []
    for r in results:
        for baseline in baselines_judged(results):
            for name, metrics in (("training", r.metrics), ("held-out", r.held_out)):
                if (w := win_rate(metrics, baseline)) is not None:
                    lines.append(
                        f"- iteration {r.iteration} vs {baseline}, {name} principles, "
                        f"{JUDGED[w.constitutions]}: {w.items} items judged; {w.ties} ties and "
                        f"{w.unparsable} unparsable verdicts (each counts 0.5)"
                    )
    return lines


def render_table(results: list[IterationResult], reference: IterationResult | None = None) -> str:
    """Markdown table, one row per iteration (0 is the base model), and one for the reference
    model after it. Win-rate columns appear per baseline some iteration was judged against,
    held-out ones when held-out principles were judged."""
    baselines = baselines_judged(results)
    judged = [b for b in baselines if any(win_rate(r.metrics, b) for r in results)]
    judged_held_out = [b for b in baselines if any(win_rate(r.held_out, b) for r in results)]
    header = [
        "iteration",
        "MI lower bound (nats)",
        "plug-in MI (nats)",
        "response tokens",
        "held-out MI lower bound",
        "train loss (first → last)",
    ]
    for b in judged:
        header += [f"win rate vs {b}", f"length-corrected vs {b}"]
    for b in judged_held_out:
        header += [f"held-out win rate vs {b}", f"held-out length-corrected vs {b}"]
    rows = [(f"{r.iteration}{' (base)' if r.iteration == 0 else ''}", r) for r in results]
    if reference is not None:
        after_base = 1 if results and results[0].iteration == 0 else 0
        rows.insert(after_base, ("reference", reference))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in rows:
        m = r.metrics
        loss = "-"
        if r.train:
            loss = f"{r.train['first_loss']:.3f} → {r.train['final_loss']:.3f}"
        cells = [
            label,
            _fmt(m.mi_lower_bound) if m else "-",
            _fmt(m.plug_in_mi) if m else "-",
            _fmt(m.mean_response_tokens) if m else "-",
            _fmt(r.held_out.mi_lower_bound) if r.held_out else "-",
            loss,
        ]
        for b in judged:
            cells += _win_cells(m, b)
        for b in judged_held_out:
            cells += _win_cells(r.held_out, b)
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
    for baseline in baselines_judged(results):
        if path := write_win_rate_plot(results, directory, plt, baseline):
            paths.append(path)
    return paths


def write_win_rate_plot(
    results: list[IterationResult], directory: Path, plt, baseline: str = BASELINE_BASE
) -> Path | None:
    """The win rate against one baseline per iteration (the paper's win-rate plots; see
    docs/paper.md) with 95% intervals, raw and length-corrected, training and held-out
    principles, and the 0.5 line (no better than the baseline); its title says whose responses
    were judged (WinRate.constitutions)."""
    series = []
    for label, pick, field, style in [
        ("raw", lambda r: r.metrics, "", "o-"),
        ("length-corrected", lambda r: r.metrics, "length_corrected", "s-"),
        ("held-out, raw", lambda r: r.held_out, "", "o--"),
        ("held-out, length-corrected", lambda r: r.held_out, "length_corrected", "s--"),
    ]:
        xs, ys, lows, highs = [], [], [], []
        for r in results:
            w = win_rate(pick(r), baseline)
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
    ax.set_ylabel(f"win rate vs {_BASELINE_MODELS.get(baseline, baseline)}")
    judged = {
        w.constitutions
        for r in results
        for m in (r.metrics, r.held_out)
        if (w := win_rate(m, baseline)) is not None
    }
    ax.set_title(", ".join(JUDGED[c] for c in sorted(judged, reverse=True)), fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = directory / win_rate_plot(baseline)
    fig.savefig(path)
    plt.close(fig)
    return path


class NotARun(ValueError):
    """The location holds no stage results of a SAMI run."""


def build_report(run: storage.Storage, directory: Path) -> str:
    """Write summary.md and the plots into `directory`; return the markdown. NotARun when
    `run` holds no finished stage (nothing is written then)."""
    results = collect_results(run)
    reference = collect_reference(run)
    if not results and reference is None:
        raise NotARun(_not_a_run(run))
    directory.mkdir(parents=True, exist_ok=True)
    table = render_table(results, reference)
    plots = write_plots(results, directory)
    checkpoints = [
        f"- iteration {r.iteration}: {run.uri(layout.checkpoint_key(r.iteration))}"
        for r in results
        if r.train
    ]
    counts = judge_counts(results)
    seeded = any(
        e is not None and e.seed_stderr is not None
        for r in [*results, reference]
        if r is not None
        for m in (r.metrics, r.held_out)
        if m is not None
        for e in (m.mi_lower_bound, m.plug_in_mi, m.mean_response_tokens)
    )
    whose = " or ".join(
        f"the {_BASELINE_MODELS.get(b, b)}'s (vs {b})" for b in baselines_judged(results)
    )
    markdown = "\n".join(
        [
            "# SAMI run report",
            "",
            f"Run data: {run.uri()}",
            "",
            table,
            "MI lower bound: log C - column loss on held-out queries (InfoNCE, at most log K).",
            "Plug-in MI: the paper's plotted estimate. ± is one standard error over queries"
            + (
                "; seeds ±, one standard error over the generation seeds (evaluation.seeds)."
                if seeded
                else "."
            ),
            *(
                [
                    f"Reference model ({reference.model or 'evaluation.judge.reference'}): "
                    "evaluated once like the base model, on the same queries and constitutions.",
                ]
                if reference is not None
                else []
            ),
            *(
                [
                    "Win rate: an LLM judge's pairwise preference for the iteration's response "
                    f"over {whose} to the same query under the same constitution (the one "
                    "with every principle kept, as in the paper, or every evaluation "
                    "constitution: each line below says which; ties and unparsable verdicts "
                    "count 0.5), with a 95% Wilson interval; "
                    "length-corrected: the win rate at equal response length (logistic "
                    "regression on the standardised length difference), 95% interval.",
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


def _not_a_run(run: storage.Storage) -> str:
    """Why `run` is no run, with the run folders below it when it is their parent (a run's
    results live in <storage uri>/<namespace>/<name>/<uid>/)."""
    below = sorted(
        {
            info.key.split("/")[0]
            for info in run.list("")
            if f"/{layout.ITERATIONS}/" in f"/{info.key}"
        }
    )
    hint = "; runs below it: " + ", ".join(run.uri(b) for b in below[:5]) if below else ""
    return (
        f"{run.uri()}: no finished stage of a SAMI run here (no iterations/<t>/evaluate or "
        f"/train manifests); give a run's folder, <storage uri>/<namespace>/<name>/<uid>{hint}"
    )
