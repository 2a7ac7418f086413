"""`armorstream controller` as a user runs it: a process, a broker, SIGTERM to stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from armorstream.embedded_broker import free_port
from enforcer.control import ControlTopics, ControlView
from tests.fakekube import FakeKube, make_namespace

pytestmark = [pytest.mark.broker]


async def read_view(bootstrap: str, topics: ControlTopics, done: Any, timeout: float = 20) -> ControlView:
    view = ControlView(topics)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while not set(topics.all()) <= await consumer.topics():  # the controller creates them
            assert time.monotonic() < deadline, "control topics never appeared"
            await asyncio.sleep(0.2)
        consumer.assign([TopicPartition(t, 0) for t in topics.all()])
        while not done(view):
            assert time.monotonic() < deadline, f"timed out; view={view.tables}"
            for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                for m in msgs:
                    view.apply(tp.topic, m.key, m.value)
    finally:
        await consumer.stop()
    return view


def controller(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "armorstream.cli", "controller", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
    return out.decode()


def test_kubernetes_mode(broker: Any) -> None:
    kube = FakeKube().start()
    try:
        kube.create("namespaces", make_namespace("shop"))
        topics = ControlTopics("cli.")
        port = free_port()
        proc = controller("--api-server", kube.url, "--broker", broker.bootstrap, "--topic-prefix", "cli.",
                          "--metrics-port", str(port), "--metrics-addr", "127.0.0.1")
        try:
            view = asyncio.run(read_view(broker.bootstrap, topics, lambda v: "shop" in v.namespaces))
            assert view.namespaces["shop"].labels == {"kubernetes.io/metadata.name": "shop"}
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            assert "armorstream_controller_ready 1.0" in text
            assert 'armorstream_controller_records{table="namespaces"} 1.0' in text
            assert "armorstream_controller_snapshots_published_total 1.0" in text
        finally:
            out = stop(proc)
        assert "Traceback" not in out
    finally:
        kube.stop()


def test_directory_mode_reports_bad_files(tmp_path: Path, broker: Any, examples_dir: Path) -> None:
    src = examples_dir / "host-security-policies" / "hsp-k8s-kubearmor-dev-file-path-block.yaml"
    (tmp_path / "hsp.yaml").write_text(src.read_text())
    (tmp_path / "broken.yaml").write_text("kind: KubeArmorPolicy\nmetadata: [\n")
    proc = controller("--policies", str(tmp_path), "--broker", broker.bootstrap, "--topic-prefix", "dir.",
                      "--node-name", "kubearmor-dev", "--poll-interval", "0.1")
    try:
        view = asyncio.run(read_view(broker.bootstrap, ControlTopics("dir."), lambda v: v.bindings))
        assert view.bindings["node/kubearmor-dev"].policies == (
            "KubeArmorHostPolicy/hsp-kubearmor-dev-file-path-block",)
    finally:
        out = stop(proc)
    assert f"{tmp_path / 'broken.yaml'}:3:" in out and "not valid YAML" in out, out
    assert "Traceback" not in out
