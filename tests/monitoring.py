"""cluster/monitoring/'s files as the tests read them: the Grafana dashboard and the alerts."""
import json
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parent.parent / "cluster" / "monitoring"


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def write_rules(path: Path) -> Path:
    """The PrometheusRule's spec at ``path``: a plain Prometheus rule file (as its header says to make one)."""
    doc = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    path.write_text(yaml.safe_dump(doc["spec"]))
    return path
