from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewayConfig, load_config
from gateway.desired import desired_from_config, endpoint_from_config, load_route_file, parse_route_file
from gateway.errors import ConfigError
from gateway.repository import Artifact, ModelRepository
from gateway.routing import EndpointRoutes
from testkit.gateways import DEMO_CONFIG, MODELS, config_text


def test_demo_route_file() -> None:
    config = load_route_file(DEMO_CONFIG)
    assert config.model_root == MODELS
    routes = desired_from_config(config, ModelRepository(MODELS)).route_table(1).endpoint("ctr-ranker")
    assert routes.versions == ("1.12", "1.13", "1.14")
    assert dict(routes.weights) == {"1.12": 90, "1.13": 10}
    assert dict(routes.labels) == {"stable": "1.12", "canary": "1.13"}
    assert routes.weights.get("1.14", 0) == 0


def check_routes_table(config: GatewayConfig) -> EndpointRoutes:
    ep = config.endpoints["ctr-ranker"]
    artifacts = {v: Artifact("ctr-ranker", v, "", "") for v in ep.versions}
    return endpoint_from_config("ctr-ranker", ep, artifacts).routes()


def test_unquoted_versions_keep_their_text() -> None:
    text = config_text(versions="[1.10, 1.12]", traffic="{1.10: 90, 1.12: 10}", labels="{stable: 1.10}")
    config = parse_route_file(text)
    assert config.endpoints["ctr-ranker"].versions == ["1.10", "1.12"]
    routes = check_routes_table(config)
    assert routes.versions == ("1.10", "1.12")
    assert dict(routes.weights) == {"1.10": 90, "1.12": 10}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"traffic": '{"1.12": 80, "1.13": 10}'}, r"endpoints.ctr-ranker.traffic: weights sum to 90; .*100"),
        ({"traffic": '{"1.12": 90, "9.9": 10}'}, r"endpoints.ctr-ranker.traffic: version '9.9' is not"),
        (
            {"traffic": '{"1.12": ninety}'},
            r"endpoints.ctr-ranker.traffic.1.12: Input should be a valid integer",
        ),
        ({"labels": '{stable: "7.0"}'}, r"endpoints.ctr-ranker.labels.stable: version '7.0'"),
        ({"nan_policy": "drop"}, r"endpoints.ctr-ranker.nan_policy: Input should be 'allow' or 'reject'"),
        ({"max_batch_size": "0"}, r"endpoints.ctr-ranker.max_batch_size: Input should be greater than"),
        ({"colour": "blue"}, r"endpoints.ctr-ranker.colour: unknown field"),
        ({"versions": '["1.12", "1.12"]'}, r"versions are listed twice: 1.12"),
        ({"shadows": '{"2.0": 10}'}, r"endpoints.ctr-ranker.shadows: version '2.0' is not a version"),
        (
            {"shadows": '{"1.14": 120}'},
            r"shadows.1.14: share of requests: 120 must be an integer percent from 0 to 100",
        ),
        ({"shadow_compare": "{threshold: 0.5, k: 3}"}, r"shadow_compare.k: unknown field"),
        (
            {"guardrails": '["error_rate > two for 5m"]'},
            r"endpoints.ctr-ranker.guardrails: .*rule 1: .*threshold 'two' is not a number",
        ),
        ({"guardrails": '["error_rate > 2%"]'}, r"rule 1: .*write METRIC > THRESHOLD for DURATION"),
        ({"guardrails": '{rules: ["error_rate > 2% for 5m"], at_least: 3}'}, r"at_least 3 must be between 1 and 1"),
        ({"batching": "{max_batch_size: 32}"}, r"endpoints.ctr-ranker.batching.max_delay_ms: required field"),
        (
            {"batching": "{max_batch_size: 0, max_delay_ms: 2}"},
            r"batching.max_batch_size: Input should be greater than or equal to 1",
        ),
        ({"batching": "{max_batch_size: 8, max_delay_ms: -1}"}, r"batching.max_delay_ms: Input should be greater"),
        (
            {"batching": "{max_batch_size: 8, max_delay_ms: 2, preferred_batch_sizes: [4, 2]}"},
            r"batching.preferred_batch_sizes: .*\[4, 2\]: list each size once, in increasing order",
        ),
        (
            {"batching": "{max_batch_size: 8, max_delay_ms: 2, preferred_batch_sizes: [16]}"},
            r"batching.preferred_batch_sizes: .*\[16\]: each must be between 1 and max_batch_size 8",
        ),
        ({"batching": "{max_batch_size: 8, max_delay_ms: 2, timeout: 3}"}, r"batching.timeout: unknown field"),
        ({"runner": "gpu"}, r"endpoints.ctr-ranker.runner: Input should be 'auto', 'inline' or 'pool'"),
    ],
)
def test_invalid_route_files_name_the_field(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_route_file(config_text(**overrides), source="routes.yaml")


def test_missing_endpoints_and_bad_yaml() -> None:
    with pytest.raises(ConfigError, match="endpoints: required field is missing"):
        parse_route_file("model_root: .\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_route_file("endpoints: [unclosed\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_route_file("- a\n- b\n")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read route file"):
        load_config(tmp_path / "missing.yaml")


def test_bad_endpoint_name() -> None:
    text = config_text().replace("ctr-ranker:", "CTR@ranker:")
    with pytest.raises(ConfigError, match="endpoint name 'CTR@ranker' is invalid"):
        parse_route_file(text)


def test_batching_and_runner_travel_from_the_route_file_to_the_routes_and_back() -> None:
    text = config_text(
        batching="{max_batch_size: 32, max_delay_ms: 2.5, preferred_batch_sizes: [8, 16]}", runner="pool"
    )
    config = parse_route_file(text)
    routes = check_routes_table(config)
    assert routes.batching is not None and routes.runner == "pool"
    assert (routes.batching.max_batch_size, routes.batching.max_delay_ms) == (32, 2.5)
    assert routes.batching.preferred_batch_sizes == (8, 16)
    assert routes.batching.describe() == "max_batch_size 32, max_delay_ms 2.5, preferred 8/16"
    plain = check_routes_table(parse_route_file(config_text()))
    assert plain.batching is None and plain.runner == "auto"
