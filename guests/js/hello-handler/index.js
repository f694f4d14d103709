// The same hello-world JSON service as ../hello, written against the
// wasi:http/incoming-handler interface directly instead of the fetch-event
// API. It does the same work, and it survives instance reuse
// (`[instance] reuse = N`): ComponentizeJS 0.23 keeps the FetchEvent of the
// first request and fails the second (StarlingMonkey issue #247), but an
// exported handler is called afresh for every request.
//
//   GET /         -> 200 {"message": "Hello from the microservice!"}
//   anything else -> 404 {"error": ...}

import {
  Fields,
  OutgoingBody,
  OutgoingResponse,
  ResponseOutparam,
} from 'wasi:http/types@0.2.10';

const encoder = new TextEncoder();
const contentType = [['content-type', encoder.encode('application/json')]];

function respond(outparam, status, value) {
  const response = new OutgoingResponse(Fields.fromList(contentType));
  response.setStatusCode(status);
  const body = response.body();
  ResponseOutparam.set(outparam, { tag: 'ok', val: response });
  const stream = body.write();
  stream.blockingWriteAndFlush(encoder.encode(JSON.stringify(value)));
  stream[Symbol.dispose]();
  OutgoingBody.finish(body, undefined);
}

export const incomingHandler = {
  handle(request, outparam) {
    const method = request.method().tag.toUpperCase();
    const path = (request.pathWithQuery() ?? '/').split('?')[0];
    if (method === 'GET' && path === '/') {
      respond(outparam, 200, { message: 'Hello from the microservice!' });
    } else {
      respond(outparam, 404, { error: `no route for ${method} ${path}` });
    }
  },
};
