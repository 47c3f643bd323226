"""The `gram-ray` command: one click group with the training and data commands (commands.py), `cluster`
(cluster.py), `bench` (bench.py) and `config-reference` (config_reference.py); what they share is in common.py.
The command modules never import this one: it registers them."""

from __future__ import annotations

import sys

import click

from gram_ray.cli.bench import bench
from gram_ray.cli.cluster import cluster
from gram_ray.cli.commands import COMMANDS
from gram_ray.cli.common import OneLineErrors
from gram_ray.cli.config_reference import config_reference

__all__ = ["main", "run_job"]


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gram-ray")
def main() -> None:
    """Train GRAM (Gramian multimodal alignment) models on Ray clusters."""


for command in (*COMMANDS, config_reference, cluster, bench):
    main.add_command(command)


def run_job(command: str) -> None:
    """The body of jobs/<command>.py: `gram-ray <command>` with the job's arguments, for `ray job submit`. Exits
    non-zero on failure, so the job is marked FAILED."""
    main([command, *sys.argv[1:]], prog_name=f"jobs/{command}.py")
