"""Bounds on what a caller may send: every string the gateway stores, logs or echoes has a length limit.

A caller-chosen string that is kept (a request id in the feedback join, a reason in the
audit log) or echoed (in a response or an error message) costs memory, disk or bandwidth the
caller does not pay for. Each has a limit here, checked where the value enters the domain;
over it the request is refused with INVALID_ARGUMENT naming the field and the limit.
Together with the count limits (the feedback join keeps at most 200,000 ids, the audit is
paged), this bounds the bytes any caller can make the gateway hold.
"""

from __future__ import annotations

from gateway.errors import InvalidInput

#: Request ids and routing keys (Predict, ModelInfer, Feedback).
MAX_ID_CHARS = 256
#: `model` of a request: `name`, `name@version` or `name:label`, and version and label names.
MAX_NAME_CHARS = 256
#: Tensor names, output names and other identifiers a request lists.
MAX_TENSOR_NAME_CHARS = 256
#: Inputs or outputs one request may name.
MAX_TENSORS = 64
#: The `reason` of an admin change (it goes into the audit log).
MAX_REASON_CHARS = 1024
#: A model path given to LoadVersion.
MAX_PATH_CHARS = 4096
#: A route file applied through Apply (and read at start).
MAX_DOCUMENT_BYTES = 1 << 20
#: Nesting depth of a route file's YAML (the real schema needs 4).
MAX_DOCUMENT_DEPTH = 32
#: Guardrail rules per endpoint, and the length of one rule line.
MAX_RULES = 32
MAX_RULE_CHARS = 256
#: Steps of one rollout.
MAX_STEPS = 100
#: Largest page of list RPCs (revisions, incidents, audit entries) by count.
MAX_PAGE = 1000
#: Longest status message sent to a caller; longer ones are cut (they may quote caller input).
MAX_ERROR_CHARS = 800


def check_text(value: str, field: str, limit: int) -> str:
    """`value` when it has at most `limit` characters and no NUL; InvalidInput naming the field otherwise."""
    if len(value) > limit:
        raise InvalidInput(f"{field} has {len(value)} characters; at most {limit} are accepted", field=field)
    if "\x00" in value:
        raise InvalidInput(f"{field} contains a NUL character", field=field)
    return value


def check_count(count: int, field: str, limit: int) -> None:
    """InvalidInput naming the field when a list has more than `limit` entries."""
    if count > limit:
        raise InvalidInput(f"{field} has {count} entries; at most {limit} are accepted", field=field)


def check_rules(rules: list[str], field: str = "rules") -> None:
    """At most MAX_RULES rule lines of at most MAX_RULE_CHARS each (InvalidInput naming the field)."""
    check_count(len(rules), field, MAX_RULES)
    for index, rule in enumerate(rules):
        check_text(rule, f"{field}[{index}]", MAX_RULE_CHARS)


def shorten(value: str, limit: int = 64) -> str:
    """`value` as it may appear in a message: its repr, cut to about `limit` characters."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"
