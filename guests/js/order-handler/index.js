// A JSON-heavy handler for `cargo xtask bench http`: for every request it
// builds an order of 2.4 KB, stringifies it, parses it back, filters its
// lines and answers a summary — the kind of work a real JSON service does
// beside its I/O. Its Express twin is xtask/peers/express/app.js (/order);
// both answer the same bytes. Written as an exported wasi:http handler, so
// it runs on reused instances.
//
//   GET /order    -> 200 {"id":"…","lines":…,"kept":…,"total_cents":…}
//   anything else -> 404

import {
  Fields,
  OutgoingBody,
  OutgoingResponse,
  ResponseOutparam,
} from 'wasi:http/types@0.2.10';

import { summarise } from './order.js';

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
    if (method === 'GET' && (path === '/' || path === '/order')) {
      respond(outparam, 200, summarise());
    } else {
      respond(outparam, 404, { error: `no route for ${method} ${path}` });
    }
  },
};
