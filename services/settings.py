"""Service settings, read once from the environment (``RNNSERVE_*``), validated and typed.

Every batching, device and limit knob of the services lives here, so an operator can set them from a
Kubernetes ConfigMap without touching code. Invalid values stop the service at start with a message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

PREFIX = "RNNSERVE_"


@dataclass(frozen=True)
class Settings:
    # Where models run: cpu, cuda, or auto (cuda when available).
    device: str = "auto"
    # Sentiment model service. max_latency_ms bounds how long a request may wait in the batcher;
    # requests the batcher predicts it cannot serve in time are shed with 503 (BentoML's default of
    # 60 s is no bound at all).
    sentiment_model: str = "sentiment:latest"
    sentiment_max_batch_size: int = 64
    sentiment_max_latency_ms: int = 1000
    sentiment_workers: int = 1
    sentiment_threads: int = 1
    # Length groups (services/batching.py plan_groups): a merged batch is split into at most
    # sentiment_length_groups model calls when that lowers the modelled cost; the cost of a time step
    # and of a call are in padded positions, fitted by load/bench.py (load/RESULTS.md). 1 = off.
    # Fitted on the BiLSTM: a call costs ~740 padded positions, a step ~40, so only a long tail splits.
    sentiment_length_groups: int = 4
    sentiment_group_step_tokens: int = 40
    sentiment_group_call_tokens: int = 740
    # Forecast model service. It always runs ONE worker: sessions (hidden states) live in that
    # worker's memory. Idle sessions expire after forecast_session_ttl_s; creating one more than
    # forecast_max_sessions answers 429.
    forecast_model: str = "forecast:latest"
    forecast_max_batch_size: int = 64
    forecast_max_latency_ms: int = 1000
    forecast_threads: int = 1
    forecast_max_rows: int = 2000
    forecast_max_sessions: int = 10000
    forecast_session_ttl_s: int = 900
    # Caption model service. Uploads are checked against the byte and pixel limits before any pixel
    # is decoded (a decompression bomb is refused from its header); beam and length are per request.
    caption_model: str = "caption:latest"
    caption_max_batch_size: int = 32
    caption_max_latency_ms: int = 2000
    caption_workers: int = 1
    caption_threads: int = 1
    caption_max_image_bytes: int = 8 * 1024 * 1024
    caption_max_image_pixels: int = 4096 * 4096
    caption_max_beam_size: int = 8
    caption_max_length: int = 64
    # Translation model service. Items of concurrent requests are batched and grouped by their
    # decoding options; streams (greedy) run one decode loop each, outside the batcher.
    translate_model: str = "translate:latest"
    translate_max_batch_size: int = 32
    translate_max_latency_ms: int = 5000
    translate_workers: int = 1
    translate_threads: int = 1
    translate_max_text_chars: int = 500
    translate_max_length: int = 80
    translate_max_beam_size: int = 8
    # "off" declares the batchable model APIs (sentiment, forecast) non-batchable: each request
    # calls the model with its own items. Only for measuring what batching buys (load/bench.py):
    # BentoML needs max_batch_size >= 2, so a batch size of 1 cannot express "off".
    batching: str = "on"
    # OpenTelemetry tracing of requests (BentoML's ASGI middleware, every service). "off" excludes every
    # URL from it: creating a span per request was 0.54 ms of the 1.52 ms an empty BentoML endpoint
    # costs (load/RESULTS.md), on each hop. "on" traces as BentoML's own config says (exporter,
    # sample rate: BENTOML_CONFIG). access_log "on": BentoML's line per public request from the entry
    # (model services never log their internal calls); off by default because it cost 11-15% of peak
    # throughput (load/RESULTS.md), while /metrics counts every request by endpoint and status and
    # errors are logged either way.
    tracing: str = "off"
    access_log: str = "off"
    # Worker processes of the entry service (services/api.py). Each parses and validates requests on
    # its own event loop, runs its own copy of the sentiment and forecast-window models with its own
    # batcher, and forwards the rest; max_in_flight applies per worker (load/RESULTS.md).
    # Two: one per core of the reference 2-core machine; one worker peaked at 810 req/s on sentiment,
    # two at 1,467 (load/RESULTS.md).
    api_workers: int = 2
    # Torch intra-op threads of each entry worker, which runs the sentiment and forecast-window models.
    api_threads: int = 1
    # Request limits, enforced before any work is queued.
    max_items: int = 64
    max_text_chars: int = 2000
    # Per-request timeout of every service, in seconds.
    timeout_s: int = 30
    # What the entry service lets in (services/errors.py, SECURITY.md). Bodies over max_body_bytes get
    # 413 (caption routes allow a base64 image, see services/api.py); JSON deeper than max_json_depth
    # gets 400. More than max_in_flight requests in progress on the entry worker get 503 with
    # Retry-After: retry_after_s. When api_token is set, POSTs to the comma-separated path prefixes
    # in api_token_paths (the state-changing session endpoints) need "Authorization: Bearer <token>".
    max_body_bytes: int = 1 << 20
    max_json_depth: int = 32
    # A text field of a multipart form (beam_size, max_length of /v1/caption/upload) holds a small
    # option; a longer value is refused with 400 before BentoML parses it.
    max_form_field_bytes: int = 64
    max_in_flight: int = 256
    # Connections the kernel queues for the entry before a worker accepts them (listen backlog;
    # BentoML's default is 2048, its minimum 64). Requests waiting there are invisible to
    # max_in_flight and to every deadline: at 2x peak, 2048 queued connections held requests 5 s
    # (p50) and delayed recovery 12 s; 128 gave 0.3 s and 1.1 s (load/overload.py, load/RESULTS.md).
    # Past it the kernel drops new SYNs and clients retry the connect (TCP's backoff).
    api_backlog: int = 128
    retry_after_s: int = 1
    api_token: str = ""
    api_token_paths: str = "/v1/forecast/sessions"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"{PREFIX}DEVICE must be cpu, cuda or auto, got {self.device!r}")
        for switch in ("batching", "tracing", "access_log"):
            if getattr(self, switch) not in ("on", "off"):
                raise ValueError(f"{PREFIX}{switch.upper()} must be on or off, got {getattr(self, switch)!r}")
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{PREFIX}{field.name.upper()} must be >= 1, got {value}")
        if self.sentiment_max_batch_size < 2:
            raise ValueError(f"{PREFIX}SENTIMENT_MAX_BATCH_SIZE must be >= 2 (BentoML's minimum)")
        if self.forecast_max_batch_size < 2:
            raise ValueError(f"{PREFIX}FORECAST_MAX_BATCH_SIZE must be >= 2 (BentoML's minimum)")
        if self.translate_max_batch_size < 2:
            raise ValueError(f"{PREFIX}TRANSLATE_MAX_BATCH_SIZE must be >= 2 (BentoML's minimum)")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = environ.get(PREFIX + field.name.upper())
            if raw is None:
                continue
            try:
                values[field.name] = int(raw) if field.type in (int, "int") else raw
            except ValueError as exc:
                raise ValueError(f"{PREFIX}{field.name.upper()} must be an integer, got {raw!r}") from exc
        return cls(**values)

    def observability(self, access_log: bool = False) -> dict:
        """BentoML service config for tracing and access logging (``@bentoml.service(**...)``)."""
        config: dict = {"logging": {"access": {"enabled": access_log and self.access_log == "on"}}}
        if self.tracing == "off":
            config["tracing"] = {"excluded_urls": ".*"}  # a regex: matches every URL
        return config

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


SETTINGS = Settings.from_env()
