"""Orchestration: what drives the control plane from above (the guardian, rollouts, incidents).

Nothing below this layer imports it; it reads windows and rules and changes routes only
through `ControlPlane`.
"""
