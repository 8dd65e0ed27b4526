"""The OpenAPI 3.1 description of the web API, served at ``/api/openapi.json``.

Schemas are JSON Schema 2020-12 (what OpenAPI 3.1 uses), so a client, or the tests, can
check every response body against them with any JSON Schema validator.
"""

from __future__ import annotations

from typing import Any

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_COUNT = {"type": "integer", "minimum": 0}
_SECONDS = {"type": "number", "minimum": 0}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Any], description: str = "") -> dict[str, Any]:
    """A closed object whose properties are all required."""
    schema: dict[str, Any] = {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def _part(name: str, description: str, **properties: Any) -> dict[str, Any]:
    return _obj({"part": {"const": name}, **properties}, description)


_READINESS: dict[str, Any] = {
    "type": "object",
    "required": ["ready", "checks"],
    "properties": {
        "ready": {"type": "boolean"},
        "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    names = {
        400: "BadRequest",
        403: "CrossSite",
        408: "TooSlow",
        413: "TooLarge",
        415: "WrongMediaType",
        422: "Flagged",
        429: "Busy",
        500: "Failed",
        503: "Unavailable",
    }
    return {str(status): {"$ref": f"#/components/responses/{names[status]}"} for status in statuses}


def _form(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    encoding = {"image": {"contentType": "image/*"}} if "image" in properties else {}
    media: dict[str, Any] = {
        "schema": {
            "type": "object",
            "required": required,
            "properties": properties,
            "additionalProperties": False,
        }
    }
    if encoding:
        media["encoding"] = encoding
    return {"required": True, "content": {"multipart/form-data": media}}


def openapi_spec(
    *, max_upload_bytes: int, session_cookie: str, rated: tuple[str, ...]
) -> dict[str, Any]:
    """The description of every endpoint, its request and its responses."""
    image_field = {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "description": (
            f"The image file (JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF), at most "
            f"{max_upload_bytes} bytes."
        ),
    }
    optional_image = {
        **image_field,
        "description": image_field["description"]
        + " Without it (and without `url`), the session's last image.",
    }
    url_field = {
        "type": "string",
        "format": "uri",
        "description": (
            "An http(s) link to the image, instead of the file. Fetched with a timeout and "
            "the same size limit; never from loopback, private, link-local or cloud-metadata "
            "addresses unless the operator allow-lists them."
        ),
    }
    seed = {
        "type": "integer",
        "minimum": 0,
        "maximum": 2**32 - 1,
        "description": "Reproduces an image.",
    }
    steps = {
        "type": "integer",
        "minimum": 1,
        "description": "Denoising steps (bounds are configured).",
    }
    png = {
        "description": "The generated image.",
        "headers": {
            "X-Seed": {"description": "The seed that made it.", "schema": {"type": "integer"}},
            "X-Width": {"description": "Width in pixels.", "schema": {"type": "integer"}},
            "X-Height": {"description": "Height in pixels.", "schema": {"type": "integer"}},
            "X-Steps": {"description": "Denoising steps run.", "schema": {"type": "integer"}},
            "X-Sha256": {"description": "The PNG's sha256, for rating it.", "schema": _SHA256},
        },
        "content": {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}},
    }
    problem = _ref("Problem")

    schemas: dict[str, Any] = {
        "Problem": _obj(
            {"detail": {"type": "string", "description": "One sentence for the user."}},
            "Why a request was refused or failed.",
        ),
        "Waiting": _obj(
            {
                "task": {"type": "string"},
                "queued": {**_COUNT, "description": "Requests in this task's line now."},
                "eta_s": {**_SECONDS, "description": "Estimated wait for a new request."},
                "warming_up": {"type": "boolean", "description": "The model is not loaded."},
            }
        ),
        "OcrLine": _obj(
            {
                "text": {"type": "string"},
                "box": {
                    "type": "array",
                    "description": "Corners clockwise from top-left, in pixels.",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            }
        ),
        "Entity": _obj(
            {
                "text": {"type": "string"},
                "span": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "boxes": {
                    "type": "array",
                    "description": "(x0, y0, x1, y1) as fractions of width and height.",
                    "items": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 4,
                        "maxItems": 4,
                    },
                },
            }
        ),
        "ImagePart": _part(
            "image", "First line: the image's content hash, for ratings.", sha256=_SHA256
        ),
        "WaitingPart": _part(
            "waiting",
            "The request waits in line behind other requests for a task.",
            task={"type": "string"},
            ahead={**_COUNT, "description": "Requests ahead of this one; 0: it is next."},
            eta_s={**_SECONDS, "description": "Estimated wait in seconds."},
        ),
        "WarmingUpPart": _part(
            "warming_up",
            "The request waits for a task's model to load.",
            task={"type": "string"},
            eta_s={
                "type": ["number", "null"],
                "minimum": 0,
                "description": "Estimated wait in seconds; null when there is no estimate yet.",
            },
        ),
        "CaptionPart": _part(
            "caption",
            "One sentence describing the image.",
            text={"type": "string"},
            degenerate={
                "type": "boolean",
                "description": "The model looped and the text was cut back.",
            },
            entities={"type": "array", "items": _ref("Entity")},
        ),
        "OcrPart": _part(
            "ocr",
            "The text in the image.",
            text={"type": "string"},
            lines={"type": "array", "items": _ref("OcrLine")},
        ),
        "TagsPart": _part(
            "tags",
            "Hashtags.",
            hashtags={"type": "array", "items": {"type": "string", "pattern": "^#"}},
        ),
        "SocialDraftPart": _part(
            "social_draft", "The social caption so far (drafts coalesce).", text={"type": "string"}
        ),
        "SocialPart": _part(
            "social",
            "The finished social caption.",
            text={"type": "string"},
            truncated={"type": "boolean", "description": "Cut to the length limit."},
        ),
        "UnavailablePart": _part(
            "unavailable",
            "One part could not be made (its model failed, or a quota is used up); the rest "
            "of the answer goes on.",
            of={"enum": ["caption", "ocr", "tags", "social"]},
            detail={"type": "string", "description": "One sentence for the user."},
        ),
        "ErrorPart": _part(
            "error",
            "Last line when the work failed after the stream began.",
            status={"type": "integer", "description": "The HTTP status it would have had."},
            detail={"type": "string"},
        ),
        "DescribeLine": {
            "description": "One line of the describe stream.",
            "oneOf": [
                _ref(name)
                for name in (
                    "ImagePart",
                    "WaitingPart",
                    "WarmingUpPart",
                    "CaptionPart",
                    "OcrPart",
                    "TagsPart",
                    "SocialDraftPart",
                    "SocialPart",
                    "UnavailablePart",
                    "ErrorPart",
                )
            ],
            "discriminator": {"propertyName": "part"},
        },
        "Answer": _obj(
            {
                "answer": {"type": "string"},
                "sha256": {**_SHA256, "description": "The image the answer is about."},
            }
        ),
        "Rating": _obj(
            {
                "sha256": {**_SHA256, "description": "The rated image (or generated PNG)."},
                "task": {
                    "enum": list(rated),
                    "description": "What made the result: write is the social caption.",
                },
                "score": {"enum": [1, -1]},
            }
        ),
        "Forgotten": _obj(
            {
                "images": {
                    **_COUNT,
                    "description": "Images this session had sent; none is reachable now.",
                },
                "deleted": {**_COUNT, "description": "Of those, the ones only it had sent."},
                "results": _COUNT,
                "bytes_freed": _COUNT,
            }
        ),
        "Status": _obj(
            {
                "accepting": {
                    "type": "boolean",
                    "description": "False while the bot is shutting down.",
                },
                "tasks": {"type": "object", "additionalProperties": _ref("Waiting")},
            },
            "Where a new request to each task would stand.",
        ),
        "Usage": _obj(
            {
                "usage": {
                    "type": "array",
                    "items": _obj(
                        {
                            "use": {"enum": ["describe", "ask", "write", "reimagine"]},
                            "used": _COUNT,
                            "limit": {**_COUNT, "description": "0: no limit."},
                        }
                    ),
                }
            },
            "What this session has used of each daily quota today (UTC).",
        ),
    }

    responses = {
        "BadRequest": _json(
            problem, "The request is wrong: a missing field, a bad number, not an image."
        ),
        "CrossSite": _json(
            problem,
            "Sent by a page on another origin (its Origin header, or Sec-Fetch-Site: "
            "cross-site); requests without an Origin header are served.",
        ),
        "TooSlow": _json(problem, "The body did not arrive within the server's read timeout."),
        "TooLarge": _json(problem, "The upload or a field is over its size limit."),
        "WrongMediaType": _json(problem, "The body is not in the media type this endpoint takes."),
        "Flagged": _json(problem, "The safety checker withheld the generated image."),
        "Busy": {
            **_json(problem, "A per-user limit or the global queue bound says: not now."),
            "headers": {
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
            },
        },
        "Failed": _json(problem, "The model failed on this request."),
        "Unavailable": _json(
            problem,
            "The task is not offered, the engine has stopped, or the bot is restarting "
            "(then with Retry-After).",
        ),
    }

    paths: dict[str, Any] = {
        "/": {
            "get": {
                "summary": "The playground page.",
                "responses": {
                    "200": {
                        "description": "An HTML page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/api/describe": {
            "post": {
                "summary": "Caption, OCR text, hashtags and social caption, streamed.",
                "description": (
                    "Answers with one JSON object per line as each part is ready: first "
                    "`image` (the sha256 for ratings), possibly `waiting` (this request's "
                    "place in line) or `warming_up` (a model is loading), then `caption`, "
                    "`ocr`, `tags`, any number of `social_draft`, and `social` last. A "
                    "failure after the stream has begun is a final `error` line; a request "
                    "refused (not an image, over a limit, the bot restarting) gets an error "
                    "status instead, before any line. A part that could not be made is an "
                    "`unavailable` line and the rest follows. The image becomes the "
                    "session's last image. Send `image` or `url`."
                ),
                "requestBody": _form({"image": image_field, "url": url_field}, []),
                "responses": {
                    "200": {
                        "description": "Newline-delimited JSON; each line is a DescribeLine.",
                        "content": {"application/x-ndjson": {"schema": _ref("DescribeLine")}},
                    },
                    **_errors(400, 403, 408, 413, 415, 429, 500, 503),
                },
            }
        },
        "/api/ask": {
            "post": {
                "summary": "Answer a question about an image.",
                "requestBody": _form(
                    {"question": {"type": "string"}, "image": optional_image, "url": url_field},
                    ["question"],
                ),
                "responses": {
                    "200": _json(_ref("Answer"), "The answer."),
                    **_errors(400, 403, 408, 413, 415, 429, 500, 503),
                },
            }
        },
        "/api/reimagine": {
            "post": {
                "summary": "A new image from text, made from an image (img2img).",
                "description": (
                    "Uses the image sent, else the session's last image; with neither, "
                    "makes one from the text alone."
                ),
                "requestBody": _form(
                    {
                        "text": {
                            "type": "string",
                            "description": "The prompt, e.g. an edited caption.",
                        },
                        "image": optional_image,
                        "url": url_field,
                        "strength": {
                            "type": "number",
                            "description": "How far to move from the image (bounds configured).",
                        },
                        "seed": seed,
                        "steps": steps,
                    },
                    ["text"],
                ),
                "responses": {"200": png, **_errors(400, 403, 408, 413, 415, 422, 429, 500, 503)},
            }
        },
        "/api/imagine": {
            "post": {
                "summary": "A new image from text alone (txt2img).",
                "requestBody": _form(
                    {"text": {"type": "string"}, "seed": seed, "steps": steps}, ["text"]
                ),
                "responses": {"200": png, **_errors(400, 403, 408, 413, 415, 422, 429, 500, 503)},
            }
        },
        "/api/rate": {
            "post": {
                "summary": "Thumbs up (1) or down (-1) on a result.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Rating")}},
                },
                "responses": {
                    "204": {"description": "Recorded; a later rating replaces it."},
                    **_errors(400, 403, 408, 413, 415, 500),
                },
            }
        },
        "/api/forget": {
            "post": {
                "summary": "Unlink this session from everything it sent; delete what only it sent.",
                "responses": {
                    "200": _json(_ref("Forgotten"), "What was deleted."),
                    **_errors(403, 500),
                },
            }
        },
        "/api/status": {
            "get": {
                "summary": "Queue length, ETA and warm-up state per task.",
                "responses": {"200": _json(_ref("Status"), "Per task.")},
            }
        },
        "/api/usage": {
            "get": {
                "summary": "What this session has used of each daily quota today.",
                "responses": {"200": _json(_ref("Usage"), "Per use.")},
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This description.",
                "responses": {"200": _json({"type": "object"}, "An OpenAPI 3.1 document.")},
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process is up (for a container's liveness check).",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "ok"}},
                        },
                        "Up.",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Every part is ready: the store, the engine, each chat platform.",
                "responses": {
                    "200": _json(_READINESS, "Ready."),
                    "503": _json(_READINESS, "A part is not ready: the checks say which."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics, for the networks in web.metrics_from only.",
                "responses": {
                    "200": {
                        "description": "The Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "404": {"description": "Not served to this client (or metrics are off)."},
                },
            }
        },
    }

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "captionbot",
            "version": "1",
            "description": (
                "Captions, reads, tags, answers questions about and reimagines images. "
                "A browser is identified by the session cookie the server sets on its first "
                "request; there is no login."
            ),
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": session_cookie}
            },
        },
        # The cookie is optional: a request without it starts a new session.
        "security": [{}, {"session": []}],
    }
