"""`gateway admin ...` against a real gateway process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.state.sqlite import SqliteStore
from testkit.gateways import ONCALL_TOKEN, ROOT, GatewayProcess

GATEWAY = [sys.executable, "-m", "gateway.cli"]
ROW = json.dumps([0.1] * 32)


pytestmark = pytest.mark.slow  # each test runs the CLI as processes against a gateway process


@contextmanager
def gateway_process(store: Path) -> Iterator[dict[str, str]]:
    gateway = GatewayProcess(store)
    try:
        yield {
            "GATEWAY_ADMIN_TARGET": gateway.admin_target,
            "GATEWAY_ADMIN_TOKEN": ONCALL_TOKEN,
            "INFERENCE": gateway.target,
        }
    finally:
        assert gateway.stop() == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One gateway for the tests that only read or are refused: none of them may change its state."""
    store = tmp_path_factory.mktemp("admin-cli") / "gateway.db"
    with gateway_process(store) as env:
        yield env
    state = SqliteStore(store)
    revisions = state.revisions(limit=10)
    state.close()
    assert [r.revision for r in revisions] == [1], "a test changed the shared gateway: give it `fresh`"


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A gateway of the test's own, for tests that change routes (no other test sees the change)."""
    with gateway_process(tmp_path / "gateway.db") as env:
        yield env


def gateway(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
        env={**os.environ, **env},
    )


def test_routes_and_versions_tables(served: dict[str, str]) -> None:
    routes = gateway(served, "admin", "routes")
    assert routes.returncode == 0, routes.stderr
    assert re.search(r"ctr-ranker\s+1\.12\s+90%\s+stable", routes.stdout)
    assert re.search(r"ctr-ranker\s+1\.14\s+0%", routes.stdout)
    versions = gateway(served, "admin", "versions", "ctr-ranker", "--json")
    body = json.loads(versions.stdout)
    assert {v["version"]: v["state"] for v in body} == {"1.12": "ready", "1.13": "ready", "1.14": "ready"}


def test_the_2am_rollback(fresh: dict[str, str]) -> None:
    ramp = gateway(fresh, "admin", "set-traffic", "ctr-ranker", "1.12=75", "1.13=25", "--reason", "ramp")
    assert ramp.returncode == 0, ramp.stderr
    assert "ctr-ranker traffic 1.13: 10 -> 25" in ramp.stdout
    rollback = gateway(fresh, "admin", "rollback", "ctr-ranker", "--reason", "CTR drop", "--json")
    assert rollback.returncode == 0, rollback.stderr
    change = json.loads(rollback.stdout)
    assert change["dry_run"] is False and change["revision"] >= 3
    assert {"path": "ctr-ranker traffic 1.12", "before": 75, "after": 100} in change["changes"]
    # The very next request is served by stable, whatever its key.
    for key in ("a", "b", "c", "d", "e"):
        served_by = gateway(
            fresh,
            "predict",
            "ctr-ranker",
            "--features",
            ROW,
            "--routing-key",
            key,
            "--target",
            fresh["INFERENCE"],
            "--json",
        )
        assert json.loads(served_by.stdout)["version"] == "1.12"
    audit = gateway(fresh, "admin", "audit", "ctr-ranker", "--json")
    newest = json.loads(audit.stdout)[0]
    assert (newest["actor"], newest["action"], newest["reason"]) == ("oncall", "rollback", "CTR drop")


def test_dry_run_and_label(fresh: dict[str, str]) -> None:
    dry = gateway(fresh, "admin", "switch", "ctr-ranker", "1.14", "--reason", "try", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("dry run against revision")
    label = gateway(fresh, "admin", "label", "ctr-ranker", "shadowy", "1.14", "--reason", "tag")
    assert label.returncode == 0 and 'label shadowy: (none) -> "1.14"' in label.stdout
    missing = gateway(fresh, "admin", "label", "ctr-ranker", "shadowy", "--reason", "x")
    assert missing.returncode == 2 and "--remove" in missing.stderr


def test_label_remove_deletes_the_label(fresh: dict[str, str]) -> None:
    label = gateway(fresh, "admin", "label", "ctr-ranker", "doomed", "1.13", "--reason", "tag")
    assert label.returncode == 0, label.stderr
    both = gateway(fresh, "admin", "label", "ctr-ranker", "doomed", "1.14", "--remove", "--reason", "x")
    assert both.returncode == 2 and "--remove deletes the label: give no VERSION" in both.stderr
    removed = gateway(fresh, "admin", "label", "ctr-ranker", "doomed", "--remove", "--reason", "untag")
    assert removed.returncode == 0 and 'label doomed: "1.13" -> (none)' in removed.stdout
    routes = json.loads(gateway(fresh, "admin", "routes", "ctr-ranker", "--json").stdout)
    assert "doomed" not in routes["endpoints"][0]["labels"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("set-traffic", "ctr-ranker", "1.12=80", "--reason", "x"),
            "INVALID_ARGUMENT: endpoints.ctr-ranker.traffic: weights sum to 80",
        ),
        (("set-traffic", "ctr-ranker", "1.12:80", "--reason", "x"), "'1.12:80' is not VERSION=WEIGHT"),
        (("unload", "ctr-ranker", "1.12", "--reason", "x"), "FAILED_PRECONDITION: ctr-ranker 1.12 takes"),
        (("rollback", "nope", "--reason", "x"), "NOT_FOUND: no endpoint 'nope'"),
    ],
)
def test_errors_are_one_line_and_nonzero(served: dict[str, str], args: tuple[str, ...], message: str) -> None:
    result = gateway(served, "admin", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_bad_token(served: dict[str, str]) -> None:
    result = gateway({**served, "GATEWAY_ADMIN_TOKEN": "wrong-wrong-wrong"}, "admin", "routes")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: PERMISSION_DENIED: the admin token is not valid; check --token / $GATEWAY_ADMIN_TOKEN "
        "against the gateway's GATEWAY_ADMIN_TOKENS or --admin-tokens-file"
    )
    flag = gateway({**served, "GATEWAY_ADMIN_TOKEN": ""}, "admin", "--token", ONCALL_TOKEN, "routes")
    assert flag.returncode == 0


def test_reason_is_required_by_the_cli(served: dict[str, str]) -> None:
    result = gateway(served, "admin", "rollback", "ctr-ranker")
    assert result.returncode == 2 and "--reason" in result.stderr


def test_apply_file(fresh: dict[str, str], tmp_path: Path) -> None:
    document = (
        (ROOT / "models" / "gateway.yaml").read_text().replace('{"1.12": 90, "1.13": 10}', '{"1.12": 60, "1.13": 40}')
    )
    path = tmp_path / "routes.yaml"
    path.write_text(document)
    result = gateway(fresh, "admin", "apply", "-f", str(path), "--reason", "declarative 60/40")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "revision 2\n  ctr-ranker traffic 1.12: 90 -> 60\n  ctr-ranker traffic 1.13: 10 -> 40\n"
    routes = json.loads(gateway(fresh, "admin", "routes", "ctr-ranker", "--json").stdout)
    assert routes["endpoints"][0]["traffic"] == {"1.12": 60, "1.13": 40}


def test_batching_and_runner_commands(fresh: dict[str, str]) -> None:
    on = gateway(
        fresh, "admin", "batching", "ctr-ranker", "--max-batch-size", "8", "--max-delay-ms", "2",
        "--preferred", "2", "4", "--reason", "merge concurrent requests",
    )  # fmt: skip
    assert on.returncode == 0, on.stderr
    assert "ctr-ranker batching max_batch_size: (none) -> 8" in on.stdout
    runner = gateway(fresh, "admin", "runner", "ctr-ranker", "pool", "--reason", "heavy model")
    assert runner.returncode == 0, runner.stderr
    routes = gateway(fresh, "admin", "routes")
    assert "batching ctr-ranker: max_batch_size 8, max_delay_ms 2, preferred 2/4" in routes.stdout
    assert "runner ctr-ranker: pool" in routes.stdout
    off = gateway(fresh, "admin", "batching", "ctr-ranker", "--off", "--max-delay-ms", "2", "--reason", "done")
    assert off.returncode == 2 and "--off turns batching off" in off.stderr
