"""vitlab serve's API through an HTTP client, as a program calling it would: answers, errors for
every kind of bad input (after each, the server still answers), batching, and the CLI's refusals.
The page in a real browser is tests/test_serve_browser.py."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import vitlab
from vitlab.cli import main
from vitlab.serve import OVERLAY_SIZE, create_app
from tests.image_fixtures import CLASSES, class_image, train_tiny_run

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MAX_UPLOAD_MB = 1
MAX_IMAGES = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITLAB_CACHE", str(root / "cache"))
        yield train_tiny_run(root)


@pytest.fixture(scope="module")
def classifier(run):
    return vitlab.load(run)


@pytest.fixture(scope="module")
def client(classifier):
    app = create_app(classifier, max_upload_mb=MAX_UPLOAD_MB, max_images=MAX_IMAGES)
    with TestClient(app) as client:  # runs the app's start-up and shut-down, as uvicorn does
        yield client


def picture(cls: int, seed: int = 0, size: int = 48) -> Image.Image:
    """A test-class image, scaled up: the server scales it back down as training data was."""
    return Image.fromarray(class_image(cls, np.random.default_rng(seed), 16)).resize((size, size))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height (CRC fixed): a decompression bomb's first bytes."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def predict(client, *images: tuple[str, bytes], **data):
    return client.post("/v1/predict", files=[("image", (name, body, "image/png")) for name, body in images],
                       data=data)


def assert_still_serving(client):
    response = predict(client, ("circle.png", encode(picture(0))))
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["predictions"][0]["class"] == "circle"


# ---------------------------------------------------------------- answers
def test_predict_gives_the_classes_and_probabilities_the_model_computes(client, classifier):
    image = picture(1, seed=4)
    response = predict(client, ("cross.png", encode(image)), top_k="3")
    assert response.status_code == 200
    answer = response.json()
    [result] = answer["results"]
    assert result["filename"] == "cross.png"
    classes = [p["class"] for p in result["predictions"]]
    probabilities = [p["probability"] for p in result["predictions"]]
    assert classes[0] == "cross" and sorted(classes) == sorted(CLASSES)
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    # exactly what the Python API says for the same image: the server preprocesses as predict does
    expected = dict(classifier.predict(image, top_k=3)[0])
    assert {c: p for c, p in zip(classes, probabilities)} == pytest.approx(expected, abs=1e-5)
    assert result["model_ms"] > 0 and result["batch_size"] >= 1 and answer["time_ms"] >= result["model_ms"]
    assert "attention_png" not in result


def test_many_images_in_one_request_keep_their_order_and_get_overlays(client):
    images = [("stripes.jpg", encode(picture(2, 1), "JPEG")),
              ("circle-gray.png", encode(picture(0, 2).convert("L"))),  # grayscale: repeated to RGB
              ("cross.gif", encode(picture(1, 3).convert("P"), "GIF"))]
    response = client.post("/v1/predict?attention=true&top_k=2",  # options in the query string work too
                           files=[("image", (name, body, "application/octet-stream"))
                                  for name, body in images])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [name for name, _ in images]
    assert [r["predictions"][0]["class"] for r in results] == ["stripes", "circle", "cross"]
    assert all(len(r["predictions"]) == 2 for r in results)
    overlays = [Image.open(io.BytesIO(base64.b64decode(r["attention_png"]))) for r in results]
    assert all(o.format == "PNG" and o.size == (OVERLAY_SIZE, OVERLAY_SIZE) for o in overlays)
    # the overlay is the image with the heat map blended in: not the plain image, nor one colour
    plain = np.asarray(picture(2, 1).resize((OVERLAY_SIZE, OVERLAY_SIZE)), dtype=float)
    first = np.asarray(overlays[0].convert("RGB"), dtype=float)
    assert np.abs(first - plain).mean() > 5 and first.std() > 5


def test_the_overlay_does_not_change_the_probabilities(client):
    body = encode(picture(2, seed=8))
    plain = predict(client, ("a.png", body)).json()["results"][0]["predictions"]
    with_overlay = predict(client, ("a.png", body), attention="true").json()["results"][0]["predictions"]
    assert plain == with_overlay


def test_model_card_describes_classes_architecture_preprocessing_and_accuracy(client, classifier):
    response = client.get("/v1/model")
    assert response.status_code == 200
    card = response.json()
    assert card["classes"] == list(CLASSES)
    assert card["architecture"]["dim"] == 32 and card["architecture"]["depth"] == 2
    assert card["architecture"]["parameters"] == sum(p.numel() for p in classifier.model.parameters())
    assert card["preprocessing"]["image_size"] == [16, 16]
    assert card["preprocessing"]["mean"] == pytest.approx(list(classifier.mean))
    accuracy = card["accuracy"]["val_top1"]
    assert accuracy == classifier.metadata["val_top1"] and 0 < accuracy <= 1
    assert card["precision"] == classifier.inference_precision
    assert card["serving"]["max_images"] == MAX_IMAGES


def test_health_page_and_openapi_need_no_network(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/app.js"' in page.text and 'href="/style.css"' in page.text
    for route, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        response = client.get(route)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert "http://" not in response.text and "https://" not in response.text, route
    assert "http://" not in page.text and "https://" not in page.text
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    # FastAPI's /docs pulls Swagger UI from a CDN: it is off, with a JSON 404 saying what exists
    docs = client.get("/docs")
    assert docs.status_code == 404 and "POST /v1/predict" in docs.json()["error"]


def test_a_file_name_is_only_a_label_never_opened(client, tmp_path):
    """A client naming its upload after a file on the server gets the upload classified."""
    decoy = tmp_path / "cross.png"
    picture(1).save(decoy)
    response = predict(client, (str(decoy), encode(picture(0, seed=5))),
                       ("../../../etc/passwd", encode(picture(2))))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [str(decoy), "../../../etc/passwd"]
    assert [r["predictions"][0]["class"] for r in results] == ["circle", "stripes"]


# ---------------------------------------------------------------- bad input
def _chunked_body():
    """An upload without Content-Length, over the limit: refused while it streams in."""
    yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
    for _ in range(MAX_UPLOAD_MB * 16 + 1):
        yield b"\0" * 65536


PNG = encode(picture(0))
TINY_PNG = encode(Image.new("RGB", (1, 1)))  # 1,000 of them stay under the body limit
# covering the 256-pixel overlay, 100,000 x 1 would become 25,600,000 x 256 pixels (20 GB of RGB)
LINE_PNG = encode(Image.new("RGB", (100_000, 1)))
MULTIPART = {"content-type": "multipart/form-data; boundary=b"}
NO_IMAGE = "no 'image' field: send one or more image files as image=@photo.png"


def upload(name: str, body: bytes, field: str = "image", mime: str = "image/png", **data) -> dict:
    """client.post arguments sending one file, plus form fields."""
    return {"files": {field: (name, body, mime)}, "data": data}


BAD_REQUESTS = {  # case: (client.post arguments, status, the start of what the error says)
    "not an image": (upload("notes.txt", b"just some text", mime="text/plain"),
                     400, "notes.txt: not an image"),
    "empty file": (upload("empty.png", b""), 400, "empty.png: not an image"),
    "truncated": (upload("half.png", PNG[: len(PNG) // 2]),
                  400, "cannot read image half.png: image file is truncated"),
    "50,000 x 50,000 header": (upload("bomb.png", png_claiming(50_000, 50_000)),
                               413, "bomb.png: the image is 2,500,000,000 pixels; "
                                    "send at most 40 megapixels"),
    "over the pixel cap": (upload("huge.png", png_claiming(8000, 6000)),
                           413, "huge.png: the image is 8000 x 6000 pixels; send at most 40 megapixels"),
    "too elongated to scale": (upload("line.png", LINE_PNG, attention="true"),
                               400, "line.png: a 100000x1 image is too elongated to resize to 256x256"),
    "body over --max-upload-mb": (upload("big.png", b"\0" * (MAX_UPLOAD_MB * 2**20 + 1)),
                                  413, "the request body is over the 1 MB limit (--max-upload-mb)"),
    "chunked body over the limit": ({"content": _chunked_body, "headers": MULTIPART},
                                    413, "the request body is over the 1 MB limit"),
    "missing field": (upload("x.png", PNG, field="file"), 400, f"{NO_IMAGE} (the request had file)"),
    "only a text field": ({"content": b'--b\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n'
                                      b"--b--\r\n", "headers": MULTIPART},
                          400, f"{NO_IMAGE} (the request had top_k)"),
    "image sent as text": (upload("x", b"", field="other", mime="text/plain", image="photo.png"),
                           400, "'image' field 1 is text, not a file"),
    "1,000 files": ({"files": [("image", (f"{i}.png", TINY_PNG, "image/png")) for i in range(1000)]},
                    400, f"Too many files. Maximum number of files is {MAX_IMAGES}; "
                         f"send at most {MAX_IMAGES} images"),
    "JSON body": ({"json": {"image": "x"}},
                  415, "send multipart/form-data with the images in fields named 'image'"),
    "top_k not a number": (upload("x.png", PNG, top_k="five"),
                           400, "top_k must be a whole number from 1 to 3 (the model's class count), "
                                "got 'five'"),
    "top_k too large": (upload("x.png", PNG, top_k="4"), 400, "top_k must be a whole number from 1 to 3"),
    "attention not a flag": (upload("x.png", PNG, attention="maybe"),
                             400, "attention must be true or false, got 'maybe'"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(client, case):
    kwargs, status, message = BAD_REQUESTS[case]
    if callable(kwargs.get("content")):
        kwargs = {**kwargs, "content": kwargs["content"]()}
    response = client.post("/v1/predict", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert_still_serving(client)


def test_one_bad_image_fails_its_request_only(client):
    response = predict(client, ("good.png", PNG), ("bad.png", b"GIF89a broken"))
    assert response.status_code == 400 and response.json()["error"].startswith("bad.png: ")
    assert_still_serving(client)


def test_unknown_routes_and_methods_say_what_exists(client):
    response = client.get("/v1/predict")
    assert response.status_code == 405
    assert response.json()["error"].startswith(
        "GET is not allowed on /v1/predict; vitlab serves POST /v1/predict")
    response = client.get("/v2/predict")
    assert response.status_code == 404 and "no such route: GET /v2/predict" in response.json()["error"]


# ---------------------------------------------------------------- batching
def post_together(client, count: int) -> list[dict]:
    """`count` one-image requests from `count` threads at once; their results in order."""
    barrier = threading.Barrier(count)
    answers: list = [None] * count

    def send(i):
        barrier.wait()
        response = predict(client, (f"{i}.png", encode(picture(i % 3, seed=i))))
        answers[i] = response.json()["results"][0] if response.status_code == 200 else response.text

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_requests_arriving_together_share_one_forward_pass(classifier):
    # a long wait, so all four surely meet; a full batch must not wait for it
    with TestClient(create_app(classifier, max_batch=4, max_wait_ms=5000)) as client:
        start = time.perf_counter()
        results = post_together(client, 4)
        elapsed = time.perf_counter() - start
    assert [r["batch_size"] for r in results] == [4, 4, 4, 4], results
    assert elapsed < 4, "a full batch waited for --max-wait-ms"
    assert [r["predictions"][0]["class"] for r in results] == ["circle", "cross", "stripes", "circle"]
    # a batch gives each image the answer it gets alone
    for i, result in enumerate(results):
        alone = dict(classifier.predict(picture(i % 3, seed=i), top_k=3)[0])
        assert {p["class"]: p["probability"] for p in result["predictions"]} == pytest.approx(alone, abs=1e-5)


def test_max_batch_1_serves_one_image_at_a_time(classifier):
    with TestClient(create_app(classifier, max_batch=1)) as client:
        results = post_together(client, 4)
    assert [r["batch_size"] for r in results] == [1, 1, 1, 1], results


def test_a_lone_request_waits_at_most_max_wait_ms(classifier):
    with TestClient(create_app(classifier, max_batch=8, max_wait_ms=300)) as client:
        predict(client, ("warm.png", PNG))
        start = time.perf_counter()
        result = predict(client, ("alone.png", PNG)).json()["results"][0]
        elapsed = time.perf_counter() - start
    assert result["batch_size"] == 1
    assert 0.3 <= elapsed < 3, elapsed


# ---------------------------------------------------------------- the command
def test_cli_refuses_a_missing_checkpoint_a_taken_port_and_bad_limits(run, capsys):
    threads_before = torch.get_num_threads()
    assert main(["serve", "no/such/run", "--port", "0"]) == 2
    assert "no/such/run does not exist" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"vitlab serve: error: cannot listen on 127.0.0.1:{port}" in err and "--port 0" in err
    assert main(["serve", str(run), "--port", "0", "--max-batch", "0"]) == 2
    assert "max_batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(run), "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    assert torch.get_num_threads() == threads_before  # a refused start changes nothing in the caller


def test_serve_load_benchmark_prints_a_table_then_one_json_line(run, capsys):
    spec = importlib.util.spec_from_file_location("serve_load", BENCHMARKS / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    # one server (each start is a fresh Python importing torch): batching on, two levels
    assert serve_load.main([str(run), "--requests", "12", "--concurrency", "1,4", "--batching", "on",
                            "--model-seconds", "0.1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("serve_load: ") and lines[1].startswith("model alone: ")
    assert lines[2].split()[:3] == ["batching", "clients", "req/s"]
    report = json.loads(lines[-1])
    assert set(report["model_ms_per_image"]) == {"1", "32"} and report["model_batch_gain"] > 0
    rows = report["runs"]
    assert [(r["batching"], r["concurrency"], r["max_batch"]) for r in rows] == [("on", 1, 32), ("on", 4, 32)]
    assert all(r["errors"] == 0 and r["requests"] == 12 and r["requests_per_s"] > 0 for r in rows)
    assert all(r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert rows[0]["mean_batch"] == 1.0  # one client: nothing to batch with

