"""Shadow traffic through a real gateway: off the critical path, exact accounting, reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.faults import Fault
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.settings import ShadowSettings
from gateway.telemetry.setup import TelemetrySettings, build_telemetry
from gateway.telemetry.tracing import Sampler
from gateway.telemetry.windows import SeriesKey
from testkit.gateways import MODELS, ONCALL_TOKEN, ROOT, RunningGateway, config_text, features, running_gateway, tensor

SHADOWED = config_text(shadows='{"1.14": 100}')


def drive(gw: RunningGateway, n: int, prefix: str = "user") -> None:
    for i in range(n):
        gw.predict(routing_key=f"{prefix}-{i}")


def test_every_copy_is_accounted_for_and_logged(tmp_path: Path) -> None:
    sessions = {
        v: ort.InferenceSession(str(MODELS / "ctr-ranker" / v / "model.onnx")) for v in ("1.12", "1.13", "1.14")
    }
    expected: dict[str, tuple[str, float, bool]] = {}  # request id -> (primary, |primary - shadow|, same decision)
    threshold = 0.05  # a CTR decision threshold: the demo's scores straddle it, so decisions sometimes differ
    config = config_text(shadows='{"1.14": 100}', shadow_compare=f"{{threshold: {threshold}}}")
    with running_gateway(config, shadow_settings=ShadowSettings(log_dir=tmp_path)) as gw:
        for i in range(60):
            x = features(1, seed=i)
            response = gw.predict(inputs=[tensor("features", x)], routing_key=f"user-{i}")
            primary, shadow = (
                float(sessions[v].run(None, {"features": x})[0][0, 0]) for v in (response.version, "1.14")
            )
            expected[response.request_id] = (
                response.version,
                abs(primary - shadow),
                (primary >= threshold) == (shadow >= threshold),
            )
        gw.predict("ctr-ranker@1.12")  # pinned: not mirrored
        assert gw.gateway.shadow.drain(10)
        mirrored, compared, dropped, errors = gw.gateway.shadow.stats.totals("ctr-ranker", "1.14")
        assert mirrored == 60 == compared + dropped + sum(errors.values())
        assert compared == 60 and dropped == 0 and errors == {}
        window = gw.gateway.telemetry.windows.window(SeriesKey("ctr-ranker", "1.14")).stats(600)
        agreeing = sum(same for _, _, same in expected.values())
        assert 0 < agreeing < 60  # both kinds occur in these inputs, so the count below tells them apart
        assert (window.compared, window.agree) == (60, agreeing)
        report = gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker"))
        assert (report.shadow_version, report.percent, report.mirrored, report.compared) == (
            "1.14",
            100,
            60,
            60,
        )
        assert (report.decisions, report.agree) == (60, agreeing)
        assert report.agreement_rate == pytest.approx(agreeing / 60)
        assert report.agreement_ci_low < report.agreement_rate < report.agreement_ci_high
        assert sorted(report.primary_versions) == sorted({v for v, _, _ in expected.values()})
        assert report.diff.max == pytest.approx(max(d for _, d, _ in expected.values()), rel=1e-4)
    lines = [json.loads(line) for line in (tmp_path / "shadow-diffs.jsonl").read_text().splitlines()]
    assert len(lines) == 60
    for line in lines:
        version, diff, same = expected[line["request_id"]]
        assert (line["shadow_version"], line["primary_version"], line["agree"]) == ("1.14", version, int(same))
        assert line["outputs"][0]["name"] == "score"
        assert line["outputs"][0]["max_abs"] == pytest.approx(diff, rel=1e-4, abs=1e-7)
        assert len(line["routing_key_hash"]) == 16 and "user-" not in json.dumps(line)
        # A copy run only in a batch has no time of its own (null): latency is compared like with like.
        assert line["primary_ms"] > 0 and (line["shadow_ms"] is None or line["shadow_ms"] > 0)
    assert any(line["shadow_ms"] is not None for line in lines)


def test_an_erroring_shadow_never_fails_the_primary() -> None:
    with running_gateway(SHADOWED) as gw:
        gw.gateway.faults.replace({("ctr-ranker", "1.14"): Fault(error_rate=1.0)})
        drive(gw, 40)  # every primary succeeds (an error would raise)
        assert gw.gateway.shadow.drain(10)
        mirrored, compared, dropped, errors = gw.gateway.shadow.stats.totals("ctr-ranker", "1.14")
        assert errors == {"UNAVAILABLE": 40} and compared == 0
        assert mirrored == compared + dropped + sum(errors.values())


def test_a_stuck_shadow_sheds_copies_beyond_its_queue_and_never_holds_a_primary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shadow's one worker is held inside the shadow model until the test lets it go: every
    primary still returns, the queue holds exactly `queue_size` copies, the rest are dropped and
    counted, and once released every copy is accounted for. (Latency with a slow shadow is
    measured in benchmarks/shadow.py, not asserted here.)"""
    settings = ShadowSettings(queue_size=4, workers=1, batch_size=1, log_dir=None)
    with running_gateway(SHADOWED, shadow_settings=settings) as gw:
        shadow_model = gw.gateway.registry.runnable("ctr-ranker", "1.14")
        original = shadow_model.run
        entered, release = threading.Event(), threading.Event()

        def stuck(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            release.wait(60)
            return original(*args, **kwargs)

        monkeypatch.setattr(shadow_model, "run", stuck)
        gw.predict(routing_key="first")
        assert entered.wait(10), "the shadow worker never took the first copy"
        drive(gw, 20, "while-stuck")  # each returns although the shadow worker cannot move
        assert not release.is_set()
        mirrored, compared, dropped, errors = gw.gateway.shadow.stats.totals("ctr-ranker", "1.14")
        assert dropped == 20 - settings.queue_size  # 4 queued behind the stuck one, the rest shed
        assert compared == 0 and errors == {}
        release.set()
        assert gw.gateway.shadow.drain(10)
        mirrored, compared, dropped, errors = gw.gateway.shadow.stats.totals("ctr-ranker", "1.14")
    assert (mirrored, compared, dropped, errors) == (21, 1 + settings.queue_size, 20 - settings.queue_size, {})


def test_shadow_span_is_linked_to_the_primary() -> None:
    exporter = InMemorySpanExporter()
    runtime = build_telemetry(TelemetrySettings(span_exporter=exporter, sampler=Sampler(1.0)))
    with running_gateway(SHADOWED, telemetry=runtime.telemetry) as gw:
        response = gw.predict(routing_key="linked")
        assert gw.gateway.shadow.drain(10)
        runtime.telemetry.spans.flush()  # type: ignore[union-attr]
        spans = {s.name: s for s in exporter.get_finished_spans()}
        shadow, primary = spans["shadow"], spans["gateway.v1.Inference/Predict"]
        assert f"{primary.context.trace_id:032x}" == response.trace_id
        (link,) = shadow.links
        assert (link.context.trace_id, link.context.span_id) == (
            primary.context.trace_id,
            primary.context.span_id,
        )
        attributes = dict(shadow.attributes or {})
        assert attributes["gateway.shadow_version"] == "1.14"
        assert attributes["gateway.request_id"] == response.request_id
    runtime.shutdown()


def test_set_shadow_is_audited_validated_and_blocks_unload() -> None:
    with running_gateway() as gw:
        change = gw.admin(
            "SetShadow",
            pb.SetShadowRequest(endpoint="ctr-ranker", version="1.14", percent=25, reason="try 1.14"),
        )
        assert change.revision == 2
        assert [(c.path, c.before, c.after) for c in change.changes] == [("ctr-ranker shadow 1.14", "", "25")]
        assert gw.gateway.router.table.endpoint("ctr-ranker").shadows == {"1.14": 25}
        with pytest.raises(grpc.RpcError) as busy:
            gw.admin("UnloadVersion", pb.UnloadVersionRequest(endpoint="ctr-ranker", version="1.14", reason="x"))
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is a shadow" in busy.value.details()
        with pytest.raises(grpc.RpcError) as bad:
            gw.admin(
                "SetShadow",
                pb.SetShadowRequest(endpoint="ctr-ranker", version="1.14", percent=150, reason="x"),
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "0 to 100" in bad.value.details()
        off = gw.admin(
            "SetShadow", pb.SetShadowRequest(endpoint="ctr-ranker", version="1.14", percent=0, reason="done")
        )
        assert off.revision == 3 and gw.gateway.router.table.endpoint("ctr-ranker").shadows == {}
        audit = gw.admin("GetAudit", pb.GetAuditRequest(endpoint="ctr-ranker")).entries
        assert [e.action for e in audit[:2]] == ["shadow", "shadow"]
        with pytest.raises(grpc.RpcError) as none:
            gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker", shadow_version="1.13"))
        assert none.value.code() == grpc.StatusCode.NOT_FOUND


def test_divergent_inputs_are_kept_for_replay(tmp_path: Path) -> None:
    with running_gateway(SHADOWED, shadow_settings=ShadowSettings(log_dir=tmp_path, keep_divergent=3)) as gw:
        for i in range(20):
            gw.predict(inputs=[tensor("features", features(1, seed=i))], routing_key=f"k{i}")
        assert gw.gateway.shadow.drain(10)
        report = gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker", top=3))
    kept = sorted((tmp_path / "divergent").glob("*.npz"))
    assert len(kept) == 3
    assert {p.stem for p in kept} == {d.request_id for d in report.top_divergent}
    assert np.load(kept[0])["features"].shape == (1, 32)


def test_diff_log_is_rotated_and_bounded(tmp_path: Path) -> None:
    settings = ShadowSettings(log_dir=tmp_path, log_max_bytes=3000, log_backups=1)
    with running_gateway(SHADOWED, shadow_settings=settings) as gw:
        drive(gw, 80)
        assert gw.gateway.shadow.drain(10)
    files = sorted(tmp_path.glob("shadow-diffs.jsonl*"))
    assert [f.name for f in files] == ["shadow-diffs.jsonl", "shadow-diffs.jsonl.1"]
    assert sum(f.stat().st_size for f in files) <= 2 * 3000 + 1000


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.slow
def test_report_cli_table_json_and_html_in_chromium(tmp_path: Path) -> None:
    with running_gateway(SHADOWED) as gw:
        drive(gw, 30)
        assert gw.gateway.shadow.drain(10)
        env = {**os.environ, "GATEWAY_ADMIN_TARGET": gw.admin_target, "GATEWAY_ADMIN_TOKEN": ONCALL_TOKEN}
        command = [sys.executable, "-m", "gateway.cli", "report", "shadow", "ctr-ranker", "--since", "15m"]
        text = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)
        page = tmp_path / "report.html"
        as_json = subprocess.run(
            [*command, "--json", "--html", str(page)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    assert text.returncode == 0, text.stderr
    assert "shadow ctr-ranker 1.14 (100% mirrored), last 900 s" in text.stdout
    assert "mirrored 30, compared 30, dropped 0, shadow errors 0" in text.stdout
    body = json.loads(as_json.stdout)
    assert body["compared"] == 30 and body["window_seconds"] == 900
    document = page.read_text()
    assert "<svg" in document and "http://" not in document.replace('xmlns="http://www.w3.org/2000/svg"', "")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); the HTML was checked as text only")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 2 and 'class="bar"' in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.exists() and shot.stat().st_size > 10_000


def test_latency_is_compared_like_with_like_when_copies_run_in_batches(tmp_path: Path) -> None:
    # Copies queue up for 0.3 s and run as one batch; a 20 ms delay on the shadow must show as
    # 20 ms per request, not 20 ms shared out over the batch (which made a slower shadow look faster).
    settings = ShadowSettings(log_dir=tmp_path, poll_seconds=0.3)
    with running_gateway(SHADOWED, shadow_settings=settings) as gw:
        gw.gateway.faults.replace({("ctr-ranker", "1.14"): Fault(latency_ms=20)})
        drive(gw, 40)
        assert gw.gateway.shadow.drain(10)
        report = gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker"))
    assert report.compared == 40 and 1 <= report.latency_samples < 40  # batches formed; one timed per batch
    assert report.shadow_latency_ms.p50 >= 20 > report.primary_latency_ms.p50
    assert "alone" in report.latency_measure and "paired" in report.latency_measure
    lines = [json.loads(line) for line in (tmp_path / "shadow-diffs.jsonl").read_text().splitlines()]
    timed = [line for line in lines if line["shadow_ms"] is not None]
    assert len(timed) == report.latency_samples and all(line["shadow_ms"] >= 20 for line in timed)


def test_shadow_history_survives_a_restart_through_the_diff_log(tmp_path: Path) -> None:
    store = tmp_path / "state.db"
    logs = tmp_path / "shadow"
    with running_gateway(SHADOWED, store_path=store, shadow_settings=ShadowSettings(log_dir=logs)) as gw:
        drive(gw, 30)
        assert gw.gateway.shadow.drain(10)
        gw.gateway.faults.replace({("ctr-ranker", "1.14"): Fault(error_rate=1.0)})
        drive(gw, 5, "failing")
        assert gw.gateway.shadow.drain(10)
        gw.admin("SetShadow", pb.SetShadowRequest(endpoint="ctr-ranker", version="1.14", percent=0, reason="done"))
        before = gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker", shadow_version="1.14"))
    with running_gateway(SHADOWED, store_path=store, shadow_settings=ShadowSettings(log_dir=logs)) as gw:
        after = gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker", shadow_version="1.14"))
        assert (after.mirrored, after.compared, dict(after.errors)) == (35, 30, {"UNAVAILABLE": 5})
        assert (after.decisions, after.agree) == (before.decisions, before.agree)
        assert after.diff.max == pytest.approx(before.diff.max, rel=1e-5)
        assert "read back from the diff log" in after.note
        # Switched off before the restart, it is still the endpoint's only shadow on record.
        unnamed = gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker"))
        assert (unnamed.shadow_version, unnamed.percent, unnamed.compared) == ("1.14", 0, 30)


def test_without_a_diff_log_a_restart_is_told_apart_from_never_a_shadow(tmp_path: Path) -> None:
    store = tmp_path / "state.db"
    with running_gateway(SHADOWED, store_path=store) as gw:
        drive(gw, 10)
        assert gw.gateway.shadow.drain(10)
        gw.admin("SetShadow", pb.SetShadowRequest(endpoint="ctr-ranker", version="1.14", percent=0, reason="done"))
    with running_gateway(SHADOWED, store_path=store) as gw:
        report = gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker", shadow_version="1.14"))
        assert report.mirrored == 0 and "nothing recorded since this gateway started" in report.note
        with pytest.raises(grpc.RpcError) as never:
            gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker", shadow_version="1.13"))
        assert never.value.code() is grpc.StatusCode.NOT_FOUND
        assert "1.13 has never been a shadow" in (never.value.details() or "")
        with pytest.raises(grpc.RpcError) as unnamed:
            gw.admin("GetShadowReport", pb.GetShadowReportRequest(endpoint="ctr-ranker"))
        assert "has no shadow now; earlier shadows: 1.14" in (unnamed.value.details() or "")
