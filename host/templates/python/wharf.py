"""What Wharf offers a Python service without writing WIT.

    import wharf

    bucket = wharf.open_bucket("{{name}}")        # wasi:keyvalue, within [keyvalue] buckets
    count = bucket.increment("visits")
    wharf.publish("{{name}}.visited", {"n": count})  # within [messaging] publish
    wharf.config("api_url")                        # [config] and [secrets]
    os.environ["GREETING"]                         # [env]

A bucket or topic the manifest does not grant raises WharfError saying which
grant to add.
"""

import json
from typing import Any, Optional

from componentize_py_types import Err, Ok
from wit_world.imports import atomics, outgoing_handler, wasi_config_store, wasi_keyvalue_store
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Post,
    OutgoingBody,
    OutgoingRequest,
    OutgoingResponse,
    ResponseOutparam,
    Scheme_Http,
)

# Most bytes one blocking write may take (wasi:io streams).
_CHUNK = 4096


class WharfError(Exception):
    """A failure with what to do about it (a missing grant, a bad name)."""


def _explain(err: Err, what: str, bucket: Optional[str] = None) -> WharfError:
    value = getattr(err, "value", err)
    if isinstance(value, wasi_keyvalue_store.Error_AccessDenied):
        return WharfError(
            f'bucket "{bucket}" is not granted to this service: '
            "add it to buckets under [keyvalue] in its manifest"
        )
    if isinstance(value, wasi_keyvalue_store.Error_NoSuchStore):
        return WharfError(f'"{bucket}" is not a bucket name: use 1-64 letters, digits, - or _')
    detail = getattr(value, "value", value)
    return WharfError(f"{what}: {detail}")


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


class Bucket:
    """A key-value bucket: keys are strings, values text, bytes or JSON."""

    def __init__(self, name: str):
        self.name = name
        try:
            self._handle = wasi_keyvalue_store.open(name)
        except Err as err:
            raise _explain(err, f'opening bucket "{name}"', name) from None

    def _call(self, what: str, call):
        try:
            return call()
        except Err as err:
            raise _explain(err, f'{what} in bucket "{self.name}"', self.name) from None

    def get_bytes(self, key: str) -> Optional[bytes]:
        """The value of `key` as bytes, or None."""
        return self._call(f"get {key}", lambda: self._handle.get(key))

    def get(self, key: str) -> Optional[str]:
        """The value of `key` as text, or None."""
        value = self.get_bytes(key)
        return None if value is None else value.decode()

    def get_json(self, key: str) -> Any:
        """The value of `key` parsed as JSON, or None."""
        text = self.get(key)
        return None if text is None else json.loads(text)

    def set(self, key: str, value: Any) -> None:
        """Sets `key` to text, bytes, or anything else as JSON."""
        self._call(f"set {key}", lambda: self._handle.set(key, _bytes(value)))

    def delete(self, key: str) -> None:
        """Deletes `key`."""
        self._call(f"delete {key}", lambda: self._handle.delete(key))

    def has(self, key: str) -> bool:
        """Whether `key` has a value."""
        return self._call(f"exists {key}", lambda: self._handle.exists(key))

    def increment(self, key: str, by: int = 1) -> int:
        """Adds `by` to the counter at `key`, atomically; the new value."""
        return self._call(f"increment {key}", lambda: atomics.increment(self._handle, key, by))

    def keys(self) -> list:
        """Every key."""
        keys, cursor = [], None
        while True:
            page = self._call("list keys", lambda: self._handle.list_keys(cursor))
            keys.extend(page.keys)
            cursor = page.cursor
            if cursor is None:
                return keys


def open_bucket(name: str) -> Bucket:
    """Opens bucket `name` (wasi:keyvalue)."""
    return Bucket(name)


def config(key: str) -> Optional[str]:
    """The configuration or secret value of `key` (wasi:config), or None."""
    try:
        return wasi_config_store.get(key)
    except Err as err:
        raise _explain(err, f"config {key}") from None


def _write_all(stream, data: bytes) -> None:
    for start in range(0, len(data), _CHUNK):
        stream.blocking_write_and_flush(data[start : start + _CHUNK])


def _post(path: str, body: bytes, content_type: str):
    request = OutgoingRequest(Fields.from_list([("content-type", content_type.encode())]))
    request.set_method(Method_Post())
    request.set_scheme(Scheme_Http())
    request.set_authority("messages.internal")
    request.set_path_with_query(path)
    outgoing = request.body()
    try:
        future = outgoing_handler.handle(request, None)
    except Err as err:
        raise WharfError(f"messages.internal refused the request: {err.value}") from None
    with outgoing.write() as stream:
        _write_all(stream, body)
    OutgoingBody.finish(outgoing, None)
    while True:
        result = future.get()
        if result is not None:
            break
        future.subscribe().block()
    if not isinstance(result, Ok) or not isinstance(result.value, Ok):
        raise WharfError(f"messages.internal did not answer: {result}")
    response = result.value.value
    data = read_incoming(response)
    return response.status(), data


def read_incoming(message) -> bytes:
    """Reads the whole body of an incoming request or response."""
    data = b""
    body = message.consume()
    with body.stream() as stream:
        while True:
            try:
                data += stream.blocking_read(65536)
            except Exception:  # the stream is closed: the body is complete
                break
    return data


def _content_type(body: Any) -> str:
    if isinstance(body, bytes):
        return "application/octet-stream"
    if isinstance(body, str):
        return "text/plain"
    return "application/json"


def publish(topic: str, body: Any, content_type: Optional[str] = None) -> dict:
    """Publishes `body` to `topic` once the broker has it; its id and topic."""
    status, data = _post(f"/{topic}", _bytes(body), content_type or _content_type(body))
    if status != 202:
        raise WharfError(f'publishing to "{topic}" failed ({status}): {data.decode().strip()}')
    return json.loads(data)


def request(topic: str, body: Any, within: str = "2s") -> bytes:
    """Sends `body` as a request to `topic`; the first reply's body."""
    status, data = _post(f"/{topic}?reply-within={within}", _bytes(body), _content_type(body))
    if status != 200:
        raise WharfError(f'the request to "{topic}" failed ({status}): {data.decode().strip()}')
    return data


def read_body(request: IncomingRequest) -> bytes:
    """Reads the whole request body."""
    return read_incoming(request)


def respond(response_out: ResponseOutparam, status: int, value: Any) -> None:
    """Sends `value` as JSON (text and bytes as they are)."""
    content_type = "application/json" if not isinstance(value, (str, bytes)) else _content_type(value)
    body = _bytes(value)
    response = OutgoingResponse(Fields.from_list([("content-type", content_type.encode())]))
    response.set_status_code(status)
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with outgoing.write() as stream:
        _write_all(stream, body)
    OutgoingBody.finish(outgoing, None)
