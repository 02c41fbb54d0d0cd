"""Telemetry: sliding windows for decisions, OpenTelemetry metrics for dashboards, traces.

One measurement call per request (`Telemetry.record`) feeds both the in-process windows the
guardrails read and the OpenTelemetry instruments that Prometheus and OTLP export.
"""
