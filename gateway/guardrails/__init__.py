"""Guardrail rules and statistics: the rule grammar and the sequential tests (pure, no I/O)."""
