"""Length-aware grouping (services/batching.py): order kept, results unchanged, padding never grows."""

import itertools
import random

import pytest
import torch
from prometheus_client import REGISTRY

from models.sentiment import SentimentConfig, SentimentRNN
from models.text import Vocab, build_vocab
from services.batching import LengthGrouping, collate, padded_positions, plan_groups, run_in_groups
from services.sentiment import classify, encode

WORDS = ["the", "film", "is", "a", "great", "and", "warm", "but", "thin", "plot", "with", "bad",
         "acting", "that", "never", "ends"]


def cost(groups: list[list[int]], grouping: LengthGrouping) -> float:
    return sum(len(g) * max(g) + grouping.step_tokens * max(g) + grouping.call_tokens for g in groups)


def lengths_of(lengths: list[int], groups: list[list[int]]) -> list[list[int]]:
    return [[lengths[i] for i in group] for group in groups]


def brute_force(lengths: list[int], grouping: LengthGrouping) -> float:
    """Least cost over every split of the length-sorted batch into at most max_groups runs."""
    ordered = sorted(lengths, reverse=True)
    best = float("inf")
    for cuts_count in range(min(grouping.max_groups, len(ordered))):
        for cuts in itertools.combinations(range(1, len(ordered)), cuts_count):
            bounds = [0, *cuts, len(ordered)]
            groups = [ordered[a:b] for a, b in itertools.pairwise(bounds)]
            best = min(best, cost(groups, grouping))
    return best


def test_no_grouping_gives_one_group_longest_first():
    lengths = [3, 9, 1, 9, 4]
    assert plan_groups(lengths) == [[1, 3, 4, 0, 2]]
    assert plan_groups(lengths, LengthGrouping(max_groups=1)) == [[1, 3, 4, 0, 2]]
    assert plan_groups([]) == []


def test_one_long_text_is_split_from_many_short_ones():
    lengths = [2] * 30 + [60]
    groups = plan_groups(lengths, LengthGrouping(max_groups=4, step_tokens=1, call_tokens=20))
    assert groups == [[30], list(range(30))]
    assert padded_positions(lengths_of(lengths, groups)) == 60 + 60  # was 31 * 60


def test_grouping_that_does_not_pay_is_not_done():
    lengths = [10, 9, 10, 8]  # 5 padded positions: a second call costing 20 never pays
    assert plan_groups(lengths, LengthGrouping(max_groups=4, call_tokens=20)) == [[0, 2, 1, 3]]


@pytest.mark.parametrize("seed", range(40))
def test_plan_is_a_partition_optimal_and_never_pads_more(seed):
    rng = random.Random(seed)
    lengths = [rng.choice((1, 2, 3, 5, 8, 13, 21, 40)) for _ in range(rng.randint(1, 11))]
    grouping = LengthGrouping(max_groups=rng.randint(1, 4), step_tokens=rng.choice((0, 1, 4)),
                              call_tokens=rng.choice((0, 3, 30)))
    groups = plan_groups(lengths, grouping)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert 1 <= len(groups) <= grouping.max_groups
    for group in groups:
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    assert padded_positions(lengths_of(lengths, groups)) <= len(lengths) * max(lengths)
    assert cost(lengths_of(lengths, groups), grouping) == pytest.approx(brute_force(lengths, grouping))


def test_run_in_groups_keeps_request_order_and_calls_once_per_group():
    items = ["ccc", "a", "bbbbbbbbbbbbbbbbbbbb", "dd", "eeeeeeeeeeeeeeeeeeee"]
    calls = []

    def run(batch: list[str]) -> list[str]:
        calls.append(batch)
        return [item.upper() for item in batch]

    out = run_in_groups(items, [len(i) for i in items], run, LengthGrouping(max_groups=3, call_tokens=3))
    assert out == [item.upper() for item in items]
    assert len(calls) == 2  # the two 20-character items, then the short ones
    assert sorted(len(b) for b in calls) == [2, 3]


def test_run_in_groups_rejects_a_run_that_drops_items():
    with pytest.raises(AssertionError, match="1 outputs for 2 inputs"):
        run_in_groups([1, 2], [1, 1], lambda batch: batch[:1])


def test_grouped_classify_equals_ungrouped_and_single_calls():
    torch.manual_seed(0)
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.choice((1, 2, 3, 25, 40)))) for _ in range(24)]
    vocab = Vocab(build_vocab(texts))
    model = SentimentRNN(SentimentConfig(vocab_size=len(vocab), embedding_dim=8, hidden_size=6,
                                         dropout=0.0)).eval()
    labels = ["negative", "positive"]
    grouping = LengthGrouping(max_groups=4, step_tokens=1, call_tokens=8)
    assert len(plan_groups([len(vocab.encode(t)) for t in texts], grouping)) > 1  # really grouped
    encoded = encode(vocab, texts, max_tokens=1000)
    whole = classify(model, labels, encoded)
    grouped = classify(model, labels, encoded, grouping=grouping)
    singles = [classify(model, labels, [ids])[0] for ids in encoded]
    for one, a, b in zip(singles, whole, grouped, strict=True):
        assert a.tokens == b.tokens == one.tokens
        probs = torch.tensor([list(r.probabilities.values()) for r in (one, a, b)])
        assert torch.allclose(probs[0], probs[1], atol=1e-6) and torch.allclose(probs[1], probs[2], atol=1e-6)


def test_collate_counts_padding_positions():
    def padding() -> float:
        return REGISTRY.get_sample_value("rnnserve_model_padding_tokens_total", {"model": "pad-test"}) or 0.0

    before = padding()
    collate([[1, 2, 3, 4], [5], [6, 7]], "pad-test")
    assert padding() - before == 3 * 4 - 7


def test_invalid_grouping_is_refused():
    with pytest.raises(ValueError, match="max_groups >= 1"):
        LengthGrouping(max_groups=0)
