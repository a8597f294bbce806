"""Service settings: one typed block for HTTP and one per model, read once at start and validated.

Every value comes from the environment variable ``RNNSERVE_<NAME>`` (``Settings.env_names()`` lists
them all), or from a file of that name in ``RNNSERVE_SECRETS_DIR`` (default ``/run/secrets/rnnserve``,
where Kubernetes mounts a Secret), the environment winning. An invalid value stops the service at start
with a message naming the variable. Limits that the model artifact records itself (the sentiment
model's token limit, the translator's output length) come from the artifact, not from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PREFIX = "RNNSERVE_"
SECRETS_DIR_VARIABLE = "RNNSERVE_SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/run/secrets/rnnserve"


class Group(BaseModel):
    """A block of settings whose variables are ``RNNSERVE_<prefix><FIELD>``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prefix: ClassVar[str] = ""

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field -> environment variable, for the plain (non-group) fields of this block."""
        return {name: f"{PREFIX}{cls.prefix}{name}".upper() for name, field in cls.model_fields.items()
                if not _is_group(field.annotation)}


def _is_group(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Group)


class ModelSettings(Group):
    """What every model service has: its model-store tag and its processes."""

    model: str
    workers: int = Field(1, ge=1, description="Processes of the model's own service.")
    threads: int = Field(1, ge=1, description="Torch intra-op threads per process.")


class BatcherSettings(Group):
    """A model whose requests are merged into one call (sentiment, forecast windows and steps)."""

    max_batch_size: int = Field(64, ge=2, description="Items merged into one model call (BentoML's "
                                "minimum is 2; its default of 100 is never used).")
    max_latency_ms: int = Field(1000, ge=1, description="How long a request may wait in the batcher; "
                                "one it cannot serve in time is shed with 503.")


class DecoderSettings(Group):
    """A generative model's decode loop (services/decoding.py): rows stepped together, items waiting
    (503 past it), and how long an item may wait and decode before its rows are dropped (503)."""

    max_active_rows: int = Field(256, ge=1)
    max_queue: int = Field(1024, ge=1)
    deadline_s: float = Field(30.0, gt=0)
    # CPU priority of the service's processes (Unix niceness, 0-19): where they share cores with the
    # entry (the embedded default), the entry's cheap models keep their latency while a decoder is
    # busy, because the kernel gives the higher-niceness processes the smaller share. In a pod of its
    # own it changes nothing.
    cpu_nice: int = Field(5, ge=0, le=19)


class RemoteModelSettings(ModelSettings):
    """A model the entry reaches through its own BentoML service (forecast sessions, caption, translate)."""

    # Empty: `bentoml serve services.api:Api` starts the service in its own process tree (the embedded
    # default, `make serve`). A URL: the service runs elsewhere (its own Kubernetes Deployment, deploy/
    # k8s) and the entry calls it there (bentoml.depends(url=...)); the entry's readiness then no
    # longer depends on it, and while it is down only its own endpoints answer 503.
    url: str = Field("", pattern=r"^(https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?/?)?$",
                     description="Base URL of the model's own service, e.g. http://rnnserve-translate:3000.")


class SentimentSettings(ModelSettings, BatcherSettings):
    prefix = "SENTIMENT_"
    model: str = "sentiment:latest"
    # The entry service runs sentiment in its own workers (services/inprocess.py) with api_threads;
    # workers and threads apply to ``bentoml serve services.sentiment:Sentiment`` alone.
    standalone: ClassVar[frozenset[str]] = frozenset({"workers", "threads"})
    # Length groups (services/batching.py plan_groups): a merged batch is split into at most
    # length_groups model calls when that lowers the modelled cost; the costs of a time step and of a
    # call, in padded positions, are fitted by load/bench.py (load/RESULTS.md). 1 = off.
    length_groups: int = Field(4, ge=1)
    group_step_tokens: int = Field(40, ge=1)
    group_call_tokens: int = Field(740, ge=1)


class ForecastSettings(RemoteModelSettings, BatcherSettings):
    prefix = "FORECAST_"
    model: str = "forecast:latest"
    workers: int = Field(1, ge=1, description="Processes of the sessions service; more than 1 only "
                         "with a Redis session store (in memory, a session lives in one process).")
    max_rows: int = Field(2000, ge=2, description="Bars per request or session history.")
    max_sessions: int = Field(10000, ge=1, description="Open sessions; one more answers 429.")
    session_ttl_s: int = Field(900, ge=1, description="Idle seconds before a session expires.")
    # Where session states live (services/sessions.py): "memory" (this process; a restart loses them)
    # or a Redis URL (redis://[:password@]host:port/db, rediss:// for TLS), shared by every worker and
    # replica. The URL may hold a password: set it from a Secret (RNNSERVE_SECRETS_DIR).
    session_store: str = Field("memory", pattern=r"^(memory|rediss?://\S+|unix://\S+)$")
    # Each Redis call (connect, read, write) fails after this; session routes then answer 503.
    session_store_timeout_s: float = Field(1.0, gt=0, le=30)
    # A step whose compare-and-set lost to another worker's step of the same session is re-read and
    # retried at most this many times in all, then answered 503 session_busy.
    session_step_attempts: int = Field(8, ge=1, le=100)

    @model_validator(mode="after")
    def _workers_need_a_shared_store(self) -> ForecastSettings:
        if self.workers > 1 and self.session_store == "memory":
            raise ValueError(f"RNNSERVE_FORECAST_WORKERS: Input should be less than or equal to 1 while "
                             f"RNNSERVE_FORECAST_SESSION_STORE is memory (got {self.workers}): each "
                             "worker would hold its own sessions. Set a redis:// URL to run more")
        return self


class CaptionSettings(RemoteModelSettings, DecoderSettings):
    prefix = "CAPTION_"
    model: str = "caption:latest"
    # Checked against the header before any pixel is decoded: a decompression bomb is refused.
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1)
    # The model reads 64x64 (its artifact's image_size); past 4096x3072 (a 12-megapixel photo) more
    # pixels only cost decode time. Memory is bounded by max_decode_bytes, whatever the pixel count.
    max_image_pixels: int = Field(4096 * 3072, ge=1)
    # Bytes of the decoded image in its stored mode (1 byte per pixel for 8-bit grey or palette, 2 for
    # 16-bit grey, 4 for RGB, RGBA and the rest; models/images.py decoded_bytes): 16 MiB holds a
    # 2048x2048 RGB(A) image, 32 times the model's side. A JPEG counts at its DCT-reduced size.
    max_decode_bytes: int = Field(16 * 1024 * 1024, ge=1)
    # Each entry worker decodes at most decode_workers images at once, in its own threads, and lets
    # decode_queue more wait; past that an upload answers 503 + Retry-After (SECURITY.md).
    decode_workers: int = Field(1, ge=1)
    decode_queue: int = Field(32, ge=0)
    max_beam_size: int = Field(8, ge=1)
    max_length: int = Field(64, ge=1)


class TranslateSettings(RemoteModelSettings, DecoderSettings):
    prefix = "TRANSLATE_"
    model: str = "translate:latest"
    max_text_chars: int = Field(500, ge=1)
    max_length: int = Field(80, ge=1)
    max_beam_size: int = Field(8, ge=1)
    # Subword tokens per source text; 0 takes the artifact's own max_input_tokens (what it was
    # trained on). Characters alone do not bound the work: one emoji is four byte-level tokens.
    max_source_tokens: int = Field(0, ge=0)
    # Decoder work per request: the sum over its texts of source tokens x beam size.
    max_request_work: int = Field(32768, ge=1)
    # Attention cells return_attention may return per request: the sum over its texts of
    # min(max_length, the artifact's cap) x source tokens, the worst case, checked before decoding.
    max_attention_cells: int = Field(65536, ge=1)


class HttpSettings(Group):
    """The entry service: its processes and what it lets in (services/admission.py, SECURITY.md)."""

    # Each entry worker parses and validates requests on its own event loop, runs its own copy of the
    # sentiment and forecast-window models with their batchers, and forwards the rest; max_in_flight
    # applies per worker. The default follows the 2-core reference machine (load/RESULTS.md).
    api_workers: int = Field(2, ge=1)
    api_threads: int = Field(1, ge=1, description="Torch threads of each entry worker's models.")
    # Connections the kernel queues before a worker accepts them: requests waiting there are
    # invisible to max_in_flight and to every deadline (load/overload.py, load/RESULTS.md).
    api_backlog: int = Field(128, ge=64, description="BentoML's minimum is 64.")
    timeout_s: int = Field(30, ge=1, description="Per-request timeout of every service.")
    retry_after_s: int = Field(1, ge=1)
    max_items: int = Field(64, ge=1, description="Texts per sentiment or translate request.")
    max_text_chars: int = Field(2000, ge=1, description="Characters per sentiment text.")
    max_body_bytes: int = Field(1 << 20, ge=1)
    max_json_depth: int = Field(32, ge=1)
    # A text field of a multipart form (beam_size, max_length of /v1/caption/upload) holds a small
    # option; a longer value is refused with 400 before BentoML parses it.
    max_form_field_bytes: int = Field(64, ge=1)
    max_in_flight: int = Field(256, ge=1)
    # X-Request-ID (services/observability.py): a caller's id of at most this many characters from
    # [A-Za-z0-9._:-] is kept, anything else is replaced by a generated one; echoed and logged.
    max_request_id_chars: int = Field(128, ge=16, le=1024)
    # Connections (services/bentoml_compat.py BoundedHttpToolsProtocol, admission.Body): the request
    # line and headers must arrive within header_timeout_s and max_header_bytes, the body within
    # body_timeout_s; idle keep-alive connections close after keep_alive_s; past max_connections open
    # connections per worker a new one is answered 503 and closed.
    header_timeout_s: float = Field(10.0, gt=0)
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    body_timeout_s: float = Field(20.0, gt=0)
    keep_alive_s: float = Field(5.0, gt=0)
    # Connecting to a model service reached by URL (services/bentoml_compat.py bound_dependency_connects):
    # past this, the entry answers 503 model_unavailable instead of waiting the whole request timeout.
    connect_timeout_s: float = Field(3.0, gt=0)
    # An open connection to such a model service whose peer has gone without closing it (a pod whose
    # network went first, a failed node): dropped once what the entry sent, a request or a TCP
    # keep-alive probe, stays unacknowledged this long (TCP_USER_TIMEOUT); 503 model_unavailable. A
    # slow answer is not cut: a live peer's kernel acknowledges while its model works.
    peer_timeout_s: float = Field(3.0, ge=0.01)
    max_connections: int = Field(1000, ge=1)
    # When api_token is set, POSTs under the comma-separated prefixes of api_token_paths (the
    # state-changing session endpoints) need "Authorization: Bearer <token>".
    api_token: str = ""
    api_token_paths: str = "/v1/forecast/sessions"


class Settings(Group):
    """Every setting of every service: ``SETTINGS.http.timeout_s``, ``SETTINGS.translate.max_length``."""

    device: Literal["cpu", "cuda", "auto"] = "auto"
    # "off" declares the batchable model APIs non-batchable: each request calls the model alone. Only
    # for measuring what batching buys (load/bench.py).
    batching: Literal["on", "off"] = "on"
    # OpenTelemetry spans per request and BentoML's access log line per public request: both cost a
    # measurable share of peak throughput (load/RESULTS.md); /metrics counts every request either way.
    tracing: Literal["on", "off"] = "off"
    access_log: Literal["on", "off"] = "off"
    # Log lines as text (BentoML's format) or as one JSON object per line, each with its request id.
    log_format: Literal["text", "json"] = "text"
    # The level of this project's own loggers (services.*): at "info", each client error is logged
    # (rate-limited per code, services/errors.py ClientErrorLog) and model start-ups are reported.
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Python's cyclic garbage collector in every worker (services/lifecycle.py settle_heap). "tuned":
    # once the models are loaded, the start-up's objects are frozen out of every later collection and
    # a young collection waits for gc_gen0_threshold new objects, because under load the default
    # collector's full collections paused an entry worker's event loop for hundreds of milliseconds
    # (load/RESULTS.md, issue 15). "default" leaves Python's collector as it is.
    gc: Literal["tuned", "default"] = "tuned"
    gc_gen0_threshold: int = Field(50_000, ge=100)
    http: HttpSettings = HttpSettings()
    sentiment: SentimentSettings = SentimentSettings()
    forecast: ForecastSettings = ForecastSettings()
    caption: CaptionSettings = CaptionSettings()
    translate: TranslateSettings = TranslateSettings()

    GROUPS: ClassVar[dict[str, type[Group]]] = {
        "http": HttpSettings, "sentiment": SentimentSettings, "forecast": ForecastSettings,
        "caption": CaptionSettings, "translate": TranslateSettings}

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Every setting's dotted path -> its environment variable."""
        names = super().env_names()
        for group, block in cls.GROUPS.items():
            names.update({f"{group}.{name}": env for name, env in block.env_names().items()})
        return names

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, secrets_dir: str | Path | None = None
                 ) -> Settings:
        """Reads every ``RNNSERVE_*`` variable (and secret file); raises ``ValueError`` naming the
        variable when a value is invalid."""
        environ = dict(os.environ if environ is None else environ)
        directory = Path(secrets_dir or environ.get(SECRETS_DIR_VARIABLE, DEFAULT_SECRETS_DIR))
        known = set(cls.env_names().values()) | {SECRETS_DIR_VARIABLE}
        unknown = sorted(name for name in environ if name.startswith(PREFIX) and name not in known)
        if unknown:  # a misspelt or retired setting would otherwise be ignored without a word
            raise ValueError(f"invalid settings: {', '.join(unknown)}: not a setting of this version "
                             "(services/settings.py, SECURITY.md); remove or rename")
        values: dict[str, Any] = {}
        for path, env in cls.env_names().items():
            raw = environ.get(env)
            if raw is None and (directory / env).is_file():
                raw = (directory / env).read_text().strip()
            if raw is None:
                continue
            *group, name = path.split(".")
            (values.setdefault(group[0], {}) if group else values)[name] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            names = cls.env_names()
            problems = [f"{names.get('.'.join(str(p) for p in e['loc']), '.'.join(map(str, e['loc'])))}: "
                        f"{e['msg']} (got {e.get('input')!r})" for e in exc.errors()]
            raise ValueError("invalid settings: " + "; ".join(problems)) from None

    @classmethod
    def read_by_entry(cls) -> dict[str, str]:
        """``env_names()`` less the variables that ``bentoml serve services.api:Api`` never reads (a
        model it runs inside its own workers ignores that model's own service's processes)."""
        names = cls.env_names()
        for group, block in cls.GROUPS.items():
            for name in getattr(block, "standalone", ()):
                names.pop(f"{group}.{name}")
        return names

    def observability(self, access_log: bool = False) -> dict:
        """BentoML service config for tracing and access logging (``@bentoml.service(**...)``)."""
        config: dict = {"logging": {"access": {"enabled": access_log and self.access_log == "on"}}}
        if self.tracing == "off":
            config["tracing"] = {"excluded_urls": ".*"}  # a regex: matches every URL
        return config

    def torch_device(self) -> str:
        """The torch device models load on. ``cuda`` without a usable GPU raises an ``ArtifactError``
        naming the cause, so that the load path keeps only that model out (not ready, its endpoints
        answer 503, the worker stays up: no crash loop); called where each model loads."""
        import torch

        if self.device == "cpu":
            return "cpu"
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        from models.artifact import ArtifactError

        if torch.version.cuda is None:
            problem = f"this torch ({torch.__version__}) is a CPU-only build: run the GPU image"
        elif not torch.cuda.is_available():
            problem = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU: is "
                       "nvidia.com/gpu requested and the NVIDIA device plugin and driver installed?")
        else:
            return "cuda"
        raise ArtifactError(f"RNNSERVE_DEVICE=cuda, but {problem} (or set RNNSERVE_DEVICE=cpu)")


SETTINGS = Settings.from_env()
