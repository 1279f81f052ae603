"""The `sami` command line: validate manifests, generate the CRD, print the version."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from sami_operator import __version__, crd
from sami_operator.validate import SpecError, load_manifests, parse_samirun

REPO_CRDS = Path(__file__).resolve().parents[2] / "crds"


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
    """Check SAMIRun manifests with the same models the operator uses."""
    failed = False
    for path in files:
        problems = _validate_file(path)
        for problem in problems:
            click.echo(problem, err=True)
        if problems:
            failed = True
        else:
            click.echo(f"{path}: valid")
    sys.exit(1 if failed else 0)


def _validate_file(path: Path) -> list[str]:
    try:
        docs = load_manifests(path.read_text())
    except OSError as err:
        return [f"{path}: cannot read: {err.strerror}"]
    except yaml.YAMLError as err:
        return [f"{path}: not valid YAML: {err}"]
    if not docs:
        return [f"{path}: no YAML documents"]
    problems = []
    for i, doc in enumerate(docs):
        source = f"{path}" if len(docs) == 1 else f"{path} (document {i + 1})"
        try:
            parse_samirun(doc, source)
        except SpecError as err:
            problems.append(str(err))
    return problems


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


if __name__ == "__main__":
    main()
