"""Every project metric, declared once. BentoML's own request and ``adaptive_batch_size`` metrics
are reused, not duplicated.

Names follow ``rnnserve_<subsystem>_<name>_<unit>``; labels stay low-cardinality (model name only).
BentoML runs prometheus_client in multiprocess mode, so only Counter, Gauge and Histogram are used.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

INPUT_LENGTH_TOKENS = Histogram(
    "rnnserve_model_input_length_tokens",
    "Tokens per input sequence, after tokenization.",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
BATCH_PADDING_RATIO = Histogram(
    "rnnserve_model_batch_padding_ratio",
    "Fraction of padded positions in each model batch: 1 - sum(lengths) / (batch * max_length).",
    ["model"],
    buckets=RATIO_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "rnnserve_model_inference_seconds",
    "Wall time of one batched model forward pass (sentiment, forecast); for translate and caption, of "
    "one request's decode in the shared decode loop, from queueing to its last sequence's end.",
    ["model"],
    buckets=SECONDS_BUCKETS,
)
# Padding waste: padded positions the model computed. With the real tokens
# (rnnserve_model_input_length_tokens_sum), waste = padding / (padding + tokens); length grouping
# (services/batching.py plan_groups) exists to lower it.
PADDING_TOKENS_TOTAL = Counter(
    "rnnserve_model_padding_tokens_total",
    "Padded positions in model batches (batch * max_length - sum(lengths)), summed over calls.",
    ["model"],
)

# Forecast sessions. Each forecast worker sets the gauge to the open sessions of its store (its own
# memory, or the Redis every worker and replica shares), so the pod's value is the max over workers;
# with Redis, take max() over pods too, not sum().
FORECAST_SESSIONS_ACTIVE = Gauge(
    "rnnserve_forecast_sessions_active",
    "Open streaming sessions in the session store (memory or Redis).",
    ["model"],
    multiprocess_mode="livemax",
)
FORECAST_SESSION_STEPS_TOTAL = Counter(
    "rnnserve_forecast_session_steps_total",
    "Bars posted to sessions, by outcome (ok, duplicate, stale, not_found, invalid, model_version, "
    "unavailable, busy).",
    ["model", "outcome"],
)
FORECAST_SESSION_STORE_UP = Gauge(
    "rnnserve_forecast_session_store_up",
    "1 while the session store answers (checked by /readyz and every few seconds), else 0.",
    ["model"],
    multiprocess_mode="livemin",
)
FORECAST_SESSION_EXPIRATIONS_TOTAL = Counter(
    "rnnserve_forecast_session_expirations_total",
    "Sessions removed because they were idle longer than the TTL.",
    ["model"],
)
FORECAST_REQUESTS_TOTAL = Counter(
    "rnnserve_forecast_requests_total",
    "Windowed forecast requests, by outcome (ok, invalid).",
    ["model", "outcome"],
)

# Captioning. Image bytes are counted for every upload, rejected ones included; decode steps and
# caption length per generated caption (steps include <eos>; length counts words).
CAPTION_IMAGE_BYTES = Histogram(
    "rnnserve_caption_image_bytes",
    "Size of each uploaded image file, before decoding.",
    ["model"],
    buckets=(1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20),
)
CAPTION_DECODE_STEPS = Histogram(
    "rnnserve_caption_decode_steps",
    "Decoder steps run for each caption (tokens generated, <eos> included).",
    ["model", "decoder"],
    buckets=TOKEN_BUCKETS,
)
CAPTION_LENGTH_TOKENS = Histogram(
    "rnnserve_caption_length_tokens",
    "Words in each generated caption.",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
CAPTION_REJECTED_IMAGES_TOTAL = Counter(
    "rnnserve_caption_rejected_images_total",
    "Uploads refused before reaching the model, by HTTP status (400, 413, 415).",
    ["model", "status"],
)

# Translation. Input tokens per text are INPUT_LENGTH_TOKENS{model="translate"} (recorded by collate
# and by the stream); these add the decoder side. ``decoder`` is greedy, beam or stream.
TRANSLATE_OUTPUT_TOKENS = Histogram(
    "rnnserve_translate_output_length_tokens",
    "Subword tokens in each translation (EOS excluded).",
    ["model", "decoder"],
    buckets=TOKEN_BUCKETS,
)
TRANSLATE_DECODE_STEPS = Histogram(
    "rnnserve_translate_decode_steps",
    "Decoder steps run per request item (a batch's steps count for each of its items).",
    ["model", "decoder"],
    buckets=TOKEN_BUCKETS,
)
TRANSLATE_BEAM_SIZE = Histogram(
    "rnnserve_translate_beam_size",
    "Beam size used for each translated item (1 = greedy).",
    ["model"],
    buckets=(1, 2, 3, 4, 5, 6, 7, 8),
)
TRANSLATE_GENERATED_TOKENS_TOTAL = Counter(
    "rnnserve_translate_generated_tokens_total",
    "Subword tokens generated (returned to callers); rate() of it is tokens per second.",
    ["model", "decoder"],
)
TRANSLATE_TOKENS_PER_SECOND = Histogram(
    "rnnserve_translate_generated_tokens_per_second",
    "Tokens generated per second of decoding, measured per decode call (one batch group or one stream).",
    ["model", "decoder"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)

# Iteration-level decoding (services/decoding.py): one loop per generative model service steps every
# active row together; requests join and leave between steps. ``reason`` is eos, max_length,
# cancelled (the client went away), deadline or error.
DECODER_ACTIVE_ROWS = Gauge(
    "rnnserve_decoder_active_rows",
    "Rows (beam hypotheses and greedy sequences) in the running decoder batch.",
    ["model"],
    multiprocess_mode="livesum",
)
DECODER_QUEUE_LENGTH = Gauge(
    "rnnserve_decoder_queue_length",
    "Items waiting for the decoder to admit them.",
    ["model"],
    multiprocess_mode="livesum",
)
DECODER_STEP_SECONDS = Histogram(
    "rnnserve_decoder_step_seconds",
    "Wall time of one decoder iteration (admission's encoder, the step, the bookkeeping).",
    ["model"],
    buckets=SECONDS_BUCKETS,
)
DECODER_TOKENS_PER_STEP = Histogram(
    "rnnserve_decoder_tokens_per_step",
    "Rows stepped together in one decoder iteration (one token each).",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
DECODER_TIME_TO_FIRST_TOKEN_SECONDS = Histogram(
    "rnnserve_decoder_time_to_first_token_seconds",
    "From an item's arrival at the decoder to its first decoded token (queue wait + encoder + step).",
    ["model"],
    buckets=SECONDS_BUCKETS,
)
DECODER_RETIRED_ROWS_TOTAL = Counter(
    "rnnserve_decoder_retired_rows_total",
    "Rows that left the decoder, by reason (eos, max_length, cancelled, deadline, error).",
    ["model", "reason"],
)

# Reliability (services/errors.py). ``reason`` is the error code of the refusal (body_too_large,
# overloaded, timeout, invalid_json, unauthorized, model_unavailable, ...): a small fixed set.
REJECTED_REQUESTS_TOTAL = Counter(
    "rnnserve_http_rejected_requests_total",
    "Requests the entry service refused before or instead of a model answer, by error code.",
    ["reason"],
)
MODEL_LOAD_FAILED = Gauge(
    "rnnserve_model_load_failed",
    "1 while a model service runs without its model (artifact missing, truncated or tampered).",
    ["model"],
    multiprocess_mode="livemax",
)
