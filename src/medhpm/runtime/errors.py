"""The errors a training run stops with; each message says why, and what to do about it."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN or infinite loss; a checkpoint was written first."""


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run; the message says where its last checkpoint is and how to resume it."""
