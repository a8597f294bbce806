"""The decode scheduler (services/decoding.py) on tiny fixed-weight translators: whatever arrives when,
every sequence decodes exactly as it would alone, and the loop stays bounded and fair.

"Alone" is the artifact's own batched ``greedy``/``beam_search`` on a batch of one: the scheduler
shares nothing with it but ``encode`` and ``decode_step``.
"""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.rnn import pad_sequences
from models.translate import BOS_ID, EOS_ID, PAD_ID
from services import decode_events, decoding
from services.decode_events import generate, stream
from services.decoding import DecodeScheduler
from services.errors import ServiceError
from services.search import Beam, Done, Failed, Greedy, Sequence, Token, Vocabulary
from tests.unit.test_translate_model import CAP, SOURCES, VARIANTS, tiny_model
from training.export import script

VOCAB = Vocabulary(bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, eos_in_output=False)
FAR = 1e12  # a deadline that never passes


@functools.cache
def scripted(cell: str = "gru", attention: str = "general"):
    return script(tiny_model(cell, attention))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scheduler(model, max_rows: int = 64, max_queue: int = 64, clock=None) -> DecodeScheduler:
    def encode(inputs):
        tokens, lengths = pad_sequences(inputs, PAD_ID)
        memory, keys, mask, state = model.encode(tokens, lengths)
        return (memory, keys, mask), state, lengths.tolist()

    def step(tokens, state, memory):
        return model.decode_step(tokens, state, *memory)

    return DecodeScheduler("test", encode, step, VOCAB, max_rows=max_rows, max_queue=max_queue,
                           clock=clock or Clock())


def sequence(source: list[int], beam_size: int = 1, max_length: int = CAP, length_penalty: float = 1.0,
             attention: bool = False, deadline: float = FAR) -> Sequence:
    limit = max(1, min(max_length, CAP))
    search = (Greedy(VOCAB, limit, len(source), attention) if beam_size == 1 else
              Beam(VOCAB, beam_size, limit, len(source), length_penalty, attention))
    return Sequence(source, search, deadline)


def alone(model, source, beam_size, max_length, length_penalty, attention):
    """The artifact's own decode of this one source: (tokens, score, steps, attention)."""
    src, lengths = pad_sequences([source], PAD_ID)
    with torch.inference_mode():
        if beam_size == 1:
            out, out_lengths, scores, steps, weights = model.greedy(src, lengths, max_length, attention)
        else:
            out, out_lengths, scores, steps, weights = model.beam_search(
                src, lengths, beam_size, max_length, length_penalty, attention)
    length = int(out_lengths[0])
    return out[0, :length].tolist(), float(scores[0]), int(steps), weights[0, :length].tolist()


def drive(engine: DecodeScheduler, arrivals: list[tuple[int, Sequence]], limit: int = 1000) -> dict:
    """Submits each sequence at its step, iterates until all are done; returns events by sequence."""
    events: dict[int, list] = {id(s): [] for _, s in arrivals}
    for _, s in arrivals:
        s.notify = events[id(s)].append
    pending = sorted(arrivals, key=lambda pair: pair[0])
    step = 0
    while (pending or engine.busy) and step < limit:
        while pending and pending[0][0] <= step:
            engine.submit([pending.pop(0)[1]])
        engine.iterate()
        step += 1
    assert not pending and not engine.busy, "the loop did not finish"
    return events


def assert_same_as_alone(model, item: dict, hypothesis) -> None:
    tokens, score, steps, weights = alone(model, **item)
    assert hypothesis.tokens == tokens, item
    assert hypothesis.score == pytest.approx(score, abs=1e-4)
    assert hypothesis.steps == steps
    if item["beam_size"] == 1:  # greedy: cut at the limit, or ended by EOS one step after its last token
        assert hypothesis.reason == ("max_length" if len(tokens) == steps else "eos")
    if item["attention"]:
        assert len(hypothesis.attention) == len(tokens)
        for got, want in zip(hypothesis.attention, weights, strict=True):
            assert got == pytest.approx(want[: len(item["source"])], abs=1e-5)


ITEM = st.fixed_dictionaries({
    "source": st.lists(st.integers(4, 22), min_size=1, max_size=9),
    "beam_size": st.sampled_from([1, 1, 2, 3, 5]),
    "max_length": st.integers(1, CAP + 3),
    "length_penalty": st.sampled_from([0.0, 0.6, 1.0, 2.0]),
    "attention": st.booleans(),
})


@pytest.mark.parametrize(("cell", "attention"), VARIANTS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(ITEM, min_size=1, max_size=8), arrivals=st.lists(st.integers(0, 12), min_size=8,
                                                                        max_size=8),
       max_rows=st.sampled_from([5, 12, 64]))
def test_every_sequence_equals_decoding_it_alone_whatever_arrives_when(cell, attention, items, arrivals,
                                                                        max_rows):
    model = scripted(cell, attention)
    engine = scheduler(model, max_rows=max_rows)
    sequences = [sequence(item["source"], item["beam_size"], item["max_length"], item["length_penalty"],
                          item["attention"]) for item in items]
    events = drive(engine, list(zip(arrivals, sequences, strict=False)))
    for item, s in zip(items, sequences, strict=True):
        (done,) = events[id(s)]
        assert isinstance(done, Done)
        assert_same_as_alone(model, {**item}, done.hypothesis)
    assert engine.active_rows == 0 and sum(engine.retired.values()) == sum(s.rows for s in sequences)


def test_mixed_lengths_really_retire_at_different_steps():
    # Otherwise the property above would not exercise rows leaving a running batch.
    model = scripted()
    engine = scheduler(model)
    sequences = [sequence(source) for source in SOURCES]
    events = drive(engine, [(0, s) for s in sequences])
    steps = {events[id(s)][0].hypothesis.steps for s in sequences}
    assert len(steps) > 1


def test_rows_and_memory_width_follow_the_active_sequences():
    model = scripted()
    engine = scheduler(model)
    long, short = sequence(list(range(4, 20))), sequence([5, 6, 7, 8, 9], beam_size=3)
    engine.submit([long, short])
    engine.iterate()
    assert engine.active_rows == 4 and engine.batch.memory[0].shape[1] == 16
    long.cancel()
    engine.iterate()
    # The long source left: its row is gone and the padded memory shrank to the short source.
    assert engine.active_rows == 3 and engine.batch.memory[0].shape[1] == 5
    assert engine.retired["cancelled"] == 1


def test_streams_get_every_token_then_the_result():
    model = scripted()
    engine = scheduler(model)
    s = sequence(SOURCES[2])
    s.stream = True
    (events,) = drive(engine, [(0, s)]).values()
    *tokens, done = events
    assert all(isinstance(t, Token) for t in tokens) and isinstance(done, Done)
    emitted = [t.token for t in tokens if t.token != EOS_ID]
    assert emitted == done.hypothesis.tokens
    assert [t.index for t in tokens] == list(range(len(tokens)))


def test_a_cancelled_sequence_leaves_at_the_next_step_and_its_neighbours_are_unchanged():
    model = scripted()
    engine = scheduler(model)
    keep = [sequence(source, beam) for source in SOURCES for beam in (1, 3)]
    gone = [sequence(SOURCES[2], 1, CAP), sequence(SOURCES[4], 4, CAP)]
    events = {id(s): [] for s in keep + gone}
    for s in keep + gone:
        s.notify = events[id(s)].append
    engine.submit(keep + gone)
    engine.iterate()
    before = engine.active_rows
    for s in gone:
        s.cancel()
    engine.iterate()
    assert engine.active_rows <= before - 5
    assert engine.retired["cancelled"] == 5
    assert all(not events[id(s)] for s in gone)  # nobody to answer
    while engine.busy:
        engine.iterate()
    for s, (source, beam) in zip(keep, [(src, b) for src in SOURCES for b in (1, 3)], strict=True):
        (done,) = events[id(s)]
        assert done.hypothesis.tokens == alone(model, source, beam, CAP, 1.0, False)[0]


def test_a_queued_sequence_cancelled_before_admission_costs_nothing():
    engine = scheduler(scripted(), max_rows=1)
    first, second = sequence(SOURCES[0]), sequence(SOURCES[1])
    engine.submit([first, second])
    engine.iterate()
    second.cancel()
    engine.iterate()
    assert len(engine.queue) == 0 and engine.retired["cancelled"] == 1
    assert second.first_token_at is None


def test_a_passed_deadline_frees_the_rows_and_answers_503():
    clock = Clock()
    engine = scheduler(scripted(), clock=clock)
    late = sequence(SOURCES[2], 4, deadline=5.0)
    other = sequence(SOURCES[2])
    events: list = []
    late.notify = events.append
    engine.submit([late, other])
    engine.iterate()
    assert engine.active_rows == 5
    clock.now = 5.0
    engine.iterate()
    assert engine.active_rows <= 1 and engine.retired["deadline"] == 4
    (failed,) = events
    assert isinstance(failed, Failed) and failed.error.status == 503 and failed.error.code == "timeout"


def test_the_queue_cap_answers_503_and_queues_nothing():
    engine = scheduler(scripted(), max_queue=3)
    engine.submit([sequence([5]), sequence([6])])
    with pytest.raises(ServiceError) as refused:
        engine.submit([sequence([7]), sequence([8])])
    assert refused.value.status == 503 and refused.value.code == "overloaded"
    assert "limit is 3" in refused.value.message and "MAX_QUEUE" in refused.value.message
    assert len(engine.queue) == 2
    engine.submit([sequence([9])])  # exactly at the cap
    assert len(engine.queue) == 3


def test_admission_is_fifo_and_never_exceeds_the_row_cap():
    engine = scheduler(scripted(), max_rows=6)
    order = [sequence([5, 6], 1, CAP), sequence([7], 4, CAP), sequence([8, 9], 3, CAP), sequence([10], 1, 2)]
    engine.submit(order)
    admitted_at: dict[int, int] = {}
    step = 0
    while engine.busy:
        engine.iterate()
        assert engine.active_rows <= 6
        for index, s in enumerate(order):
            if s.first_token_at is not None or s.outcome is not None:
                admitted_at.setdefault(index, step)
        step += 1
    starts = [admitted_at[i] for i in range(len(order))]
    assert starts == sorted(starts), "a later sequence overtook an earlier one"
    assert starts[2] > starts[1]  # the beam of 3 waited: 1 + 4 + 3 rows do not fit under 6


def test_a_sequence_wider_than_the_cap_still_runs_alone():
    engine = scheduler(scripted(), max_rows=2)
    wide = sequence(SOURCES[0], 4)
    (done,) = drive(engine, [(0, wide)])[id(wide)]
    assert isinstance(done, Done)


def test_async_helpers_cancel_on_the_way_out():
    model = scripted()
    engine = scheduler(model).start()
    try:
        async def first_event_then_close() -> Sequence:
            s = sequence(SOURCES[2], 1, CAP)
            events = stream(engine, s)
            await events.__anext__()
            await events.aclose()  # the client went away
            return s

        async def both() -> list:
            return await generate(engine, [sequence(SOURCES[0]), sequence(SOURCES[3], 2)])

        closed = asyncio.run(first_event_then_close())
        assert closed.cancelled
        results = asyncio.run(both())
        assert results[0].tokens == alone(model, SOURCES[0], 1, CAP, 1.0, False)[0]
        assert results[1].tokens == alone(model, SOURCES[3], 2, CAP, 1.0, False)[0]
    finally:
        engine.stop()


def test_a_waiting_sequence_joins_in_the_step_its_predecessor_leaves():
    # Retiring rows and admitting the waiting ones share one gather of the memory (_regather).
    model = scripted()
    engine = scheduler(model, max_rows=1)
    first, second = sequence(SOURCES[0], 1, 2), sequence(SOURCES[3])
    events = {id(s): [] for s in (first, second)}
    for s in (first, second):
        s.notify = events[id(s)].append
    engine.submit([first, second])
    engine.iterate()
    assert engine.active_rows == 1 and len(engine.queue) == 1
    engine.iterate()  # the first stops at its limit of 2; the second takes its row at once
    assert first.outcome == "max_length" and len(engine.queue) == 0 and engine.active_rows == 1
    assert engine.batch.memory[0].shape[1] == len(SOURCES[3])
    while engine.busy:
        engine.iterate()
    (done,) = events[id(second)]
    assert done.hypothesis.tokens == alone(model, SOURCES[3], 1, CAP, 1.0, False)[0]


def test_assemble_keeps_rows_and_appends_new_ones_zero_padded():
    old = torch.arange(4 * 5 * 2, dtype=torch.float32).view(4, 5, 2)
    new = torch.ones(2, 3, 2)
    keep = torch.tensor([3, 1])
    for width in (3, 5, 7):
        got = decoding._assemble(old, keep, new, width)
        want = torch.zeros(4, width, 2)
        want[:2, : min(5, width)] = old[[3, 1], : min(5, width)]
        want[2:, :3] = 1.0
        assert torch.equal(got, want), width
    assert torch.equal(decoding._assemble(old, None, None, 5), old)


def test_events_reach_the_event_loop_in_order_with_one_wake_up_per_burst():
    async def main() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        box = decode_events._mailbox(loop)
        wake_ups = 0
        original = loop.call_soon_threadsafe

        def counting(*args):
            nonlocal wake_ups
            wake_ups += 1
            return original(*args)

        loop.call_soon_threadsafe = counting
        got: list = []
        poster = threading.Thread(target=lambda: [box.post(got.append, i) for i in range(100)])
        poster.start()
        poster.join()  # the loop is blocked meanwhile: one burst of 100 events
        await asyncio.sleep(0)
        box.post(got.append, 100)  # after the flush: a new burst wakes the loop again
        await asyncio.sleep(0)
        return got, wake_ups

    got, wake_ups = asyncio.run(main())
    assert got == list(range(101)) and wake_ups == 2
