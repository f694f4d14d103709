"""{{name}}: a Wharf service. It answers

  GET  /                -> a JSON greeting (its text from GREETING in {{name}}.toml)
  GET  /hello?name=Ada  -> a greeting for the query parameter
  POST /echo            -> the JSON body it was sent
  GET  /count           -> a counter kept in the "{{name}}" bucket
  POST /publish         -> publishes the body to {{name}}.events
  anything else         -> 404

Wharf strips the service's route (/{{name}}) from the path first.
"""

import json
import os
import traceback
from urllib.parse import parse_qs, urlsplit

import wharf
from wit_world import exports
from wit_world.imports.types import IncomingRequest, Method_Get, Method_Post, ResponseOutparam


def route(request: IncomingRequest):
    """The status and body answering `request`."""
    url = urlsplit(request.path_with_query() or "/")
    query = parse_qs(url.query)
    greeting = os.environ.get("GREETING", "Hello")
    method = request.method()
    get, post = isinstance(method, Method_Get), isinstance(method, Method_Post)
    if get and url.path == "/":
        return 200, {"message": f"{greeting} from {{name}}!"}
    if get and url.path == "/hello":
        name = query.get("name", ["world"])[0]
        return 200, {"message": f"{greeting}, {name}!"}
    if post and url.path == "/echo":
        text = wharf.read_body(request)
        try:
            received = json.loads(text)
        except ValueError:
            return 400, {"error": "the body is not JSON"}
        return 200, {"received": received, "bytes": len(text)}
    if get and url.path == "/count":
        # State: the "{{name}}" bucket, granted in {{name}}.toml.
        return 200, {"count": wharf.open_bucket("{{name}}").increment("count")}
    if post and url.path == "/publish":
        # Messages: {{name}}.events, granted in {{name}}.toml.
        return 202, wharf.publish("{{name}}.events", wharf.read_body(request).decode())
    return 404, {"error": f"no route for {url.path}"}


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        try:
            status, body = route(request)
        except Exception as err:
            text = "".join(traceback.format_exception(err))
            print(f"uncaught error: {text}", flush=True)
            expose = os.environ.get("WHARF_EXPOSE_ERRORS") == "1"
            status, body = 500, text if expose else "Internal Server Error"
        wharf.respond(response_out, status, body)
