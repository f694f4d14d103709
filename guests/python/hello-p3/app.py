"""The hello service for WASI 0.3 (wasi:http/handler@0.3.0), in Python.

An async handler built by componentize-py against wit/wasi-0.3.0:
  GET  /   -> 200 {"message": "Hello from the microservice!"}
  POST /   -> 200, the request body streamed back as it arrives
"""

import json

import componentize_py_async_support
import wit_world
from componentize_py_types import Ok
from componentize_py_async_support.streams import ByteStreamWriter
from wit_world import exports
from wit_world.imports.wasi_http_types import Fields, Method_Post, Request, Response


class Handler(exports.Handler):
    """Implements the exported wasi:http/handler@0.3.0."""

    async def handle(self, request: Request) -> Response:
        if isinstance(request.get_method(), Method_Post):
            # Echo without buffering: the request body becomes the response's.
            headers = [
                (name, value)
                for name, value in request.get_headers().copy_all()
                if name == "content-type"
            ]
            body, trailers = Request.consume_body(request, unit_future())
            return Response.new(Fields.from_list(headers), body, trailers)[0]
        writer, reader = wit_world.byte_stream()
        message = json.dumps({"message": "Hello from the microservice!"})
        componentize_py_async_support.spawn(write(writer, message.encode()))
        return Response.new(
            Fields.from_list([("content-type", b"application/json")]),
            reader,
            trailers_future(),
        )[0]


async def write(writer: ByteStreamWriter, data: bytes) -> None:
    with writer:
        await writer.write_all(data)


def trailers_future():
    return wit_world.result_option_wasi_http_types_fields_wasi_http_types_error_code_future(
        lambda: Ok(None)
    )[1]


def unit_future():
    return wit_world.result_unit_wasi_http_types_error_code_future(lambda: Ok(None))[1]
