"""Errors the control plane reports to an operator: a stable code and a message safe to print."""

from __future__ import annotations


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
