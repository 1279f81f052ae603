"""The `sami` command line: validate manifests, generate the CRD, print the version."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from sami_operator import __version__, crd
from sami_operator.models import GROUP
from sami_operator.validate import SpecError, decode_manifest, load_manifests, parse_samirun

REPO_CRDS = Path(__file__).resolve().parents[2] / "crds"
REPO_CHART_CRD = (
    Path(__file__).resolve().parents[2]
    / "charts"
    / "sami-operator"
    / "files"
    / "sami.dev_samiruns.yaml"
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """SAMI: align a language model to written principles without preference labels."""


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check SAMIRun manifests with the same models the operator uses (documents of other
    APIs in the files are skipped)."""
    failed = False
    for path in files:
        runs, problems = _parse_file(path)
        for problem in problems:
            click.echo(problem, err=True)
        if problems:
            failed = True
        elif runs:
            click.echo(f"{path}: valid")
    sys.exit(1 if failed else 0)


def _parse_file(path: Path) -> tuple[list, list[str]]:
    """(the SAMIRuns in a file, the problems found); one problem per bad document."""
    try:
        docs = load_manifests(decode_manifest(path.read_bytes(), str(path)))
    except OSError as err:
        return [], [f"{path}: cannot read: {err.strerror}"]
    except SpecError as err:
        return [], [str(err)]
    except yaml.YAMLError as err:
        return [], [f"{path}: not valid YAML: {err}"]
    if not docs:
        return [], [f"{path}: no YAML documents"]
    runs, problems = [], []
    for i, doc in enumerate(docs):
        source = f"{path}" if len(docs) == 1 else f"{path} (document {i + 1})"
        api_version = doc.get("apiVersion") if isinstance(doc, dict) else None
        if isinstance(api_version, str) and not api_version.startswith(f"{GROUP}/"):
            # Another API's object beside the runs (a ClusterTrainingRuntime): not ours.
            click.echo(f"{source}: skipped ({api_version} {doc.get('kind')}, not a SAMIRun)")
            continue
        try:
            runs.append(parse_samirun(doc, source))
        except SpecError as err:
            problems.append(str(err))
    return runs, problems


def _load_one(path: Path):
    """The single SAMIRun in a file, or exit with the validation message."""
    runs, problems = _parse_file(path)
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        sys.exit(1)
    if len(runs) != 1:
        click.echo(f"{path}: expected one SAMIRun, found {len(runs)} documents", err=True)
        sys.exit(1)
    return runs[0]


def load_for_run(path: Path):
    """The single SAMIRun in a file as `sami run` runs it: its relative local paths resolved
    against the file's folder, whatever the current directory (local.resolve_relative_paths)."""
    from sami_operator.local import resolve_relative_paths

    return resolve_relative_paths(_load_one(path), path.resolve().parent)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where task files and logs go (default .sami/<namespace>/<name>/<uid>).",
)
def run(file: Path, workdir: Path | None) -> None:
    """Run a SAMIRun on this machine: every stage as a local process. Re-running resumes.

    Relative local paths in FILE (model and data paths, storage.uri) are relative to FILE's
    folder. The run's id is a hash of the spec with those paths resolved: the same spec
    resumes where it stopped, an edited one is a new run.

    API keys come from this environment: an endpoint that names apiKeySecret gets
    SAMI_API_KEY, or else OPENAI_API_KEY, and only over https (over plain http only
    SAMI_API_KEY, only to a loopback host whose endpoint sets allowInsecureApiKey). An
    endpoint without apiKeySecret gets no key.
    """
    import logging

    from sami_operator.local import (
        LocalRunner,
        default_workdir,
        machine_problems,
        missing_local_paths,
        run_uid,
    )
    from sami_operator.report import NotARun

    logging.basicConfig(level=logging.WARNING)
    samirun = load_for_run(file)
    missing = missing_local_paths(samirun)
    if missing:
        where = file.resolve().parent
        click.echo(f"{file}: cannot run (relative paths resolve against {where}):", err=True)
        for problem in missing:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)
    unfit = machine_problems(samirun)
    if unfit:
        click.echo(f"{file}: cannot run on this machine:", err=True)
        for problem in unfit:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)
    default = default_workdir(samirun, run_uid(samirun))
    runner = LocalRunner(samirun, workdir or default)
    for line in runner.start_lines(default.parent):
        click.echo(line)
    try:
        status = runner.execute()
    except KeyboardInterrupt:
        click.echo(
            "interrupted: the running stage was stopped; run the same command to resume", err=True
        )
        sys.exit(130)
    try:
        report = runner.write_report()
    except NotARun:
        report = None  # no stage finished: nothing to report
    if report is not None:
        click.echo("")
        click.echo((report / "summary.md").read_text())
        click.echo(f"report: {report}")
    if status.phase.value != "Succeeded":
        click.echo(f"run {status.phase.value}: {status.message}", err=True)
        sys.exit(1)


@main.command()
@click.argument("location")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Report directory (default <location>/report for local runs).",
)
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// runs.")
def report(location: str, out: Path | None, endpoint_url: str | None) -> None:
    """Rebuild a run's report from its stored results (a run directory or s3:// prefix)."""
    from sami_operator.report import NotARun, build_report
    from sami_worker.storage import StorageError, StorageSettings, open_storage

    if out is None:
        if location.startswith("s3://"):
            raise click.UsageError("--out is required for s3:// locations")
        out = Path(location.removeprefix("file://")) / "report"
    try:
        store = open_storage(location, StorageSettings(endpoint_url=endpoint_url))
        markdown = build_report(store, out)
    except (NotARun, StorageError) as err:
        click.echo(f"sami report: {err}", err=True)
        sys.exit(1)
    click.echo(markdown)
    click.echo(f"report: {out}")


@main.command("crd")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO_CRDS,
    show_default=True,
    help="Directory to write the CRD into.",
)
@click.option("--stdout", is_flag=True, help="Print the CRD instead of writing it.")
def crd_command(out: Path, stdout: bool) -> None:
    """Generate the SAMIRun CRD YAML from the API models."""
    if stdout:
        click.echo(crd.render_crd_yaml(), nl=False)
        return
    click.echo(f"wrote {crd.write_crd(out)}")
    if out == REPO_CRDS:
        click.echo(f"wrote {crd.write_chart_crd(REPO_CHART_CRD)}")


if __name__ == "__main__":
    main()
