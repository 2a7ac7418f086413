"""deploy/compose validates with docker-compose, and every armorstream command in it parses
with the real CLI (subcommand exists, every flag is known, every value converts)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
from click.testing import CliRunner
from conftest import ROOT, need_tool
from ruamel.yaml import YAML

from armorstream.cli import cli
from enforcer.control import DEFAULT_PREFIX
from enforcer.policy.parse import parse_file, policy_files
from stream.app import StreamSettings

COMPOSE_DIR = ROOT / "deploy" / "compose"
ARMORSTREAM_SERVICES = {"migrate", "controller", "stream", "sensor", "cli"}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    exe = need_tool("docker-compose")
    out = subprocess.run([exe, "config"], cwd=COMPOSE_DIR, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded: dict[str, Any] = YAML(typ="safe").load(out.stdout)
    return loaded


def parse_command(args: list[str]) -> tuple[str, click.Context]:
    """Parse `armorstream ARGS` as the CLI would, without running it; returns the command path."""
    cmd: click.Command = cli
    path, rest = "armorstream", list(args)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        sub = cmd.get_command(click.Context(cmd), name)
        assert sub is not None, f"`{path} {name}`: no such command"
        cmd, path = sub, f"{path} {name}"
    # make_context raises on an unknown flag, a missing value or a value of the wrong type.
    ctx = cmd.make_context(path, rest)
    return path, ctx


def test_compose_validates_with_the_expected_services(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"kafka", "clickhouse"} | ARMORSTREAM_SERVICES
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft: no ZooKeeper service
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    for name in ARMORSTREAM_SERVICES:
        build = services[name]["build"]
        assert Path(build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file(), name
    assert int(services["stream"]["deploy"]["replicas"]) >= 2


def test_sensor_is_privileged_with_the_host_mounts(config: dict[str, Any]) -> None:
    sensor = config["services"]["sensor"]
    assert sensor["privileged"] is True and sensor["pid"] == "host"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in sensor["volumes"]}
    for path in ("/sys/fs/bpf", "/sys/kernel/btf", "/sys/fs/cgroup"):
        assert mounts.get(path) == path, path


@pytest.mark.parametrize("service", sorted(ARMORSTREAM_SERVICES))
def test_commands_are_real_armorstream_commands(config: dict[str, Any], service: str) -> None:
    args = [str(a) for a in config["services"][service]["command"]]
    path = "armorstream" if args == ["--help"] else parse_command(args)[0]  # `cli` prints the help
    help_args = [*path.split()[1:], "--help"]
    r = CliRunner().invoke(cli, help_args)
    assert r.exit_code == 0 and "Usage:" in r.output, r.output


def test_topics_and_schema_match_the_defaults(config: dict[str, Any]) -> None:
    """Compose, `armorstream up` and the k8s manifests name the same topics, prefix and database."""
    services = config["services"]
    _, stream = parse_command([str(a) for a in services["stream"]["command"]])
    defaults = StreamSettings()
    for opt in ("raw_topic", "alerts_topic", "logs_topic", "dead_letter_topic", "control_prefix"):
        assert stream.params[opt] == getattr(defaults, opt), opt
    _, controller = parse_command([str(a) for a in services["controller"]["command"]])
    assert controller.params["topic_prefix"] == DEFAULT_PREFIX == defaults.control_prefix
    _, sensor = parse_command([str(a) for a in services["sensor"]["command"]])
    assert sensor.params["topic"] in (None, defaults.raw_topic)
    for name in ARMORSTREAM_SERVICES:
        url = services[name]["environment"]["CLICKHOUSE_URL"]
        assert urlsplit(url).path == "/armorstream" and urlsplit(url).hostname == "clickhouse"
    assert urlsplit(stream.params["clickhouse"]).path == "/armorstream"
    assert services["clickhouse"]["environment"]["CLICKHOUSE_DB"] == "armorstream"


def test_controller_policies_are_mounted_and_valid(config: dict[str, Any]) -> None:
    controller = config["services"]["controller"]
    _, ctx = parse_command([str(a) for a in controller["command"]])
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in controller["volumes"]}
    host_dir = mounts[str(ctx.params["policy_dir"])]
    files, errors = policy_files([host_dir])
    assert files and not errors
    for f in files:
        policies, errs = parse_file(f)
        assert policies and not errs, (f, errs)


def test_a_wrong_flag_is_caught() -> None:
    """The check above can fail: an unknown flag and a bad value are rejected."""
    with pytest.raises(click.UsageError):
        parse_command(["stream", "--no-such-flag"])
    with pytest.raises(click.BadParameter):
        parse_command(["stream", "--partitions", "zero"])
    with pytest.raises(AssertionError):
        parse_command(["no-such-command"])


def _topic_settings(ctx: click.Context) -> dict[str, Any]:
    return {k: ctx.params[k] for k in ("raw_topic", "alerts_topic", "logs_topic", "dead_letter_topic",
                                       "control_prefix")}  # fmt: skip


def test_k8s_compose_and_up_name_the_same_topics(config: dict[str, Any], tmp_path: Path) -> None:
    from armorstream.up import Plan, component_plan

    _, compose = parse_command([str(a) for a in config["services"]["stream"]["command"]])
    k8s_dir = ROOT / "deploy" / "k8s"
    yaml = YAML(typ="safe")
    env = yaml.load((k8s_dir / "base" / "config.yaml").read_text())["data"]
    deployment = next(d for d in yaml.load_all((k8s_dir / "base" / "stream.yaml").read_text())
                      if d and d.get("kind") == "Deployment")  # fmt: skip
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = [str(a) for a in container["args"]]
    for name, value in env.items():
        args = [a.replace(f"$({name})", str(value)) for a in args]
    _, k8s = parse_command(args)
    plan = Plan(data_dir=tmp_path, broker_port=9092, clickhouse_port=8123, policies=tmp_path,
                metrics_port=9464, node_name="n")  # fmt: skip
    stream = next(c for c in component_plan(plan) if c.name == "stream")
    _, up = parse_command(stream.argv[3:])  # after `python -m armorstream.cli`
    assert _topic_settings(compose) == _topic_settings(k8s) == _topic_settings(up)
    assert urlsplit(up.params["clickhouse"]).path == urlsplit(compose.params["clickhouse"]).path
    dev = next(d for d in yaml.load_all((k8s_dir / "overlays" / "dev" / "clickhouse.yaml").read_text())
               if d and d.get("kind") == "Secret")  # fmt: skip
    assert urlsplit(dev["stringData"]["CLICKHOUSE_URL"]).path == "/armorstream"
