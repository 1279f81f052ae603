"""Peak memory of this process, phase by phase (load, train, export).

The training worker reports where its memory goes so that a user sizing a 70B run, and the
benchmarks holding it to its targets, see each phase apart: the peak of a late phase would
otherwise hide behind an earlier one. On the host the peak is the resident set's high-water
mark (VmHWM), which Linux resets when "5" is written to /proc/self/clear_refs; on a GPU it is
the CUDA caching allocator's peak of allocated memory, which torch resets.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (kB) in MiB; 0 where the file does not exist."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return 0.0
    return int(match.group(1)) / 1024 if match else 0.0


def host_rss_mb() -> float:
    return _status_mb("VmRSS")


class PhasePeaks:
    """`start(phase)` ... `end()`: the peak host and device memory (MiB) of each phase, and
    the resident memory the phase started from."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host: dict[str, float] = {}
        self.cuda: dict[str, float] = {}
        self.start_host: dict[str, float] = {}
        self._phase: str | None = None
        self._resettable = True

    def start(self, phase: str) -> None:
        self._phase = phase
        self.start_host[phase] = host_rss_mb()
        if self._resettable:
            try:
                _CLEAR_REFS.write_text("5")
            except OSError as exc:  # some sandboxes forbid it: peaks then accumulate
                log.info("cannot reset the peak RSS (%s); phase peaks are cumulative", exc)
                self._resettable = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self) -> None:
        if self._phase is None:
            return
        self.host[self._phase] = max(_status_mb("VmHWM"), self.start_host[self._phase])
        if self.device.type == "cuda":
            self.cuda[self._phase] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self._phase = None

    def report(self) -> dict:
        """This rank's figures: `device` peaks per phase (CUDA on a GPU, else host), `host`
        peaks, and `start` (resident host memory when each phase began)."""
        device = self.cuda if self.device.type == "cuda" else self.host
        return {
            **{phase: round(mb, 1) for phase, mb in device.items()},
            "host": {phase: round(mb, 1) for phase, mb in self.host.items()},
            "start": {phase: round(mb, 1) for phase, mb in self.start_host.items()},
        }
