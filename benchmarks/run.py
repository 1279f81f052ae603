"""Run the benchmark suite and write benchmarks/results.json and benchmarks/results.md.

    python -m benchmarks.run [--quick] [--only SUITE,...]   # SUITES below

The suite measures on the GPU when torch sees one and on the CPU otherwise; on a machine
without CUDA the GPU entries are listed as skipped with the reason. A benchmark that fails is
recorded as "failed" with the tail of its error, and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import machine, unmeasured

SUITES = (
    "generation",
    "sharding",
    "training",
    "scaling",
    "memory",
    "operator",
    "e2e",
    "download",
    "streaming",
    "alignment",
)
HERE = Path(__file__).resolve().parent
NOT_YET: list[tuple[str, str]] = []


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(results: dict) -> str:
    """The results as a markdown table, the machine above it and the notes below it."""
    m = results["machine"]
    gpu = f"{m['gpu']} x{m['gpu_count']}" if m["gpu"] else "none"
    lines = [
        "# SAMI benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {gpu}; "
        f"torch {m['torch']}, vllm {m['vllm']}, transformers {m['transformers']}; "
        f"load average {m['load_average']} at start, {m['load_average_end']} at end.",
        f"Run: {'--quick' if results['quick'] else 'full'}, device {results['device']}, "
        f"{results['seconds']:.0f} s. Ratio = ours / baseline, medians of `reps` repetitions.",
        "",
        "| # | benchmark | baseline | ours | unit | ratio | target | met | reps | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, e in enumerate(results["benchmarks"], start=1):
        cells = [n, e["name"], e["baseline"], e["ours"], e["unit"], e["ratio"], e["target"]]
        cells += [e["met"], e["reps"], e["status"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Notes:", ""]
    lines += [f"{n}. {e['notes']}" for n, e in enumerate(results["benchmarks"], 1) if e["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="Fewer repetitions.")
    parser.add_argument(
        "--only", default=",".join(SUITES), help=f"Comma-separated subset of {','.join(SUITES)}."
    )
    parser.add_argument("--out-dir", type=Path, default=HERE, help="Where the results go.")
    args = parser.parse_args(argv)
    selected = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(selected) - set(SUITES))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {list(SUITES)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    info = machine()
    print(f"machine: {json.dumps(info)}", file=sys.stderr)
    entries: list[dict] = []
    for suite in selected:
        module = importlib.import_module(f"benchmarks.{suite}")
        print(f"{suite} ({device}) ...", file=sys.stderr)
        suite_started = time.monotonic()
        try:
            entries += module.run(quick=args.quick, device=device)
        except Exception as err:  # one broken benchmark must not hide the others
            entries.append(unmeasured(f"{suite} ({device})", "failed", str(err)[-2000:]))
        print(f"{suite} done in {time.monotonic() - suite_started:.0f} s", file=sys.stderr)
        if device == "cpu":
            entries += module.skipped_on_cpu()
    entries += [unmeasured(name, "not yet measured", note) for name, note in NOT_YET]

    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {
        "machine": info,
        "device": device,
        "quick": args.quick,
        "only": selected,
        "seconds": round(time.monotonic() - started, 1),
        "benchmarks": entries,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out_dir / "results.md").write_text(table)
    print(table)
    return 1 if any(e["status"] == "failed" for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
