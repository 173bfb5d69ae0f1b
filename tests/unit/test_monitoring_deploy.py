"""The monitoring deployment stays consistent with the pool it watches: every Prometheus
target is a service of compose.yaml on its service's port, every file the monitoring
containers mount exists, and the Grafana provisioning points at the dashboard's folder."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.support import ROOT

PORTS = {"router": 8000, "worker": 7000, "manager": 9000}


def load(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def test_prometheus_scrapes_every_service_of_compose() -> None:
    services = load("compose.yaml")["services"]
    jobs = load("deploy/prometheus.yml")["scrape_configs"]
    scraped: set[str] = set()
    for job in jobs:
        assert job["authorization"]["credentials_file"] == "/tmp/metrics_token"
        for target in job["static_configs"][0]["targets"]:
            host, port = target.split(":")
            assert host in services, target
            assert int(port) == PORTS[host.split("-")[0]], target
            scraped.add(host)
    pool = {s for s in services if s.split("-")[0] in PORTS}
    assert scraped == pool
    paths = {job.get("metrics_path", "/metrics") for job in jobs}
    assert paths == {"/metrics", "/metrics/engines"}


def test_monitoring_profile_mounts_files_that_exist() -> None:
    services = load("compose.yaml")["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    provider = load("deploy/grafana/provisioning/dashboards/svllm.yml")["providers"][0]
    mounts = {v.split(":")[1] for v in services["grafana"]["volumes"]
              if v.startswith("./deploy/grafana/dashboards")}
    assert provider["options"]["path"] in mounts
    datasource = load("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/svllm.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}
