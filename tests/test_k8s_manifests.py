"""deploy/k8s: generated CRDs, offline validation against the Kubernetes API schemas
(kubernetes-validate), kustomize renders (`kubectl kustomize`), and the cross-checks the
API server or the cluster would only report at apply or run time: container args against
the real `armorstream` commands, least-privilege RBAC, references between objects, and
the sensor's capabilities and mounts."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
from ruamel.yaml import YAML

from armorstream import k8s_crds
from armorstream.cli import COMMANDS, cli
from tests.conftest import ROOT, need, need_tool

DEPLOY = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "overlays/external", "overlays/dev")
# appArmorProfile (sensor) is a field since 1.30; kubernetes-validate's newest schemas.
K8S_VERSIONS = ("1.30.0", "1.37.0")
IMAGE = "armorstream/armorstream"
IMAGE_TAG = importlib.metadata.version("armorstream")  # the image of this release
KUBEARMOR_CRDS = ROOT.parent / "shared" / "kubearmor-examples" / "crds"
WORKLOADS = ("Deployment", "DaemonSet", "Job")

Doc = dict[str, Any]


def load_docs(path: Path) -> list[Doc]:
    return [d for d in YAML(typ="safe", pure=True).load_all(path.read_text()) if d]


def resource_files(kdir: Path) -> Iterator[Path]:
    """Files a kustomization lists as resources, following directories (not patches)."""
    (k,) = load_docs(kdir / "kustomization.yaml")
    for r in k.get("resources", []):
        p = (kdir / r).resolve()
        if p.is_dir():
            yield from resource_files(p)
        else:
            yield p


def all_resource_files() -> list[Path]:
    return sorted({f for k in KUSTOMIZATIONS for f in resource_files(DEPLOY / k)})


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    kubectl = need_tool("kubectl")
    out = {}
    for k in KUSTOMIZATIONS:
        p = subprocess.run([kubectl, "kustomize", str(DEPLOY / k)], capture_output=True, text=True,
                           timeout=60, check=False)
        assert p.returncode == 0, f"kubectl kustomize {k}: {p.stderr}"
        out[k.rsplit("/", 1)[-1]] = [d for d in YAML(typ="safe", pure=True).load_all(p.stdout) if d]
    return out


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def quantity(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", q)
    assert m, f"unexpected quantity {q!r}"
    return int(m[1]) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30}[m[2]]


# ---- CRDs ----------------------------------------------------------------------------


def test_committed_crds_equal_the_generator_output() -> None:
    expected = k8s_crds.render()
    committed = {p.name: p.read_text() for p in (DEPLOY / "crds").iterdir()}
    assert committed.keys() == expected.keys()
    for name, text in expected.items():
        assert committed[name] == text, f"{name} is stale: run python -m armorstream.k8s_crds"
    assert k8s_crds.write(DEPLOY / "crds", check=True) == []


def _strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


def test_crds_match_kubearmors() -> None:
    need(KUBEARMOR_CRDS.is_dir(), f"KubeArmor's CRDs not found at {KUBEARMOR_CRDS}")
    theirs = {d["spec"]["names"]["kind"]: d for f in KUBEARMOR_CRDS.glob("*.yaml") for d in load_docs(f)}
    ours = {d["spec"]["names"]["kind"]: d for f in (DEPLOY / "crds").glob("security*.yaml")
            for d in load_docs(f)}
    assert ours.keys() == theirs.keys() == {"KubeArmorPolicy", "KubeArmorClusterPolicy",
                                            "KubeArmorHostPolicy", "KubeArmorNetworkPolicy"}
    for kind, o in ours.items():
        t = theirs[kind]
        assert o["metadata"]["name"] == t["metadata"]["name"]
        for key in ("group", "names", "scope"):
            assert o["spec"][key] == t["spec"][key], (kind, key)
        (ov,), (tv,) = o["spec"]["versions"], t["spec"]["versions"]
        for key in ("name", "served", "storage", "subresources"):
            assert ov[key] == tv[key], (kind, key)
        assert ({c["name"]: c for c in ov["additionalPrinterColumns"]}
                == {c["name"]: c for c in tv["additionalPrinterColumns"]})
        assert (_strip_descriptions(ov["schema"]["openAPIV3Schema"])
                == _strip_descriptions(tv["schema"]["openAPIV3Schema"])), kind


def _structural_problems(node: Doc, path: str) -> Iterator[str]:
    """The API server's structural-schema rules that matter here: every node has a type, no
    $ref, and properties never combine with additionalProperties."""
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and not node.get("x-kubernetes-int-or-string"):
        yield f"{path}: no type"
    if "$ref" in node:
        yield f"{path}: $ref"
    if "properties" in node and "additionalProperties" in node:
        yield f"{path}: properties with additionalProperties"
    for name, sub in node.get("properties", {}).items():
        yield from _structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _structural_problems(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _structural_problems(node["items"], f"{path}[]")


@cache
def crd_schemas() -> dict[str, Doc]:
    docs = [d for f in (DEPLOY / "crds").glob("security*.yaml") for d in load_docs(f)]
    return {d["spec"]["names"]["kind"]: d["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for d in docs}


def test_crd_schemas_are_structural() -> None:
    for kind, schema in crd_schemas().items():
        assert list(_structural_problems(schema, kind)) == []
    # The check itself catches a non-structural node.
    broken = copy.deepcopy(crd_schemas()["KubeArmorPolicy"])
    del broken["properties"]["spec"]["properties"]["action"]["type"]
    assert list(_structural_problems(broken, "ksp")) == ["ksp.spec.action: no type"]


def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    # openAPIV3Schema keywords used here (type, properties, items, enum, pattern, required,
    # minItems, ...) mean the same in draft 4; x-kubernetes-validations (CEL) is ignored.
    return jsonschema.Draft4Validator(crd_schemas()[kind])


def test_every_example_policy_is_accepted_by_the_crds(examples_dir: Path) -> None:
    count = 0
    for f in sorted(examples_dir.rglob("*.yaml")):
        if "crds" in f.parts:
            continue
        for doc in load_docs(f):
            if isinstance(doc, dict) and doc.get("apiVersion") == "security.kubearmor.com/v1":
                errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                          for e in crd_validator(doc["kind"]).iter_errors(doc)]
                assert errors == [], f"{f}: {errors}"
                count += 1
    assert count >= 90


def test_crd_schema_rejects_invalid_policies() -> None:
    ksp: Doc = {"apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorPolicy",
           "metadata": {"name": "x"},
           "spec": {"selector": {"matchLabels": {"app": "a"}}, "action": "Block",
                    "process": {"matchPaths": [{"path": "/bin/sh"}]}}}
    assert list(crd_validator("KubeArmorPolicy").iter_errors(ksp)) == []
    for spec_change in ({"action": "Deny"}, {"process": {"matchPaths": [{"path": "bin/sh"}]}},
                        {"severity": 11}):
        bad = copy.deepcopy(ksp)
        bad["spec"].update(spec_change)
        assert list(crd_validator("KubeArmorPolicy").iter_errors(bad)), spec_change
    hsp = {"apiVersion": "security.kubearmor.com/v1", "kind": "KubeArmorHostPolicy",
           "metadata": {"name": "x"}, "spec": {"action": "Block"}}
    assert list(crd_validator("KubeArmorHostPolicy").iter_errors(hsp)), "nodeSelector is required"


# ---- Kubernetes schemas ----------------------------------------------------------------


def need_kubernetes_validate() -> None:
    found = importlib.util.find_spec("kubernetes_validate")
    need(found, "needs kubernetes-validate (a dev extra: pip install -e '.[dev]')")


@cache
def _validate(doc_json: str) -> None:
    import kubernetes_validate

    doc = json.loads(doc_json)
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = f"{doc['kind']}/{doc['metadata']['name']}.{e.json_path.removeprefix('$.')}"
            pytest.fail(f"Kubernetes {version}: {where}: {e.message}", pytrace=False)


def validate_k8s(doc: Doc) -> None:
    _validate(json.dumps(doc, sort_keys=True))


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    need_kubernetes_validate()
    files = all_resource_files()
    assert len(files) >= 10
    for f in files:
        docs = load_docs(f)
        assert docs, f
        for doc in docs:
            validate_k8s(doc)


def test_every_render_validates_against_the_kubernetes_schemas(rendered: dict[str, list[Doc]]) -> None:
    need_kubernetes_validate()
    for docs in rendered.values():
        for doc in docs:
            validate_k8s(doc)


def test_schema_validation_catches_mistakes() -> None:
    need_kubernetes_validate()
    (ds,) = [d for d in load_docs(DEPLOY / "base" / "sensor.yaml") if d["kind"] == "DaemonSet"]
    bad = copy.deepcopy(ds)
    pod_spec(bad)["containers"][0]["securityContext"]["capabilites"] = {"add": ["BPF"]}  # typo
    with pytest.raises(pytest.fail.Exception, match="capabilites"):
        validate_k8s(bad)


# ---- args, environment, references -----------------------------------------------------


def env_of(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (fieldRefs get a sample value)."""
    cms, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(cms[src["configMapRef"]["name"]]["data"])
        elif src["secretRef"]["name"] in secrets:
            env.update(secrets[src["secretRef"]["name"]].get("stringData", {}))
        else:
            assert src["secretRef"].get("optional"), f"missing Secret {src['secretRef']['name']}"
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", e
            env[e["name"]] = "node-1"
    return env


def armorstream_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            if c["image"].startswith(f"{IMAGE}:") and "command" not in c:  # the image's entrypoint
                yield w, c


def resolve_command(args: list[str]) -> tuple[click.Command, list[str]]:
    """The click command that `armorstream ARGS` runs, and the args left for it."""
    cmd: click.Command = cli
    ctx = click.Context(cli, info_name="armorstream")
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.get_command(ctx, args[0])
        assert sub is not None, f"`armorstream ... {args[0]}` is not a command"
        cmd, args = sub, args[1:]
    return cmd, args


def test_container_args_are_real_armorstream_commands(rendered: dict[str, list[Doc]]) -> None:
    seen = set()
    for overlay, docs in rendered.items():
        for w, c in armorstream_containers(docs):
            env = env_of(c, docs)
            args = []
            for a in c["args"]:
                missing = set(re.findall(r"\$\((\w+)\)", a)) - env.keys()
                assert not missing, f"{overlay} {w['metadata']['name']}: {a} uses undefined {missing}"
                args.append(re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a))  # noqa: B023
            cmd, rest = resolve_command(args)
            assert cmd.name in COMMANDS or cmd is not cli
            try:
                # Parses every option and its value (types, ranges) without running anything.
                cmd.make_context(cmd.name, rest)
            except click.ClickException as e:
                pytest.fail(f"{overlay} {w['metadata']['name']}: armorstream {' '.join(args)}: "
                            f"{e.format_message()}", pytrace=False)
            seen.add(c["args"][0])
    assert {"controller", "stream", "sensor", "clickhouse"} <= seen


def test_the_arg_check_catches_a_wrong_flag() -> None:
    cmd, rest = resolve_command(["stream", "--brokers=kafka:9092"])
    with pytest.raises(click.NoSuchOption):
        cmd.make_context(cmd.name, rest)


def test_every_config_key_is_read(rendered: dict[str, list[Doc]]) -> None:
    """Each ConfigMap/Secret key reaches a command: as $(VAR) in args or an option's envvar."""
    for overlay, docs in rendered.items():
        used: set[str] = set()
        for _, c in armorstream_containers(docs):
            used |= {v for a in c["args"] for v in re.findall(r"\$\((\w+)\)", a)}
            cmd, _ = resolve_command(list(c["args"]))
            used |= {p.envvar for p in cmd.params if isinstance(p.envvar, str)}
        keys = {k for cm in by_kind(docs, "ConfigMap").values() for k in cm["data"]}
        keys |= {k for s in by_kind(docs, "Secret").values() for k in s.get("stringData", {})}
        assert keys <= used, f"{overlay}: unread settings {keys - used}"


def test_dev_broker_command_resolves_here() -> None:
    (kafka,) = [d for d in load_docs(DEPLOY / "overlays" / "dev" / "kafka.yaml") if d["kind"] == "Deployment"]
    script = pod_spec(kafka)["containers"][0]["args"][0]
    snippet = re.search(r"python -c '([^']+)'", script)
    assert snippet
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", snippet[1]], capture_output=True,
                       text=True, timeout=30, check=False)
    need(p.returncode == 0, f"tansu binary not found here: {p.stderr.strip()}")
    assert Path(p.stdout.strip()).is_file()


def test_references_between_objects_resolve(rendered: dict[str, list[Doc]]) -> None:
    for overlay, docs in rendered.items():
        sas = by_kind(docs, "ServiceAccount")
        pods = []
        for w in workloads(docs):
            where = f"{overlay} {w['kind']}/{w['metadata']['name']}"
            labels = w["spec"]["template"]["metadata"]["labels"]
            if w["kind"] != "Job":
                sel = w["spec"]["selector"]["matchLabels"]
                assert sel.items() <= labels.items(), f"{where}: selector does not match its pods"
            spec = pod_spec(w)
            sa = spec.get("serviceAccountName")
            assert sa is None or sa in sas, f"{where}: no ServiceAccount {sa}"
            if sa is None:
                assert spec.get("automountServiceAccountToken") is False, f"{where}: default SA token"
            volumes = {v["name"] for v in spec.get("volumes", [])}
            for c in spec["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{where}: no volume {m['name']}"
                env_of(c, docs)  # every ConfigMap and required Secret exists
                assert c["image"] == f"{IMAGE}:{IMAGE_TAG}", f"{where}: image {c['image']}"
            pods.append((w["metadata"]["namespace"], labels, spec["containers"]))
        for svc in by_kind(docs, "Service").values():
            ns, sel = svc["metadata"]["namespace"], svc["spec"]["selector"]
            targets = [cs for pns, labels, cs in pods if pns == ns and sel.items() <= labels.items()]
            assert targets, f"{overlay} Service {svc['metadata']['name']} selects no pods"
            named = {p["name"] for cs in targets for c in cs for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in named, f"{overlay} Service {svc['metadata']['name']}"
        for crb in by_kind(docs, "ClusterRoleBinding").values():
            assert crb["roleRef"]["name"] in by_kind(docs, "ClusterRole")
            for s in crb["subjects"]:
                assert s["kind"] == "ServiceAccount" and s["name"] in sas
                assert s["namespace"] == sas[s["name"]]["metadata"]["namespace"]
        namespaces = set(by_kind(docs, "Namespace"))
        assert {d["metadata"]["namespace"] for d in docs if "namespace" in d["metadata"]} <= namespaces


# ---- RBAC --------------------------------------------------------------------------------


def test_rbac_is_least_privilege(rendered: dict[str, list[Doc]]) -> None:
    from controller.watch import KNOWN

    docs = rendered["base"]
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    for r in roles:
        for rule in r["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), f"{r['metadata']['name']}: * in {key}"
            assert not rule.get("nonResourceURLs")
    bindings = {d["metadata"]["name"] for d in docs if d["kind"].endswith("RoleBinding")}
    assert bindings == {"armorstream-controller"}

    # The controller gets exactly what controller/watch.py calls: LIST and WATCH of each
    # watched resource and Event creation, nothing more.
    granted = {(g, res, v) for rule in by_kind(docs, "ClusterRole")["armorstream-controller"]["rules"]
               for g in rule["apiGroups"] for res in rule["resources"] for v in rule["verbs"]}
    needed = {(r.group, r.plural, v) for r in KNOWN.values() for v in ("list", "watch")}
    needed.add(("", "events", "create"))
    assert granted == needed

    # Stream and sensor read everything from Kafka: no role, no token.
    for name in ("armorstream-stream", "armorstream-sensor"):
        assert by_kind(docs, "ServiceAccount")[name].get("automountServiceAccountToken") is False
        (w,) = [w for w in workloads(docs) if pod_spec(w).get("serviceAccountName") == name]
        assert pod_spec(w).get("automountServiceAccountToken") is False


# ---- workloads -----------------------------------------------------------------------------

# Each added capability and why (the manifest says the same next to it).
SENSOR_CAPS = {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE", "SYS_PTRACE"}


def test_sensor_daemonset(rendered: dict[str, list[Doc]]) -> None:
    for overlay, docs in rendered.items():
        ds = by_kind(docs, "DaemonSet")["armorstream-sensor"]
        spec = pod_spec(ds)
        (c,) = spec["containers"]
        sc = c["securityContext"]
        assert not sc.get("privileged")
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert set(sc["capabilities"]["add"]) == SENSOR_CAPS
        # API-server rules outside the schemas: no allowPrivilegeEscalation=false with
        # CAP_SYS_ADMIN, and Bidirectional propagation only in privileged containers.
        assert sc.get("allowPrivilegeEscalation", True)
        assert all(m.get("mountPropagation") != "Bidirectional" for m in c["volumeMounts"])
        assert spec["hostPID"] is True and not spec.get("hostNetwork")
        assert {"operator": "Exists"} in spec["tolerations"]

        hostpaths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        mounts = {hostpaths[m["name"]]: m for m in c["volumeMounts"] if m["name"] in hostpaths}
        assert mounts["/sys/fs/bpf"]["mountPath"] == "/sys/fs/bpf"
        assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
        for ro in ("/sys/kernel/btf", "/sys/fs/cgroup", "/sys/kernel/security"):
            assert mounts[ro]["readOnly"] is True and mounts[ro]["mountPath"] == ro

        limit = quantity(c["resources"]["limits"]["memory"])
        assert 256 << 20 <= limit <= 512 << 20
        assert quantity(c["resources"]["requests"]["memory"]) <= limit

        env = {e["name"]: e for e in c["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert "--node-name=$(NODE_NAME)" in c["args"]
        (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
        assert f"--metrics-port={port['containerPort']}" in c["args"], overlay
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] == "metrics"


def test_stream_and_controller_are_probed_on_their_metrics_ports(rendered: dict[str, list[Doc]]) -> None:
    for overlay, docs in rendered.items():
        seen = set()
        for _, c in armorstream_containers(docs):
            if c["args"][0] not in ("stream", "controller"):
                continue
            seen.add(c["args"][0])
            (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
            assert f"--metrics-port={port['containerPort']}" in c["args"], overlay
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, (overlay, probe)
        assert seen == {"stream", "controller"}, overlay


def test_sensor_manifest_explains_each_capability() -> None:
    text = (DEPLOY / "base" / "sensor.yaml").read_text()
    for cap in SENSOR_CAPS:
        assert re.search(rf"^\s+- {cap}\s+#\s*\S", text, re.M), f"{cap} has no reason"


def test_other_pods_are_restricted(rendered: dict[str, list[Doc]]) -> None:
    for overlay, docs in rendered.items():
        for w in workloads(docs):
            if w["kind"] == "DaemonSet":
                continue
            spec = pod_spec(w)
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            assert not spec.get("hostPID") and not spec.get("hostNetwork")
            for c in spec["containers"]:
                sc = c["securityContext"]
                where = f"{overlay} {w['metadata']['name']}"
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"] == {"drop": ["ALL"]}, where
                assert "memory" in c["resources"]["limits"], where


def test_overlays(rendered: dict[str, list[Doc]]) -> None:
    def deployment(overlay: str, name: str) -> Doc:
        return by_kind(rendered[overlay], "Deployment")[name]

    def args(overlay: str, name: str) -> list[str]:
        a: list[str] = pod_spec(deployment(overlay, name))["containers"][0]["args"]
        return a

    def config(overlay: str) -> dict[str, str]:
        data: dict[str, str] = by_kind(rendered[overlay], "ConfigMap")["armorstream-config"]["data"]
        return data

    base_stream = deployment("base", "armorstream-stream")
    assert base_stream["spec"]["replicas"] == 2
    assert deployment("base", "armorstream-controller")["spec"]["replicas"] == 1
    assert "Secret" not in {d["kind"] for d in rendered["base"]}  # no ClickHouse by default

    # external: your broker and ClickHouse, real-Kafka producer settings.
    assert config("external")["ARMORSTREAM_BROKER"] != config("base")["ARMORSTREAM_BROKER"]
    assert "CLICKHOUSE_URL" in by_kind(rendered["external"], "Secret")["armorstream-clickhouse"]["stringData"]
    assert "--idempotent-producer" in args("external", "armorstream-stream")
    assert "armorstream-clickhouse-migrate" in by_kind(rendered["external"], "Job")

    # dev: the broker and ClickHouse addresses name Services the overlay creates.
    services = by_kind(rendered["dev"], "Service")
    host = config("dev")["ARMORSTREAM_BROKER"].rsplit(":", 1)[0]
    assert host in services and "kafka" not in by_kind(rendered["base"], "Service")
    url = by_kind(rendered["dev"], "Secret")["armorstream-clickhouse"]["stringData"]["CLICKHOUSE_URL"]
    assert re.match(r"http://([^:/]+)", url)[1] in services  # type: ignore[index]
    assert deployment("dev", "armorstream-stream")["spec"]["replicas"] == 1
    assert "--one-record-per-batch" in args("dev", "armorstream-controller")
