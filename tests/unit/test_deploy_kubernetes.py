"""deploy/kubernetes: every manifest is valid Kubernetes (kubernetes-validate, strict, against
its bundled schemas: no network), each kustomization lists exactly its files, each overlay
builds into a consistent set (a small resolver here, and `kubectl kustomize` where kubectl is
installed), and the pods get what the services read: settings only, probes on /health at the
service's port, tokens from Secrets."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shared.settings import WorkerSettings
from tests.unit.deploy_support import (
    K8S,
    ROOT,
    TOKENS,
    commented_env_keys,
    default_port,
    env_names,
    load_yaml_docs,
    service_of,
    unknown,
)

# The oldest Kubernetes the manifests are meant for, and the newest schema bundled.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
NAMESPACE = "svllm"
# Files the operator makes from instructions (they hold secrets): never committed.
OPERATOR_FILES = {"tokens.env": sorted(TOKENS)}
# Tokens each service refuses to start without on a non-loopback address (README, Security).
NEEDS = {"router": TOKENS, "manager": {"INTERNAL_TOKEN"},
         "worker": {"ADMIN_TOKEN", "INTERNAL_TOKEN"}}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomization(d: Path) -> dict[str, Any]:
    return load_yaml_docs(d / "kustomization.yaml")[0]


def generator_files(k: dict[str, Any]) -> list[str]:
    return [f for g in k.get("secretGenerator", []) + k.get("configMapGenerator", [])
            for f in g.get("envs", []) + g.get("files", [])]


def generated_keys(d: Path, name: str) -> list[str]:
    """Keys of a generator's env file; an operator-made one from its example or its rule."""
    if (d / name).exists():
        return list(commented_env_keys(d / name))
    if name in OPERATOR_FILES:
        return OPERATOR_FILES[name]
    example = d / f"{name}.example"
    assert example.exists(), f"{d / name} is made by the operator from what? (no example)"
    return list(commented_env_keys(example))


@dataclass
class Build:
    docs: list[dict[str, Any]] = field(default_factory=list)
    secrets: dict[str, set[str]] = field(default_factory=dict)
    configs: dict[str, set[str]] = field(default_factory=dict)
    literals: dict[str, str] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]

    def workloads(self) -> Iterator[dict[str, Any]]:
        return (d for d in self.docs if d["kind"] in WORKLOADS)


def build(d: Path) -> Build:
    """What `kustomize build d` makes, for what these kustomizations use: resources (files and
    directories), namespace, secret and config generators. Anything else fails loudly."""
    k = kustomization(d)
    supported = {"apiVersion", "kind", "namespace", "resources", "secretGenerator",
                 "configMapGenerator", "images"}
    assert set(k) <= supported, f"{d}: extend this resolver for {set(k) - supported}"
    out = Build()
    for res in k.get("resources", []):
        sub = d / res
        part = build(sub) if sub.is_dir() else Build(docs=load_yaml_docs(sub))
        out.docs += copy.deepcopy(part.docs)
        out.secrets |= part.secrets
        out.configs |= part.configs
        out.literals |= part.literals
    for kind, gens in (("secrets", k.get("secretGenerator", [])),
                       ("configs", k.get("configMapGenerator", []))):
        for g in gens:
            keys = {lit.split("=", 1)[0] for lit in g.get("literals", [])}
            out.literals |= dict(lit.split("=", 1) for lit in g.get("literals", []))
            for f in g.get("envs", []):
                keys |= set(generated_keys(d, f))
            getattr(out, kind)[g["name"]] = keys
    for doc in out.docs:
        if doc["kind"] == "ConfigMap":
            out.configs[doc["metadata"]["name"]] = set(doc.get("data", {}))
        if "namespace" in k and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = k["namespace"]
    return out


def containers(workload: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec["containers"]) + (list(spec.get("initContainers", [])) if init else [])


def service_containers(b: Build) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for w in b.workloads():
        for c in containers(w):
            svc = service_of(c.get("command", []))
            if svc:
                yield svc, w, c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates(path: Path, version: str) -> None:
    docs = load_yaml_docs(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_wrong_manifest_does_not_validate() -> None:
    # The validator catches what a typo makes: a misspelt field, a wrong type.
    doc = load_yaml_docs(K8S / "base" / "worker.yaml")[0]
    doc["spec"]["template"]["spec"]["hostIpc"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
    doc = load_yaml_docs(K8S / "base" / "router.yaml")[0]
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("d", [K8S / "base", *OVERLAYS], ids=lambda p: p.name)
def test_kustomization_lists_exactly_its_files(d: Path) -> None:
    k = kustomization(d)
    resources = k.get("resources", [])
    for res in resources:
        target = d / res
        assert target.is_file() or (target / "kustomization.yaml").is_file(), res
    local = {p.name for p in d.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert local == {r for r in resources if (d / r).is_file()}, "unlisted or missing files"
    for name in generator_files(k):
        if (d / name).exists():
            continue
        # Made by the operator: ignored by git, so a secret never lands in a commit.
        ignored = subprocess.run(["git", "check-ignore", "-q", str(d / name)], cwd=ROOT,
                                 check=False)
        assert ignored.returncode == 0, f"{d / name} would be committed: add it to .gitignore"
        generated_keys(d, name)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_is_consistent(overlay: Path) -> None:
    b = build(overlay)
    ids = [(d["kind"], d["metadata"]["name"]) for d in b.docs]
    assert len(ids) == len(set(ids)), "duplicate resources"
    assert all(d["metadata"].get("namespace") == NAMESPACE
               for d in b.docs if d["kind"] != "Namespace")
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in b.workloads()]
    for w in b.workloads():
        assert selects(w["spec"]["selector"]["matchLabels"],
                       w["spec"]["template"]["metadata"]["labels"])
        for c in containers(w, init=True):
            _check_refs(b, c)
    for s in (d for d in b.docs if d["kind"] == "Service"):
        backends = [w for w in b.workloads()
                    if selects(s["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert backends, f"service {s['metadata']['name']} selects no pods"
        names = {p["name"] for w in backends for c in containers(w) for p in c["ports"]}
        assert {p["targetPort"] for p in s["spec"]["ports"]} <= names
    for d in b.docs:
        if d["kind"] == "HorizontalPodAutoscaler":
            b.get(d["spec"]["scaleTargetRef"]["kind"], d["spec"]["scaleTargetRef"]["name"])
        if d["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            sel = d["spec"].get("selector") or d["spec"]["podSelector"]
            assert any(selects(sel["matchLabels"], p) for p in pods), d["metadata"]["name"]
    # The pool's parts are all there.
    assert b.get("Deployment", "svllm-manager")["spec"]["replicas"] == 2
    b.get("Deployment", "svllm-router")
    b.get("DaemonSet", "svllm-worker")
    b.get("HorizontalPodAutoscaler", "svllm-router")


def _check_refs(b: Build, c: dict[str, Any]) -> None:
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            assert src["configMapRef"]["name"] in b.configs
        else:
            assert src["secretRef"]["name"] in b.secrets, src
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and not ref.get("optional"):
            assert ref["key"] in b.secrets.get(ref["name"], set()), ref


def test_in_cluster_redis_url_names_its_service() -> None:
    b = build(K8S / "overlays" / "single-redis")
    url = b.literals["REDIS_URL"]
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    svc = b.get("Service", host)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert "@" not in url  # a literal carries no password


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl is not installed: the resolver above checks the overlays")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_kubectl_kustomize_builds_the_same_valid_set(overlay: Path, tmp_path: Path) -> None:
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    (tree / "base" / "tokens.env").write_text("".join(f"{t}=x{t.lower()}\n" for t in TOKENS))
    for example in tree.rglob("*.env.example"):
        example.with_suffix("").write_text(example.read_text())
    out = subprocess.run(["kubectl", "kustomize", str(tree / overlay.relative_to(K8S))],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)

    mine = build(overlay)

    def ident(d: dict[str, Any]) -> tuple[str, str, str | None]:
        name = d["metadata"]["name"]
        if d["kind"] == "Secret" and name.rsplit("-", 1)[0] in mine.secrets:
            name = name.rsplit("-", 1)[0]  # the generator's content hash
        return d["kind"], name, d["metadata"].get("namespace")

    ours = {ident(d) for d in mine.docs} | {("Secret", n, NAMESPACE) for n in mine.secrets}
    assert {ident(d) for d in built} == ours


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_pods_set_only_settings_of_their_service(overlay: Path) -> None:
    b = build(overlay)
    seen = set()
    for svc, _, c in service_containers(b):
        seen.add(svc)
        names = {e["name"] for e in c.get("env", [])}
        for src in c.get("envFrom", []):
            ref = src.get("configMapRef") or src["secretRef"]
            names |= (b.configs if "configMapRef" in src else b.secrets)[ref["name"]]
        assert not unknown(names, env_names(svc)), f"{svc}: not settings of the {svc}"
    assert seen == {"router", "manager", "worker"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_probes_are_health_on_the_service_port(overlay: Path) -> None:
    for svc, _, c in service_containers(build(overlay)):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": default_port(svc)}
        assert f"{svc.upper()}_PORT" not in {e["name"] for e in c.get("env", [])}
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] == "/health", (svc, probe)
            assert ports.get(get["port"], get["port"]) == default_port(svc), (svc, probe)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_tokens_come_from_secrets(overlay: Path) -> None:
    b = build(overlay)
    for svc, _, c in service_containers(b):
        env = {e["name"]: e for e in c.get("env", [])}
        assert NEEDS[svc] <= set(env), f"{svc} lacks {NEEDS[svc] - set(env)}"
        for name, e in env.items():
            if name.endswith("_TOKEN"):
                assert "value" not in e, f"{svc}: {name} is a literal"
                assert "secretKeyRef" in e["valueFrom"], f"{svc}: {name} not from a Secret"
    for d in b.docs:
        assert d["kind"] != "Secret", "a Secret is committed: generate it from an ignored file"
    assert not {k for k in b.literals if k.endswith("_TOKEN")}


def test_workers_run_on_gpu_nodes_with_host_ipc() -> None:
    b = build(K8S / "base")
    ds = b.get("DaemonSet", "svllm-worker")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostIPC"] is True
    assert any(k.startswith("nvidia.com/") for k in spec["nodeSelector"])
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    (c,) = containers(ds)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    env = [e["name"] for e in c["env"]]
    url = next(e["value"] for e in c["env"] if e["name"] == "WORKER_URL")
    # Kubernetes expands $(VAR) only from variables defined before it.
    assert "$(POD_IP)" in url
    assert env.index("POD_IP") < env.index("WORKER_URL")
    resolved = url.replace("$(POD_IP)", "10.1.2.3")
    advertised = WorkerSettings(worker_url=resolved).advertised_url()
    assert advertised == f"http://10.1.2.3:{default_port('worker')}"
    worker_id = next(e for e in c["env"] if e["name"] == "WORKER_ID")
    assert worker_id["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_managers_have_distinct_ids() -> None:
    mgr = build(K8S / "base").get("Deployment", "svllm-manager")
    (c,) = containers(mgr)
    ident = next(e for e in c["env"] if e["name"] == "MANAGER_ID")
    assert ident["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_container_has_requests_limits_and_no_privileges(overlay: Path) -> None:
    for w in build(overlay).workloads():
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for c in containers(w, init=True):
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
            assert "memory" in res["limits"], c["name"]
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]


def test_every_pool_image_is_set_in_one_place() -> None:
    # The operator points `images:` of the base at their registry; a container whose image
    # is not listed there would still pull the unbuilt local name.
    listed = {i["name"] for i in kustomization(K8S / "base")["images"]}
    used = {c["image"] for o in OVERLAYS for w in build(o).workloads()
            for c in containers(w, init=True)}
    assert {i for i in used if not i.startswith("redis:")} == listed
