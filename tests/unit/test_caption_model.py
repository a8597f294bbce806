"""The captioner on tiny fixed-weight models: TorchScript equals eager, batched equals single, and
beam search with one beam is greedy decoding."""

from __future__ import annotations

import pytest
import torch

from models.caption import BOS_ID, EOS_ID, CaptionConfig, Captioner, caption_vocab
from models.text import PAD, PAD_ID, UNK
from training.export import script

VOCAB = 14
LIMITS = torch.tensor([3, 9, 1, 12, 6])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny tensors only lose to thread hand-offs on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(cell: str, attention: bool, seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    config = CaptionConfig(vocab_size=VOCAB, image_size=16, channels=(4, 6, 8), embedding_dim=8,
                           hidden_size=12, cell=cell, attention=attention, attention_size=6, dropout=0.0)
    model = Captioner(config).eval()
    with torch.no_grad():  # large weights and a nudge to <eos>: captions vary in length and content
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.6)
        model.output.bias[EOS_ID] += 1.0
    return model


def images(count: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# Every cell, both with and without attention, and LSTM (the two-part state) both ways.
VARIANTS = [("rnn_tanh", True), ("gru", False), ("lstm", False), ("lstm", True)]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{c}-{'attn' if a else 'init'}" for c, a in VARIANTS])
def pair(request):
    model = tiny(*request.param)
    return model, script(model)


def test_vocab_puts_specials_first():
    assert caption_vocab(["a", "circle", "a", "<eos>"])[:6] == [PAD, UNK, "<bos>", "<eos>", "a", "circle"]
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 2, 3)


def test_config_rejects_unknown_cell_and_bad_sizes():
    with pytest.raises(ValueError, match="cell"):
        CaptionConfig(vocab_size=VOCAB, cell="transformer")
    with pytest.raises(ValueError, match="divisible"):
        CaptionConfig(vocab_size=VOCAB, image_size=30, channels=(4, 4, 4))


def test_teacher_forced_logits_have_one_row_per_input_token(pair):
    model, _ = pair
    tokens = torch.tensor([[BOS_ID, 5, 6, 7], [BOS_ID, 8, PAD_ID, PAD_ID]])
    assert model(images(2), tokens).shape == (2, 4, VOCAB)


def test_torchscript_equals_eager(pair):
    model, scripted = pair
    x = images()
    tokens = torch.randint(4, VOCAB, (5, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, tokens), model(x, tokens))
        for eager, traced in ((model.greedy(x, LIMITS), scripted.greedy(x, LIMITS)),
                              (model.beam_search(x, LIMITS, 3), scripted.beam_search(x, LIMITS, 3))):
            assert torch.equal(eager[0], traced[0]) and torch.equal(eager[2], traced[2])
            torch.testing.assert_close(eager[1], traced[1])


@pytest.mark.parametrize("beam_size", [1, 3])
def test_batched_decoding_equals_one_image_at_a_time(pair, beam_size):
    _, scripted = pair
    x = images()
    with torch.no_grad():
        tokens, logprobs, lengths = (scripted.greedy(x, LIMITS) if beam_size == 1
                                     else scripted.beam_search(x, LIMITS, beam_size))
        for i in range(len(x)):
            one = (scripted.greedy(x[i:i + 1], LIMITS[i:i + 1]) if beam_size == 1
                   else scripted.beam_search(x[i:i + 1], LIMITS[i:i + 1], beam_size))
            n = int(one[2])
            assert int(lengths[i]) == n
            assert torch.equal(tokens[i, :n], one[0][0, :n])
            torch.testing.assert_close(logprobs[i, :n], one[1][0, :n], atol=1e-5, rtol=1e-5)


def test_lengths_respect_each_rows_limit_and_padding_follows(pair):
    _, scripted = pair
    with torch.no_grad():
        for tokens, logprobs, lengths in (scripted.greedy(images(), LIMITS),
                                          scripted.beam_search(images(), LIMITS, 4)):
            assert tokens.shape == (5, int(LIMITS.max()))
            assert (lengths >= 1).all() and (lengths <= LIMITS).all()
            for row, n in zip(tokens, lengths.tolist(), strict=True):
                assert (row[n:] == PAD_ID).all()
                assert EOS_ID not in row[:n - 1].tolist(), "<eos> only ever ends a caption"
            assert (logprobs <= 0).all()


def test_beam_of_one_is_greedy(pair):
    _, scripted = pair
    with torch.no_grad():
        greedy, beam = scripted.greedy(images(), LIMITS), scripted.beam_search(images(), LIMITS, 1)
    assert torch.equal(greedy[0], beam[0]) and torch.equal(greedy[2], beam[2])
    torch.testing.assert_close(greedy[1], beam[1])


def test_some_tiny_captions_end_with_eos_and_some_hit_the_limit():
    """Guards the tests above against a degenerate model that never (or always) stops."""
    with torch.no_grad():
        tokens, _, lengths = tiny("gru", False).greedy(images(32), torch.full((32,), 10))
    ended = [EOS_ID in row[:n].tolist() for row, n in zip(tokens, lengths.tolist(), strict=True)]
    assert any(ended) and not all(ended)


def test_step_by_step_decoding_reproduces_greedy(pair):
    _, scripted = pair
    x = images(1)
    with torch.no_grad():
        tokens, _, lengths = scripted.greedy(x, torch.tensor([10]))
        memory, keys, state = scripted.encode(x)
        current, stepped = torch.tensor([BOS_ID]), []
        for _ in range(10):
            logprobs, state = scripted.step(current, state, memory, keys)
            current = logprobs.argmax(dim=1)
            stepped.append(int(current))
            if stepped[-1] == EOS_ID:
                break
    assert stepped == tokens[0, :int(lengths[0])].tolist()
