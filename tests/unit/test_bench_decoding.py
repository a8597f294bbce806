"""The pure parts of ``load/bench_decoding.py``: percentiles, stream frames and gaps, the report."""

import math
from collections import Counter

import pytest

from load.bench_decoding import (
    FrameReader,
    StreamRecord,
    gaps,
    markdown,
    pct,
    stream_record,
    stream_row,
    targets,
)


def test_pct_is_nearest_rank_and_nan_when_empty():
    values = list(range(100, 0, -1))  # unordered on purpose
    assert pct(values, 0.5) == 51
    assert pct(values, 0.99) == 100
    assert pct(values, 0.0) == 1
    assert pct([7.0], 0.99) == 7.0
    assert math.isnan(pct([], 0.5))


def test_gaps_between_consecutive_events():
    assert gaps([0.1, 0.15, 0.45]) == pytest.approx([0.05, 0.3])
    assert gaps([0.2]) == []
    assert gaps([]) == []


def test_frame_reader_reframes_chunks_and_stamps_the_completing_chunk():
    reader = FrameReader()
    reader.feed(b'data: {"delta": "ho', 1.0)
    assert reader.frames == []
    reader.feed(b'la"}\n\ndata: {"delta": " a"}\n\nda', 2.0)
    reader.feed(b'ta: {"done": true, "output_tokens": 3}\n\n', 3.5)
    assert reader.frames == [(2.0, '{"delta": "hola"}'), (2.0, '{"delta": " a"}'),
                             (3.5, '{"done": true, "output_tokens": 3}')]


def test_frame_reader_keeps_a_character_split_across_chunks():
    reader = FrameReader()
    data = 'data: {"token": "niño"}\n\n'.encode()
    cut = data.index("ñ".encode()) + 1  # inside the two bytes of ñ
    reader.feed(data[:cut], 1.0)
    reader.feed(data[cut:], 2.0)
    assert reader.frames == [(2.0, '{"token": "niño"}')]


def test_stream_record_times_text_events_from_the_send_and_reads_the_summary():
    frames = [(10.25, '{"delta": "a"}'), (10.5, '{"delta": "b"}'), (10.75, '{"done": true, "steps": 4}')]
    record = stream_record(frames, 10.0, "steps")
    assert record == StreamRecord([0.25, 0.5], 4)


@pytest.mark.parametrize("frames", [[], [(1.0, '{"delta": "a"}')]])
def test_stream_record_refuses_a_stream_without_a_summary(frames):
    with pytest.raises(ValueError):
        stream_record(frames, 0.0, "steps")


def test_stream_row_rates_first_token_and_inter_token():
    records = [StreamRecord([0.1, 0.2, 0.4], 5), StreamRecord([0.3, 0.31], 2), StreamRecord([], 1)]
    row = stream_row(64, 2.0, records, Counter({"503": 2}))
    assert row["completed"] == 3
    assert row["streams_per_s"] == pytest.approx(1.5)
    assert row["tokens_per_s"] == pytest.approx(4.0)
    assert row["ttft_p50_ms"] == pytest.approx(200.0)  # of the two streams that sent text
    assert row["ttft_p99_ms"] == pytest.approx(300.0)
    assert row["inter_token_p99_ms"] == pytest.approx(200.0)  # gaps 100, 200, 10
    assert row["failures"] == {"503": 2}


def request_row(clients: int, tokens_per_s: float, failures: dict | None = None) -> dict:
    return {"clients": clients, "rps": tokens_per_s / 8, "tokens_per_s": tokens_per_s, "p50_ms": 10.0,
            "p99_ms": 20.0, "failures": failures or {}}


def streams_row(streams: int, tokens_per_s: float, ttft_p99_ms: float) -> dict:
    return {"streams": streams, "streams_per_s": tokens_per_s / 8, "tokens_per_s": tokens_per_s,
            "ttft_p50_ms": 10.0, "ttft_p99_ms": ttft_p99_ms, "inter_token_p99_ms": 5.0, "failures": {}}


def report(after_greedy_64: float, after_streams: float, ttft_p99: float) -> dict:
    ceiling = {"greedy": {"sequences_per_s": 400.0, "tokens_per_s": 3200.0},
               "beam": {"sequences_per_s": 100.0, "tokens_per_s": 800.0}}

    def tree(greedy_64: float, streams: float, ttft: float) -> dict:
        model = {"requests": {"greedy": [request_row(1, 100.0), request_row(64, greedy_64)],
                              "beam": [request_row(64, 400.0, {"503": 3})]},
                 "streams": [streams_row(64, streams, ttft), streams_row(256, streams, ttft)]}
        return {"translate": model, "caption": model}

    return {"machine": {"cores": 2}, "seconds": 8.0, "ceiling": {"translate": ceiling, "caption": ceiling},
            "before": tree(1600.0, 200.0, 700.0), "after": tree(after_greedy_64, after_streams, ttft_p99),
            "load_average_at_end": (1.0, 1.0, 1.0)}


def test_markdown_has_both_tables_per_model_with_ratios_to_the_ceiling():
    text = markdown(report(3520.0, 1100.0, 250.0))
    assert text.count("### translate") == 1 and text.count("### caption") == 1
    assert "| after | greedy | 64 | 440.0 | 3520 | 1.10 | 10 | 20 | 0 |" in text
    assert "| before | beam 4 | 64 | 50.0 | 400 | 0.50 | 10 | 20 | 3 x 503 |" in text
    assert "| after | 256 concurrent | 137.5 | 1100 | 10 | 250 | 5 | 0 |" in text
    assert "greedy 400 sequences/s, 3200 tokens/s; beam 4 100 sequences/s, 800 tokens/s" in text


def test_targets_read_off_the_run():
    met = targets(report(3520.0, 1100.0, 250.0))
    assert met[0].startswith("- greedy /v1/translate at 64 clients: 1.10x") and met[0].endswith(": met")
    assert "5.5x the tokens/s" in met[1] and met[1].count("not met") == 0
    missed = targets(report(2400.0, 900.0, 320.0))
    assert missed[0].endswith("not met")
    assert "4.5x" in missed[1] and missed[1].count("not met") == 2


def test_targets_without_a_before_tree_report_only_the_ceiling():
    only_after = report(3520.0, 1100.0, 250.0)
    del only_after["before"]
    assert len(targets(only_after)) == 1
    assert "### translate" in markdown(only_after)
