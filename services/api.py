"""The entry service: every public endpoint under one port and one OpenAPI document.

The short, stateless models (sentiment, forecast windows) run inside each entry worker, batched by
BentoML's adaptive batcher there (services/inprocess.py): a second HTTP hop cost more than the model.
The generative models (caption, translate) and the stateful forecast sessions run in their own
BentoML services with their own workers, batching and readiness; this service validates requests,
forwards them with ``bentoml.depends``, and shapes the responses.

    bentoml serve services.api:Api
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import bentoml
import torch

import services.bentoml_compat  # noqa: F401 - patches BentoML: no URL fetches, less per-request overhead
from services import fast_routes
from services.admission import Body, Deadline, InFlight, Routes, Token
from services.body_checks import form_specs
from services.caption import Caption, caption_response, prepare_item, read_upload
from services.errors import ServiceError, to_service_error
from services.fast_routes import FastRoutes
from services.forecast import Forecast, session_answer, window_response
from services.forecasting import WindowModel
from services.inprocess import Batcher, InProcessModel
from services.lifecycle import Readyz, settle_heap
from services.metrics import FORECAST_REQUESTS_TOTAL
from services.observability import RequestId
from services.openapi import Docs
from services.schemas.caption import (
    BeamSize,
    CaptionRequest,
    CaptionResponse,
    CaptionSpec,
    MaxLength,
    StreamRequest,
)
from services.schemas.common import ModelInfo
from services.schemas.forecast import (
    Deleted,
    ForecastMismatchError,
    ForecastRequest,
    ForecastResponse,
    ForecastSpec,
    SessionCreateRequest,
    SessionInfo,
    SessionRef,
    SessionState,
    StepItem,
    StepRequest,
    check_forecast,
)
from services.schemas.sentiment import SentimentRequest, SentimentResponse
from services.schemas.status import ModelStatus
from services.schemas.translate import TranslateRequest, TranslateResponse, TranslateStreamRequest
from services.sentiment import SentimentModel
from services.settings import SETTINGS
from services.translate import Translate

# Model services this process tree starts itself (no URL set: the embedded default, `make serve`); the
# others run on their own (deploy/k8s: one Deployment per model) and are reached by URL.
EMBEDDED = tuple(name for name, block in (("forecast", SETTINGS.forecast), ("caption", SETTINGS.caption),
                                          ("translate", SETTINGS.translate)) if not block.url)
# BentoML's own dependency probe waits runner_probe.timeout (1 s) per service: the same here, so that
# /readyz answers well within the Kubernetes probes' timeoutSeconds (3).
DEPENDENCY_PROBE_TIMEOUT_S = 1
STATUS_TIMEOUT_S = 2.0  # GET /v1/models: a model service that has not answered by then is unavailable


@bentoml.service(name="rnnserve", workers=SETTINGS.http.api_workers,
                  traffic={"timeout": SETTINGS.http.timeout_s},
                  backlog=SETTINGS.http.api_backlog,
                  # Readiness is __is_ready__'s alone: BentoML's probe would also wait for the model
                  # services reached by URL, which are ready (or not) on their own.
                  runner_probe={"enabled": False},
                  **SETTINGS.observability(access_log=True))
class Api:
    # Run in this worker (services/inprocess.py): checksum-verified from the model store by tag.
    sentiment_model = bentoml.models.BentoModel(SETTINGS.sentiment.model)
    forecast_model = bentoml.models.BentoModel(SETTINGS.forecast.model)
    # Own services: sessions (one process holds them), captioning and translation.
    # With RNNSERVE_<MODEL>_URL set, bentoml.depends(url=...) calls that service there (JSON over HTTP)
    # and `bentoml serve` does not start it.
    forecast = bentoml.depends(Forecast, url=SETTINGS.forecast.url or None)
    caption = bentoml.depends(Caption, url=SETTINGS.caption.url or None)
    translate = bentoml.depends(Translate, url=SETTINGS.translate.url or None)

    def __init__(self) -> None:
        torch.set_num_threads(SETTINGS.http.api_threads)
        batching = SETTINGS.batching == "on"
        # The device is resolved inside each load: cuda without a usable GPU keeps only that model out.
        self.sentiment = InProcessModel(
            "sentiment", lambda: SentimentModel.load(self.sentiment_model, SETTINGS.torch_device()))
        self.windows = InProcessModel(
            "forecast", lambda: WindowModel.load(self.forecast_model, SETTINGS.torch_device()))
        largest = max(SETTINGS.sentiment.max_batch_size, SETTINGS.forecast.max_batch_size)
        self.sentiment_batcher = Batcher(
            "sentiment", lambda encoded: self.sentiment.get().classify(encoded), method_name="classify",
            max_batch_size=SETTINGS.sentiment.max_batch_size,
            max_latency_ms=SETTINGS.sentiment.max_latency_ms, batching=batching,
            histogram_max_batch_size=largest)
        self.forecast_batcher = Batcher(
            "forecast", lambda requests: self.windows.get().forecast(requests), method_name="forecast",
            max_batch_size=SETTINGS.forecast.max_batch_size,
            max_latency_ms=SETTINGS.forecast.max_latency_ms, batching=batching,
            histogram_max_batch_size=largest)
        self._model_info: dict[str, ModelInfo] = {}
        self._caption_spec: CaptionSpec | None = None
        # The hot routes skip BentoML's per-request machinery (services/fast_routes.py).
        fast_routes.register("/v1/sentiment", SentimentRequest, self.classify_sentiment)
        fast_routes.register("/v1/forecast", ForecastRequest, self.forecast_prices)
        # Translate too: under 64 clients the entry's BentoML machinery cost more than forwarding (issue 16).
        fast_routes.register("/v1/translate", TranslateRequest, self.translate_text)
        settle_heap()

    async def __is_ready__(self) -> bool:
        """Ready when what this process tree serves is: the models in this worker and the model
        services it started itself. A service reached by URL is not waited for: while it is down only
        its own endpoints answer 503, and /v1/models says so."""
        if not (self.sentiment.ready and self.windows.ready):
            return False
        clients = [getattr(self, name) for name in EMBEDDED]
        checks = [client.is_ready(DEPENDENCY_PROBE_TIMEOUT_S) for client in clients
                  if hasattr(client, "is_ready")]
        try:
            return all(await asyncio.gather(*checks))
        except Exception:  # a worker restarting refuses connections: not ready, and /readyz says which
            return False

    async def _status(self, name: str, service) -> ModelStatus:
        try:
            info = await asyncio.wait_for(service.to_async.info(), STATUS_TIMEOUT_S)
        except Exception as exc:
            return ModelStatus.unavailable(name, to_service_error(exc).message)
        self._model_info[name] = ModelInfo.model_validate(info, from_attributes=True)
        return ModelStatus.ready(self._model_info[name])

    async def _info(self, name: str, service) -> ModelInfo:
        if name not in self._model_info:
            info = await service.to_async.info()
            self._model_info[name] = ModelInfo.model_validate(info, from_attributes=True)
        return self._model_info[name]

    @bentoml.api(route="/v1/sentiment")
    async def classify_sentiment(self, request: SentimentRequest, /) -> SentimentResponse:
        """Classifies one text or a list of texts as negative or positive."""
        model = self.sentiment.get()
        texts = request.items()
        encoded = model.encode(texts, request.item_field)
        results = await self.sentiment_batcher(encoded)
        return SentimentResponse(model=model.model_info, results=results)

    @bentoml.api(route="/v1/forecast")
    async def forecast_prices(self, request: ForecastRequest, /) -> ForecastResponse:
        """Forecasts the close for the next 1..horizon business days from a window of daily bars.

        Research/demo output: no trading advice.
        """
        windows = self.windows.get()
        spec = windows.public_spec
        try:
            check_forecast(request, spec)
        except ForecastMismatchError as exc:
            FORECAST_REQUESTS_TOTAL.labels("forecast", "invalid").inc()
            raise ServiceError(400, "invalid_request", str(exc), exc.field) from exc
        [result] = await self.forecast_batcher([request])
        FORECAST_REQUESTS_TOTAL.labels("forecast", "ok").inc()
        return window_response(request, result, spec, windows.model_info)

    @bentoml.api(route="/v1/forecast/spec")
    async def forecast_spec(self) -> ForecastSpec:
        """Rows the forecast model needs, its horizons and quantiles, and the session limits."""
        return self.windows.get().public_spec

    @bentoml.api(route="/v1/forecast/sessions")
    async def create_forecast_session(self, request: SessionCreateRequest, /) -> SessionInfo:
        """Opens a streaming session, optionally warmed with history; 429 when the limit is reached."""
        return session_answer(await self.forecast.to_async.create_session(history=request.history))

    @bentoml.api(route="/v1/forecast/sessions/step")
    async def step_forecast_session(self, request: StepRequest, /) -> SessionInfo:
        """Posts one new bar to a session and returns the next business day's forecast."""
        item = StepItem(session_id=request.session_id, bar=request.bar)
        [result] = await self.forecast.to_async.step([item])
        return session_answer(result)

    @bentoml.api(route="/v1/forecast/sessions/get")
    async def get_forecast_session(self, request: SessionRef, /) -> SessionInfo:
        """Reads a session: bars seen, last bar, latest forecast."""
        return session_answer(await self.forecast.to_async.get_session(session_id=request.session_id))

    @bentoml.api(route="/v1/forecast/sessions/delete")
    async def delete_forecast_session(self, request: SessionRef, /) -> Deleted:
        """Closes a session and frees its state."""
        answer = session_answer(await self.forecast.to_async.delete_session(session_id=request.session_id))
        return Deleted(session_id=answer.session_id)

    @bentoml.api(route="/v1/forecast/sessions/export")
    async def export_forecast_session(self, request: SessionRef, /) -> SessionState:
        """Returns a session's hidden state, to resume it on another replica with import."""
        result = await self.forecast.to_async.export_session(session_id=request.session_id)
        return session_answer(result, "state")

    @bentoml.api(route="/v1/forecast/sessions/import")
    async def import_forecast_session(self, request: SessionState, /) -> SessionInfo:
        """Opens a new session from an exported state (same model version only)."""
        return session_answer(await self.forecast.to_async.import_session(state=request))

    async def _caption_input_spec(self) -> CaptionSpec:
        if self._caption_spec is None:
            spec = await self.caption.to_async.spec()
            self._caption_spec = CaptionSpec.model_validate(spec, from_attributes=True)
        return self._caption_spec

    async def _caption(self, data: bytes, beam_size: int, max_length: int | None) -> CaptionResponse:
        decoded, item = await prepare_item(data, await self._caption_input_spec(), beam_size, max_length)
        [result] = await self.caption.to_async.caption([item])
        return caption_response(result, decoded, item, await self._info("caption", self.caption))

    @bentoml.api(route="/v1/caption")
    async def caption_image(self, request: CaptionRequest, /) -> CaptionResponse:
        """Captions one image sent as base64 (PNG, JPEG or WebP; any size and mode)."""
        return await self._caption(request.image_bytes(), request.beam_size, request.max_length)

    @bentoml.api(route="/v1/caption/upload")
    async def caption_upload(self, image: Path, beam_size: BeamSize = 1,
                             max_length: MaxLength = None) -> CaptionResponse:
        """Captions one image uploaded as multipart/form-data (field ``image``)."""
        return await self._caption(read_upload(image), beam_size, max_length)

    @bentoml.api(route="/v1/caption/stream")
    async def caption_stream(self, request: StreamRequest, /) -> AsyncGenerator[str, None]:
        """Greedy captioning as server-sent events: one per word as it is decoded, then a summary."""
        _, item = await prepare_item(request.image_bytes(), await self._caption_input_spec(), 1,
                                     request.max_length)
        async for line in self.caption.to_async.stream(item=item):
            yield line

    @bentoml.api(route="/v1/caption/spec")
    async def caption_spec(self) -> CaptionSpec:
        """The caption model's input size, normalisation, formats and limits."""
        return await self._caption_input_spec()

    @bentoml.api(route="/v1/translate")
    async def translate_text(self, request: TranslateRequest, /) -> TranslateResponse:
        """Translates one English text or a list into Spanish (greedy for beam_size 1, else beam search).

        Texts of concurrent requests are batched together; each keeps its own options.
        """
        results = await self.translate.to_async.translate(request.items())
        return TranslateResponse(model=await self._info("translate", self.translate), results=results)

    @bentoml.api(route="/v1/translate/stream")
    async def translate_stream(self, request: TranslateStreamRequest, /) -> AsyncGenerator[str, None]:
        """Greedy translation as server-sent events: ``{"delta": ...}`` as text is decoded, then a
        ``{"done": true, "translation": ...}`` summary. Each stream is a row of the translate
        service's shared decode loop, so concurrent streams share its steps.
        """
        buffer = ""  # the dependency's byte chunks need not align with events: re-frame on blank lines
        async for chunk in self.translate.to_async.stream(text=request.text, max_length=request.max_length):
            buffer += chunk
            *frames, buffer = buffer.split("\n\n")
            for frame in frames:
                yield frame + "\n\n"
        if buffer.strip():
            yield buffer + "\n\n"

    @bentoml.api(route="/v1/models")
    async def models(self) -> list[ModelStatus]:
        """Every model and its state: ready (name, version, cell, held-out metrics) or unavailable
        (and why). A model that is down does not fail this call."""
        local = [ModelStatus.ready(model.get().model_info) if model.ready else
                 ModelStatus.unavailable(model.name, model.error or "not loaded")
                 for model in (self.sentiment, self.windows)]
        remote = await asyncio.gather(self._status("caption", self.caption),
                                      self._status("translate", self.translate))
        return [*local, *remote]


# Outermost first (services/admission.py): the request id (services/observability.py), routes,
# readiness and docs, then the admission of API
# requests. Caption routes take a base64 or uploaded image, so their body limit follows the image limit.
BODY_LIMITS = {"/v1/caption": (SETTINGS.caption.max_image_bytes + 2) // 3 * 4 + (1 << 16)}
Api.add_asgi_middleware(RequestId, max_chars=SETTINGS.http.max_request_id_chars)
Api.add_asgi_middleware(Routes, api_routes=[method.route for method in Api.apis.values()])
Api.add_asgi_middleware(Readyz, service=Api)
Api.add_asgi_middleware(Docs, service=Api, prefix="/v1/", token_paths=SETTINGS.http.api_token_paths,
                        token_enabled=bool(SETTINGS.http.api_token),
                        max_body_bytes=SETTINGS.http.max_body_bytes,
                        body_limits=BODY_LIMITS)
Api.add_asgi_middleware(Token, token=SETTINGS.http.api_token, paths=SETTINGS.http.api_token_paths.split(","))
Api.add_asgi_middleware(InFlight, limit=SETTINGS.http.max_in_flight)
Api.add_asgi_middleware(Body, max_body_bytes=SETTINGS.http.max_body_bytes, body_limits=BODY_LIMITS,
                        media_types={"/v1/caption/upload": "multipart/form-data"}, forms=form_specs(Api),
                        max_json_depth=SETTINGS.http.max_json_depth,
                        body_timeout_s=SETTINGS.http.body_timeout_s,
                        no_fields=frozenset(method.route for method in Api.apis.values()
                                            if not method.input_spec.model_fields))
# Just under BentoML's traffic.timeout, so that this shaped 503 answers before BentoML's bare 504.
Api.add_asgi_middleware(Deadline, timeout_s=max(SETTINGS.http.timeout_s - 0.5, SETTINGS.http.timeout_s * 0.5))
Api.add_asgi_middleware(FastRoutes)
