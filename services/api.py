"""The entry service: every public endpoint under one port and one OpenAPI document.

Each model runs in its own BentoML service with its own workers, batching and readiness; this service
validates requests, forwards them with ``bentoml.depends``, and shapes the responses.

    bentoml serve services.api:Api
"""

from __future__ import annotations

import bentoml

from services.http import JsonOnlyMiddleware
from services.schemas.common import ModelInfo
from services.schemas.sentiment import SentimentRequest, SentimentResponse
from services.sentiment import Sentiment
from services.settings import SETTINGS


@bentoml.service(name="rnnserve", traffic={"timeout": SETTINGS.timeout_s})
class Api:
    sentiment = bentoml.depends(Sentiment)

    def __init__(self) -> None:
        self._model_info: dict[str, ModelInfo] = {}

    async def _info(self, name: str, service) -> ModelInfo:
        if name not in self._model_info:
            info = await service.to_async.info()
            self._model_info[name] = ModelInfo.model_validate(info, from_attributes=True)
        return self._model_info[name]

    @bentoml.api(route="/v1/sentiment")
    async def classify_sentiment(self, request: SentimentRequest, /) -> SentimentResponse:
        """Classifies one text or a list of texts as negative or positive."""
        results = await self.sentiment.to_async.classify(request.items())
        return SentimentResponse(model=await self._info("sentiment", self.sentiment), results=results)

    @bentoml.api(route="/v1/models")
    async def models(self) -> list[ModelInfo]:
        """Every model this server answers with: name, version, cell and held-out metrics."""
        return [await self._info("sentiment", self.sentiment)]


Api.add_asgi_middleware(JsonOnlyMiddleware)
