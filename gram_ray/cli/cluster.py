"""`gram-ray cluster`: check a job against a cluster YAML, and try a YAML on this machine with Ray's autoscaler."""

from __future__ import annotations

from pathlib import Path

import click

from gram_ray.cli.common import CONFIG_OPTION, SET_OPTION, config_from_options


@click.group()
def cluster() -> None:
    """Clusters: check a job against a cluster YAML before paying for it."""


@cluster.command("check")
@click.option("--yaml", "yaml_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@CONFIG_OPTION
@SET_OPTION
@click.option(
    "--gpu-gb",
    type=click.FloatRange(min=0, min_open=True),
    help="GPU memory per GPU, where the YAML names no instance type gram-ray knows",
)
def cluster_check_cmd(yaml_path, config_path, overrides, gpu_gb) -> None:
    """Which node types host the trainer workers and the decode tasks, how many nodes the job needs, whether every
    request fits a node type (a request none can hold would stay pending for ever) and whether the training step
    fits the GPUs' memory. Exits non-zero when the job cannot run as configured."""
    from gram_ray.cluster.check import CheckError, check_cluster

    cfg = config_from_options(config_path, overrides)
    try:
        result = check_cluster(cfg, yaml_path, gpu_gb=gpu_gb)
    except CheckError as e:
        raise click.ClickException(str(e)) from None
    for line in result.lines:
        click.echo(line)
    if result.fits_memory is False:
        raise click.ClickException(
            f"the training step does not fit the GPUs of {result.trainer_type.name}: use a node type with more GPU "
            "memory, lower train.batch_size, or turn on model.gradient_checkpointing / freeze the vision tower"
        )


@cluster.command("local")
@click.argument("yaml_path", metavar="YAML", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--node-cpus",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="logical CPUs of each local node (at most)",
)
@click.option(
    "--idle-timeout-minutes",
    type=click.FloatRange(min=0, min_open=True),
    help="shorter than the YAML's, to see nodes go sooner",
)
@click.option(
    "--job",
    "jobs",
    multiple=True,
    help="a job's command (e.g. 'python jobs/train.py --config ...'), submitted from this folder once the head is "
    "up, one after the other; without --job the cluster runs until Ctrl+C",
)
@click.option(
    "--settle-s",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="after the jobs: how long to wait, beyond the idle timeout, for the nodes to go back to each type's minimum",
)
@click.option(
    "--logs",
    "logs_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="write each job's whole output to LOGS/job-N.log (the head, and `ray job logs` with it, go at the end)",
)
def cluster_local_cmd(yaml_path, node_cpus, idle_timeout_minutes, jobs, settle_s, logs_dir) -> None:
    """Try a cluster YAML (AWS, GCP launcher, or a KubeRay RayCluster/RayJob) on this machine: Ray's autoscaler
    launches and removes local "nodes" shaped like its node types, and the console says which came and went."""
    import time

    from gram_ray.cluster.check import CheckError
    from gram_ray.cluster.local import LocalCluster

    try:
        local = LocalCluster(yaml_path, node_cpus=node_cpus, idle_timeout_minutes=idle_timeout_minutes)
    except CheckError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"a local autoscaling cluster shaped like {yaml_path}:")
    for line in local.mapping():
        click.echo("  " + line)
    failed = []
    with local:
        click.echo(f"head up: dashboard and job server {local.dashboard}, GCS {local.gcs_address} (token auth on)")
        if not jobs:
            click.echo(
                f"submit with: RAY_ADDRESS={local.dashboard} RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<its token> ray job "
                "submit --working-dir . -- python jobs/train.py ...; Ctrl+C stops the cluster"
            )
            try:
                while True:
                    local.watch()
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        for number, job in enumerate(jobs, 1):
            status, logs = local.submit(job)
            if status != "SUCCEEDED":
                failed.append(job)
            # The head goes when this command ends, and `ray job logs` with it: the job's own output is shown here.
            click.echo(f"--- the end of the job's output ({status}) ---\n{logs[-3000:].rstrip()}\n--- end ---")
            if logs_dir is not None:
                logs_dir.mkdir(parents=True, exist_ok=True)
                (logs_dir / f"job-{number}.log").write_text(logs)
        if jobs:
            wait = local.idle_timeout_minutes * 60 + settle_s
            click.echo(f"jobs done; waiting up to {wait:.0f} s for idle nodes to go (idle timeout)")
            if not local.wait_for_minimum(wait):
                click.echo("nodes were still up when the wait ended")
    click.echo("node timeline:")
    for line in local.timeline.in_words():
        click.echo("  " + line)
    if failed:
        raise click.ClickException(f"{len(failed)} job(s) failed: {failed}")


def _node_options(command):
    """--address and --node-id: the Ray node a command drains (default: the one this machine, or pod, runs)."""
    command = click.option("--node-id", help="the Ray node to drain (hex); default: the one this machine runs")(command)
    return click.option(
        "--address",
        default="auto",
        show_default=True,
        help="the cluster's GCS (host:port); auto: the Ray node started on this machine",
    )(command)


@cluster.command("spot-watch")
@click.option("--cloud", required=True, type=click.Choice(["aws", "gcp"]), help="whose instance metadata to read")
@_node_options
@click.option("--metadata-url", help="the metadata service (default: the cloud's own)")
@click.option("--poll-s", default=2.0, show_default=True, type=click.FloatRange(min=0.1), help="seconds between polls")
@click.option(
    "--rebalance-deadline-s",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="AWS's rebalance recommendation drains the node with this deadline; 0: only say it",
)
def cluster_spot_watch_cmd(cloud, address, node_id, metadata_url, poll_s, rebalance_deadline_s) -> None:
    """Watch this node's instance metadata for a spot interruption (AWS: spot/instance-action and the rebalance
    recommendation, IMDSv2; GCP: instance/preempted) and drain this Ray node with its deadline, so that training
    checkpoints before the node goes. The cluster YAMLs start it on every worker node."""
    from gram_ray.cluster.drain import drain_node, the_node
    from gram_ray.cluster.spot import AWS_METADATA, GCP_METADATA, AwsMetadata, GcpMetadata, SpotWatcher

    address, node_id = the_node(address, node_id)
    if cloud == "aws":
        metadata = AwsMetadata(metadata_url or AWS_METADATA)
    else:
        metadata = GcpMetadata(metadata_url or GCP_METADATA, poll_s=poll_s)
    click.echo(f"spot-watch: {cloud} metadata at {metadata.base}, every {poll_s:g} s, for Ray node {node_id}")

    def drain(deadline_s, why):
        drain_node(address, node_id, deadline_s, f"gram-ray spot-watch: {why}")

    watcher = SpotWatcher(
        metadata,
        drain,
        poll_s=poll_s,
        rebalance_deadline_s=rebalance_deadline_s or None,
        log=click.echo,
    )
    notice = watcher.run()
    click.echo(f"spot-watch: node {node_id} drained ({notice.detail}); done")


@cluster.command("drain-self")
@click.option(
    "--deadline-s",
    required=True,
    type=click.FloatRange(min=1),
    help="seconds until this node goes (a pod: its termination grace period, less a margin)",
)
@_node_options
@click.option("--wait/--no-wait", default=True, show_default=True, help="return once the node has shut down")
def cluster_drain_self_cmd(deadline_s, address, node_id, wait) -> None:
    """Drain this Ray node as a preemption, with a deadline, and wait until Ray has moved its work off it: a KubeRay
    pod's preStop hook (cluster/kuberay/), so that training checkpoints before the pod goes."""
    import time

    from gram_ray.cluster.drain import drain_node, node_is_gone, the_node

    address, node_id = the_node(address, node_id)
    drain_node(address, node_id, deadline_s, "gram-ray cluster drain-self: the pod is being stopped")
    click.echo(f"drain-self: node {node_id} drained, to go in {deadline_s:g} s")
    ends = time.monotonic() + deadline_s
    while wait and time.monotonic() < ends:
        if node_is_gone(address, node_id):
            click.echo("drain-self: the node has shut down (its work moved elsewhere)")
            return
        time.sleep(1)
    if wait:
        click.echo("drain-self: the deadline passed with the node still up")
