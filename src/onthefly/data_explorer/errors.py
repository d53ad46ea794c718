"""Errors of the training-dynamics record, shared by the recorder and the views over it."""

from __future__ import annotations


class DynamicsError(RuntimeError):
    """The dynamics folder or a new record does not fit what was recorded before."""
