"""Guardrails: rules, the sequential CTR test, the guardian loop, rollouts and incidents."""
