"""The demo's e-mail service, in Python: its trigger POSTs every
`orders.created` message to /on-order, and it "sends" a confirmation (a log
line) and counts it in the `demo` bucket.

Routes (after Wharf strips the mount point):
  POST /on-order -> handles one order message (a trigger calls this)
  GET  /         -> {"emails_sent": N}
"""

import json

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import atomics, wasi_keyvalue_store
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
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


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = (request.path_with_query() or "/").split("?")[0]
        try:
            bucket = wasi_keyvalue_store.open("demo")
            if path == "/on-order" and isinstance(request.method(), Method_Post):
                try:
                    order = json.loads(read_body(request))
                except ValueError as err:
                    # A 4xx/5xx asks for the message again; a malformed
                    # order never gets better, so it ends in the dead letters.
                    respond(response_out, 422, {"error": f"not an order: {err}"})
                    return
                sent = atomics.increment(bucket, "emails", 1)
                print(f"email: confirmation for order {order.get('id')} to user {order.get('user_id')} (#{sent})")
                respond(response_out, 200, {"sent": sent})
            else:
                stored = bucket.get("emails")
                respond(response_out, 200, {"emails_sent": int(stored) if stored else 0})
        except Err as err:
            value = err.value
            respond(response_out, 503, {"error": getattr(value, "value", None) or type(value).__name__})
