#!/usr/bin/env python
"""Command line for operators and admins: `python manage.py --help`.

This file only parses and delegates. Each package contributes its commands from a `cli`
module exposing COMMANDS (a list of click commands); those modules import torch lazily so
that `--help` is quick and web-only commands never load it.
"""
from __future__ import annotations

import getpass
import importlib

import click

COMMAND_MODULES = ("ml.cli", "ml.explain_cli", "webapp.cli", "worker.cli", "worker.review_cli", "ml.mrmc_cli", "webapp.drift_cli")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--actor", metavar="EMAIL", help="the account on whose behalf this command acts, recorded in the "
              "audit log (the operating-system user is always recorded)")
def cli(actor: str | None) -> None:
    """Breast-review: clinical review of breast-image AI (research use, not for diagnosis)."""
    from webapp.models import set_command_line_actor

    set_command_line_actor(getpass.getuser(), actor)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if exc.name != _name:  # a real missing dependency, not an absent command module
            raise
        continue
    for _command in _module.COMMANDS:
        cli.add_command(_command)


if __name__ == "__main__":
    cli()
