"""The fleet's alert rules under `promtool test rules`, and the Grafana dashboard's queries against exported metrics.

The rules and the scrape configuration are rendered by the real role (playbooks/monitoring.yml on localhost, from
the production inventory) into a temporary directory, then:
- `promtool check rules` / `check config` accept them;
- `promtool test rules` runs series written here: each alert fires for the host whose series cross its threshold, at
  the time its `for:` allows, and not for the host whose series stay on the good side;
- a second render with other thresholds changes what fires (the thresholds are wired to the variables);
- every query of the dashboard (roles/innova_monitoring/files/innova-fleet-dashboard.json) parses (promtool) and names
  only metrics that the service or HAProxy exports (lists below, read from a live backend's and HAProxy 2.6's
  /metrics in the fleet scenario), and the service's names are cross-checked against its metrics module.

promtool comes from Debian's `prometheus` package: installed with apt-get when missing (root), as scripts/molecule.sh
installs podman. ansible-playbook comes from the venv (installed with pip when missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "roles/innova_monitoring/files/innova-fleet-dashboard.json"

pytestmark = pytest.mark.system

# Metric families the service exports (GET /metrics of innova-smollm; counters with their _total, histograms with
# _bucket/_sum/_count), as scraped from a fleet backend.
SERVICE_METRICS = {
    "smollm_http_requests_total",
    "smollm_rejections_total",
    "smollm_cancellations_total",
    "smollm_answers_total",
    "smollm_prompt_tokens_total",
    "smollm_completion_tokens_total",
    "smollm_model_loaded",
    "smollm_model_load_seconds",
    "smollm_requests_in_flight",
    "smollm_decode_threads",
    "smollm_decode_thread_moves_total",
    "smollm_prompt_cache_tokens_total",
    "smollm_prompt_states",
    "smollm_prompt_states_bytes",
    "smollm_process_memory_bytes",
    *(
        f"{name}_{suffix}"
        for name in (
            "smollm_queue_wait_seconds",
            "smollm_time_to_first_token_seconds",
            "smollm_time_per_output_token_seconds",
            "smollm_request_duration_seconds",
        )
        for suffix in ("bucket", "sum", "count")
    ),
}
# The HAProxy 2.6 exporter's families the dashboard and the rules use (each seen in its /metrics in the fleet scenario).
HAPROXY_METRICS = {
    "haproxy_server_status",
    "haproxy_server_current_sessions",
    "haproxy_server_limit_sessions",
    "haproxy_server_sessions_total",
    "haproxy_server_current_queue",
    "haproxy_backend_current_queue",
    "haproxy_backend_queue_time_average_seconds",
    "haproxy_backend_response_time_average_seconds",
    "haproxy_frontend_http_responses_total",
    "haproxy_backend_http_responses_total",
}
# Families from other exporters that the rules (not the dashboard) use: node exporter and the health-check textfile.
OTHER_RULE_METRICS = {
    "up",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
    "innova_healthcheck_last_exit_code",
    "innova_healthcheck_last_run_timestamp_seconds",
}

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("promtool is missing and only root can install it: apt-get install prometheus")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
        check=True,
        env=env,
        capture_output=True,
    )
    return shutil.which("promtool") or pytest.fail("apt-get installed prometheus but no promtool is on PATH")


def _ansible_playbook() -> str:
    bindir = Path(sys.executable).parent
    tool = bindir / "ansible-playbook"
    if not tool.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "ansible-core"], check=True)
    return str(tool)


def _render(out: Path, *extra: str) -> Path:
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.run(
        [
            _ansible_playbook(),
            "-i",
            "inventories/production",
            "playbooks/monitoring.yml",
            "-e",
            "innova_monitoring_hosts=localhost",
            "-e",
            f"innova_monitoring_dir={out}",
            "-e",
            "innova_monitoring_become=false",
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def promtool() -> str:
    return _promtool()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, promtool: str) -> Path:
    return _render(tmp_path_factory.mktemp("monitoring"))


def _run(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


# --- series and expected alerts -----------------------------------------------------------------------------------


def _bucket_series(name: str, host: str, buckets: list[str], filled: str, per_min: int) -> list[dict[str, str]]:
    """Cumulative histogram buckets: ``per_min`` observations a minute, all in the bucket ``filled`` and above."""
    series = []
    reached = False
    for le in buckets:
        reached = reached or le == filled
        series.append(
            {"series": f'{name}_bucket{{host="{host}",le="{le}"}}', "values": f"0+{per_min if reached else 0}x40"}
        )
    return series


def _alert(name: str, at: str, firing: list[dict[str, str]]) -> dict[str, object]:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in firing]}


def _rule_tests(rules_file: str) -> dict[str, object]:
    ttft = ["1", "5", "10", "30", "+Inf"]
    per_token = ["0.01", "0.02", "0.2", "0.5", "+Inf"]
    series = [
        # Target down: b1 stops answering, b2 answers.
        {"series": 'up{job="innova-smollm",host="b1",instance="b1:8000"}', "values": "0x20"},
        {"series": 'up{job="innova-smollm",host="b2",instance="b2:8000"}', "values": "1x20"},
        # The balancer marks b1 DOWN, b2 UP.
        {"series": 'haproxy_server_status{proxy="smollm",server="b1",state="DOWN",host="lb"}', "values": "1x20"},
        {"series": 'haproxy_server_status{proxy="smollm",server="b2",state="DOWN",host="lb"}', "values": "0x20"},
        # The model is not loaded on b1.
        {"series": 'smollm_model_loaded{host="b1"}', "values": "0x20"},
        {"series": 'smollm_model_loaded{host="b2"}', "values": "1x20"},
        # HAProxy's queue: never empty except at minute 3.
        {"series": 'haproxy_backend_current_queue{proxy="smollm",host="lb"}', "values": "1 1 1 0 1 1 1 1 1 1 1 1"},
        # Refusals: b1 2 a minute (10 in 5 min), b2 0.5 a minute (2.5 in 5 min); the balancer 3 a minute.
        {"series": 'smollm_rejections_total{reason="queue_full",host="b1"}', "values": "0+2x20"},
        {"series": 'smollm_rejections_total{reason="queue_full",host="b2"}', "values": "0+0.5x20"},
        {"series": 'haproxy_frontend_http_responses_total{proxy="smollm_in",code="5xx",host="lb"}', "values": "0+3x20"},
        {
            "series": 'haproxy_frontend_http_responses_total{proxy="smollm_in",code="2xx",host="lb"}',
            "values": "0+100x20",
        },
        # First token: b1's requests take 10-30 s, b2's under 1 s.
        *_bucket_series("smollm_time_to_first_token_seconds", "b1", ttft, "30", 10),
        *_bucket_series("smollm_time_to_first_token_seconds", "b2", ttft, "1", 10),
        # Time per token: b1 0.2-0.5 s (2-5 tokens/s, p95 ~2), b2 0.01-0.02 s (50-100 tokens/s).
        *_bucket_series("smollm_time_per_output_token_seconds", "b1", per_token, "0.5", 100),
        *_bucket_series("smollm_time_per_output_token_seconds", "b2", per_token, "0.02", 100),
        # Disk: b1 5 % free, b2 50 %.
        {
            "series": 'node_filesystem_avail_bytes{job="innova-node",mountpoint="/",fstype="ext4",host="b1"}',
            "values": "5x30",
        },
        {
            "series": 'node_filesystem_size_bytes{job="innova-node",mountpoint="/",fstype="ext4",host="b1"}',
            "values": "100x30",
        },
        {
            "series": 'node_filesystem_avail_bytes{job="innova-node",mountpoint="/",fstype="ext4",host="b2"}',
            "values": "50x30",
        },
        {
            "series": 'node_filesystem_size_bytes{job="innova-node",mountpoint="/",fstype="ext4",host="b2"}',
            "values": "100x30",
        },
        # Health-check cron: b1 exits 2 (CRITICAL) and its last run is stuck at t=0; b2 exits 0 every minute.
        {"series": 'innova_healthcheck_last_exit_code{host="b1"}', "values": "2x30"},
        {"series": 'innova_healthcheck_last_exit_code{host="b2"}', "values": "0x30"},
        {"series": 'innova_healthcheck_last_run_timestamp_seconds{host="b1"}', "values": "0x30"},
        {"series": 'innova_healthcheck_last_run_timestamp_seconds{host="b2"}', "values": "0+60x30"},
    ]
    crit, warn = {"severity": "critical"}, {"severity": "warning"}
    alerts = [
        _alert("InnovaTargetDown", "1m", []),  # pending: for 2m
        _alert("InnovaTargetDown", "3m", [{**crit, "job": "innova-smollm", "host": "b1", "instance": "b1:8000"}]),
        _alert(
            "InnovaBackendOutOfBalancer",
            "3m",
            [{**crit, "proxy": "smollm", "server": "b1", "state": "DOWN", "host": "lb"}],
        ),
        _alert("InnovaModelNotLoaded", "4m", []),  # for 5m
        _alert("InnovaModelNotLoaded", "6m", [{**crit, "host": "b1"}]),
        _alert("InnovaNoFreeSlot", "7m", []),  # the empty queue at minute 3 is still in the 5-minute window
        _alert("InnovaNoFreeSlot", "9m", [{**warn, "proxy": "smollm", "host": "lb"}]),
        _alert("InnovaQueueRejections", "8m", [{**warn, "host": "b1"}]),
        _alert("InnovaBalancerRejections", "8m", [{**warn, "host": "lb"}]),
        _alert("InnovaSlowFirstToken", "5m", []),  # for 10m
        _alert("InnovaSlowFirstToken", "15m", [{**warn, "host": "b1"}]),
        _alert("InnovaSlowDecode", "5m", []),
        _alert("InnovaSlowDecode", "15m", [{**warn, "host": "b1"}]),
        _alert("InnovaModelDiskNearlyFull", "10m", []),  # for 15m
        _alert(
            "InnovaModelDiskNearlyFull",
            "20m",
            [{**warn, "job": "innova-node", "mountpoint": "/", "fstype": "ext4", "host": "b1"}],
        ),
        _alert("InnovaHealthCheckFailing", "5m", []),  # for 10m
        _alert("InnovaHealthCheckFailing", "12m", [{**crit, "host": "b1"}]),
        _alert("InnovaHealthCheckNotRunning", "10m", []),  # 600 s < 900 s
        _alert("InnovaHealthCheckNotRunning", "20m", [{**warn, "host": "b1"}]),
    ]
    return {
        "rule_files": [rules_file],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alerts}],
    }


def _strip_annotations(rules: Path, out: Path) -> Path:
    """The rules without annotations: promtool compares annotations too, and they are prose, not behaviour."""
    data = yaml.safe_load(rules.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_generated_files_pass_promtool_checks(rendered: Path, promtool: str) -> None:
    _run([promtool, "check", "rules", "innova-alerts.yml"], rendered)
    _run([promtool, "check", "config", "--syntax-only", "innova-prometheus.yml"], rendered)
    config = yaml.safe_load((rendered / "innova-prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # From the production inventory: two backends on their private addresses, one balancer exporter.
    backends = [t for sc in jobs["innova-smollm"]["static_configs"] for t in sc["targets"]]
    assert backends == ["198.51.100.10:8000", "198.51.100.11:8000"]
    assert [t for sc in jobs["innova-haproxy"]["static_configs"] for t in sc["targets"]] == ["198.51.100.5:8404"]
    assert {sc["labels"]["host"] for sc in jobs["innova-smollm"]["static_configs"]} == {
        "backend-1.example.invalid",
        "backend-2.example.invalid",
    }


def test_every_alert_fires_when_it_should_and_only_then(rendered: Path, promtool: str, tmp_path: Path) -> None:
    rules = _strip_annotations(rendered / "innova-alerts.yml", tmp_path / "rules.yml")
    names = {rule["alert"] for group in yaml.safe_load(rules.read_text())["groups"] for rule in group["rules"]}
    tests = _rule_tests(rules.name)
    tested = {case["alertname"] for case in tests["tests"][0]["alert_rule_test"]}
    assert tested == names, f"alerts without a test: {names - tested}"
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    out = _run([promtool, "test", "rules", "tests.yml"], tmp_path)
    assert "SUCCESS" in out


def test_thresholds_are_variables(tmp_path: Path, promtool: str) -> None:
    """With a looser first-token threshold (60 s) and decode floor (1 token/s) b1 no longer fires."""
    out = _render(
        tmp_path / "loose", "-e", "innova_monitoring_ttft_p95_max_s=60", "-e", "innova_monitoring_decode_min_tok_s=1"
    )
    rules = _strip_annotations(out / "innova-alerts.yml", tmp_path / "rules.yml")
    tests = _rule_tests(rules.name)
    for case in tests["tests"][0]["alert_rule_test"]:
        if case["alertname"] in ("InnovaSlowFirstToken", "InnovaSlowDecode"):
            case["exp_alerts"] = []
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    _run([promtool, "test", "rules", "tests.yml"], tmp_path)


# --- dashboard ----------------------------------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords or label names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        after = text[match.end() :].lstrip()
        if after.startswith("(") or word in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]?", word):
            continue
        if text[: match.start()].rstrip().endswith(("offset",)):
            continue
        names.add(word)
    return names


def test_metric_name_parser_on_known_shapes() -> None:
    assert metric_names('sum by (host, le) (rate(smollm_x_bucket{a="b"}[5m]))') == {"smollm_x_bucket"}
    assert metric_names("1 / histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m]))) < 4") == {"a_bucket"}
    assert metric_names('haproxy_server_status{proxy="smollm",state="UP"} == 1 and on(server) b') == {
        "haproxy_server_status",
        "b",
    }


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            exprs.append((panel["title"], target["expr"]))
    return exprs


def test_every_dashboard_query_names_an_exported_metric() -> None:
    exported = SERVICE_METRICS | HAPROXY_METRICS
    for title, expr in _dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{title!r}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{title!r}: {sorted(unknown)} is exported by neither the service nor HAProxy ({expr!r})"


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": expr} for i, (_, expr) in enumerate(_dashboard_exprs())
                ],
            }
        ]
    }
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    _run([promtool, "check", "rules", "dashboard-rules.yml"], tmp_path)


def test_alert_rules_name_only_known_metrics(rendered: Path) -> None:
    known = SERVICE_METRICS | HAPROXY_METRICS | OTHER_RULE_METRICS
    data = yaml.safe_load((rendered / "innova-alerts.yml").read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule['alert']}: unknown metrics {sorted(unknown)}"


def test_service_metric_list_matches_the_service_source() -> None:
    """Each smollm_* family of the list is declared in the service's metrics module (wherever it lives now)."""
    sources = [p for p in (REPO / "service").rglob("metrics.py") if "smollm_model_loaded" in p.read_text()]
    assert sources, "no metrics module declaring smollm_model_loaded under service/"
    text = "\n".join(p.read_text() for p in sources)
    for name in SERVICE_METRICS:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert f'"{base}"' in text, f"{base} is not declared in {[str(p) for p in sources]}"
