"""Every project metric, declared once. BentoML's own request and ``adaptive_batch_size`` metrics
are reused, not duplicated.

Names follow ``rnnserve_<subsystem>_<name>_<unit>``; labels stay low-cardinality (model name only).
BentoML runs prometheus_client in multiprocess mode, so only Counter, Gauge and Histogram are used.
"""

from __future__ import annotations

from prometheus_client import Histogram

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
    "Wall time of one batched model forward pass.",
    ["model"],
    buckets=SECONDS_BUCKETS,
)
