"""deploy/kubernetes/: the manifests validate offline against the Kubernetes schemas (`kubernetes-validate`, which
bundles them), the probes hit the service's health routes, and every LTSERVE_* variable is a ServiceSettings field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ltserve.serve.settings import ENV_PREFIX, ServiceSettings

KUBE = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBE.glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"
"""The oldest schema version the manifests are checked against (also the newest the package bundles)."""


def _documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kind(kind: str) -> dict:
    found = [doc for _, doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBE}"
    return found[0]


def test_every_manifest_is_valid_against_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _documents()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                            "PodDisruptionBudget"}
    errors = []
    for version in sorted({KUBERNETES_VERSION, kubernetes_validate.utils.latest_version()}):
        for path, doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{version} {path.name} {doc['kind']}: {exc.message} at "
                              f"{'/'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


def test_the_validator_catches_a_broken_manifest():
    """The check above has teeth: a misspelt field and a wrong type are errors."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = _kind("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["httpGet"]["pathh"] = container["livenessProbe"]["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_probes_use_the_service_health_routes():
    container = _kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"  # the warm-up ends when /readyz answers 200
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 3000}  # `bentoml serve`'s port in the containerized Bento
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "http"


def test_every_ltserve_variable_is_a_settings_field_and_the_key_comes_from_a_secret():
    container = _kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    fields = {ENV_PREFIX + f.upper() for f in ServiceSettings.model_fields}
    unknown = sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in fields)
    assert not unknown, f"not ServiceSettings fields (ltserve/serve/settings.py): {unknown}"
    assert "value" not in env["LTSERVE_API_KEY"]
    assert env["LTSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["key"]
    # the service's writable places are on emptyDir volumes
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _kind("Deployment")["spec"]["template"]["spec"]["volumes"]}
    for name in ("LTSERVE_PRIOR_STATE_DIR", "LTSERVE_METRICS_DIR", "TMPDIR"):
        path = env[name]["value"]
        mount = next((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), None)
        assert mount is not None and "emptyDir" in volumes[mounts[mount]], f"{name}={path} is not on an emptyDir"
    # the settings' own values parse (the same check the service makes at start-up)
    values = {n[len(ENV_PREFIX):].lower(): e["value"] for n, e in env.items() if n.startswith(ENV_PREFIX) and
              "value" in e}
    ServiceSettings(**values)


def test_the_service_hpa_and_budget_select_the_deployment():
    deployment = _kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _kind("Service")["spec"]["selector"].items() <= labels.items()
    assert _kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = _kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    assert _kind("Service")["spec"]["ports"][0]["targetPort"] == port
