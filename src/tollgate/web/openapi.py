"""The OpenAPI 3.1 document of ``/api/v1/`` (served at ``/api/v1/openapi.json``).

Field names are the ledger's column names (docs/ledger.md); numbers that must stay exact
(``cost_usd``) are strings, times are ISO 8601 in UTC.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from tollgate.web.data import DAILY_GROUPS, MAX_PAGE, OUTCOMES, REQUEST_COLUMNS, USER_SORTS, UserRow

__all__ = ["openapi_document"]

_INT_COLUMNS = {
    "status_code",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "latency_ms",
    "ttft_ms",
}
_ARRAY_COLUMNS = {"tags", "limit_ids", "usage_flags"}
_BOOL_COLUMNS = {"streamed", "logging_disabled"}


def _column_schema(name: str) -> dict[str, Any]:
    if name in _INT_COLUMNS:
        return {"type": ["integer", "null"]}
    if name in _ARRAY_COLUMNS:
        return {"type": "array", "items": {"type": "string"}}
    if name in _BOOL_COLUMNS:
        return {"type": "boolean"}
    if name == "units":
        return {"type": ["object", "null"], "additionalProperties": {"type": "number"}}
    if name == "cost_usd":
        return {"type": ["string", "null"], "description": "exact decimal, USD"}
    if name == "created_at":
        return {"type": "string", "format": "date-time"}
    if name == "request_id":
        return {"type": "string", "format": "uuid"}
    if name == "outcome":
        return {"type": "string", "enum": list(OUTCOMES)}
    return {"type": ["string", "null"]}


def _param(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_LOG_FILTERS = [
    _param("user", "only this end user"),
    _param("unattributed", "only requests without an end user", type="boolean"),
    _param("key", "only this gateway key (a viewer: its own key only; another one is a 403)"),
    _param("provider", "only this provider"),
    _param("model", "only this model"),
    _param("endpoint", "only this endpoint"),
    _param("tag", "only requests carrying this tag"),
    _param("outcome", "only this outcome", type="string", enum=list(OUTCOMES)),
    _param("since", "from this ISO 8601 date or date-time (inclusive; no zone = UTC)"),
    _param("until", "up to this ISO 8601 date or date-time (exclusive)"),
]
_PERIOD = [
    _param("month", "a calendar month, YYYY-MM (the default: the current month)"),
    _param("since", "first day, YYYY-MM-DD (inclusive)", type="string", format="date"),
    _param("until", "last day, YYYY-MM-DD (exclusive)", type="string", format="date"),
]
_LIMIT = _param("limit", f"page size, 1 to {MAX_PAGE}", type="integer", minimum=1, maximum=MAX_PAGE)


def _ok(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {
        "200": {"description": "OK", "content": {media: {"schema": schema}}},
        "400": {"$ref": "#/components/responses/BadParameter"},
        "401": {"$ref": "#/components/responses/Unauthorized"},
        "403": {"$ref": "#/components/responses/Forbidden"},
    }


def _totals() -> dict[str, Any]:
    props: dict[str, Any] = {}
    for f in fields(UserRow):
        if f.name == "end_user_id":
            props[f.name] = {"type": ["string", "null"], "description": "null: no end user"}
        elif f.name == "cost_usd":
            props[f.name] = {"type": "string", "description": "exact decimal, USD"}
        else:
            props[f.name] = {"type": "integer"}
    return {"type": "object", "properties": props}


def _user_detail() -> dict[str, Any]:
    grouped = {"type": "object", "additionalProperties": True}
    return {
        "type": "object",
        "properties": {
            "end_user_id": {"type": "string"},
            "since": {"type": "string", "format": "date"},
            "until": {"type": "string", "format": "date"},
            "totals": _totals(),
            "daily": {"type": "array", "items": grouped},
            "models": {"type": "array", "items": grouped},
            "keys": {"type": "array", "items": grouped},
        },
    }


def openapi_document() -> dict[str, Any]:
    request_row = {
        "type": "object",
        "properties": {c: _column_schema(c) for c in REQUEST_COLUMNS},
        "required": list(REQUEST_COLUMNS),
    }
    period_fields = {
        "since": {"type": "string", "format": "date"},
        "until": {"type": "string", "format": "date"},
    }
    grouped = {"type": "object", "additionalProperties": True}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tollgate usage API",
            "version": "1",
            "description": "Per-user LLM usage and cost from the Tollgate ledger. Field names "
            "are the ledger's column names (docs/ledger.md).",
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": {
            "/requests": {
                "get": {
                    "summary": "Ledger rows, newest first, a page at a time",
                    "parameters": [
                        *_LOG_FILTERS,
                        _param("cursor", "next_cursor of the previous page"),
                        _LIMIT,
                    ],
                    "responses": _ok(
                        {
                            "type": "object",
                            "properties": {
                                "data": {"type": "array", "items": request_row},
                                "next_cursor": {"type": ["string", "null"]},
                            },
                        }
                    ),
                }
            },
            "/requests.csv": {
                "get": {
                    "summary": "Every row of the filter as CSV (header: the column names)",
                    "parameters": _LOG_FILTERS,
                    "responses": _ok({"type": "string"}, "text/csv"),
                }
            },
            "/users": {
                "get": {
                    "summary": "Per-user totals over a period",
                    "parameters": [
                        *_PERIOD,
                        _param("q", "end user ids containing this text"),
                        _param("sort", "column to sort by", type="string", enum=list(USER_SORTS)),
                        _param("order", "asc or desc", type="string", enum=["asc", "desc"]),
                        _LIMIT,
                    ],
                    "responses": _ok(
                        {
                            "type": "object",
                            "properties": {
                                **period_fields,
                                "matched": {"type": "integer"},
                                "data": {"type": "array", "items": _totals()},
                            },
                        }
                    ),
                }
            },
            "/users/{end_user_id}": {
                "get": {
                    "summary": "One user's totals, cost per day, models and keys",
                    "parameters": [
                        {
                            "name": "end_user_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        *_PERIOD,
                    ],
                    "responses": _ok(_user_detail()),
                }
            },
            "/user": {
                "get": {
                    "summary": "The same as /users/{end_user_id}, for any id (also . and ..)",
                    "parameters": [
                        {
                            "name": "end_user_id",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        *_PERIOD,
                    ],
                    "responses": _ok(_user_detail()),
                }
            },
            "/usage/daily": {
                "get": {
                    "summary": "Usage summed per day (and per group_by columns)",
                    "parameters": [
                        *_PERIOD,
                        _param("group_by", f"comma list of {', '.join(DAILY_GROUPS)}"),
                        _param("user", "only this end user"),
                        _param("key", "only this gateway key"),
                        _param("provider", "only this provider"),
                        _param("model", "only this model"),
                    ],
                    "responses": _ok(
                        {
                            "type": "object",
                            "properties": {
                                **period_fields,
                                "truncated": {"type": "boolean"},
                                "data": {"type": "array", "items": grouped},
                            },
                        }
                    ),
                }
            },
            "/limits": {
                "get": {
                    "summary": "Each limit with its current period, spend, remaining, reset",
                    "responses": _ok(
                        {
                            "type": "object",
                            "properties": {"data": {"type": "array", "items": grouped}},
                        }
                    ),
                }
            },
            "/me": {
                "get": {
                    "summary": "Who the credential is: admin, or a viewer and its key",
                    "responses": _ok(grouped),
                }
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": _ok(grouped)},
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the admin token, or a viewer token (tgv_…)",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "tollgate_session",
                    "description": "the dashboard's login session",
                },
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "code": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                            },
                        }
                    },
                }
            },
            "responses": {
                name: {
                    "description": text,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for name, text in (
                    ("BadParameter", "a parameter cannot be used (code invalid_parameter)"),
                    ("Unauthorized", "no valid credential (code unauthorized)"),
                    ("Forbidden", "a viewer asked for another key (code forbidden_key)"),
                )
            },
        },
    }
