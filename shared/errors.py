"""Errors the whole project raises for bad input and failed stages, mapped to gRPC status codes in one place."""

from __future__ import annotations


class RequestError(ValueError):
    """An invalid user request: names the field and the rule it breaks (-> INVALID_ARGUMENT)."""

    def __init__(self, field: str, rule: str):
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")
