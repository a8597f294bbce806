"""The procedural scene generator: deterministic, well-formed, and honest about its held-out split."""

from __future__ import annotations

import numpy as np
import pytest

from training import scenes


def test_same_seed_and_split_give_identical_pixels_and_caption():
    for seed in (0, 7, 123456):
        first, second = scenes.make_scene(seed, "train"), scenes.make_scene(seed, "train")
        assert np.array_equal(first.image, second.image)
        assert first.caption == second.caption and first.shapes == second.shapes


def test_different_seeds_and_splits_give_different_scenes():
    images = [scenes.make_scene(seed, "train").image for seed in range(20)]
    assert len({image.tobytes() for image in images}) == 20
    assert not np.array_equal(scenes.make_scene(3, "train").image, scenes.make_scene(3, "test_fresh").image)


def test_pinned_scene_never_drifts():
    """A change to the generator changes the data every artifact was trained on: it must be deliberate."""
    scene = scenes.make_scene(0, "train")
    assert scene.caption == ("a small red circle at the top right , a large yellow diamond in the centre "
                             "and a large yellow triangle at the bottom")


def test_scene_is_64x64_rgb_with_one_to_three_shapes_in_distinct_cells():
    counts = set()
    for seed in range(60):
        scene = scenes.make_scene(seed, "val")
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        cells = [shape.cell for shape in scene.shapes]
        assert 1 <= len(cells) <= 3 and cells == sorted(set(cells))  # reading order, one per cell
        counts.add(len(cells))
    assert counts == {1, 2, 3}


def test_scene_shapes_matches_the_drawn_scene():
    for seed in range(10):
        assert scenes.scene_shapes(seed, "test_unseen") == scenes.make_scene(seed, "test_unseen").shapes


def test_caption_parses_back_to_the_drawn_attributes():
    for seed in range(40):
        scene = scenes.make_scene(seed, "train")
        parsed = scenes.parse_caption(scene.caption)
        assert parsed == [{"size": s.size, "colour": s.colour, "shape": s.kind, "position": s.position}
                          for s in scene.shapes]


def test_held_out_pairs_appear_only_in_the_unseen_split():
    def pairs(split):
        return [{(s.colour, s.kind) for s in scenes.scene_shapes(seed, split)} for seed in range(600)]

    for split in ("train", "val", "test_fresh"):
        assert not any(p & scenes.HELD_OUT_PAIRS for p in pairs(split)), split
    assert all(p & scenes.HELD_OUT_PAIRS for p in pairs("test_unseen"))
    # Each held-out colour and kind still occurs in training, in other pairings.
    seen = set().union(*pairs("train"))
    for colour, kind in scenes.HELD_OUT_PAIRS:
        assert any(c == colour for c, _ in seen) and any(k == kind for _, k in seen)


def test_shapes_are_visible_against_the_background():
    scene = scenes.make_scene(1, "train")
    for shape in scene.shapes:
        row, col = divmod(shape.cell, scenes.GRID)
        cell = scene.image[row * 21:(row + 1) * 21, col * 21:(col + 1) * 21].astype(float)
        # The nominal colour's strongest channel stands out in the cell holding the shape.
        channel = int(np.argmax(scenes.COLOURS[shape.colour]))
        assert cell[..., channel].max() > 150


def test_attribute_matches_scores_each_attribute():
    scene = scenes.make_scene(5, "train")
    assert all(c == n for c, n in scenes.attribute_matches(scene.caption, scene.shapes).values())
    first = scene.shapes[0]
    other = next(c for c in scenes.COLOURS if c != first.colour)
    wrong = scene.caption.replace(f"{first.size} {first.colour} {first.kind}",
                                  f"{first.size} {other} {first.kind}", 1)
    scores = scenes.attribute_matches(wrong, scene.shapes)
    assert scores["colour"][0] == len(scene.shapes) - 1
    assert scores["shape"][0] == scores["size"][0] == scores["position"][0] == len(scene.shapes)
    assert all(c == 0 for c, _ in scenes.attribute_matches("a dog on a sofa", scene.shapes).values())


@pytest.mark.parametrize("caption", ["", "a red circle", "a small red circle at the moon",
                                     "the small red circle at the top", "a small red circle at the top and"])
def test_off_grammar_captions_do_not_parse(caption):
    assert scenes.parse_caption(caption) is None


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        scenes.make_scene(0, "test")
