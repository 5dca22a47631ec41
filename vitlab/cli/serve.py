"""`vitlab serve [CHECKPOINT]`: the page and JSON API of vitlab.serve on a uvicorn server."""

from __future__ import annotations

from .model_source import add_precision_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over HTTP: a page to drop images on and a JSON API",
        description="Serves a page (GET /) where you drop, choose or paste images and see the top-5 "
                    "classes and where the model looked, and a JSON API: POST /v1/predict, "
                    "GET /v1/model, GET /healthz (docs/serving.md). Ctrl-C stops it.")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="a run directory or .safetensors file (default: the model vitlab ships)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="most images in one forward pass (default 32; 1 serves one image at a time)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="longest an image waits for others to share its forward pass (default 5)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                   help="largest request body accepted (default 10)")
    p.add_argument("--max-images", type=int, default=64, metavar="N",
                   help="most images in one request (default 64)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the model (default: one per core but one, left to the HTTP side)")
    p.add_argument("--device", default="auto",
                   help="auto (default: the CUDA GPU when there is one, else the CPU), cpu, cuda")
    add_precision_option(p)
    p.set_defaults(func=run)


def _listen(host: str, port: int):
    """A listening socket, bound before the model loads, so a taken port fails at once and
    --port 0 can print the port the system chose."""
    import socket

    from .errors import CLIError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after Ctrl-C
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        raise CLIError(f"cannot listen on {host}:{port} ({error.strerror or error}); pass another "
                       f"--port, or --port 0 for a free one") from None
    return sock


def run(args) -> int:
    import gc

    from .errors import CLIError

    try:
        import uvicorn

        from ..serve import create_app, default_threads
    except ImportError as error:
        raise CLIError(f"vitlab serve needs FastAPI, uvicorn and python-multipart ({error.name} is "
                       f"missing): pip install 'vitlab[serve]'") from None
    import torch

    from ..checkpoint import load_checkpoint

    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    threads = args.threads or default_threads()
    sock = _listen(args.host, args.port)
    try:
        classifier = load_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
        app = create_app(classifier, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_upload_mb=args.max_upload_mb, max_images=args.max_images)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        where = classifier.device.type
        if where == "cpu":
            where += f", {threads} thread{'s' if threads > 1 else ''}"
        print(f"vitlab serve: {args.checkpoint or 'the shipped model'} ({where}, "
              f"{classifier.inference_precision}, batches of up to {args.max_batch}); "
              f"open http://{shown}:{port}/ (Ctrl-C stops it)", flush=True)
        # the modules, model and app made so far live until exit: frozen, the garbage collector
        # stops walking them, in pauses between requests and for seconds at exit
        gc.freeze()
        torch.set_num_threads(threads)  # here, so a refused start leaves the caller's setting alone
        # warnings only: uvicorn's own start-up lines would repeat the address above, and a line
        # per request would cost the event loop time under load
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # Ctrl-C while loading, or the usual way to stop: uvicorn catches it, finishes the requests
        # in flight and stops the app, then raises it again for its caller
        pass
    finally:
        sock.close()
    print("vitlab serve: stopped", flush=True)
    return 0
