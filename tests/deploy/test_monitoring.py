"""Monitoring artifacts: the alert rules parse (promtool when installed) and are the same in the rule file
and the operator's PrometheusRule; every metric the rules and the Grafana dashboard use exists in a real
server's /metrics; the kustomize component renders a ServiceMonitor that finds the services' metrics port;
Compose's optional Prometheus scrapes all four services."""

from __future__ import annotations

import json
import os
import re
import subprocess

import kubernetes_validate
import yaml
from deploy_tools import COMPOSE, K8S, ROOT, tool
from prometheus_client.parser import text_string_to_metric_families

MONITORING = ROOT / "deploy" / "monitoring"
METRIC = re.compile(r"\b(?:fluxlora|grpc_server)_[a-z0-9_]+")


def rules() -> dict:
    return yaml.safe_load((MONITORING / "alerts.yaml").read_text())


def dashboard() -> dict:
    return json.loads((MONITORING / "fluxlora-dashboard.json").read_text())


def used_metrics() -> set[str]:
    exprs = [r["expr"] for g in rules()["groups"] for r in g["rules"]]
    exprs += [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    return {m for e in exprs for m in METRIC.findall(e)}


def test_every_alert_rule_is_complete_and_the_operator_rule_holds_the_same_groups():
    groups = rules()["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"]}
    assert {"FluxloraServiceDown", "FluxloraJobsFailing", "FluxloraGpuQueueWaitOverAnHour",
            "FluxloraStoreUnavailable"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["expr"].strip() and rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    operator = yaml.safe_load((K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule" and operator["spec"] == rules()


def test_promtool_accepts_the_alert_rules(tmp_path):
    promtool = tool("promtool")  # Debian's prometheus package (.ci/install-deploy-tools)
    result = subprocess.run([promtool, "check", "rules", str(MONITORING / "alerts.yaml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    config = tmp_path / "prometheus.yml"
    config.write_text((MONITORING / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yaml",
                                                                          str(MONITORING / "alerts.yaml")))
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_parses_and_every_metric_it_plots_exists_in_a_scrape(tmp_path):
    from metrics_support import scrape_text

    from support import preprocessing_server

    board = dashboard()
    assert board["uid"] == "fluxlora" and len(board["panels"]) >= 10
    assert all(p["targets"] and p["datasource"]["type"] == "prometheus" for p in board["panels"])
    with preprocessing_server(tmp_path, metrics_port=0) as server:
        text = scrape_text(server.metrics_port)
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_count"}
        names |= {s.name for s in family.samples}
    missing = sorted(used_metrics() - names)
    assert not missing, f"plotted or alerted on but never exported: {missing}"


def test_the_component_renders_a_service_monitor_for_the_services_metrics_port(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "rtx4090", overlay)],
        "components": [os.path.relpath(K8S / "components" / "monitoring", overlay)]}))
    result = subprocess.run([tool("kubectl"), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["metadata"]["namespace"] == "fluxlora"
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == rules()
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [d for d in docs if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()]
    assert sorted(d["metadata"]["name"] for d in selected) == ["captioning", "evaluation", "preprocessing", "training"]
    for service in selected:
        assert [p["port"] for p in service["spec"]["ports"] if p["name"] == "metrics"] == [9464]
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "fluxlora"  # job="fluxlora"
    config = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "fluxlora-config"][0]
    assert config["data"]["FLUXLORA_METRICS_PORT"] == "9464"
    for doc in docs:
        if doc["kind"] not in ("ServiceMonitor", "PrometheusRule"):
            kubernetes_validate.validate(doc, "1.30", strict=True)
        if doc["kind"] == "Deployment":
            ports = {p["name"]: p["containerPort"] for p in doc["spec"]["template"]["spec"]["containers"][0]["ports"]}
            assert ports["metrics"] == 9464


def test_compose_has_prometheus_in_an_optional_profile_scraping_all_four_services():
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert "@sha256:" in prometheus["image"]
    for mount in prometheus["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("."):
            assert (COMPOSE / source).resolve().exists(), mount
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "fluxlora"
    assert sorted(job["static_configs"][0]["targets"]) == sorted(
        f"{name}:9464" for name in ("preprocessing", "captioning", "training", "evaluation"))
    assert compose["x-fluxlora-env"]["FLUXLORA_METRICS_PORT"] == "9464"
