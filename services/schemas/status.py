"""What GET /v1/models answers: each model's state, and what it is when it is ready."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from services.schemas.common import ModelInfo


class ModelStatus(BaseModel):
    """One model: ready (with its model-store tag and training record) or unavailable (and why)."""

    name: str = Field(description="Model name in the BentoML model store.", examples=["translate"])
    state: Literal["ready", "unavailable"] = Field(
        description="unavailable: its artifact failed to load, or its service is down or starting; its "
                    "endpoints answer 503 with Retry-After meanwhile.", examples=["ready"])
    version: str | None = Field(None, description="Model store version, when ready.",
                                examples=["c1ed897c08e83735"])
    task: str | None = Field(None, description="What the model does, when ready.", examples=["translate"])
    cell: str | None = Field(None, description="Recurrent cell, when ready.", examples=["gru"])
    metrics: dict[str, Any] = Field(default_factory=dict, description="Held-out metrics recorded at export.")
    reason: str | None = Field(None, description="Why it is unavailable.")

    @classmethod
    def ready(cls, info: ModelInfo) -> ModelStatus:
        return cls(state="ready", **info.model_dump())

    @classmethod
    def unavailable(cls, name: str, reason: str) -> ModelStatus:
        return cls(name=name, state="unavailable", reason=reason)
