"""`vitlab serve`'s web app: a page to drop images on and a versioned JSON API, over one model.

    app = create_app(vitlab.load("runs/lite"), max_batch=32, max_wait_ms=5)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes (docs/serving.md has the full reference):
    GET  /             the page (vitlab/static/: plain HTML, CSS and JS, nothing from the internet)
    POST /v1/predict   multipart images -> top-k classes, optionally the attention-rollout overlay
    GET  /v1/model     classes, architecture, preprocessing, accuracy from the checkpoint
    GET  /healthz      {"status": "ok"}

How a request is served: the event loop only parses HTTP. Decoding an upload (PIL, up to tens of
megapixels) runs in the thread pool, one request's images in one call; the decoded pixels go to
`BatchingWorker`, one thread that owns the model and runs the images queued by all concurrent
requests in one forward pass. Each request awaits a future that the worker resolves back on the
loop, so slow inference never stalls other connections.

Bad input: every way a request can be wrong ends in a 4xx JSON `{"error": "..."}` that names the
problem and what to do. Uploads are parsed in memory (Starlette spools parts over 1 MB to an
anonymous temporary file); no name or path from a request is ever opened, and the page's own
files are read once from the package at start-up and served by exact route.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .attention import attention_maps
from .classifier import Classifier
from .data.image import PREPROCESSING_RULE, convert_mode, decode_opened, resize_to, to_uint8_array

# An image's header is read before its pixels: anything larger is refused before it is decoded.
# 40 megapixels is more than a phone camera's default photo (12-24 MP) and 120 MB as RGB.
MAX_PIXELS = 40_000_000
# The longer side of the attention overlay PNG: the model's input (32x32 for CIFAR-10) scaled up
# from the upload itself, so the overlay shows the crop the model saw at a size a person can read.
OVERLAY_SIZE = 256
OVERLAY_ALPHA = 0.6  # heat map over the image, as in vitlab.plots.plot_attention
FILE_FIELD = "image"
ROUTES = "POST /v1/predict, GET /v1/model, GET /healthz and the page at GET /"


def default_threads() -> int:
    """The model's intra-op threads unless told: one per core but one, which is left to the event
    loop, HTTP parsing and decoding. On a busy 2-core machine, two model threads fighting the
    server for the cores served 32 clients at 59% of the rate of one (BENCHMARKS.md, Serving)."""
    return max(1, torch.get_num_threads() - 1)


class RequestError(Exception):
    """A request the server refuses: answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------- decoding uploads
@dataclass
class DecodedImage:
    name: str
    pixels: torch.Tensor  # uint8 (C, H, W) at the model's size: what the model sees
    display: Image.Image | None  # RGB, the same crop at OVERLAY_SIZE, when the overlay is wanted


def _too_large(name: str, size: str) -> RequestError:
    return RequestError(413, f"{name}: the image is {size}; send at most {MAX_PIXELS // 1_000_000} "
                             f"megapixels (resize it first)")


def decode_upload(data: bytes, name: str, classifier: Classifier, keep_display: bool) -> DecodedImage:
    """Bytes of one upload -> the model's input, converted by the same rule as training data and
    `vitlab predict` (vitlab.data.image). RequestError(400/413) for anything that is not a
    readable image of a sane size."""
    try:
        # Image.open reads the header only; PIL itself refuses headers past 2x its own limit
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        claimed = re.search(r"\d+", str(error))  # "Image size (N pixels) exceeds limit of ..."
        raise _too_large(name, f"{int(claimed[0]):,} pixels" if claimed else "too many pixels") from None
    except UnidentifiedImageError:
        raise RequestError(400, f"{name}: not an image (PNG, JPEG, GIF, BMP, WebP, TIFF or PPM); "
                                f"send an image file") from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a crafted header can fail in any way inside a PIL plugin
        raise RequestError(400, f"{name}: cannot read the image header ({error})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _too_large(name, f"{width} x {height} pixels")
    try:
        decode_opened(image, name)  # a truncated or corrupt file fails here, whole
    except ValueError as error:
        raise RequestError(400, f"{error}; send the complete image file") from None
    try:
        # vitlab.data.image refuses a shape that would scale to more pixels than it decodes
        # (60,000,000 x 1 covering 32x32): checked again for the larger overlay crop
        pixels = torch.from_numpy(to_uint8_array(image, classifier.image_size, classifier.in_channels).copy())
        display = None
        if keep_display:
            h, w = classifier.image_size
            scale = OVERLAY_SIZE / max(h, w)
            display = resize_to(convert_mode(image, 3), (round(h * scale), round(w * scale)))
    except ValueError as error:
        raise RequestError(400, f"{name}: {error}; crop it closer to the model's shape") from None
    return DecodedImage(name, pixels, display)


def _inferno_lut() -> np.ndarray:
    """uint8 (256, 3): matplotlib's inferno colours, the colour map of vitlab attention."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def overlay_png(display: Image.Image, rollout: np.ndarray, lut: np.ndarray) -> bytes:
    """PNG bytes: the rollout map (gh, gw) stretched to its own min..max (as plot_attention's
    imshow does), upsampled smoothly over the image and blended on it, bright where the classifier
    drew the most."""
    low, high = float(rollout.min()), float(rollout.max())
    scaled = (rollout - low) / (high - low) if high > low else np.zeros_like(rollout)
    heat = (scaled * 255).round().astype(np.uint8)
    heat = Image.fromarray(heat).resize(display.size, Image.Resampling.BILINEAR)
    coloured = Image.fromarray(lut[np.asarray(heat)])
    out = io.BytesIO()
    Image.blend(display, coloured, OVERLAY_ALPHA).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------- batching
@dataclass
class Prediction:
    probabilities: torch.Tensor  # (K,) fp32, sums to 1
    rollout: np.ndarray | None  # (gh, gw) attention rollout of the classifier's query, when asked
    model_ms: float  # the forward pass that served this image (the whole batch)
    batch_size: int  # images in that forward pass


@dataclass
class _Job:
    pixels: torch.Tensor
    attention: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float  # time.perf_counter() when submitted


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the request went away (client disconnected, a sibling image failed)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BatchingWorker:
    """One thread that owns the model and serves a queue of images in batches.

    It takes the oldest waiting image, then gathers more until it has `max_batch` or until
    `max_wait_ms` after that image was submitted, and runs them in one forward pass. Under load
    the oldest image has already waited through the previous pass, so the next batch is whatever
    queued meanwhile, with no extra wait; when idle, an image waits at most `max_wait_ms` for
    company. `max_batch=1` serves images one at a time.
    """

    def __init__(self, classifier: Classifier, max_batch: int, max_wait_ms: float):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms}")
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # one pass first, so the first request does not pay for building the bf16 copy and
        # allocating buffers
        c, (h, w) = self.classifier.in_channels, self.classifier.image_size
        self._infer([_Job(torch.zeros(c, h, w, dtype=torch.uint8), True, None, None, 0.0)])
        self._thread = threading.Thread(target=self._serve, name="vitlab-inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finishes the images already queued, then ends the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    async def submit(self, pixels: torch.Tensor, attention: bool) -> Prediction:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(pixels, attention, future, loop, time.perf_counter()))
        return await future

    def _next_batch(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch, deadline = [first], first.enqueued + self.max_wait
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # serve this batch, then stop
                break
            batch.append(job)
        return batch

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                predictions = self._infer(batch)
            except Exception as error:  # a bug or out of memory: fail these requests, keep serving
                for job in batch:
                    job.loop.call_soon_threadsafe(_settle, job.future, None, error)
                continue
            for job, prediction in zip(batch, predictions):
                job.loop.call_soon_threadsafe(_settle, job.future, prediction)

    def _infer(self, batch: list[_Job]) -> list[Prediction]:
        start = time.perf_counter()
        pixels = torch.stack([job.pixels for job in batch])  # uint8 (B, C, H, W)
        probabilities = self.classifier.probabilities(pixels).cpu()
        rollouts: list[np.ndarray | None] = [None] * len(batch)
        wanted = [i for i, job in enumerate(batch) if job.attention]
        if wanted:
            # a second, plain-attention pass for these images: the fused kernel of the first never
            # forms the weights, and reusing its probabilities keeps them identical with or
            # without the overlay
            maps = attention_maps(self.classifier, self.classifier.preprocess(pixels[wanted]))
            for i, rollout in zip(wanted, maps.query_rollout):
                rollouts[i] = rollout
        model_ms = (time.perf_counter() - start) * 1000
        return [Prediction(p, r, model_ms, len(batch)) for p, r in zip(probabilities, rollouts)]


# ---------------------------------------------------------------- the app
def _parse_top_k(value: str | None, num_classes: int) -> int:
    if value is None:
        return min(5, num_classes)
    try:
        top_k = int(value)
    except ValueError:
        top_k = 0
    if not 1 <= top_k <= num_classes:
        raise RequestError(400, f"top_k must be a whole number from 1 to {num_classes} (the model's "
                                f"class count), got {value!r}")
    return top_k


def _parse_flag(name: str, value: str | None) -> bool:
    if value is None:
        return False
    flag = value.strip().lower()
    if flag not in ("true", "false", "1", "0", "yes", "no"):
        raise RequestError(400, f"{name} must be true or false, got {value!r}")
    return flag in ("true", "1", "yes")


class _UploadLimit:
    """ASGI middleware: refuses a request body over `max_bytes` with 413, from its Content-Length
    before reading anything, or as soon as a chunked body passes the limit."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"the request body is over the {max_bytes / 2**20:g} MB limit (--max-upload-mb); " \
                       f"send fewer or smaller images per request"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except self._TooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": self.message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _page_assets() -> dict[str, tuple[bytes, str]]:
    """The page's three files, read from the package once: route -> (bytes, media type)."""
    static = files("vitlab") / "static"
    return {
        "/": ((static / "index.html").read_bytes(), "text/html; charset=utf-8"),
        "/app.js": ((static / "app.js").read_bytes(), "text/javascript; charset=utf-8"),
        "/style.css": ((static / "style.css").read_bytes(), "text/css; charset=utf-8"),
    }


def model_card(classifier: Classifier) -> dict:
    """What GET /v1/model answers: enough for a client to label, preprocess and trust results."""
    config = classifier.model.config.to_dict()
    metadata = classifier.metadata
    h, w = classifier.image_size
    return {
        "classes": classifier.class_names,
        "architecture": {**config, "parameters": sum(p.numel() for p in classifier.model.parameters())},
        "preprocessing": {
            "image_size": [h, w], "in_channels": classifier.in_channels,
            "mean": list(classifier.mean), "std": list(classifier.std),
            "rule": PREPROCESSING_RULE,  # the one description exports carry too
        },
        # val_top1 and any other top-k figure the checkpoint recorded; {} for untrained weights
        "accuracy": {k: v for k, v in metadata.items() if k.endswith(("top1", "top5"))},
        # how the shipped model was trained (data, commands, machine, date); None for other checkpoints
        "provenance": metadata.get("provenance"),
        "device": classifier.device.type,
        "precision": classifier.inference_precision,
    }


def create_app(classifier: Classifier, *, max_batch: int = 32, max_wait_ms: float = 5.0,
               max_upload_mb: float = 10.0, max_images: int = 64):
    """The FastAPI app serving `classifier` (see the module docstring). Requests arriving together
    share forward passes of up to `max_batch` images, gathered for at most `max_wait_ms`
    (max_batch=1: one at a time); a body over `max_upload_mb` or more than `max_images` files is
    refused with 413/400."""
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    worker = BatchingWorker(classifier, max_batch, max_wait_ms)
    assets = _page_assets()
    card = model_card(classifier)
    card["serving"] = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_upload_mb": max_upload_mb,
                       "max_images": max_images}
    lut = _inferno_lut()

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(worker.start)
        yield
        await run_in_threadpool(worker.stop)

    # no /docs or /redoc: FastAPI loads their scripts from a CDN, and the server must work offline;
    # docs/serving.md documents the API and /openapi.json describes it
    app = FastAPI(title="vitlab", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_UploadLimit, max_bytes=int(max_upload_mb * 2**20))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        messages = {404: f"no such route: {request.method} {request.url.path}; vitlab serves {ROUTES}",
                    405: f"{request.method} is not allowed on {request.url.path}; vitlab serves {ROUTES}"}
        return JSONResponse({"error": messages.get(error.status_code, str(error.detail))},
                            status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return JSONResponse({"error": f"internal error ({type(error).__name__}: {error}); the server "
                                      f"logged it and keeps serving"}, status_code=500)

    def static_page(body: bytes, media_type: str):
        return lambda: Response(body, media_type=media_type)

    for route, (body, media_type) in assets.items():
        app.get(route, include_in_schema=False)(static_page(body, media_type))

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/v1/model")
    def model():
        return card

    multipart_schema = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [FILE_FIELD],
        "properties": {
            FILE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                         "description": f"one or more image files (at most {max_images})"},
            "top_k": {"type": "integer", "description": "classes per image (default 5)"},
            "attention": {"type": "boolean",
                          "description": "add attention_png: the attention-rollout overlay (base64 PNG)"},
        }}}}}}

    @app.post("/v1/predict", openapi_extra=multipart_schema)
    async def predict(request: Request):
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise RequestError(415, f"send multipart/form-data with the images in fields named "
                                    f"'{FILE_FIELD}' (curl -F {FILE_FIELD}=@photo.png); got Content-Type "
                                    f"{content_type or 'none'}")
        try:
            form = await request.form(max_files=max_images, max_fields=16)
        except HTTPException as error:  # Starlette's parser: too many files or fields, malformed body
            raise RequestError(400, f"cannot read the multipart body: {str(error.detail).rstrip('.')}; "
                                    f"send at most {max_images} images in fields named "
                                    f"'{FILE_FIELD}'") from None
        try:
            # top_k and attention may come as form fields or in the query string
            options = {**request.query_params, **{k: v for k, v in form.items() if isinstance(v, str)}}
            top_k = _parse_top_k(options.get("top_k"), len(classifier.class_names))
            attention = _parse_flag("attention", options.get("attention"))
            uploads = form.getlist(FILE_FIELD)
            if not uploads:
                others = sorted(set(form.keys()))
                raise RequestError(400, f"no '{FILE_FIELD}' field: send one or more image files as "
                                        f"{FILE_FIELD}=@photo.png" +
                                        (f" (the request had {', '.join(others)})" if others else ""))
            texts = [i + 1 for i, upload in enumerate(uploads) if isinstance(upload, str)]
            if texts:
                raise RequestError(400, f"'{FILE_FIELD}' field {texts[0]} is text, not a file: upload the "
                                        f"file (curl -F {FILE_FIELD}=@photo.png, with the @)")
            named = [((u.filename or f"image {i + 1}")[:100], await u.read()) for i, u in enumerate(uploads)]
        finally:
            await form.close()

        def decode_all() -> list[DecodedImage]:
            return [decode_upload(data, name, classifier, attention) for name, data in named]

        images = await run_in_threadpool(decode_all)
        predictions = await asyncio.gather(*(worker.submit(image.pixels, attention) for image in images))

        def describe() -> list[dict]:
            results = []
            for image, prediction in zip(images, predictions):
                values, indices = prediction.probabilities.topk(top_k)
                result = {"filename": image.name,
                          "predictions": [{"class": classifier.class_names[i], "probability": round(p, 6)}
                                          for p, i in zip(values.tolist(), indices.tolist())],
                          "model_ms": round(prediction.model_ms, 2), "batch_size": prediction.batch_size}
                if attention:
                    png = overlay_png(image.display, prediction.rollout, lut)
                    result["attention_png"] = base64.b64encode(png).decode("ascii")
                results.append(result)
            return results

        # PNG encoding is CPU work too: off the loop whenever there is an overlay to draw
        results = await run_in_threadpool(describe) if attention else describe()
        return {"results": results, "time_ms": round((time.perf_counter() - started) * 1000, 2)}

    return app
