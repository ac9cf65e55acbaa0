"""The command line (DESIGN §5): a thin shell that parses, calls one library function, formats."""

import functools
import json
import sys
import time
from pathlib import Path

import click

from . import settings as settings_mod
from .errors import BadInput, SdmPeerError
from .rundir import RunDir, token_path_for, write_token


class Cli(click.Group):
    """Turns SdmPeerError into one line on stderr (with a hint) and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SdmPeerError as exc:
            click.echo(f"Error: {exc}", err=True)
            if exc.hint:
                click.echo(f"Try: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sdm-peer")
def main():
    """sdm-peer: run a grid of experiments on preemptible workers with leases, no master daemon."""


def now():
    return time.time()


def settings_options(command):
    """--set KEY=VALUE (repeatable) and --settings FILE, shared by init and bootstrap."""
    command = click.option("--settings", "settings_file", type=click.Path(dir_okay=False),
                           help="Run settings from a JSON or TOML file.")(command)
    command = click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                           help="A run setting (repeatable), e.g. --set provider=local.")(command)
    return command


def collect_settings(assignments, settings_file, **flags):
    """Settings from --settings, then --set, then explicit flags; validated before any write."""
    collected = settings_mod.read_file(settings_file) if settings_file else {}
    collected.update(settings_mod.parse_assignments(assignments))
    collected.update({key: value for key, value in flags.items() if value is not None})
    return settings_mod.validate(collected)


def init_run(db, plan_file, settings, token_file=None):
    """Parse the plan (whole, before anything is written), then create or extend the database."""
    from .plan import read_plan
    from .store import Store

    plan = read_plan(plan_file)
    store = Store(db)
    try:
        counts = store.import_plan(plan, settings=settings, now=now())
    finally:
        store.close()
    write_token(token_file or token_path_for(db))
    return counts


@main.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("--plan", "plan_file", required=True, type=click.Path(), help="CSV, JSON or JSONL plan file.")
@click.option("--group-size", type=int, help="Workers per group for configs whose plan rows give none.")
@click.option("--max-failures", type=int, help="Non-zero exits before an experiment is FAILED (default 3).")
@click.option("--max-interruptions", type=int,
              help="Releases/expiries before an experiment is FAILED (default 10).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Where to write the token (default DB.token).")
@settings_options
def init(db, plan_file, group_size, max_failures, max_interruptions, token_file, assignments, settings_file):
    """Create DB from a plan, or add the plan's new experiments to it.

    Re-running with the same plan adds nothing and changes nothing; a bad plan changes nothing."""
    settings = collect_settings(assignments, settings_file, group_size=group_size, max_failures=max_failures,
                                max_interruptions=max_interruptions)
    counts = init_run(db, plan_file, settings, token_file)
    click.echo(f"{db}: {counts['experiments_added']:,} experiments added in {counts['configs_added']:,} new configs"
               + (f"; {counts['configs_reopened']} DONE configs reopened" if counts["configs_reopened"] else ""))


def target_options(command):
    """--db DB | --server HOST:PORT | --dir RUNDIR, and --token-file, for commands that read a run."""
    for option in reversed((
        click.option("--db", type=click.Path(dir_okay=False), help="Read the database file directly."),
        click.option("--server", help="Ask a running server, HOST:PORT."),
        click.option("--dir", "run_dir", type=click.Path(file_okay=False), help="A run directory."),
        click.option("--token-file", type=click.Path(dir_okay=False), help="Token file (or set SDM_TOKEN)."),
    )):
        command = option(command)
    return command


def status_source(db, server, run_dir, token_file):
    """A function returning the run's status object, from whichever target was given."""
    given = [name for name, value in (("--db", db), ("--server", server), ("--dir", run_dir)) if value]
    if len(given) != 1:
        raise BadInput("give exactly one of --db, --server or --dir")
    if server:
        from .client import Client

        client = Client.for_server(server, token_file=token_file)
        return functools.partial(client.call, "status")
    from .store import Store

    store = Store(RunDir(run_dir).db if run_dir else db, create=False)
    return lambda: store.status(now=now())


@main.command()
@target_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (DESIGN §5).")
@click.option("--watch", type=float, metavar="SECONDS", help="Refresh every SECONDS until interrupted.")
@click.option("--all", "show_all", is_flag=True, help="Show every config, even in a long run.")
def status(db, server, run_dir, token_file, as_json, watch, show_all):
    """Where the run stands: per config, how many experiments are done, running, waiting, failed."""
    read = status_source(db, server, run_dir, token_file)
    if as_json:
        while True:
            click.echo(json.dumps(read()))
            if not watch:
                return
            time.sleep(watch)
    from rich.console import Console
    from rich.live import Live

    from .view import status_table

    console = Console()
    if not watch:
        console.print(status_table(read(), show_all=show_all))
        return
    with Live(status_table(read(), show_all=show_all), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(status_table(read(), show_all=show_all), refresh=True)
        except KeyboardInterrupt:
            pass


@main.command()
@click.option("--db", type=click.Path(dir_okay=False), help="The database file.")
@click.option("--dir", "run_dir", type=click.Path(file_okay=False), help="A run directory.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file, .csv or .jsonl.")
def export(db, run_dir, out):
    """Write every experiment, params and results flattened into columns, to a CSV or JSONL file."""
    from .export import export as write_export
    from .store import Store

    if bool(db) == bool(run_dir):
        raise BadInput("give exactly one of --db or --dir")
    store = Store(RunDir(run_dir).db if run_dir else db, create=False)
    count = write_export(store, out)
    click.echo(f"{out}: {count:,} experiments")


if __name__ == "__main__":
    sys.exit(main())
