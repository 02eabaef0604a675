"""The API's routers, one per resource, gathered under ``/api/v1`` by ``api_router``."""

from __future__ import annotations

from typing import Any

from server.schemas import ErrorResponse

_WHY = {
    400: "Unparseable or too deeply nested body",
    401: "Missing or malformed bearer token",
    403: "Token does not grant this write",
    404: "Unknown run or alert",
    413: "Body over max_body_bytes",
    422: "Invalid request: the message names the field or key",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error codes a route can answer, all ``{"detail": "..."}``."""
    return {c: {"model": ErrorResponse, "description": _WHY[c]} for c in codes}


BODY = (400, 413, 422)
"""What any route with a JSON body can answer."""
