"""`accuvqa predict`: one image and one question; an image file answers like its prepared features."""

import pytest

from accuvqa.data.features import feature_file
from accuvqa.errors import DataError
from accuvqa.predict import predict


@pytest.fixture
def trained(tiny_trained):
    return tiny_trained


@pytest.mark.parametrize("question", ["What color is the shape?", "Is there a circle?"])
def test_an_image_file_answers_like_its_prepared_features(trained, question):
    import easy_vqa

    image_id, png = sorted(easy_vqa.get_test_image_paths().items())[0]
    npz = feature_file(trained.FEATURE_PATH, "test2015", image_id)  # what `prepare` wrote for that PNG
    from_png = predict(trained, png, question, top_k=13)
    from_npz = predict(trained, str(npz), question, top_k=13)
    assert [a for a, _ in from_png] == [a for a, _ in from_npz]
    assert [s for _, s in from_png] == pytest.approx([s for _, s in from_npz], abs=1e-6)
    assert len(from_png) == 13 and [s for _, s in from_png] == sorted((s for _, s in from_png), reverse=True)


def test_another_image_gives_other_scores(trained):
    import easy_vqa

    paths = [p for _, p in sorted(easy_vqa.get_test_image_paths().items())]
    scores = [dict(predict(trained, p, "What color is the shape?", top_k=13)) for p in paths[:6]]
    assert len({tuple(round(s[a], 4) for a in sorted(s)) for s in scores}) > 1


def test_missing_or_unreadable_image_is_named(trained, tmp_path):
    with pytest.raises(DataError, match="image nope.png does not exist"):
        predict(trained, "nope.png", "?")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot read image {tmp_path / 'junk.png'}"):
        predict(trained, str(tmp_path / "junk.png"), "?")
    with pytest.raises(DataError, match="this model reads region features: give the image's features file"):
        predict(trained.replace(DATASET="vqa"), str(tmp_path / "junk.png"), "?")
