"""A Python service that keeps state in wasi:keyvalue and reads wasi:config.

Routes (after Wharf strips the mount point):
  GET  /         -> {"service": ..., "visits": N}: an atomic per-visit counter
  GET  /notes    -> {"notes": [...]}
  POST /notes    -> appends the body as a note; the notes
  anything else  -> 404

Its manifest grants the `default` bucket (`[keyvalue] buckets = ["default"]`);
the name it reports comes from `[config] service_name`.
"""

import json

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import atomics, wasi_config_store, wasi_keyvalue_store
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Get,
    Method_Post,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


def read_body(request: IncomingRequest) -> bytes:
    """Reads the whole request body."""
    data = b""
    body = request.consume()
    with body.stream() as stream:
        while True:
            try:
                data += stream.blocking_read(65536)
            except Exception:  # the stream is closed: the body is complete
                break
    return data


def respond(response_out: ResponseOutparam, status: int, value) -> None:
    """Sends `value` as a JSON response."""
    body = json.dumps(value).encode()
    response = OutgoingResponse(Fields.from_list([("content-type", b"application/json")]))
    response.set_status_code(status)
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with outgoing.write() as stream:
        stream.blocking_write_and_flush(body)
    OutgoingBody.finish(outgoing, None)


def describe(err: Err) -> str:
    """A key-value error as text."""
    value = err.value
    return getattr(value, "value", None) or type(value).__name__


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = (request.path_with_query() or "/").split("?")[0]
        method = request.method()
        try:
            bucket = wasi_keyvalue_store.open("default")
            if isinstance(method, Method_Get) and path == "/":
                visits = atomics.increment(bucket, "py-visits", 1)
                name = wasi_config_store.get("service_name") or "visits-py"
                respond(response_out, 200, {"service": name, "visits": visits})
            elif path == "/notes" and isinstance(method, Method_Post):
                stored = bucket.get("py-notes")
                notes = json.loads(stored) if stored else []
                notes.append(read_body(request).decode(errors="replace"))
                bucket.set("py-notes", json.dumps(notes).encode())
                respond(response_out, 200, {"notes": notes})
            elif path == "/notes":
                stored = bucket.get("py-notes")
                respond(response_out, 200, {"notes": json.loads(stored) if stored else []})
            else:
                respond(response_out, 404, {"error": f"no route for {path}"})
        except Err as err:
            respond(response_out, 503, {"error": describe(err)})
