"""The playbooks' other triggers through the guardian, with a fake clock and real parts.

Feature drift, score drift (canary and shadow), value per request, timeouts and memory growth:
real inference (onnxruntime), real windows and histograms, real SQLite, a SimClock.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gateway.app import Gateway
from gateway.clock import SimClock
from gateway.desired import parse_route_file
from gateway.errors import GatewayError
from gateway.inference import InferRequest
from gateway.orchestration.evaluate import Status
from gateway.state.sqlite import SqliteStore
from gateway.telemetry.memory import MemoryWindow
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.windows import SeriesKey, WindowStore
from testkit.gateways import MODELS, config_text

Row = Callable[[str, np.ndarray], np.ndarray]


def make(tmp_path: Path, clock: SimClock, memory: Callable[[], int] | None = None, **overrides: str) -> Gateway:
    config = parse_route_file(config_text(**overrides), base_dir=MODELS)
    windows = WindowStore(3600, clock=clock)
    telemetry = Telemetry(windows, memory=MemoryWindow(3600, clock=clock, reader=memory) if memory else None)
    gateway = Gateway(config, SqliteStore(tmp_path / "state.db"), telemetry=telemetry, clock=clock)
    gateway.start()
    return gateway


def run(
    gateway: Gateway,
    clock: SimClock,
    seconds: int,
    *,
    per_second: int = 50,
    shift: Row | None = None,
    feedback: Callable[[str, np.random.Generator], tuple[float, float | None]] | None = None,
    seed: int = 0,
) -> list[str]:
    """Traffic through the real inference path, a guardian tick per simulated second; the incidents' ids."""
    rng = np.random.default_rng(seed)
    incidents = []
    for second in range(seconds):
        routes = gateway.router.table.endpoint("ctr-ranker")
        for i in range(per_second):
            key = f"user-{seed}-{second}-{i}"
            version = routes.choose(key).version
            x = rng.normal(size=(1, 32)).astype(np.float32)
            if shift is not None:
                x = shift(version, x)
            with contextlib.suppress(GatewayError):
                result = gateway.inference.infer(InferRequest("ctr-ranker", {"features": x}, routing_key=key))
                if feedback is not None:
                    outcome, value = feedback(result.version, rng)
                    gateway.feedback.feedback(result.request_id, outcome, value)
        clock.advance(1)
        incidents += [i.id for i in gateway.guardian.tick().incidents]
        if incidents:
            break
    return incidents


def weights(gateway: Gateway) -> dict[str, int]:
    return dict(gateway.control.state.endpoint("ctr-ranker").weights)


@pytest.fixture
def clock() -> SimClock:
    return SimClock()


def unit_change_on(version: str) -> Row:
    """An upstream change on one version's requests: feature 3 arrives in other units (x100), no NaN."""

    def shift(served: str, x: np.ndarray) -> np.ndarray:
        if served == version:
            x[0, 3] *= 100
        return x

    return shift


@pytest.mark.parametrize(
    ("rule", "statistic", "threshold"),
    [("feature_drift[any] > 0.2 psi for 10m", "psi", 0.2), ("feature_drift[features[3]] > 0.1 ks for 10m", "ks", 0.1)],
)
def test_an_upstream_feature_shift_on_the_canary_rolls_back(
    tmp_path: Path, clock: SimClock, rule: str, statistic: str, threshold: float
) -> None:
    gateway = make(tmp_path, clock, guardrails=f'["{rule}"]', traffic='{"1.12": 50, "1.13": 50}')
    (first,) = run(gateway, clock, 200, shift=unit_change_on("1.13")) or [""]
    assert first and weights(gateway) == {"1.12": 100}
    incident = gateway.incidents.get(first)
    (verdict,) = incident.verdicts
    assert verdict["status"] == "breach" and verdict["detail"] == "feature features[3]"
    assert verdict["observed"] > threshold
    assert verdict["samples"]["1.13"] >= 1000 and verdict["samples"]["1.12"] >= 1000
    assert f"{statistic} features[3]" in verdict["values"] and verdict["threshold"] == threshold
    assert rule in incident.to_markdown()
    gateway.close()


def test_no_drift_is_a_pass_and_bins_are_learnt_first(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(
        tmp_path,
        clock,
        guardrails='["feature_drift > 0.2 psi for 10m", "feature_drift[features[3]] > 0.1 ks for 10m"]',
        traffic='{"1.12": 50, "1.13": 50}',
    )
    gateway.guardian.tick()  # the rule asks for histograms from now on
    run(gateway, clock, 10)
    report = gateway.guardian.tick()
    first = report.verdicts["ctr-ranker/1.13"][0]
    assert first.status is Status.INCONCLUSIVE and "placing the bins" in first.detail
    assert run(gateway, clock, 120) == []
    verdicts = gateway.guardian.tick().verdicts["ctr-ranker/1.13"]
    assert [v.status for v in verdicts] == [Status.PASS, Status.PASS]
    assert verdicts[0].observed < 0.1 and verdicts[1].detail == "feature features[3]"
    assert gateway.telemetry.drift.source("ctr-ranker").startswith("learnt from the first 1000 rows stable (1.12)")
    gateway.close()


def test_score_drift_compares_the_canary_scores_with_stable(tmp_path: Path, clock: SimClock) -> None:
    # 1.13's output bias is shifted: its scores are lower (KS about 0.09 against 1.12's).
    gateway = make(
        tmp_path,
        clock,
        guardrails='{rules: ["score_drift > 0.2 ks for 10m", "score_drift > 0.04 ks for 10m"], at_least: 2}',
        traffic='{"1.12": 50, "1.13": 50}',
    )
    assert run(gateway, clock, 150) == []
    loose, tight = gateway.guardian.tick().verdicts["ctr-ranker/1.13"]
    assert loose.status is Status.PASS and tight.status is Status.BREACH
    assert 0.04 < loose.observed < 0.2 and loose.samples["1.13"] >= 1000
    gateway.close()


def test_score_drift_of_a_shadow_is_measured_against_its_primary(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(
        tmp_path,
        clock,
        guardrails='["score_drift > 0.04 ks for 10m action alert-only"]',
        traffic='{"1.12": 100}',
        shadows='{"1.14": 100}',
    )
    gateway.guardian.tick()
    incidents = []
    for _ in range(100):
        incidents += run(gateway, clock, 1, per_second=40)  # its tick may see the drained copies already
        assert gateway.shadow.drain(30)
        incidents += [i.id for i in gateway.guardian.tick().incidents]
        if incidents:
            break
    (first,) = incidents
    incident = gateway.incidents.get(first)
    (verdict,) = incident.verdicts
    assert (incident.candidate, verdict["baseline"], verdict["status"]) == ("1.14", "primary", "breach")
    assert verdict["samples"]["1.14"] == verdict["samples"]["primary"] >= 1000
    assert incident.outcome.startswith("alert: shadow 1.14") and weights(gateway) == {"1.12": 100}
    gateway.close()


def revenue(canary_factor: float) -> Callable[[str, np.random.Generator], tuple[float, float | None]]:
    """Clicks at 12% on every version; a click's value is lognormal, scaled by `canary_factor` on 1.13."""

    def feedback(version: str, rng: np.random.Generator) -> tuple[float, float | None]:
        click = rng.random() < 0.12
        value = float(rng.lognormal(3, 0.5)) * (canary_factor if version == "1.13" else 1.0) if click else 0.0
        return float(click), value

    return feedback


def test_revenue_drop_with_flat_ctr_rolls_back_on_value_drop(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(
        tmp_path,
        clock,
        guardrails='["ctr_drop > 5% p < 0.05 for 30m", "value_drop > 3% p < 0.05 for 30m"]',
        traffic='{"1.12": 50, "1.13": 50}',
    )
    (first,) = run(gateway, clock, 1800, per_second=60, feedback=revenue(0.75), seed=5) or [""]
    assert first and weights(gateway) == {"1.12": 100}
    ctr, value = gateway.incidents.get(first).verdicts
    assert ctr["status"] != "breach" and value["status"] == "breach"
    assert value["p_value"] < 0.05 and value["observed"] > 0.03 and value["samples"]["1.13"] >= 1000
    assert value["values"]["candidate_value_per_request"] < value["values"]["baseline_value_per_request"]
    gateway.close()


def test_equal_value_per_request_does_not_roll_back(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(
        tmp_path, clock, guardrails='["value_drop > 3% p < 0.05 for 30m"]', traffic='{"1.12": 50, "1.13": 50}'
    )
    assert run(gateway, clock, 300, per_second=60, feedback=revenue(1.0), seed=6) == []
    (verdict,) = gateway.guardian.tick().verdicts["ctr-ranker/1.13"]
    assert verdict.status is not Status.BREACH and verdict.samples["1.13"] > 5000
    with pytest.raises(GatewayError, match="value inf must be a finite number"):
        gateway.feedback.feedback("any", 1.0, float("inf"))
    gateway.close()


def test_timeouts_on_the_canary_roll_back(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, guardrails='["timeout_rate > 1% for 5m"]', traffic='{"1.12": 50, "1.13": 50}')
    routes = gateway.router.table.endpoint("ctr-ranker")
    rng = np.random.default_rng(0)
    for second in range(10):
        for i in range(30):
            key = f"u{second}-{i}"
            late = routes.choose(key).version == "1.13" and i % 10 == 0  # a tenth of 1.13's callers gave up
            x = rng.normal(size=(1, 32)).astype(np.float32)
            with contextlib.suppress(GatewayError):
                gateway.inference.infer(
                    InferRequest("ctr-ranker", {"features": x}, routing_key=key),
                    time_left=(lambda: 0.0) if late else (lambda: 5.0),
                )
        clock.advance(1)
    canary = gateway.telemetry.windows.window(SeriesKey("ctr-ranker", "1.13")).stats(60)
    assert canary.timeouts == canary.errors > 0  # DEADLINE_EXCEEDED is a server error too
    (incident,) = gateway.guardian.tick().incidents
    (verdict,) = incident.verdicts
    assert verdict["status"] == "breach" and 0.05 < verdict["observed"] < 0.2
    assert verdict["values"]["candidate_timeouts"] > 0 and weights(gateway) == {"1.12": 100}
    gateway.close()


class Leak:
    """A fake resident-memory reader (fault injection): flat, then growing 1 MB per read once started."""

    def __init__(self) -> None:
        self.rss = 400_000_000
        self.growing = False

    def __call__(self) -> int:
        if self.growing:
            self.rss += 1_000_000
        return self.rss


def test_memory_growth_rolls_back_the_version_that_started_serving_last(tmp_path: Path, clock: SimClock) -> None:
    leak = Leak()
    gateway = make(tmp_path, clock, memory=leak, guardrails='["memory_growth > 200MB for 10m"]')
    assert run(gateway, clock, 120, per_second=5) == []  # flat: nothing to see
    (verdict,) = gateway.guardian.tick().verdicts["ctr-ranker/1.13"]
    assert verdict.status is Status.PASS and verdict.observed == 0
    leak.growing = True
    (first,) = run(gateway, clock, 400, per_second=5) or [""]
    assert first and weights(gateway) == {"1.12": 100}
    (recorded,) = gateway.incidents.get(first).verdicts
    assert recorded["status"] == "breach" and 200 < recorded["observed"] < 210
    assert (
        "attributed to 1.13 by timing only" in recorded["detail"]
        and "per process, not per version" in recorded["detail"]
    )
    gateway.close()


def test_memory_growth_after_another_version_was_loaded_is_not_pinned_on_the_canary(
    tmp_path: Path, clock: SimClock
) -> None:
    leak = Leak()
    gateway = make(tmp_path, clock, memory=leak, guardrails='["memory_growth > 200MB for 10m"]')
    run(gateway, clock, 5, per_second=5)
    gateway.registry.unload("ctr-ranker", "1.14")  # an operator loads 1.14 again: now the newest load
    clock.advance(1)
    state = gateway.control.state.endpoint("ctr-ranker")
    gateway.registry.load(state.artifacts["1.14"])
    leak.growing = True
    assert run(gateway, clock, 300, per_second=5) == []
    (verdict,) = gateway.guardian.tick().verdicts["ctr-ranker/1.13"]
    assert verdict.status is Status.INCONCLUSIVE and verdict.observed > 200
    assert "attributed by timing to ctr-ranker 1.14, not 1.13" in verdict.detail
    assert weights(gateway) == {"1.12": 90, "1.13": 10}
    gateway.close()


def test_a_reference_file_in_the_route_file_places_the_bins_without_a_warm_up(tmp_path: Path, clock: SimClock) -> None:
    root = tmp_path / "models"
    shutil.copytree(MODELS / "ctr-ranker", root / "ctr-ranker")
    rng = np.random.default_rng(9)
    np.savez(root / "ctr-ranker" / "reference.npz", features=rng.normal(size=(5000, 32)), scores=rng.random(5000) * 0.1)
    np.save(root / "broken.npy", np.zeros(3))
    text = config_text(
        guardrails='["feature_drift[any] > 0.2 psi for 10m min 200"]',
        traffic='{"1.12": 50, "1.13": 50}',
        drift_reference="ctr-ranker/reference.npz",
    ).replace(str(MODELS), str(root))
    config = parse_route_file(text, base_dir=root)
    gateway = Gateway(
        config,
        SqliteStore(tmp_path / "state.db"),
        telemetry=Telemetry(WindowStore(3600, clock=clock)),
        clock=clock,
    )
    gateway.start()
    assert gateway.control.state.endpoint("ctr-ranker").drift_reference == "ctr-ranker/reference.npz"
    gateway.guardian.tick()
    (first,) = run(gateway, clock, 60, per_second=20, shift=unit_change_on("1.13")) or [""]
    assert first  # 200 rows per arm: ten seconds, not the 1000-row warm-up
    assert gateway.telemetry.drift.source("ctr-ranker").endswith("ctr-ranker/reference.npz")
    gateway.control.apply("ci", text.replace("ctr-ranker/reference.npz", "broken.npy"), reason="bad file")
    gateway.control.set_traffic("ci", "ctr-ranker", {"1.12": 50, "1.13": 50}, reason="again")
    run(gateway, clock, 30, per_second=20)
    (verdict,) = gateway.guardian.tick().verdicts["ctr-ranker/1.13"]
    assert verdict.status is Status.INCONCLUSIVE and "expected numeric rows [rows >= 10, features]" in verdict.detail
    gateway.close()


def test_a_reference_that_is_not_numpy_is_refused_with_the_field() -> None:
    with pytest.raises(GatewayError, match=r"drift_reference.*must be a \.npy file"):
        parse_route_file(config_text(drift_reference="ref.csv"), base_dir=MODELS)


def test_the_guardian_decides_value_drop_exactly_as_the_sequential_test(tmp_path: Path, clock: SimClock) -> None:
    """The figures in tests/test_guardrails_stats.py hold for the guardian: same values in, same tick out."""
    from gateway.guardrails.sequential import Moments, SequentialMeanDropTest

    rng = np.random.default_rng(11)
    for drop in (0.0, 0.15):
        (tmp_path / str(drop)).mkdir()
        gateway = make(
            tmp_path / str(drop),
            clock,
            guardrails='["value_drop > 3% p < 0.05 for 30m"]',
            traffic='{"1.12": 50, "1.13": 50}',
        )
        windows = gateway.telemetry.windows
        canary = windows.window(SeriesKey("ctr-ranker", "1.13"))
        stable = windows.window(SeriesKey("ctr-ranker", "1.12"))
        gateway.guardian.tick()  # the experiment starts at the first tick that sees the rule
        test, sums = SequentialMeanDropTest(), {"c": [0, 0.0, 0.0], "s": [0, 0.0, 0.0]}
        expected = actual = None
        for second in range(600):
            for arm, window, factor in (("c", canary, 1 - drop), ("s", stable, 1.0)):
                for _ in range(40):
                    value = float(rng.lognormal(3, 1.0)) * factor if rng.random() < 0.12 else 0.0
                    window.record_outcome(float(value > 0), value)
                    total = sums[arm]
                    total[0] += 1
                    total[1] += value
                    total[2] += value * value
            result = test.update(Moments(*sums["c"]), Moments(*sums["s"]))  # type: ignore[arg-type]
            if expected is None and result.canary_n >= 1000 and result.p_value < 0.05 and result.relative_drop > 0.03:
                expected = second
            clock.advance(1)
            if gateway.guardian.tick().incidents:
                actual = second
                break
        assert actual == expected, (drop, actual, expected)
        if drop:
            assert actual is not None and weights(gateway) == {"1.12": 100}
        gateway.close()


def test_memory_growth_pinned_on_a_shadow_alerts_without_touching_traffic(tmp_path: Path, clock: SimClock) -> None:
    leak = Leak()
    gateway = make(
        tmp_path,
        clock,
        memory=leak,
        guardrails='["memory_growth > 200MB for 10m"]',
        traffic='{"1.12": 100}',
        shadows='{"1.14": 10}',
    )
    run(gateway, clock, 5, per_second=5)
    leak.growing = True
    (first,) = run(gateway, clock, 400, per_second=5) or [""]
    incident = gateway.incidents.get(first)
    assert incident.candidate == "1.14" and incident.outcome.startswith("alert: shadow 1.14: memory_growth > 200MB")
    assert "--off" in incident.outcome and weights(gateway) == {"1.12": 100}
    gateway.close()


def test_after_a_drift_rollback_stables_histograms_are_checked_against_their_own(
    tmp_path: Path, clock: SimClock
) -> None:
    gateway = make(
        tmp_path, clock, guardrails='["feature_drift[any] > 0.2 psi for 10m"]', traffic='{"1.12": 50, "1.13": 50}'
    )
    (first,) = run(gateway, clock, 200, shift=unit_change_on("1.13")) or [""]
    assert first and weights(gateway) == {"1.12": 100}
    assert run(gateway, clock, 601, per_second=10, seed=1) == []  # one window of stable alone, unchanged inputs
    check = gateway.incidents.get(first).verification
    assert check is not None and check["status"] == "healthy", check
    (verdict,) = check["verdicts"]
    assert verdict["baseline"] == "1.12 when the rule fired" and verdict["observed"] < 0.2
    assert verdict["samples"]["1.12"] >= 1000
    gateway.close()
