"""The labeling service: a page where people answer "Is this a <category>?", and its JSON API.

``lsun-hitl serve --root R`` runs it (uvicorn). Every API call needs ``Authorization: Bearer
<token>`` (tokens from ``lsun-hitl labelers add``): 401 without a valid token, 403 for another
labeler's batch or for admin calls by a labeler, 422 for malformed payloads, 413 for bodies over
``max_body_bytes``. Images are read from the storage root by the service itself and only by their
position in a batch assigned to the caller, so no path or URL from a client is ever opened.
No CORS headers are sent unless origins are configured.

When a request is fully labeled the desk calls the ``on_complete`` callback the caller passed to
``create_app`` (the CLI passes one that resumes the flow run waiting for the request); the service
itself never talks to the orchestrator.

Latency: the labeler-facing endpoints run on the event loop and touch only memory (token index,
desk state, an LRU cache of image bytes); storage I/O -- writing a new batch or a submission, reading
images -- runs in worker threads, and a new batch's images are read ahead into the cache while the
labeler looks at the first one. FastAPI's built-in OpenTelemetry middleware is off unless
``telemetry=True`` (it costs more per request than the endpoints themselves).
"""

import asyncio
import base64
import hashlib
import inspect
import io
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .desk import DeskError, LabelingDesk
from .images import DEFAULT_MAX_PIXELS, PoolReading, pool_reading
from .images import image_id as content_id
from .integrity import LIVE_WRITE_S, remove_temporary
from .labelers import Labeler, LabelerError, TokenIndex, create_labeler
from .quality import QCParams
from .status import HEADER, status, status_rows
from .storage import SERVICE_KEY, Storage, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
BROWSER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class Answer(BaseModel):
    index: int = Field(ge=0, le=10_000)
    answer: Literal["yes", "no", "unsure"]


class Submission(BaseModel):
    answers: list[Answer] = Field(min_length=1, max_length=10_000)


class NewLabeler(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    role: Literal["labeler", "admin"] = "labeler"
    replace: bool = False


class BodyLimit:
    """Refuse bodies over ``max_bytes`` (413) and chunked POST bodies (411) before any handler runs.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per request.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            refused = None
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                refused = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
            elif scope["method"] == "POST" and length is None and headers.get(b"transfer-encoding"):
                refused = JSONResponse({"detail": "send a Content-Length; chunked bodies are refused"}, status_code=411)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def page_policy(page: str) -> str:
    """The Content-Security-Policy for every answer: the page's own inline script and style by their SHA-256
    (nothing else runs), images from the service or the page's blob URLs, calls to the service only, and no
    framing (clickjacking a labeler's answers)."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src 'self' blob:;"
        " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class SecurityHeaders:
    """Add the page's Content-Security-Policy, ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff``
    and ``Referrer-Policy: no-referrer`` to every answer (a plain ASGI middleware, as ``BodyLimit``)."""

    def __init__(self, app: Any, policy: str) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", policy.encode()),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ImageCache:
    """Image bytes by URI, least recently used out first, at most ``max_bytes`` in all (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, uri: str) -> tuple[bytes, str] | None:
        with self._lock:
            item = self._items.get(uri)
            if item is not None:
                self._items.move_to_end(uri)
            return item

    def put(self, uri: str, item: tuple[bytes, str]) -> None:
        if len(item[0]) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(uri, None)
            if old is not None:
                self._size -= len(old[0])
            self._items[uri] = item
            self._size += len(item[0])
            while self._size > self.max_bytes:
                _, (data, _) = self._items.popitem(last=False)
                self._size -= len(data)


@dataclass
class ServiceState:
    """The objects the routes share, kept on ``app.state.service``."""

    storage: Storage
    desk: LabelingDesk
    tokens: TokenIndex
    images: ImageCache
    readahead: ThreadPoolExecutor  # reads a new batch's images into ``images``
    page: str  # the labeling page's HTML
    reading: PoolReading = PoolReading()  # how the pool's files are checked when read again (ingest's record)


def service_state(request: Request) -> ServiceState:
    """The shared objects of the app serving ``request``."""
    return request.app.state.service


# ---- authentication ---------------------------------------------------------------------------------
async def labeler(request: Request, authorization: Annotated[str | None, Header()] = None) -> Labeler:
    """The caller, from its bearer token (401 without a valid one)."""
    tokens = service_state(request).tokens
    token = authorization[7:] if authorization and authorization.lower().startswith("bearer ") else None
    if token and tokens.stale():  # re-read the registry (off the event loop): added, removed, replaced tokens
        who = await run_in_threadpool(tokens.authenticate, token)
    else:
        who = tokens.lookup(token)
    if who is None:
        raise HTTPException(
            401,
            "missing or invalid token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return who


Caller = Annotated[Labeler, Depends(labeler)]


async def admin(who: Caller) -> Labeler:
    """The caller if it has an admin token (403 otherwise)."""
    if not who.is_admin:
        raise HTTPException(403, "this needs an admin token")
    return who


Admin = Annotated[Labeler, Depends(admin)]


# ---- helpers ----------------------------------------------------------------------------------------
def desk_call(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, a DeskError answered with its HTTP status."""
    try:
        return fn(*args)
    except DeskError as exc:
        raise HTTPException(exc.status, str(exc)) from exc


def fetch_cached(state: ServiceState, uri: str, image_id: str) -> tuple[bytes, str]:
    """An image's bytes and media type, from the cache or else from storage, checked as scoring checks it (the
    pool's content id and pixel limit), then cached."""
    data = state.images.get(uri)
    if data is None:
        expected = image_id if state.reading.content_ids else None
        data = fetch_image(uri, state.storage, expected, state.reading.max_pixels)
        state.images.put(uri, data)
    return data


def read_ahead(state: ServiceState, uris: list[str], image_ids: list[str]) -> None:
    """Read images into the cache before the labeler asks for them."""
    for uri, image_id in zip(uris, image_ids, strict=True):
        try:
            fetch_cached(state, uri, image_id)
        except HTTPException:
            pass  # the labeler's own request reports it


async def storage_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After for a StorageError; the full error goes to the service's log, not to labelers."""
    log.error("labeling service: %s", exc)
    return JSONResponse(
        {"detail": "the labeling service cannot reach its storage right now; nothing was recorded, try again"},
        status_code=503,
        headers={"Retry-After": "10"},
    )


# ---- the labeling page and health -------------------------------------------------------------------
page_routes = APIRouter()


@page_routes.get("/", response_class=HTMLResponse)
def index(request: Request) -> str:
    return service_state(request).page


@page_routes.get("/admin", response_class=HTMLResponse)
def admin_page() -> str:
    """Every category under the root, where it stands (the token in the URL's fragment, as on the label page)."""
    return resources.files("lsun_hitl").joinpath("static/admin.html").read_text()


@page_routes.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


# ---- the labeler API --------------------------------------------------------------------------------
labeler_routes = APIRouter(prefix="/api")


@labeler_routes.get("/me")
async def me(request: Request, who: Caller) -> dict:
    return {"labeler": who.name, "role": who.role, "flagged": service_state(request).desk.is_flagged(who.name)}


@labeler_routes.post("/batches/next")
async def next_batch(request: Request, who: Caller) -> dict:
    """The caller's open batch or a new one; ``batch`` is None when there is nothing to label now."""
    state = service_state(request)
    desk = state.desk
    batch = desk_call(desk.assign, who.name)
    if desk.refresh_due():
        if batch is None:  # nothing to hand out: look for new requests now
            await run_in_threadpool(desk.refresh)
            batch = desk_call(desk.assign, who.name)
        else:
            desk.refresh_in_background()
    if batch is not None and not batch.persisted:
        await run_in_threadpool(desk_call, desk.persist, batch)
        state.readahead.submit(read_ahead, state, list(batch.uris), list(batch.image_ids))
    return {"batch": batch.public() if batch else None, "retry_after_s": 5}


@labeler_routes.get("/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str, who: Caller) -> dict:
    return desk_call(service_state(request).desk.batch_for, batch_id, who.name).public()


@labeler_routes.get("/batches/{batch_id}/images/{index}")
async def image(request: Request, batch_id: str, index: int, who: Caller) -> Response:
    state = service_state(request)
    batch = desk_call(state.desk.batch_for, batch_id, who.name)
    if not 0 <= index < len(batch.uris):
        raise HTTPException(404, f"batch {batch_id!r} has no image {index}")
    uri = batch.uris[index]
    data = state.images.get(uri) or await run_in_threadpool(fetch_cached, state, uri, batch.image_ids[index])
    return Response(data[0], media_type=data[1], headers={"Cache-Control": "private, max-age=3600"})


@labeler_routes.post("/batches/{batch_id}/labels")
async def submit(request: Request, batch_id: str, body: Submission, who: Caller) -> dict:
    desk = service_state(request).desk
    desk_call(desk.batch_for, batch_id, who.name)  # 404 / 403 without a thread
    answers = [(a.index, a.answer) for a in body.answers]
    return await run_in_threadpool(desk_call, desk.submit, batch_id, who.name, answers)


# ---- the admin API ----------------------------------------------------------------------------------
admin_routes = APIRouter(prefix="/api/admin")


@admin_routes.get("/requests")
def requests(request: Request, _: Admin) -> list[dict]:
    return service_state(request).desk.progress()


@admin_routes.get("/status")
def category_status(request: Request, _: Admin) -> dict:
    """``lsun_hitl.status`` of every category under the root: the table's header, its cells, and the rows."""
    rows = status(service_state(request).storage)
    return {"header": list(HEADER), "rows": status_rows(rows), "categories": [r.to_dict() for r in rows]}


@admin_routes.get("/labelers")
def labelers(request: Request, _: Admin) -> list[dict]:
    df = service_state(request).desk.labeler_figures()
    return [] if df.empty else df.astype(object).where(df.notna(), None).to_dict("records")


@admin_routes.post("/labelers")
def add_labeler(request: Request, body: NewLabeler, _: Admin) -> dict:
    state = service_state(request)
    try:
        token = create_labeler(state.storage, body.name, role=body.role, replace=body.replace)
    except LabelerError as exc:
        raise HTTPException(409, str(exc)) from exc
    state.tokens.reload()
    return {"labeler": body.name, "role": body.role, "token": token}


# ---- the app ----------------------------------------------------------------------------------------
@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Allow the desk's background work while the app runs; wait for it when the app stops."""
    desk = app.state.service.desk
    # answers and batches this service wrote when a kill cut their write: none is live at its start
    removed = remove_temporary(app.state.service.storage, ["labels"], older_than_s=LIVE_WRITE_S)
    if removed:
        log.info("removed %d temporary files of writes that died: %s", len(removed), ", ".join(removed[:3]))
    desk.open()
    yield
    await asyncio.to_thread(desk.close)  # background refreshes and resumes end before the process does


def create_app(
    storage: Storage,
    qc: QCParams | None = None,
    *,
    on_complete: Callable[[str, str], None] | None = None,
    cors_origins: list[str] | None = None,
    max_body_bytes: int = 1 << 20,
    preload: int = 3,
    image_cache_bytes: int = 256 << 20,
    telemetry: bool = False,
) -> FastAPI:
    """The FastAPI application over one storage root.

    Parameters
    ----------
    storage
        The storage root: requests, batches, answers, labelers' tokens, images.
    qc
        Quality-control parameters for the desk.
    on_complete
        Called as ``on_complete(category, request_id)`` (in a background thread) when a request is
        fully labeled, e.g. to resume the flow run waiting for it; None: nothing is called.
    cors_origins
        Origins allowed by CORS (GET and POST); none: no CORS headers.
    max_body_bytes
        Larger request bodies are refused with 413.
    preload
        How many images ahead the labeling page loads.
    image_cache_bytes
        Memory for image bytes served or read ahead.
    telemetry
        Keep FastAPI's OpenTelemetry middleware on.
    """
    extra: dict[str, Any] = {}
    if not telemetry and "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        extra["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    desk = LabelingDesk(storage, qc, on_complete=on_complete)
    page = resources.files("lsun_hitl").joinpath("static/label.html").read_text()
    # no /docs, /redoc or /openapi.json: the API is this page's, and its schema is nobody else's business
    app = FastAPI(
        title="lsun-hitl labeling", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan, **extra
    )
    app.state.service = ServiceState(
        storage=storage,
        desk=desk,
        tokens=TokenIndex(storage),
        images=ImageCache(image_cache_bytes),
        readahead=ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-readahead"),
        page=page.replace("__PRELOAD__", str(int(preload))),
        reading=pool_reading(storage),
    )
    app.state.desk = desk  # for callers: the demo reads labeler figures, ServiceThread closes it
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],  # the page's bearer token and JSON bodies
        )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(SecurityHeaders, policy=page_policy(app.state.service.page))
    app.add_exception_handler(StorageError, storage_unavailable)
    for router in (page_routes, labeler_routes, admin_routes):
        app.include_router(router)
    return app


def fetch_image(
    uri: str, storage: Storage, image_id: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, str]:
    """Image bytes for a browser: browser formats as stored, others (TIFF, CMYK, ...) as PNG.

    With ``image_id`` (a pool whose ids are content hashes) a file whose bytes no longer hash to it changed since
    ingest and is refused (409), as scoring refuses it; so is an image over ``max_pixels`` (from its header,
    before it is decoded)."""
    import fsspec
    from PIL import Image

    try:
        with fsspec.open(uri, "rb", **storage.options) as f:
            data = f.read()
    except Exception as exc:  # noqa: BLE001 - a bad file must not take the page down
        log.warning("cannot serve %s: %s", uri, exc)
        raise HTTPException(502, f"the image could not be read from storage ({type(exc).__name__})") from exc
    if image_id is not None and content_id(data) != image_id:
        log.warning("not serving %s: its bytes changed since ingest (no longer %s)", uri, image_id)
        raise HTTPException(409, "this image's file changed since the pool was built; it is not shown")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise HTTPException(409, f"this image is over the pool's limit of {max_pixels:,} pixels")
            fmt = im.format or ""
            if fmt in BROWSER_FORMATS and im.mode in ("1", "L", "LA", "P", "RGB", "RGBA"):
                return data, BROWSER_FORMATS[fmt]
            im.draft("RGB", (1024, 1024))
            rgb = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            rgb.thumbnail((1024, 1024))
            out = io.BytesIO()
            rgb.save(out, "PNG")
            return out.getvalue(), "image/png"
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad file must not take the page down
        log.warning("cannot serve %s: %s", uri, exc)
        raise HTTPException(502, f"the image could not be read from storage ({type(exc).__name__})") from exc


def announce(storage: Storage, url: str) -> None:
    """Record where people find the labeling page of ``storage`` (``SERVICE_KEY``): a waiting run names it."""
    storage.write_json(storage.path(SERVICE_KEY), {"url": url.rstrip("/") + "/", "started_at": time.time()})


def serve(
    storage: Storage,
    qc: QCParams | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    on_complete: Callable[[str, str], None] | None = None,
    cors_origins: list[str] | None = None,
    public_url: str | None = None,
) -> None:
    """Run the labeling service until interrupted (``on_complete`` as for ``create_app``). Its page's URL
    (``public_url``, else this host and port) is recorded for the runs that wait for people to name it."""
    import socket
    import sys

    import uvicorn

    announce(storage, public_url or f"http://{socket.getfqdn() if host in ('0.0.0.0', '::') else host}:{port}/")

    # Storage writes run in worker threads, and each hand-back of the GIL from the busy event loop can
    # wait a whole switch interval; a submission needs several, so a shorter interval cuts its latency.
    sys.setswitchinterval(0.001)
    app = create_app(storage, qc, on_complete=on_complete, cors_origins=cors_origins)
    uvicorn.run(app, host=host, port=port, log_level="warning")


class ServiceThread:
    """The service on loopback in a background thread (the demo and tests): ``with ServiceThread(app) as url``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self._thread: threading.Thread | None = None

    def __enter__(self) -> str:
        announce(self.app.state.service.storage, self.url)
        self._thread = threading.Thread(target=self.server.run, name="labeling-service", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the labeling service did not start on {self.url}")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        desk = getattr(self.app.state, "desk", None)
        if desk is not None:  # also closed by the app's shutdown; again in case that was cut short
            desk.close()
