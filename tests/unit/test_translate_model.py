"""Translator decoding on tiny fixed-weight models: batching, beam vs greedy, TorchScript vs eager."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.nn import functional as F

from models.rnn import pad_sequences
from models.translate import BOS_ID, EOS_ID, PAD_ID, TranslateConfig, Translator
from training.export import script

SRC_VOCAB, TGT_VOCAB, CAP = 23, 19, 12
# Mixed lengths, including a one-token source, in no particular order.
SOURCES = [[5, 6, 7], [9], [4, 8, 10, 11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21]]
VARIANTS = [("gru", "general"), ("gru", "additive"), ("lstm", "general"), ("rnn_tanh", "additive")]


@functools.cache
def _trained_state(cell: str, attention: str, seed: int) -> dict:
    """A few hundred steps on a toy task (target = source reversed), so that, unlike a random model,
    the decoder ends sentences at different steps: the batching tests then cover mixed lengths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and kinder to a shared machine
    try:
        return _train(cell, attention, seed)
    finally:
        torch.set_num_threads(threads)


def _train(cell: str, attention: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = Translator(_config(cell, attention))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(60):
        lengths = torch.randint(1, 8, (16,), generator=generator)
        sources = [torch.randint(4, SRC_VOCAB, (int(n),), generator=generator).tolist() for n in lengths]
        targets = [[4 + (t % (TGT_VOCAB - 4)) for t in reversed(s)] for s in sources]
        src, src_lengths = pad_sequences(sources, PAD_ID)
        tgt_in, _ = pad_sequences([[BOS_ID, *t] for t in targets], PAD_ID)
        tgt_out, _ = pad_sequences([[*t, EOS_ID] for t in targets], PAD_ID)
        logits = model(src, src_lengths, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, TGT_VOCAB), tgt_out.reshape(-1), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _config(cell: str, attention: str) -> TranslateConfig:
    return TranslateConfig(
        src_vocab_size=SRC_VOCAB, tgt_vocab_size=TGT_VOCAB, embedding_dim=8, encoder_hidden_size=6,
        decoder_hidden_size=10, attention_size=7, cell=cell, attention=attention, dropout=0.3,
        max_output_length=CAP,
    )


def tiny_model(cell: str = "gru", attention: str = "general", seed: int = 0) -> Translator:
    model = Translator(_config(cell, attention))
    model.load_state_dict(_trained_state(cell, attention, seed))
    return model.eval()


def batch(sources: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_sequences(sources, PAD_ID)


def run_greedy(model, sources, max_length=CAP, attention=True):
    src, lengths = batch(sources)
    with torch.inference_mode():
        return model.greedy(src, lengths, max_length, attention)


def run_beam(model, sources, beam_size, max_length=CAP, length_penalty=1.0, attention=True):
    src, lengths = batch(sources)
    with torch.inference_mode():
        return model.beam_search(src, lengths, beam_size, max_length, length_penalty, attention)


def rows(output, index):
    """(tokens, score, attention) of one sentence of a decode, trimmed to its length."""
    tokens, lengths, scores, _, attention = output
    length = int(lengths[index])
    return tokens[index, :length], scores[index], attention[index, :length]


@pytest.mark.parametrize(("cell", "attention"), VARIANTS)
def test_outputs_have_mixed_lengths_so_the_batching_tests_mean_something(cell, attention):
    _, lengths, _, steps, _ = run_greedy(tiny_model(cell, attention), SOURCES)
    assert len(set(lengths.tolist())) >= 2
    assert int(steps) <= CAP


@pytest.mark.parametrize(("cell", "attention"), VARIANTS)
def test_batched_greedy_equals_one_by_one(cell, attention):
    model = tiny_model(cell, attention)
    batched = run_greedy(model, SOURCES)
    for index, source in enumerate(SOURCES):
        tokens, score, weights = rows(batched, index)
        single_tokens, single_score, single_weights = rows(run_greedy(model, [source]), 0)
        assert torch.equal(tokens, single_tokens)
        torch.testing.assert_close(score, single_score)
        torch.testing.assert_close(weights[:, : len(source)], single_weights)
        assert float(weights[:, len(source):].abs().sum()) == 0.0  # no attention on padding


@pytest.mark.parametrize(("cell", "attention"), VARIANTS)
@pytest.mark.parametrize("beam_size", [2, 5])
def test_batched_beam_equals_one_by_one(cell, attention, beam_size):
    model = tiny_model(cell, attention)
    batched = run_beam(model, SOURCES, beam_size)
    for index, source in enumerate(SOURCES):
        tokens, score, weights = rows(batched, index)
        single_tokens, single_score, single_weights = rows(run_beam(model, [source], beam_size), 0)
        assert torch.equal(tokens, single_tokens)
        torch.testing.assert_close(score, single_score)
        torch.testing.assert_close(weights[:, : len(source)], single_weights)


@pytest.mark.parametrize(("cell", "attention"), VARIANTS)
def test_beam_size_one_is_exactly_greedy(cell, attention):
    model = tiny_model(cell, attention)
    for max_length in (3, CAP):
        greedy = run_greedy(model, SOURCES, max_length)
        beam = run_beam(model, SOURCES, 1, max_length, length_penalty=0.7)
        for got, want in zip(beam, greedy, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize(("cell", "attention"), VARIANTS)
def test_torchscript_equals_eager(cell, attention):
    model = tiny_model(cell, attention)
    scripted = script(model)
    src, lengths = batch(SOURCES)
    tgt_in = torch.tensor([[2, 5, 6, 7]] * len(SOURCES))
    with torch.inference_mode():
        torch.testing.assert_close(scripted(src, lengths, tgt_in), model(src, lengths, tgt_in))
        for got, want in zip(scripted.greedy(src, lengths, CAP, True), model.greedy(src, lengths, CAP, True),
                             strict=True):
            torch.testing.assert_close(got, want)
        for got, want in zip(scripted.beam_search(src, lengths, 3, CAP, 1.0, True),
                             model.beam_search(src, lengths, 3, CAP, 1.0, True), strict=True):
            torch.testing.assert_close(got, want)


def test_max_length_is_enforced_and_capped_by_the_model():
    model = tiny_model()
    with torch.no_grad():
        model.output.bias[EOS_ID] -= 50.0  # never ends by itself
    for max_length, expected in ((1, 1), (4, 4), (CAP, CAP), (CAP + 50, CAP)):
        tokens, lengths, _, steps, attention = run_greedy(model, SOURCES, max_length)
        assert lengths.tolist() == [expected] * len(SOURCES)
        assert tokens.shape == (len(SOURCES), expected) and int(steps) == expected
        assert attention.shape == (len(SOURCES), expected, max(map(len, SOURCES)))
        tokens, lengths, *_ = run_beam(model, SOURCES, 3, max_length)
        assert lengths.tolist() == [expected] * len(SOURCES)


def test_attention_rows_are_distributions_and_absent_unless_requested():
    model = tiny_model("gru", "additive")
    _, lengths, _, _, attention = run_beam(model, SOURCES, 3)
    for index, length in enumerate(lengths.tolist()):
        sums = attention[index, :length].sum(dim=1)
        torch.testing.assert_close(sums, torch.ones(length))
        assert float(attention[index, length:].abs().sum()) == 0.0
    assert run_greedy(model, SOURCES, attention=False)[4].shape[1] == 0
    assert run_beam(model, SOURCES, 3, attention=False)[4].shape[1] == 0


def test_beam_scores_are_the_log_probability_of_the_returned_tokens():
    model = tiny_model("lstm", "general")
    tokens, lengths, scores, _, _ = run_beam(model, SOURCES, 4, length_penalty=0.0)
    src, src_lengths = batch(SOURCES)
    for index, length in enumerate(lengths.tolist()):
        target = tokens[index, :length].tolist()
        ended = length < CAP  # a hypothesis cut at the cap has no EOS to score
        tgt_in = torch.tensor([[2, *target]])
        expected = [*target, EOS_ID] if ended else target
        with torch.inference_mode():
            log_probs = torch.log_softmax(model(src[index:index + 1], src_lengths[index:index + 1], tgt_in),
                                          dim=-1)[0]
        total = sum(float(log_probs[step, token]) for step, token in enumerate(expected))
        assert float(scores[index]) == pytest.approx(total, abs=1e-4)


def test_config_rejects_unknown_cell_and_attention():
    with pytest.raises(ValueError, match="cell"):
        TranslateConfig(src_vocab_size=5, tgt_vocab_size=5, cell="transformer")
    with pytest.raises(ValueError, match="attention"):
        TranslateConfig(src_vocab_size=5, tgt_vocab_size=5, attention="dot-product")
