"""`sami run`: execute the planned stages as local processes, on one machine, no cluster.

Each stage runs its worker program exactly as a pod would (`python -m sami_worker <stage>
--task task.json`; training through `torchrun --nproc_per_node N`). A stage whose outputs are
complete in storage (manifest present) is skipped, so re-running the same command resumes
where it stopped, and a finished run is reported, not redone. Ctrl-C terminates the running
child's process group; stages publish their manifest last, so nothing half-written counts.
Relative local paths in the manifest are resolved against its folder before the run's id (a
hash of the spec) is taken, so a manifest is the same run from any current directory.

The workers inherit this process's environment, so their API key is SAMI_API_KEY or
OPENAI_API_KEY from it where a pod would get the Secret in apiKeySecret; the workers decide
where a key may go (sami_worker.chat.api_key_for: only to an endpoint naming apiKeySecret,
only over https, OPENAI_API_KEY never over plain http).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

from sami_operator.models import (
    Reproducibility,
    SAMIRun,
    SAMIRunStatus,
    Sharding,
    StagePhase,
    StorageSpec,
)
from sami_operator.planner import Stage, plan, run_prefix
from sami_operator.report import build_report
from sami_operator.status import StageRecord, derive_status
from sami_worker import storage
from sami_worker.common import open_uri
from sami_worker.contract import merge_shard_summaries
from sami_worker.reproducibility import record as reproducibility_record
from sami_worker.tasks import dump_task

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
# Worker lines worth showing on the console; everything goes to the stage's log file.
PROGRESS_MARKERS = ("sami_worker", "Traceback", "Error")


def run_uid(run: SAMIRun) -> str:
    """A stable id for a local run: the hash of its spec, as `sami run` resolves it
    (resolve_relative_paths: local paths absolute), so the same file resumes from any current
    directory; a changed spec is a different run with its own storage prefix."""
    canonical = json.dumps(run.spec.to_api(), sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:12]


# Spec fields that may name something on this machine, and what: "file" fields are local paths
# unless they have a scheme (s3://, file://); "model" fields may also be Hugging Face hub names,
# so they are paths only as the workers tell (sami_worker.backends.resolve_model_dir): when
# they start with '.' or name something that exists. A data field may hold a list of sources:
# each item's uri is a field of its own (data.train[1].uri).
LOCAL_PATH_FIELDS: tuple[tuple[str, str], ...] = (
    ("model.uri", "model"),
    ("model.tokenizer", "model"),
    ("principles.writer.model", "model"),
    ("data.train.uri", "file"),
    ("data.eval.uri", "file"),
    ("evaluation.judge.model", "model"),
    ("evaluation.judge.reference.uri", "model"),
    ("evaluation.judge.reference.tokenizer", "model"),
    ("storage.uri", "file"),
)


def resolve_relative_paths(run: SAMIRun, base_dir: Path) -> SAMIRun:
    """A copy of `run` whose relative local paths (LOCAL_PATH_FIELDS) are absolute, resolved
    against `base_dir`, the manifest's folder: the run reads the same files, and has the same
    uid, whatever the current directory. URIs with a scheme, absolute and ~ paths, and model
    names that are no path there (hub names) stay as written."""
    base = Path(os.path.abspath(base_dir))
    spec = run.spec
    for _, parts, kind, value in _local_path_values(run.spec):
        if isinstance(value, str) and (path := _resolved(value, kind, base)) is not None:
            spec = _with_field(spec, parts, path)
    return run.model_copy(update={"spec": spec})


def _resolved(value: str, kind: str, base: Path) -> str | None:
    if not value or "://" in value or value.startswith("~") or os.path.isabs(value):
        return None
    candidate = base / value
    if kind == "model" and not (value.startswith(".") or candidate.exists()):
        return None  # a hub name
    return os.path.normpath(candidate)


def _local_path_values(spec):
    """(field as messages name it, its path of attributes and list indices, kind, value) for
    each LOCAL_PATH_FIELDS field the spec reaches, a field under a list once per item."""
    for field, kind in LOCAL_PATH_FIELDS:
        for name, parts, value in _expand(spec, field.split("."), "", ()):
            yield name, parts, kind, value


def _expand(obj, parts: list[str], name: str, at: tuple):
    if not parts:
        yield name, at, obj
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _expand(item, parts, f"{name}[{i}]", (*at, i))
    elif obj is not None:
        head, *rest = parts
        named = f"{name}.{head}" if name else head
        yield from _expand(getattr(obj, head), rest, named, (*at, head))


def _with_field(obj, parts, value):
    head, *rest = parts
    if isinstance(head, int):
        items = list(obj)
        items[head] = _with_field(items[head], rest, value) if rest else value
        return items
    new = _with_field(getattr(obj, head), rest, value) if rest else value
    return obj.model_copy(update={head: new})


def missing_local_paths(run: SAMIRun) -> list[str]:
    """One line per data file or model folder the spec names on this machine that is not
    there, naming the field (storage folders are created, so they need not exist)."""
    problems = []
    for field, _, kind, value in _local_path_values(run.spec):
        if field == "storage.uri" or not isinstance(value, str) or not value:
            continue
        if value.startswith("file://"):
            path = Path(unquote(urlparse(value).path))
        elif "://" in value:
            continue
        else:
            path = Path(value).expanduser()
        if kind == "file" and not path.is_file():
            problems.append(f"spec.{field}: no such file: {path}")
        elif kind == "model" and path.is_absolute() and not path.is_dir():
            problems.append(f"spec.{field}: no model folder at {path}")
    return problems


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stage_command(stage: Stage, task_file: Path) -> list[str]:
    worker = ["-m", "sami_worker", stage.program, "--task", str(task_file)]
    if stage.name == "train":
        nproc = stage.task.training.procs_per_node
        torchrun = Path(sys.executable).with_name("torchrun")
        return [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", *worker]
    return [sys.executable, *worker]


class LocalRunner:
    def __init__(self, run: SAMIRun, workdir: Path, echo=None):
        # The uid of the spec as written (default_workdir's), before storage gets its default.
        self.uid = run_uid(run)
        if run.spec.storage is None:  # default: beside the logs, under the work directory
            storage = StorageSpec(uri=str((workdir / "storage").resolve()))
            run = run.model_copy(update={"spec": run.spec.model_copy(update={"storage": storage})})
        self.run = run
        self.prefix = run_prefix(run, self.uid)
        self.stages = plan(run, self.uid)  # once: every status derived walks the same stages
        self.storage = open_uri(self.prefix, run.spec.storage)
        self.workdir = workdir
        self.bar = None
        self.echo = echo or self._write
        self.records: dict[str, StageRecord] = {}
        self.status: SAMIRunStatus | None = None
        # The workers inherit this process's environment: what they will run with.
        self.reproducibility = Reproducibility.model_validate(
            reproducibility_record(run.spec.constitutions.seed)
        )

    def _write(self, line: str) -> None:
        # Lines go above the stage progress bar (tqdm, shown on terminals only).
        from tqdm import tqdm

        tqdm.write(line)

    def report_dir(self) -> Path:
        if self.prefix.startswith("s3://"):
            return self.workdir / "report"
        return Path(self.prefix.removeprefix("file://")) / "report"

    def stages_done(self) -> tuple[int, int]:
        """(stages complete in storage, stages planned)."""
        done = sum(self._complete(stage) for stage in self.stages)
        return done, len(self.stages)

    def start_lines(self, runs_dir: Path) -> list[str]:
        """What `sami run` says first: a new run or a resumed one (a stage complete or a status
        stored under this uid); for a new run, the earlier runs of this name, workdirs with
        another uid in `runs_dir` (.sami/<namespace>/<name>), whose spec was different."""
        name = f"{self.run.metadata.namespace or 'default'}/{self.run.metadata.name}"
        done, total = self.stages_done()
        if done or self.storage.exists(STATUS_FILE):
            return [f"resuming {name} {self.uid} in {self.workdir}: {done} of {total} stages done"]
        lines = [f"new run {name} {self.uid} in {self.workdir}"]
        others = runs_dir.iterdir() if runs_dir.is_dir() else ()
        earlier = sorted(
            (p for p in others if p.is_dir() and p.name != self.uid),
            key=lambda p: p.stat().st_mtime,
        )
        if earlier:
            more = f" (and {len(earlier) - 1} older)" if len(earlier) > 1 else ""
            lines.append(
                f"the spec changed since the run in {earlier[-1]}{more}: a new uid, so this "
                "run starts from its first stage"
            )
        return lines

    def execute(self) -> SAMIRunStatus:
        if self.run.spec.training.nodes > 1:
            self.echo(
                f"note: training.nodes={self.run.spec.training.nodes} is for clusters; "
                f"locally training uses {self.run.spec.training.procs_per_node} process(es)"
            )
        self.echo(f"run data: {self.prefix}")
        from tqdm import tqdm

        self.bar = tqdm(total=len(self.stages), unit="stage", disable=not sys.stderr.isatty())
        try:
            return self._execute(self.stages)
        finally:
            self.bar.close()

    def _execute(self, stages: list[Stage]) -> SAMIRunStatus:
        for number, stage in enumerate(stages, 1):
            self.bar.set_description(stage.id)
            record = self.records.setdefault(stage.id, StageRecord())
            if self._complete(stage):
                record.phase = StagePhase.succeeded
                record.meta = self._meta(stage)
                self.echo(f"[{number}/{len(stages)}] {stage.id}: already done")
                self.bar.update()
                continue
            self.echo(f"[{number}/{len(stages)}] {stage.id}: running")
            started = time.monotonic()
            record.phase, record.start_time = StagePhase.running, now()
            record.attempts += 1
            self._publish_status()
            failure = self._run_shards(stage, record) if stage.shards else self._run_stage(stage)
            record.completion_time = now()
            if failure is not None:
                record.phase = StagePhase.failed
                record.message = failure
                self._publish_status()
                self.echo(f"[{number}/{len(stages)}] {stage.id}: FAILED ({record.message})")
                return self.status
            record.phase = StagePhase.succeeded
            record.meta = self._meta(stage)
            self.echo(
                f"[{number}/{len(stages)}] {stage.id}: done in {time.monotonic() - started:.0f}s"
                + _headline(stage, record.meta)
            )
            self._publish_status()
            self.bar.update()
        self._publish_status()
        return self.status

    def _complete(self, stage: Stage) -> bool:
        """Every output of the stage (each shard's) has its manifest."""
        return all(self._is_complete(uri) for uri in stage.outputs)

    def _is_complete(self, uri: str) -> bool:
        return storage.is_complete(open_uri(uri, self.run.spec.storage), "")

    def _meta(self, stage: Stage) -> dict:
        """The stage's summary: its manifest's, or its shards' merged."""
        metas = [
            storage.read_manifest(open_uri(uri, self.run.spec.storage), "").meta
            for uri in stage.outputs
        ]
        return merge_shard_summaries(metas) if stage.shards else metas[0]

    def _log_path(self, stage: Stage, shard: int | None = None) -> Path:
        name = stage.id if shard is None else f"{stage.id}-shard-{shard}"
        return self.workdir / "logs" / f"{name}.log"

    def _run_stage(self, stage: Stage) -> str | None:
        """Run the stage's worker; why it failed, or None."""
        code = self._run_processes(stage, [(stage.task, self._log_path(stage), "", {})])[0]
        return None if code == 0 else f"exit code {code}; log: {self._log_path(stage)}"

    def _run_shards(self, stage: Stage, record: StageRecord) -> str | None:
        """Run every shard not yet complete side by side, and let all of them finish even
        when one fails (what they publish is kept); why any failed, or None."""
        record.sharding = Sharding.processes
        todo = []
        for index, task in enumerate(stage.shards):
            shard = record.shard(index)
            if self._is_complete(task.output):
                shard.phase = StagePhase.succeeded
                continue
            shard.phase, shard.message = StagePhase.running, None
            shard.attempts += 1
            todo.append((index, task))
        self._publish_status()
        envs = shard_envs(self.run, local_gpus())
        runs = [(task, self._log_path(stage, i), f"[shard {i}] ", envs[i]) for i, task in todo]
        codes = self._run_processes(stage, runs)
        failures = []
        for (index, _), code in zip(todo, codes, strict=True):
            shard = record.shard(index)
            if code == 0:
                shard.phase = StagePhase.succeeded
                continue
            shard.phase = StagePhase.failed
            shard.message = f"exit code {code}; log: {self._log_path(stage, index)}"
            failures.append(f"shard {index}: {shard.message}")
        if not failures:
            return None
        return "; ".join(failures) + " (run again to retry only the failed shards)"

    def _run_processes(self, stage: Stage, runs: list[tuple]) -> list[int]:
        """Run one worker per (task, log file, console prefix, environment) at once, each
        writing its output to its log file line by line (`tail -f` follows it) and its
        progress to the console; their exit codes, in order."""
        children, pumps = [], []
        try:
            for task, log_path, tag, extra in runs:
                env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
                task_file = self.workdir / "tasks" / f"{log_path.stem}.json"
                task_file.parent.mkdir(parents=True, exist_ok=True)
                task_file.write_text(dump_task(task))
                log_path.parent.mkdir(parents=True, exist_ok=True)
                child = subprocess.Popen(
                    stage_command(stage, task_file),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                    start_new_session=True,
                )
                children.append(child)
                pump = threading.Thread(target=self._pump, args=(child, log_path, tag))
                pump.start()
                pumps.append(pump)
            for pump in pumps:
                while pump.is_alive():
                    pump.join(0.5)  # in slices: Ctrl-C reaches this thread between them
            return [child.wait() for child in children]
        except BaseException:  # Ctrl-C, or a worker that could not start: none left behind
            for child in children:
                _terminate(child)
            raise

    def _pump(self, child: subprocess.Popen, log_path: Path, tag: str) -> None:
        """Copy a worker's output to its log file and its progress to the console; reads to
        the end whatever happens to either, so the worker never blocks on a full pipe."""
        with log_path.open("w", buffering=1) as sink:
            for line in child.stdout:
                try:
                    sink.write(line)
                    if any(marker in line for marker in PROGRESS_MARKERS):
                        self.echo(f"    {tag}{line.rstrip()[:160]}")
                except Exception as err:  # a full disk, a closed console
                    log.warning("worker output not recorded: %s", err)

    def _publish_status(self) -> None:
        self.status = derive_status(
            self.run, self.uid, self.records, now(), self.status, self.stages
        ).model_copy(update={"reproducibility": self.reproducibility})
        data = json.dumps(self.status.to_api(), indent=2).encode()
        self.storage.write_bytes(STATUS_FILE, data)

    def write_report(self) -> Path:
        directory = self.report_dir()
        build_report(self.storage, directory)
        if self.status is not None:
            (directory / STATUS_FILE).write_text(json.dumps(self.status.to_api(), indent=2))
        return directory


def local_gpus() -> list[str]:
    """The GPUs `sami run`'s workers see: CUDA_VISIBLE_DEVICES when set, else the ones
    nvidia-smi lists; none on a machine without NVIDIA GPUs."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        listed = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
        return [d.strip() for d in listed if d.strip() and not d.strip().startswith("-")]
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    try:
        found = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("nvidia-smi -L failed (%s): running shards without GPUs of their own", err)
        return []
    lines = found.stdout.splitlines() if found.returncode == 0 else []
    return [str(i) for i, line in enumerate(ln for ln in lines if ln.startswith("GPU "))]


def shard_envs(run: SAMIRun, gpus: list[str]) -> list[dict[str, str]]:
    """Each generation shard's environment under `sami run`: GPUs of its own
    (CUDA_VISIBLE_DEVICES; a vLLM engine's tensorParallelSize of them), so that shards side
    by side do not all load onto the first GPU; nothing on a machine without GPUs, where
    they share the cores. ValueError, naming the fields, when the machine has too few GPUs
    for every shard at once."""
    generation = run.spec.generation
    shards = generation.shards
    if shards == 1 or not gpus:
        return [{} for _ in range(shards)]
    each = generation.engine.tensor_parallel_size if generation.backend == "vllm" else 1
    if len(gpus) < shards * each:
        raise ValueError(
            f"spec.generation.shards: {shards} shards of {each} GPU(s) each "
            f"(generation.engine.tensorParallelSize) need {shards * each} GPUs side by side, "
            f"this machine has {len(gpus)} ({','.join(gpus)}); use at most "
            f"{max(len(gpus) // each, 1)} shards"
        )
    return [
        {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * each : (i + 1) * each])} for i in range(shards)
    ]


def machine_problems(run: SAMIRun) -> list[str]:
    """What keeps this machine from running the spec, found before any stage runs."""
    try:
        shard_envs(run, local_gpus())
    except ValueError as err:
        return [str(err)]
    return []


def _terminate(child: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop a stage's whole process group (vLLM and torchrun start children of their own)."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    except ProcessLookupError:
        pass


def _headline(stage: Stage, meta: dict) -> str:
    if stage.name in ("evaluate", "reference") and meta.get("metrics"):
        metrics = meta["metrics"]
        mi = metrics.get("miLowerBound", {}).get("value")
        parts = [f"MI lower bound {mi:.4f} nats"] if mi is not None else []
        for w in metrics.get("winRates", []):
            parts.append(f"win rate vs {w['baseline']} {w['rate']:.2f}")
        return f" ({'; '.join(parts)})" if parts else ""
    if stage.name == "generate" and "kept" in meta:
        return f" ({meta['kept']}/{meta['queries']} queries kept)"
    if stage.name == "train" and "final_loss" in meta:
        return f" (loss {meta['first_loss']:.3f} -> {meta['final_loss']:.3f})"
    return ""


def default_workdir(run: SAMIRun, uid: str) -> Path:
    namespace = run.metadata.namespace or "default"
    return Path(".sami") / namespace / run.metadata.name / uid
