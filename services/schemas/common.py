"""Schemas shared by every endpoint."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelInfo(BaseModel):
    """Which artifact answered: the model store tag and what it was trained as."""

    name: str = Field(description="Model name in the BentoML model store.", examples=["sentiment"])
    version: str = Field(description="Model store version (sha256 prefix of the artifact).",
                         examples=["c1ed897c08e83735"])
    task: str = Field(description="What the model does.", examples=["sentiment"])
    cell: str = Field(description="Recurrent cell: rnn_tanh, gru or lstm.", examples=["lstm"])
    metrics: dict[str, Any] = Field(default_factory=dict,
                                    description="Held-out metrics recorded at export.")
