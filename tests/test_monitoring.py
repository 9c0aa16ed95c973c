"""cluster/monitoring/: the alerts and the Grafana dashboard's queries, evaluated by Prometheus' own rule tester
(`promtool test rules`) over series shaped as a Ray head serves `fcclip label`'s metrics: Ray's labels beside ours
(each run a driver of its own, so a WorkerId of its own), a counter's series beginning with its first increment.
That the job serves these names at all is tests/test_cluster_submit.py's (a real head, scraped)."""
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.monitoring import dashboard, write_rules

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Prometheus' rule tester) not installed; on Debian: apt-get download "
    "prometheus && dpkg -x prometheus_*.deb x && install x/usr/bin/promtool /usr/local/bin/ (.ci/run does this)")

DEST = "s3://lake/labels/ade20k"


def _series(name: str, values: str, worker: str = "03000000ffffffff", **tags) -> dict:
    labels = {"Component": "core_worker", "NodeAddress": "10.0.0.5", "SessionName": "session_2026-12-05_02-00-00",
              "Version": "2.60.0", "WorkerId": worker, "dest": DEST, **tags}
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _rules_file(tmp_path: Path) -> Path:
    return write_rules(tmp_path / "fcclip.rules.yaml")


def _promtool_test(tmp_path: Path, tests: list[dict]) -> None:
    rules = _rules_file(tmp_path)
    spec = tmp_path / "fcclip.test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}))
    run = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_rules_file_is_valid(tmp_path):
    run = subprocess.run([PROMTOOL, "check", "rules", str(_rules_file(tmp_path))], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "3 rules found" in run.stdout, run.stdout + run.stderr


def test_alerts(tmp_path):
    summary = "fcclip label into s3://lake/labels/ade20k has images left and writes no rows"
    stalled = {  # rows for 20 minutes, then none while 600 images are left (a write that hangs, say)
        "interval": "1m",
        "input_series": [
            _series("ray_fcclip_label_images_left", "1600-50x20 600x100"),
            _series("ray_fcclip_label_images_total", "50+50x20 1050x100", status="ok"),
            # last night's run: its counter still served, flat; its gauges long gone
            _series("ray_fcclip_label_images_total", "9000x120", worker="02000000ffffffff", status="ok"),
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "FcclipLabelStalled", "exp_alerts": []},  # rows 10 minutes ago
            {"eval_time": "60m", "alertname": "FcclipLabelStalled", "exp_alerts": []},  # pending: none for 30 min
            {"eval_time": "80m", "alertname": "FcclipLabelStalled", "exp_alerts": [
                {"exp_labels": {"alertname": "FcclipLabelStalled", "dest": DEST, "severity": "warning"},
                 "exp_annotations": {"summary": summary}}]},
            {"eval_time": "80m", "alertname": "FcclipLabelErrorRows", "exp_alerts": []},
        ],
    }
    starting = {  # a run whose model actors never get ready: images left, not a single row (no counter series)
        "interval": "1m",
        "input_series": [_series("ray_fcclip_label_images_left", "500x60")],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "FcclipLabelStalled", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "FcclipLabelStalled", "exp_alerts": [
                {"exp_labels": {"alertname": "FcclipLabelStalled", "dest": DEST, "severity": "warning"},
                 "exp_annotations": {"summary": summary}}]},
        ],
    }
    failing = {  # 90 ok and 10 error rows a minute: 10% error rows; actors dying twice every 10 minutes
        "interval": "1m",
        "input_series": [
            _series("ray_fcclip_label_images_left", "20000-100x120"),
            _series("ray_fcclip_label_images_total", "90+90x120", status="ok"),
            _series("ray_fcclip_label_images_total", "10+10x120", status="failed"),
            _series("ray_fcclip_label_model_actors_replaced_total", "1+0.2x120", reason="died"),
        ],
        "alert_rule_test": [
            {"eval_time": "120m", "alertname": "FcclipLabelStalled", "exp_alerts": []},
            {"eval_time": "120m", "alertname": "FcclipLabelErrorRows", "exp_alerts": [
                {"exp_labels": {"alertname": "FcclipLabelErrorRows", "dest": DEST, "severity": "warning"},
                 "exp_annotations": {"summary": "10% of fcclip label's rows into s3://lake/labels/ade20k are error "
                                                "rows"}}]},
            {"eval_time": "120m", "alertname": "FcclipLabelActorsReplaced", "exp_alerts": [
                {"exp_labels": {"alertname": "FcclipLabelActorsReplaced", "dest": DEST, "reason": "died",
                                "severity": "warning"},
                 "exp_annotations": {"summary": "fcclip label into s3://lake/labels/ade20k replaced 12 model actors "
                                                "in an hour (died)"}}]},
        ],
    }
    healthy = {  # 1% error rows, one actor replaced in the hour, rows flowing to the end: no alert
        "interval": "1m",
        "input_series": [
            _series("ray_fcclip_label_images_left", "12000-100x120"),
            _series("ray_fcclip_label_images_total", "99+99x120", status="ok"),
            _series("ray_fcclip_label_images_total", "1+1x120", status="failed"),
            _series("ray_fcclip_label_model_actors_replaced_total", "1x60 2x60", reason="timed_out"),
        ],
        "alert_rule_test": [
            {"eval_time": "120m", "alertname": name, "exp_alerts": []}
            for name in ("FcclipLabelStalled", "FcclipLabelErrorRows", "FcclipLabelActorsReplaced")
        ],
    }
    _promtool_test(tmp_path, [stalled, starting, failing, healthy])


def _dashboard_queries() -> dict[str, str]:
    panels = dashboard()["panels"]
    queries = {p["title"]: p["targets"][0]["expr"] for p in panels}
    assert all(len(p["targets"]) == 1 for p in panels)
    # Grafana's variables as it fills them: all DESTs, and a rate window of a few scrape intervals
    return {t: q.replace('"$dest"', '".*"').replace("$__rate_interval", "5m") for t, q in queries.items()}


def test_dashboard_queries(tmp_path):
    """Each panel's query gives what its title says over a run of known rates: 100 images a minute (90 ok, 10
    failed), 6,000 left (an hour), 2 actors ready and 1 starting, 3 chunks waiting, 20 segments an ok image, a shard
    committed every 2 minutes, 6 actors replaced in 5 minutes; beside a finished run's flat counters."""
    q = _dashboard_queries()
    old = "02000000ffffffff"
    series = [
        _series("ray_fcclip_label_images_total", "90+90x30", status="ok"),
        _series("ray_fcclip_label_images_total", "10+10x30", status="failed"),
        _series("ray_fcclip_label_images_total", "5000x30", worker=old, status="ok"),
        _series("ray_fcclip_label_segments_total", "1800+1800x30"),
        _series("ray_fcclip_label_segments_total", "70000x30", worker=old),
        _series("ray_fcclip_label_shards_committed_total", "1+0.5x30"),
        _series("ray_fcclip_label_model_actors_replaced_total", "1+1.2x30", reason="died"),
        _series("ray_fcclip_label_images_left", "6000x30"),
        _series("ray_fcclip_label_model_actors", "2x30", state="ready"),
        _series("ray_fcclip_label_model_actors", "1x30", state="starting"),
        _series("ray_fcclip_label_chunks_waiting", "3x30"),
    ]
    dest = {"dest": DEST}

    def expect(title, samples):
        """The panel's query at 20 minutes, to a thousandth (PromQL's round, and the same arithmetic here: a rate's
        last bits are not the point)."""
        return {"expr": f"round({q[title]}, 0.001)", "eval_time": "20m",
                "exp_samples": [{"labels": "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
                                 "value": math.floor(value / 0.001 + 0.5) * 0.001} for labels, value in samples]}

    tests = [{"interval": "1m", "input_series": series, "promql_expr_test": [
        expect("Images labeled per second", [({"status": "ok"}, 1.5), ({"status": "failed"}, 10 / 60)]),
        expect("Images left", [(dest, 6000)]),
        expect("Hours left", [(dest, 1.0)]),
        expect("Error rows", [({}, 0.1)]),
        expect("Model actors", [({"state": "ready"}, 2), ({"state": "starting"}, 1)]),
        expect("Chunks waiting for a model actor", [(dest, 3)]),
        expect("Model actors replaced", [({"reason": "died"}, 6)]),
        expect("Shards committed per minute", [(dest, 0.5)]),
        expect("Segments per labeled image", [({}, 20)]),
    ]}]
    assert {t["expr"] for t in tests[0]["promql_expr_test"]} == {f"round({e}, 0.001)" for e in q.values()}
    _promtool_test(tmp_path, tests)
