"""The labeling service: a page where people answer "Is this a <category>?", and its JSON API.

``lsun-hitl serve --root R`` runs it (uvicorn). Every API call needs ``Authorization: Bearer
<token>`` (tokens from ``lsun-hitl labelers add``): 401 without a valid token, 403 for another
labeler's batch or for admin calls by a labeler, 422 for malformed payloads, 413 for bodies over
``max_body_bytes``. Images are read from the storage root by the service itself and only by their
position in a batch assigned to the caller, so no path or URL from a client is ever opened.
No CORS headers are sent unless origins are configured.

When a request is fully labeled the desk calls ``resume`` (the waiting flow run is resumed through
the Prefect API with the request id as run input).
"""


import io
import logging
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from .desk import DeskError, LabelingDesk
from .labelers import Labeler, LabelerError, TokenIndex, create_labeler
from .quality import QCParams
from .storage import Storage

log = logging.getLogger(__name__)
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


def resume_waiting_run(storage: Storage) -> Callable[[str, str], None]:
    """``on_complete`` that resumes the flow run waiting for a request (through the Prefect API)."""

    def resume(category: str, request_id: str) -> None:
        from .runner import resume as resume_run

        resume_run(storage, category, request_id)

    return resume


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


def create_app(
    storage: Storage,
    qc: QCParams | None = None,
    *,
    on_complete: Callable[[str, str], None] | None = None,
    cors_origins: list[str] | None = None,
    max_body_bytes: int = 1 << 20,
    preload: int = 3,
) -> FastAPI:
    """The FastAPI application over one storage root."""
    desk = LabelingDesk(storage, qc, on_complete=on_complete)
    tokens = TokenIndex(storage)
    app = FastAPI(title="lsun-hitl labeling", docs_url=None, redoc_url=None)
    app.state.desk = desk
    app.state.tokens = tokens
    page = resources.files("lsun_hitl").joinpath("static/label.html").read_text()
    page = page.replace("__PRELOAD__", str(int(preload)))

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"])

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    def labeler(authorization: Annotated[str | None, Header()] = None) -> Labeler:
        token = authorization[7:] if authorization and authorization.lower().startswith("bearer ") else None
        who = tokens.authenticate(token)
        if who is None:
            raise HTTPException(401, "missing or invalid token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    def admin(who: Annotated[Labeler, Depends(labeler)]) -> Labeler:
        if not who.is_admin:
            raise HTTPException(403, "this needs an admin token")
        return who

    def desk_call(fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except DeskError as exc:
            raise HTTPException(exc.status, str(exc)) from exc

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/api/me")
    def me(who: Annotated[Labeler, Depends(labeler)]) -> dict:
        return {"labeler": who.name, "role": who.role, "flagged": desk.is_flagged(who.name)}

    @app.post("/api/batches/next")
    def next_batch(who: Annotated[Labeler, Depends(labeler)]) -> dict:
        batch = desk_call(desk.next_batch, who.name)
        return {"batch": batch.public() if batch else None, "retry_after_s": 5}

    @app.get("/api/batches/{batch_id}")
    def get_batch(batch_id: str, who: Annotated[Labeler, Depends(labeler)]) -> dict:
        return desk_call(desk.batch_for, batch_id, who.name).public()

    @app.get("/api/batches/{batch_id}/images/{index}")
    def image(batch_id: str, index: int, who: Annotated[Labeler, Depends(labeler)]) -> Response:
        batch = desk_call(desk.batch_for, batch_id, who.name)
        if not 0 <= index < len(batch.uris):
            raise HTTPException(404, f"batch {batch_id!r} has no image {index}")
        data = _fetch(batch.uris[index], storage)
        return Response(data[0], media_type=data[1], headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/batches/{batch_id}/labels")
    def submit(batch_id: str, body: Submission, who: Annotated[Labeler, Depends(labeler)]) -> dict:
        return desk_call(desk.submit, batch_id, who.name, [(a.index, a.answer) for a in body.answers])

    @app.get("/api/admin/requests")
    def requests(_: Annotated[Labeler, Depends(admin)]) -> list[dict]:
        return desk.progress()

    @app.get("/api/admin/labelers")
    def labelers(_: Annotated[Labeler, Depends(admin)]) -> list[dict]:
        df = desk.labeler_figures()
        return [] if df.empty else df.astype(object).where(df.notna(), None).to_dict("records")

    @app.post("/api/admin/labelers")
    def add_labeler(body: NewLabeler, _: Annotated[Labeler, Depends(admin)]) -> dict:
        try:
            token = create_labeler(storage, body.name, role=body.role, replace=body.replace)
        except LabelerError as exc:
            raise HTTPException(409, str(exc)) from exc
        tokens.reload()
        return {"labeler": body.name, "role": body.role, "token": token}

    return app


def _fetch(uri: str, storage: Storage) -> tuple[bytes, str]:
    """Image bytes for a browser: browser formats as stored, others (TIFF, CMYK, ...) as PNG."""
    import fsspec
    from PIL import Image

    try:
        with fsspec.open(uri, "rb", **storage.options) as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            if fmt in BROWSER_FORMATS and im.mode in ("1", "L", "LA", "P", "RGB", "RGBA"):
                return data, BROWSER_FORMATS[fmt]
            im.draft("RGB", (1024, 1024))
            rgb = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            rgb.thumbnail((1024, 1024))
            out = io.BytesIO()
            rgb.save(out, "PNG")
            return out.getvalue(), "image/png"
    except Exception as exc:  # noqa: BLE001 - a bad file must not take the page down
        log.warning("cannot serve %s: %s", uri, exc)
        raise HTTPException(502, f"the image could not be read from storage ({type(exc).__name__})") from exc


def serve(
    storage: Storage,
    qc: QCParams | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    resume_runs: bool = True,
    cors_origins: list[str] | None = None,
) -> None:
    """Run the labeling service until interrupted."""
    import uvicorn

    app = create_app(
        storage, qc, on_complete=resume_waiting_run(storage) if resume_runs else None, cors_origins=cors_origins
    )
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
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self._thread: threading.Thread | None = None

    def __enter__(self) -> str:
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
