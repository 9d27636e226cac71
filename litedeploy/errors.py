"""User-facing error types: each message says what is wrong and what to change."""

from __future__ import annotations


class LiteDeployError(Exception):
    """Base of every error litedeploy raises on purpose."""


class ModelLoadError(LiteDeployError, ValueError):
    """The model folder or file cannot be loaded as asked (bad config, shapes, formats)."""


class ModelNotFoundError(LiteDeployError, FileNotFoundError):
    """A path, a config.json, a shard or the embedded default model is missing."""


class RequestError(LiteDeployError, ValueError):
    """A generation request that can never be served (too long, bad parameters)."""
