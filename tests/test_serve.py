"""`accuvqa serve`: the page's answers equal `predict`'s, bad input becomes a message, and the page works in
a real browser (headless Chromium driven by Playwright) with every request going to the server itself."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from accuvqa import cli
from accuvqa.data.features import read_features
from accuvqa.errors import ConfigError
from accuvqa.predict import image_region_features, predict
from accuvqa.serve import MAX_IMAGE_PIXELS, Page, dataset_images
from conftest import ROOT, TINY, cli_overrides

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
QUESTION = "What color is the shape?"


@pytest.fixture(scope="module")
def page(tiny_trained) -> Page:
    return Page(tiny_trained)


@pytest.fixture(scope="module")
def png() -> str:
    import easy_vqa

    return sorted(easy_vqa.get_test_image_paths().items())[0][1]


def test_an_uploaded_image_is_answered_like_predict(page, tiny_trained, png):
    reply = page.ask(png, None, None, QUESTION)
    expected = predict(tiny_trained, png, QUESTION, top_k=5)  # loads the checkpoint afresh
    assert list(reply.answers) == [a for a, _ in expected]
    assert list(reply.answers.values()) == pytest.approx([s for _, s in expected], abs=1e-6)
    # the attention picture: larger than the 64x64 upload, drawn from the same forward pass
    assert reply.picture is not None and reply.picture.size[0] > 64 * 4
    assert reply.message.startswith(f"Answered from {Path(png).name}")


def test_the_model_is_loaded_once_not_per_question(page, png, monkeypatch):
    def no_reload(*args):
        raise AssertionError("the checkpoint was loaded again")

    monkeypatch.setattr("accuvqa.predict.load_trained_state", no_reload)
    monkeypatch.setattr("accuvqa.checkpoint.load_trained_state", no_reload)
    monkeypatch.setattr("accuvqa.checkpoint.load_trained", no_reload)
    assert len(page.ask(png, None, None, QUESTION).answers) == 5
    assert len(page.ask(None, None, page.images[0].name, "Is there a circle?").answers) == 5


def test_a_dataset_image_is_answered_like_its_features(page, tiny_trained):
    assert page.images and len(page.images) == len({i.name for i in page.images})
    chosen = page.images[1]
    assert chosen.name.startswith("val image ") and chosen.features.is_file() and chosen.image_file.is_file()
    # the page reads the image's packed store: the features of its .npz, bit for bit
    assert np.array_equal(image_region_features(tiny_trained, chosen.features),
                          read_features(chosen.features, tiny_trained.IMG_FEAT_SIZE, tiny_trained.IMG_FEAT_PAD_SIZE))
    reply = page.ask(None, None, chosen.name, chosen.questions[0])
    expected = predict(tiny_trained, str(chosen.features), chosen.questions[0], top_k=5)
    assert list(reply.answers) == [a for a, _ in expected]
    assert list(reply.answers.values()) == pytest.approx([s for _, s in expected], abs=1e-6)


def test_dataset_images_are_the_val_images_with_their_questions(tiny_trained):
    import json

    questions = json.loads(Path(tiny_trained.DATASET_PATH, "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    ids = sorted({q["image_id"] for q in questions["questions"]})
    images = dataset_images(tiny_trained, limit=3)
    assert [i.name for i in images] == [f"val image {n}" for n in ids[:3]]
    assert set(images[0].questions) == {q["question"] for q in questions["questions"] if q["image_id"] == ids[0]}


def _npz(path: Path, feat_size: int, regions: int = 4) -> str:
    np.savez(path, x=np.zeros((feat_size, regions), dtype=np.float32))
    return str(path)


def test_bad_input_gives_one_message_and_no_answer(page, tiny_trained, png, tmp_path):
    from PIL import Image

    (tmp_path / "notes.png").write_text("not an image")
    Image.new("1", (8000, MAX_IMAGE_PIXELS // 8000 + 1)).save(tmp_path / "huge.png")
    Image.new("1", (15000, 12000)).save(tmp_path / "bomb.png")  # past Pillow's decompression-bomb limit
    cases = {  # (image, features, picked, question) -> what the message must say
        (str(tmp_path / "notes.png"), None, None, QUESTION): "notes.png is not an image that can be read",
        (png, None, None, "   "): "type a question, then press Ask",
        (None, None, None, QUESTION): "upload an image (or its region features .npz), or pick one",
        (None, None, "val image -1", QUESTION): "'val image -1' is not one of the dataset's images",
        (None, _npz(tmp_path / "small.npz", 7), None, QUESTION):
            f"small.npz: 'x' has shape (7, 4), and neither side is IMG_FEAT_SIZE {tiny_trained.IMG_FEAT_SIZE}",
        (str(tmp_path / "huge.png"), None, None, QUESTION): "huge.png is 8000x5001 pixels, more than the 40,000,000",
        (str(tmp_path / "bomb.png"), None, None, QUESTION): "bomb.png has more than the 40,000,000 pixels",
    }
    for inputs, says in cases.items():
        reply = page.ask(*inputs)
        assert reply.message.startswith("**Error:** ") and says in reply.message, (inputs, reply.message)
        assert str(tmp_path) not in reply.message  # the upload is named, not the server's copy of it
        assert reply.answers == {} and reply.picture is None
    assert page.ask(png, None, None, QUESTION).answers  # and the next question is answered


def test_the_vqa_layout_answers_from_region_features(tiny_trained, png):
    cfg = tiny_trained.replace(DATASET="vqa")
    page = Page(cfg)
    assert "upload the image's features .npz as well" in page.ask(png, None, None, QUESTION).message
    chosen = page.images[0]
    assert chosen.image_file is None  # the VQA v2 layout has features, not pictures
    reply = page.ask(None, str(chosen.features), None, QUESTION)
    assert list(reply.answers) == [a for a, _ in predict(cfg, str(chosen.features), QUESTION)]
    assert reply.picture is not None  # the regions' boxes on a blank canvas of the stored image size
    assert page.ask(png, str(chosen.features), None, QUESTION).answers == reply.answers  # image only drawn on


def test_serve_without_gradio_exits_2_with_the_install_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--config", "easyvqa", "--CKPT_PATH", "never-read.pkl"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "accuvqa: error: accuvqa serve needs Gradio: pip install 'accuvqa[demo]'\n"


@pytest.mark.slow  # imports gradio: several seconds
def test_a_taken_port_is_named(tiny_trained, monkeypatch):
    import argparse

    from accuvqa import serve

    pytest.importorskip("gradio")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{port}: the port is taken"):
            serve.main(tiny_trained, argparse.Namespace(host="127.0.0.1", port=port))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"accuvqa serve exited {server.returncode}: {server.stdout.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"accuvqa serve did not listen on port {port} within {timeout} s")


@contextlib.contextmanager
def _serving(args: list[str], tmp_path: Path):
    """`accuvqa serve ARGS` on a free port in a subprocess; yields the URL."""
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GRADIO_TEMP_DIR": str(tmp_path / "uploads")}
    server = subprocess.Popen([sys.executable, "-m", "accuvqa", "serve", *args, "--port", str(port)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_port(port, server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def server(tiny_trained, tmp_path):
    """`accuvqa serve` serving the tiny trained model; yields the URL."""
    cfg = tiny_trained
    keys = {**TINY, **{k: getattr(cfg, k) for k in ("DATASET_PATH", "FEATURE_PATH", "CKPTS_PATH", "RESULT_PATH",
                                                     "VERSION", "CKPT_EPOCH")}}
    with _serving(["--config", str(ROOT / "configs/easyvqa.yml"), *cli_overrides(keys)], tmp_path) as url:
        yield url


@pytest.mark.slow
def test_the_page_answers_in_a_real_browser_and_fetches_nothing_from_outside(server, tiny_trained, png, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expected = predict(tiny_trained, png, QUESTION, top_k=5)
    (tmp_path / "notes.png").write_text("not an image")
    wrong_size = _npz(tmp_path / "wrong.npz", 7)
    (tmp_path / "big.npz").write_bytes(b"\0" * (11 * 2**20))  # over the 10 MB upload limit
    requests: list[str] = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        web = browser.new_page(viewport={"width": 1200, "height": 860})
        web.on("request", lambda r: requests.append(r.url))

        def ask(image=None, features=None, question=QUESTION):
            web.goto(server)
            for elem_id, path in (("image", image), ("features", features)):
                if path:
                    web.locator(f"#{elem_id} input[type=file]").set_input_files(path)
                    expect(web.locator(f"#{elem_id} a[href*='file=']")).to_be_visible()  # uploaded
            web.locator("#question textarea").fill(question)
            web.locator("#ask").click()

        ask(image=png)
        answers = web.locator("#answers")
        for answer, score in expected:
            expect(answers).to_contain_text(answer, timeout=20_000)
        expect(web.locator("#message")).to_contain_text(f"Answered from {Path(png).name}")
        picture = web.locator("#picture img")
        expect(picture).to_be_visible()
        assert picture.evaluate("img => img.naturalWidth") > 0
        shot = tmp_path / "serve.png"
        web.screenshot(path=shot, full_page=True)
        if os.environ.get("ACCUVQA_SERVE_SCREENSHOT"):  # the README's picture, in 256 colours to keep it small
            from PIL import Image

            with Image.open(shot) as image:
                image.convert("RGB").quantize(256).save(os.environ["ACCUVQA_SERVE_SCREENSHOT"], optimize=True)

        for inputs, says in (({"image": str(tmp_path / "notes.png")}, "notes.png is not an image"),
                             ({"image": png, "question": ""}, "type a question, then press Ask"),
                             ({"features": wrong_size}, "wrong.npz: 'x' has shape (7, 4), and neither side is")):
            ask(**inputs)
            expect(web.locator("#message")).to_contain_text(says, timeout=20_000)
            expect(answers).not_to_contain_text(expected[0][0])

        web.goto(server)
        web.locator("#features input[type=file]").set_input_files(str(tmp_path / "big.npz"))
        expect(web.locator("body")).to_contain_text("exceed the maximum allowed size", timeout=20_000)

        web.goto(server)  # one click on an example answers it: the server kept serving
        web.locator(".gallery-item, tr.tr-body").first.click()
        expect(web.locator("#message")).to_contain_text("Answered from val image", timeout=20_000)
        browser.close()

    assert requests and all(url.startswith(server + "/") or url == server for url in requests), \
        sorted({url for url in requests if not url.startswith(server)})
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_an_uploaded_photo_is_answered_through_the_recorded_extractor_in_a_real_browser(own_data_trained, tmp_path):
    """A model trained on features `accuvqa extract` wrote (DATASET folder) answers a bare photo on the page."""
    from playwright.sync_api import expect, sync_playwright

    from accuvqa.config import load_config
    from accuvqa.predict import Predictor

    photo = own_data_trained["root"] / "photos/test/test_01.png"
    predictor = Predictor(load_config(None, own_data_trained["keys"]))
    feats, boxes, _ = predictor.photo_regions(photo)
    expected = predictor.answer(feats, "Is it wide?", top_k=5, boxes=boxes, attention=False).answers
    with _serving(cli_overrides(own_data_trained["keys"]), tmp_path) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        web = browser.new_page(viewport={"width": 1200, "height": 860})
        web.goto(url)
        web.locator("#image input[type=file]").set_input_files(str(photo))
        expect(web.locator("#image a[href*='file=']")).to_be_visible()
        web.locator("#question textarea").fill("Is it wide?")
        web.locator("#ask").click()
        expect(web.locator("#message")).to_contain_text("Answered from test_01.png: 4 regions", timeout=60_000)
        for answer, _ in expected:
            expect(web.locator("#answers")).to_contain_text(answer)
        expect(web.locator("#picture img")).to_be_visible()
        browser.close()
