"""deploy/kubernetes: every manifest against the Kubernetes schema, offline.

The built-in kinds are checked against the models of the ``kubernetes`` Python client (its
``openapi_types`` and ``attribute_map`` are the API's OpenAPI schema, field by field); the
custom resources (the Prometheus Operator's, kustomize's) against the fields their kinds
allow, written down below as data.  Then what the DaemonSet must have for oomkit to work.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from oomkit import Config
from oomkit.config import config_from_dict

k8s = pytest.importorskip("kubernetes.client", reason="the kubernetes client (its models are the schema) is not installed")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"

MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
}

# Custom resources: for each path (dots; [] for list items), the keys allowed there.  From
# the Prometheus Operator's CRDs (monitoring.coreos.com/v1) and kustomize's Kustomization.
ANY = "*"
CUSTOM: dict[tuple[str, str], dict[str, set[str] | str]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "": {"apiVersion", "kind", "metadata", "spec"},
        "metadata": {"name", "namespace", "labels", "annotations"},
        "metadata.labels": ANY,
        "spec": {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels",
                 "sampleLimit"},
        "spec.selector": {"matchLabels", "matchExpressions"},
        "spec.selector.matchLabels": ANY,
        "spec.namespaceSelector": {"any", "matchNames"},
        "spec.endpoints[]": {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                             "relabelings", "metricRelabelings", "params", "tlsConfig"},
        "spec.endpoints[].relabelings[]": {"sourceLabels", "separator", "targetLabel", "regex", "modulus",
                                           "replacement", "action"},
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "": {"apiVersion", "kind", "metadata", "spec"},
        "metadata": {"name", "namespace", "labels", "annotations"},
        "metadata.labels": ANY,
        "spec": {"groups"},
        "spec.groups[]": {"name", "interval", "rules", "limit", "partial_response_strategy"},
        "spec.groups[].rules[]": {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"},
        "spec.groups[].rules[].labels": ANY,
        "spec.groups[].rules[].annotations": ANY,
    },
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): {
        "": {"apiVersion", "kind", "resources", "namespace", "commonLabels", "labels", "configMapGenerator",
             "images", "patches"},
    },
}


def documents() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
            out.append((path, doc))
    return out


def schema_problems(value: Any, type_name: str, where: str) -> list[str]:
    """What in ``value`` the client model ``type_name`` (an openapi_types string) does not allow."""
    if type_name.lower().startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        return [p for i, v in enumerate(value) for p in schema_problems(v, type_name[5:-1], f"{where}[{i}]")]
    if type_name.lower().startswith(("dict[", "dict(")):
        if not isinstance(value, dict):
            return [f"{where}: not a mapping"]
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        return [p for k, v in value.items() for p in schema_problems(v, inner, f"{where}.{k}")]
    scalar = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str,
              "bytes": str, "date": str}
    if type_name in scalar:
        kind = scalar[type_name]
        ok = isinstance(value, kind) and not (type_name in ("int", "float") and isinstance(value, bool))
        return [] if ok else [f"{where}: {value!r} is not a {type_name}"]
    model = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{where}: not a mapping ({type_name})"]
    fields = {json_name: model.openapi_types[py] for py, json_name in model.attribute_map.items()}
    out = []
    for key, v in value.items():
        if key not in fields:
            out.append(f"{where}.{key}: not a field of {type_name}")
        elif v is not None:
            out.extend(schema_problems(v, fields[key], f"{where}.{key}"))
    return out


def custom_problems(value: Any, allowed: dict[str, set[str] | str], where: str = "") -> list[str]:
    if isinstance(value, list):
        return [p for v in value for p in custom_problems(v, allowed, f"{where}[]")]
    if not isinstance(value, dict):
        return []
    keys = allowed.get(where)
    if keys == ANY:
        return []
    out = []
    for key, v in value.items():
        if keys is None or key not in keys:
            out.append(f"{where or '<top>'}: {key!r} is not allowed there")
        else:
            out.extend(custom_problems(v, allowed, f"{where}.{key}" if where else key))
    return out


@pytest.mark.parametrize(("path", "doc"), documents(), ids=lambda x: x.name if isinstance(x, Path) else x.get("kind"))
def test_every_manifest_matches_its_kinds_schema(path: Path, doc: dict[str, Any]) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in MODELS:
        problems = schema_problems(doc, MODELS[key], key[1])  # type: ignore[index]
    else:
        assert key in CUSTOM, f"{path.name}: no schema here for {key}"
        problems = custom_problems(doc, CUSTOM[key])  # type: ignore[index]
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_the_schema_check_can_fail() -> None:
    bad = {"apiVersion": "apps/v1", "kind": "DaemonSet", "spec": {"template": {"spec": {"hostPid": True}}}}
    assert schema_problems(bad, "V1DaemonSet", "DaemonSet") == [
        "DaemonSet.spec.template.spec.hostPid: not a field of V1PodSpec"
    ]
    assert custom_problems({"spec": {"groups": [{"rulez": []}]}}, CUSTOM[("monitoring.coreos.com/v1", "PrometheusRule")])


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in documents() if d["kind"] == kind]
    return doc


def test_the_daemonset_has_what_oomkit_needs() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["priorityClassName"] == "system-node-critical"
    (c,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    for path in ("/sys/fs/cgroup", "/sys/kernel/tracing", "/run/oomkit"):
        assert host[mounts[path]] == path, f"{path} is not the host's"
    caps = c["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and set(caps["add"]) == {"KILL", "SYS_RESOURCE", "IPC_LOCK", "SYS_NICE", "SYS_ADMIN", "SYSLOG"}
    assert c["securityContext"]["privileged"] is False
    res = c["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"] and "cpu" not in res["limits"]
    assert c["args"][:1] == ["serve"] and "/etc/oomkit/oomkit.toml" in c["args"]


def test_the_config_map_is_a_valid_oomkit_config_and_ports_agree() -> None:
    raw = tomllib.loads(by_kind("ConfigMap")["data"]["oomkit.toml"])
    port = int(raw["metrics"]["listen"].rpartition(":")[2])
    if not hasattr(Config(), "metrics"):
        raw.pop("metrics")  # [metrics] comes with the operations branch; the rest is checked here
    config_from_dict(raw, "deploy/kubernetes/configmap.yaml")
    ds = by_kind("DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert by_kind("Service")["spec"]["ports"][0]["port"] == port


def test_fleet_md_shows_the_rules_that_are_deployed() -> None:
    text = (ROOT / "docs" / "fleet.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    groups = [b["groups"] for b in blocks if isinstance(b, dict) and "groups" in b]
    assert groups == [by_kind("PrometheusRule")["spec"]["groups"]]
    alerts = {r["alert"] for g in groups[0] for r in g["rules"]}
    assert {"OomkitKilled", "OomkitHandedBack"} <= alerts
