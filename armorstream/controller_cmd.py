"""`armorstream controller`: publish pods, namespaces, nodes and KubeArmor policies to the control topics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path

import click

from enforcer.control import DEFAULT_PREFIX, ControlTopics
from enforcer.errors import ArmorstreamError


@click.command("controller")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
@click.option("--in-cluster", is_flag=True, help="Use the pod's service account.")
@click.option("--api-server", default=None, metavar="URL", help="API server URL without credentials (tests).")
@click.option("--policies", "policy_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory mode: watch this directory of policy YAML files instead of Kubernetes.")
@click.option("--broker", default="127.0.0.1:9092", show_default=True, envvar="ARMORSTREAM_BROKER",
              help="Kafka bootstrap servers.")
@click.option("--topic-prefix", default=DEFAULT_PREFIX, show_default=True)
@click.option("--snapshot-interval", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="Seconds between full snapshots of every control topic.")
@click.option("--node-name", default=None,
              help="Directory mode: this machine's node name (default: the host name).")
@click.option("--poll-interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Directory mode: seconds between directory scans.")
@click.option("--one-record-per-batch", is_flag=True,
              help="Send records one at a time (brokers with wrong end offsets after batches, e.g. tansu).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus /metrics on this port (0: any free port); also the pod's probe.")
@click.option("--metrics-addr", default="0.0.0.0", show_default=True)
@click.option("-v", "--verbose", is_flag=True)
def controller(kubeconfig: str | None, in_cluster: bool, api_server: str | None, policy_dir: Path | None,
               broker: str, topic_prefix: str, snapshot_interval: float, node_name: str | None,
               poll_interval: float, one_record_per_batch: bool, metrics_port: int | None, metrics_addr: str,
               verbose: bool) -> None:
    """Watch Kubernetes (or a policy directory) and keep the control topics current.

    Publishes container -> pod metadata, namespaces (labels, posture and visibility
    annotations), nodes, validated policies and the resolved policy bindings, with
    tombstones on delete and a full snapshot every --snapshot-interval seconds.
    Invalid policies are logged with their field path (and, in Kubernetes, reported
    as a Warning Event on the object) and never applied.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    if not verbose:
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
        logging.getLogger("kafka").setLevel(logging.WARNING)

    from controller.publish import Publisher
    from controller.run import Controller, Source
    from controller.state import ClusterState

    source: Source
    local_node = None
    if policy_dir is not None:
        if not policy_dir.is_dir():
            raise click.ClickException(f"--policies {policy_dir}: not a directory")
        from controller.directory import DirectorySource

        source = DirectorySource(policy_dir, interval=poll_interval)
        local_node = node_name or socket.gethostname()
    else:
        from controller.watch import KubeSource, load_api_client

        try:
            source = KubeSource(load_api_client(kubeconfig, in_cluster=in_cluster, host=api_server))
        except ArmorstreamError as e:
            raise click.ClickException(str(e)) from None

    ctl = Controller(source, Publisher(broker, ControlTopics(topic_prefix), one_record_per_batch),
                     ClusterState(source.resources, local_node=local_node),
                     snapshot_interval=snapshot_interval)

    if metrics_port is not None:
        from controller.metrics import ControllerMetrics

        metrics = ControllerMetrics(ctl)
        try:
            metrics.serve(metrics_port, metrics_addr)
        except OSError as e:
            raise click.ClickException(f"cannot serve metrics on {metrics_addr}:{metrics_port}: {e}") from e
        logging.info("metrics: http://%s:%d/metrics", metrics_addr, metrics.port)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, ctl.stop)
        await ctl.run()

    try:
        asyncio.run(main())
    except ArmorstreamError as e:
        raise click.ClickException(str(e)) from None
