"""Kept only for `deployments/services/__main__.py` (owned by the deploy work of issue 14), which still
imports `ServiceError` from here: a refusal is the kit's `deployments.gateway.refusal.Refusal`. Delete this
module once that import is `from deployments.gateway.refusal import Refusal`."""

from __future__ import annotations

from deployments.gateway.refusal import Refusal as ServiceError

__all__ = ["ServiceError"]
