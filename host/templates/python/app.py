"""{{name}}: a Wharf service. It answers

  GET  /                -> a JSON greeting (its text from the GREETING variable)
  GET  /hello?name=Ada  -> a greeting for the query parameter
  POST /echo            -> the JSON body it was sent
  anything else         -> 404

Wharf strips the service's route (/{{name}}) from the path first.
"""

import json
import os
from urllib.parse import parse_qs, urlsplit

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


def respond(response_out: ResponseOutparam, status: int, value) -> None:
    """Sends `value` as a JSON response."""
    body = json.dumps(value).encode()
    headers = Fields.from_list([("content-type", b"application/json")])
    response = OutgoingResponse(headers)
    response.set_status_code(status)
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with outgoing.write() as stream:
        stream.blocking_write_and_flush(body)
    OutgoingBody.finish(outgoing, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        url = urlsplit(request.path_with_query() or "/")
        query = parse_qs(url.query)
        greeting = os.environ.get("GREETING", "Hello")
        method = request.method()
        if isinstance(method, Method_Get) and url.path == "/":
            respond(response_out, 200, {"message": f"{greeting} from {{name}}!"})
        elif isinstance(method, Method_Get) and url.path == "/hello":
            name = query.get("name", ["world"])[0]
            respond(response_out, 200, {"message": f"{greeting}, {name}!"})
        elif isinstance(method, Method_Post) and url.path == "/echo":
            text = read_body(request)
            try:
                received = json.loads(text)
            except ValueError:
                respond(response_out, 400, {"error": "the body is not JSON"})
                return
            respond(response_out, 200, {"received": received, "bytes": len(text)})
        else:
            respond(response_out, 404, {"error": f"no route for {url.path}"})
