"""Pick the model for a generation from the catalogue: priority, health, cost."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from atelier import model_health
from atelier.catalogue import ModelEntry, rank
from atelier.messages import ModelChoice, SelectModelRequest


class ModelActivities:
    def __init__(self, engine: AsyncEngine, catalogue: list[ModelEntry], *, failure_threshold: int,
                 failure_window_s: float, available_providers: set[str]) -> None:
        self.engine = engine
        self.catalogue = [m for m in catalogue if m.provider in available_providers]
        self.failure_threshold = failure_threshold
        self.failure_window_s = failure_window_s

    @activity.defn
    async def select_model(self, req: SelectModelRequest) -> ModelChoice:
        """The best model not yet tried; an empty choice when none is left."""
        unhealthy = await model_health.unhealthy_models(
            self.engine, threshold=self.failure_threshold, window_s=self.failure_window_s
        )
        ranked = rank(self.catalogue, req.kind, set(req.exclude), unhealthy)
        if not ranked:
            return ModelChoice()
        best = ranked[0]
        declared = best.max_concurrent is not None or best.per_minute is not None
        return ModelChoice(model=best.name, provider=best.provider, priority=best.priority,
                           max_concurrent=best.max_concurrent, per_minute=best.per_minute,
                           # Calls queue for admission where a quota is declared, and for every
                           # remote provider (an undeclared quota is learned from crowds of 429s;
                           # docs/quotas.md). The local compositor without a quota does not.
                           admission=declared or best.provider != "local")
