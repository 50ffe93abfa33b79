"""`accuvqa serve`: a page in the browser to ask a trained model about an image and see where it looked.

The page is made with Gradio (the optional extra `accuvqa[demo]`) and works offline: analytics are
off and every script, style and font comes from the server itself. The model is loaded once, when
the server starts; each question is answered by `Page.ask`, which needs no Gradio and turns every
user error (not an image, no question, features of the wrong size) into a message on the page.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from accuvqa.config import Config
from accuvqa.data.folder import FolderLayout
from accuvqa.data.feature_store import open_features
from accuvqa.data.layout import dataset_layout
from accuvqa.data.question_store import question_store
from accuvqa.data.records import FOLDERS
from accuvqa.errors import AccuvqaError, ConfigError, DataError
from accuvqa.runlog import print_table

log = logging.getLogger(__name__)

MAX_UPLOAD = "10mb"  # larger uploads are refused by the server before they reach the model
MAX_IMAGE_PIXELS = 40_000_000  # an upload that decodes to more pixels is refused (a 10 MB PNG can hold 10^9)
TOP_K = 5
DATASET_IMAGES = 200  # how many of the dataset's images the picker lists
EXAMPLES = 4  # (image, question) pairs from the data, one click away
INSTALL_HINT = "accuvqa serve needs Gradio: pip install 'accuvqa[demo]'"


@dataclass(frozen=True)
class DatasetImage:
    """One image of the prepared data: its region features, its picture if there is one, its questions."""

    name: str
    features: Path
    image_file: Path | None
    questions: tuple[str, ...]


@dataclass
class Reply:
    """What the page shows after Ask: answer -> score (best first), the attention picture, a message."""

    answers: dict[str, float] = field(default_factory=dict)
    picture: Any = None  # PIL.Image.Image
    message: str = ""


def _easyvqa_image_files(folder: str) -> dict[int, str]:
    """image id -> PNG of the bundled dataset for one feature folder ({} without the easy-vqa package)."""
    try:
        import easy_vqa
    except ImportError:
        return {}
    return easy_vqa.get_test_image_paths() if folder == FOLDERS["test"] else easy_vqa.get_train_image_paths()


def dataset_images(cfg: Config, limit: int = DATASET_IMAGES) -> list[DatasetImage]:
    """The first `limit` images (by id) of the val split (else test, else train), from the prepared stores."""
    try:
        store = question_store(cfg)
    except AccuvqaError as e:
        log.warning("no dataset images on the page: %s", e)
        return []
    for split in ("val", "test", "train"):
        if split not in store.splits:
            continue
        questions = store.questions(split, need_answers=False)
        by_image: dict[int, list[str]] = {}
        for image_id, question in zip(questions.image_id.tolist(), questions.questions()):
            by_image.setdefault(image_id, []).append(question)
        layout = dataset_layout(cfg)
        folder = layout.feature_folders(split)[0]
        packed = open_features(cfg.FEATURE_PATH, [folder], cfg.IMG_FEAT_SIZE, store_path=cfg.STORE_PATH, layout=layout)
        pictures = _easyvqa_image_files(folder) if cfg.DATASET == "easyvqa" else {}
        named = isinstance(layout, FolderLayout)  # your own images: named by their file names
        files = layout.index_features(folder) if named else {}
        images = []
        for image_id in sorted(i for i in by_image if i in packed)[:limit]:
            features = files.get(image_id) or layout.feature_file(folder, image_id)
            name = str(features.relative_to(Path(cfg.FEATURE_PATH) / folder))[:-len(".npz")] if named else image_id
            picture = layout.image_source(split, name) if named else pictures.get(image_id)
            images.append(DatasetImage(f"{split} image {name}", features,
                                       Path(picture) if picture and Path(picture).is_file() else None,
                                       tuple(by_image[image_id])))
        return images
    log.warning("no dataset images on the page: the question store %s holds no split", store.path)
    return []


def examples(images: list[DatasetImage], n: int = EXAMPLES) -> list[list[str]]:
    """[[image name, question], ...]: n of the dataset's images, each with a different one of its questions."""
    return [[image.name, image.questions[i % len(image.questions)]] for i, image in enumerate(images[:n])]


def check_image(path: Path) -> None:
    """DataError unless `path` is an image Pillow can read, of at most MAX_IMAGE_PIXELS pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as e:  # Pillow's own limit, far above ours
        raise DataError(f"{path.name} has more than the {MAX_IMAGE_PIXELS:,} pixels this page accepts: "
                        f"make it smaller") from e
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path.name} is not an image that can be read (PNG or JPEG expected)") from e
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{path.name} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} this page "
                        f"accepts: make it smaller")


class Page:
    """The model, loaded once, and the dataset images the page offers; `ask` answers one question."""

    def __init__(self, cfg: Config) -> None:
        from accuvqa.predict import Predictor

        self.cfg = cfg
        self.predictor = Predictor(cfg)
        self.lock = threading.Lock()  # one question at a time: the model keeps its attention maps in itself
        self.images = dataset_images(cfg)
        self.by_name = {image.name: image for image in self.images}

    def ask(self, image: str | None, features: str | None, picked: str | None, question: str | None) -> Reply:
        """Answer `question` about an uploaded image and/or features file, else about a dataset image."""
        uploads = [Path(p) for p in (image, features) if p]
        try:
            return self._ask(Path(image) if image else None, Path(features) if features else None, picked,
                             (question or "").strip())
        except AccuvqaError as e:
            message = str(e)
            for path in uploads:  # name an upload as the user did, not by the server's temporary copy
                message = message.replace(str(path), path.name)
            return Reply(message=f"**Error:** {message}")

    def _ask(self, image: Path | None, features: Path | None, picked: str | None, question: str) -> Reply:
        if not question:
            raise DataError("type a question, then press Ask")
        if image is None and features is None:
            if not picked:
                raise DataError("upload an image (or its region features .npz), or pick one of the dataset's images")
            if picked not in self.by_name:
                raise DataError(f"{picked!r} is not one of the dataset's images")
            chosen = self.by_name[picked]
            image, features, source = chosen.image_file, chosen.features, chosen.name
        else:
            source = " + ".join(p.name for p in (image, features) if p)
        if image is not None:
            check_image(image)
        predictor = self.predictor
        if features is None and not predictor.reads_photos:
            raise DataError("this model was trained on region features of unknown origin (not written by accuvqa "
                            "extract): upload the image's features .npz as well, or pick one of the dataset's images")
        reads = features if features is not None else image
        feats, boxes, size = predictor.regions(reads)
        with self.lock:
            answer = predictor.answer(feats, question, top_k=TOP_K, boxes=boxes)
            picture = (predictor.draw(answer, image_file=image, boxes=boxes, image_size=size)
                       if predictor.exposes_attention else None)
        return Reply(dict(answer.answers), picture, f"Answered from {source}: {feats.shape[0]} regions.")


def import_gradio() -> Any:
    """The gradio module, imported with analytics off; ConfigError naming the extra when it is missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read at import: no usage reports, no version check
    try:
        import gradio
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return gradio


def build_page(page: Page, gr: Any) -> Any:
    """The Gradio Blocks of the page: inputs and Ask beside the answers, the attention picture below them."""
    cfg = page.cfg
    vqa_layout = not page.predictor.reads_photos  # a model that reads region features only

    def ask(image, features, picked, question):
        reply = page.ask(image, features, picked, question)
        return reply.answers or None, reply.picture, reply.message

    def ask_example(picked, question):  # an example is a dataset image: uploads are cleared
        return (None, None, *ask(None, None, picked, question))

    with gr.Blocks(title="accuvqa", analytics_enabled=False) as blocks:
        gr.Markdown(f"## accuvqa: ask the model `{cfg.VERSION}` about an image\n"
                    + ("Upload an image with its region features (`.npz`), or pick one of the dataset's images."
                       if vqa_layout else "Upload a PNG or JPEG image (or its features `.npz`), or pick one of the "
                       "dataset's images."))
        with gr.Row():
            with gr.Column():
                image = gr.File(label="Image (PNG or JPEG)", file_types=[".png", ".jpg", ".jpeg"],
                                type="filepath", elem_id="image")
                features = gr.File(label="Region features (.npz)" + ("" if vqa_layout else ", instead of the image"),
                                   file_types=[".npz"], type="filepath", elem_id="features")
                picked = gr.Dropdown([i.name for i in page.images], value=None, label="…or one of the dataset's images",
                                     elem_id="picked")
                question = gr.Textbox(label="Question", placeholder="what color is the shape?", elem_id="question")
                button = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                message = gr.Markdown(elem_id="message")
                answers = gr.Label(label=f"Top-{TOP_K} answers", num_top_classes=TOP_K, elem_id="answers")
        picture = gr.Image(label="Where the model looked", type="pil", format="png", interactive=False,
                           buttons=["download", "fullscreen"], elem_id="picture")  # no sharing to a hub
        if page.images:
            gr.Examples(examples(page.images), inputs=[picked, question], outputs=[image, features, answers, picture,
                        message], fn=ask_example, run_on_click=True, cache_examples=False, label="Examples from the data")
        for trigger in (button.click, question.submit):
            trigger(ask, [image, features, picked, question], [answers, picture, message])
    return blocks


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Load the model, serve the page on --host:--port until interrupted."""
    gr = import_gradio()
    page = Page(cfg)
    blocks = build_page(page, gr)
    url = f"http://{args.host}:{args.port}"
    print_table("accuvqa serve", {"model": f"{cfg.VERSION} ({cfg.MODEL_USE})", "dataset images": len(page.images),
                                  "url": url})
    try:
        blocks.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, ssr_mode=False,
                      share=False, quiet=True, footer_links=["settings"], show_error=False)
    except OSError as e:
        raise ConfigError(f"cannot serve on {args.host}:{args.port}: the port is taken or the host is not an "
                          f"address of this machine; pick another --port or --host") from e
    except KeyboardInterrupt:
        blocks.close()
    return 0
