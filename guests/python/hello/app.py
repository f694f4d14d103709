"""The Express hello-world microservice, rewritten for Wharf in Python.

Routes (the path is what is left after Wharf strips the mount point):
  GET  /       -> 200 {"message": "Hello from the microservice!"}
  POST /echo   -> 201, the JSON body it was sent, with an x-handled-by header
  anything else -> 404 {"error": ...}
"""

import json

from componentize_py_types import Ok
from wit_world import exports
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


def respond(response_out: ResponseOutparam, status: int, value, headers=()) -> None:
    """Sends `value` as a JSON response."""
    body = json.dumps(value).encode()
    fields = Fields.from_list([("content-type", b"application/json"), *headers])
    response = OutgoingResponse(fields)
    response.set_status_code(status)
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with outgoing.write() as stream:
        stream.blocking_write_and_flush(body)
    OutgoingBody.finish(outgoing, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = (request.path_with_query() or "/").split("?")[0]
        method = request.method()
        handled_by = [("x-handled-by", b"wharf-python")]
        if isinstance(method, Method_Get) and path == "/":
            respond(response_out, 200, {"message": "Hello from the microservice!"})
        elif isinstance(method, Method_Post) and path == "/echo":
            try:
                received = json.loads(read_body(request) or b"null")
            except ValueError as err:
                respond(response_out, 400, {"error": f"bad JSON: {err}"})
                return
            respond(response_out, 201, {"received": received, "lang": "python"}, handled_by)
        else:
            respond(response_out, 404, {"error": f"no route for {path}"}, handled_by)
