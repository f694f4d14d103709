// What Wharf offers a JavaScript service, without writing WIT:
//
//   import { serve, kv, config, env, publish, request } from './wharf/index.js';
//
//   serve(async (req) => {                 // or serve(app.fetch) with Hono
//     const n = kv.open('{{name}}').increment('visits');
//     await publish('{{name}}.visited', { n });
//     return { visits: n };                // objects become JSON
//   });
//
// Every call checks the service's manifest (NAME.toml): a bucket or topic
// it does not name fails with an Error saying which grant to add. An
// uncaught error is logged with its stack (mapped to your files by the
// source map the build embeds) and answered 500 — with the message and
// stack in the body only when the host says so (`wharf dev`, or
// `[http] expose_errors = true`).
import { open as openBucket } from 'wasi:keyvalue/store@0.2.0-draft';
import { increment as atomicIncrement } from 'wasi:keyvalue/atomics@0.2.0-draft';
import { get as configGet, getAll as configGetAll } from 'wasi:config/store@0.2.0-rc.1';
import { getEnvironment } from 'wasi:cli/environment@0.2.10';
import {
  Fields,
  OutgoingBody,
  OutgoingResponse,
  ResponseOutparam,
} from 'wasi:http/types@0.2.10';

const encoder = new TextEncoder();
const decoder = new TextDecoder();

let environment;

/** The service's environment: its manifest's `[env]`, read when first used. */
export const env = new Proxy(
  {},
  {
    get(_, name) {
      environment ??= Object.fromEntries(getEnvironment());
      return environment[name];
    },
    has(_, name) {
      environment ??= Object.fromEntries(getEnvironment());
      return name in environment;
    },
    ownKeys() {
      environment ??= Object.fromEntries(getEnvironment());
      return Reflect.ownKeys(environment);
    },
    getOwnPropertyDescriptor(_, name) {
      environment ??= Object.fromEntries(getEnvironment());
      return name in environment
        ? { value: environment[name], enumerable: true, configurable: true }
        : undefined;
    },
  },
);

/** A key-value failure, with what to do about it. */
export class WharfError extends Error {
  constructor(message, cause) {
    super(message, { cause });
    this.name = 'WharfError';
  }
}

// A WIT `result` error arrives as a thrown ComponentError whose `payload`
// is the variant: say what it means instead of "[object Object]".
function explain(err, what, bucket) {
  const tag = err?.payload?.tag;
  if (tag === 'access-denied') {
    return new WharfError(
      `bucket "${bucket}" is not granted to this service: add it to buckets under [keyvalue] in its manifest`,
      err,
    );
  }
  if (tag === 'no-such-store') {
    return new WharfError(
      `"${bucket}" is not a bucket name: use 1-64 letters, digits, '-' or '_'`,
      err,
    );
  }
  if (tag === 'other') return new WharfError(`${what}: ${err.payload.val}`, err);
  return err instanceof Error ? err : new WharfError(`${what}: ${String(err)}`, err);
}

function bytes(value) {
  if (value instanceof Uint8Array) return value;
  if (typeof value === 'string') return encoder.encode(value);
  return encoder.encode(JSON.stringify(value));
}

/** A key-value bucket: keys are strings, values strings, bytes or JSON. */
class Bucket {
  constructor(name) {
    this.name = name;
    try {
      this.handle = openBucket(name);
    } catch (err) {
      throw explain(err, `opening bucket "${name}"`, name);
    }
  }

  #call(what, fn) {
    try {
      return fn();
    } catch (err) {
      throw explain(err, `${what} in bucket "${this.name}"`, this.name);
    }
  }

  /** The value of `key` as text, or null. */
  get(key) {
    const value = this.getBytes(key);
    return value === null ? null : decoder.decode(value);
  }

  /** The value of `key` as bytes, or null. */
  getBytes(key) {
    return this.#call(`get ${key}`, () => this.handle.get(key) ?? null);
  }

  /** The value of `key` parsed as JSON, or null. */
  getJSON(key) {
    const text = this.get(key);
    return text === null ? null : JSON.parse(text);
  }

  /** Sets `key` to a string, bytes, or anything else as JSON. */
  set(key, value) {
    this.#call(`set ${key}`, () => this.handle.set(key, bytes(value)));
  }

  /** Deletes `key`. */
  delete(key) {
    this.#call(`delete ${key}`, () => this.handle.delete(key));
  }

  /** Whether `key` has a value. */
  has(key) {
    return this.#call(`exists ${key}`, () => this.handle.exists(key));
  }

  /** Adds `by` (default 1) to the counter at `key`, atomically; the new value. */
  increment(key, by = 1) {
    return Number(this.#call(`increment ${key}`, () => atomicIncrement(this.handle, key, BigInt(by))));
  }

  /** Every key, in pages of the store's choosing. */
  keys() {
    const keys = [];
    let cursor;
    do {
      const page = this.#call('list keys', () => this.handle.listKeys(cursor));
      keys.push(...page.keys);
      cursor = page.cursor;
    } while (cursor !== undefined && cursor !== null);
    return keys;
  }
}

/** Key-value buckets (`wasi:keyvalue`): `kv.open('cart').get('ada')`. */
export const kv = {
  open: (name) => new Bucket(name),
};

/** Configuration and secrets (`wasi:config`): the manifest's `[config]` and `[secrets]`. */
export const config = {
  /** The value of `key`, or undefined. */
  get(key) {
    try {
      return configGet(key) ?? undefined;
    } catch (err) {
      throw explain(err, `config ${key}`);
    }
  },
  /** Every key and value. */
  all() {
    try {
      return Object.fromEntries(configGetAll());
    } catch (err) {
      throw explain(err, 'config');
    }
  },
};

async function post(topic, body, query, contentType) {
  const payload = bytes(body);
  const type =
    contentType ??
    (body instanceof Uint8Array
      ? 'application/octet-stream'
      : typeof body === 'string'
        ? 'text/plain'
        : 'application/json');
  const response = await fetch(`http://messages.internal/${topic}${query}`, {
    method: 'POST',
    headers: { 'content-type': type },
    body: payload,
  });
  if (response.status === 202 || response.status === 200) return response;
  const why = await response.text();
  throw new WharfError(`publishing to "${topic}" failed (${response.status}): ${why.trim()}`);
}

/**
 * Publishes `body` (a string, bytes, or anything else as JSON) to `topic`;
 * resolves once the broker has it, with its id. The topic must be within
 * the manifest's `[messaging] publish` list.
 */
export async function publish(topic, body, { contentType } = {}) {
  const response = await post(topic, body, '', contentType);
  return response.json();
}

/**
 * Sends `body` as a request to `topic` and resolves with the first reply's
 * text, waiting at most `within` ("2s" by default).
 */
export async function request(topic, body, { within = '2s', contentType } = {}) {
  const response = await post(topic, body, `?reply-within=${encodeURIComponent(within)}`, contentType);
  return response.text();
}

/** A JSON response with `status` (200 by default). */
export function json(value, status = 200) {
  return new Response(JSON.stringify(value), {
    status,
    headers: { 'content-type': 'application/json' },
  });
}

function toResponse(result) {
  if (result instanceof Response) return result;
  if (result === undefined || result === null) return new Response(null, { status: 204 });
  if (typeof result === 'string') {
    return new Response(result, { headers: { 'content-type': 'text/plain; charset=utf-8' } });
  }
  return new Response(JSON.stringify(result), {
    headers: { 'content-type': 'application/json' },
  });
}

/** The error as text: its message, then its stack. */
function describe(err) {
  if (!(err instanceof Error)) return `thrown: ${String(err)}`;
  const stack = err.stack ? `\n${err.stack.trimEnd()}` : '';
  const cause = err.cause?.payload ? ` (${JSON.stringify(err.cause.payload)})` : '';
  return `${err.name}: ${err.message}${cause}${stack}`;
}

/** The handler `serve` was given. */
let served;

/**
 * Serves HTTP with `handler(request)`, which returns (or resolves to) a
 * Response, a string, an object (sent as JSON) or nothing (204). A thrown
 * error is logged and answered 500.
 *
 * Each request calls the handler afresh, so the service runs on reused
 * instances too (`[instance] reuse` in the manifest): what the module keeps
 * in its own variables then lives on from one request to the next, as in
 * a Node.js process.
 */
export function serve(handler) {
  served = handler;
}

/** The incoming request as a standard `Request`, its body read whole. */
function toRequest(incoming) {
  const method = incoming.method();
  const verb = method.tag === 'other' ? method.val : method.tag.toUpperCase();
  const scheme = incoming.scheme();
  const protocol = scheme?.tag === 'HTTPS' ? 'https' : 'http';
  const authority = incoming.authority() ?? 'localhost';
  const url = `${protocol}://${authority}${incoming.pathWithQuery() ?? '/'}`;
  const headers = new Headers();
  for (const [name, value] of incoming.headers().entries()) {
    headers.append(name, decoder.decode(value));
  }
  let body;
  if (verb !== 'GET' && verb !== 'HEAD') {
    const chunks = [];
    const incomingBody = incoming.consume();
    const stream = incomingBody.stream();
    for (;;) {
      let chunk;
      try {
        chunk = stream.blockingRead(65536n);
      } catch (err) {
        if (err?.payload?.tag === 'closed') break;
        throw err;
      }
      chunks.push(chunk);
    }
    stream[Symbol.dispose]();
    body = concat(chunks);
  }
  return new Request(url, { method: verb, headers, body });
}

/** `chunks` as one array. */
function concat(chunks) {
  const out = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

/** Sends `response` through `outparam`. */
async function respond(outparam, response) {
  const fields = [];
  response.headers.forEach((value, name) => fields.push([name, encoder.encode(value)]));
  const outgoing = new OutgoingResponse(Fields.fromList(fields));
  outgoing.setStatusCode(response.status);
  const body = outgoing.body();
  const bytes = new Uint8Array(await response.arrayBuffer());
  ResponseOutparam.set(outparam, { tag: 'ok', val: outgoing });
  const stream = body.write();
  // One blocking write carries at most 4096 bytes.
  for (let at = 0; at < bytes.length; at += 4096) {
    stream.blockingWriteAndFlush(bytes.subarray(at, at + 4096));
  }
  stream[Symbol.dispose]();
  OutgoingBody.finish(body, undefined);
}

/** The 500 answering `err`: its details only when the host says so. */
function failure(err) {
  const text = describe(err);
  console.error(`uncaught error: ${text}`);
  const body = env.WHARF_EXPOSE_ERRORS === '1' ? text : 'Internal Server Error';
  return new Response(body, {
    status: 500,
    headers: { 'content-type': 'text/plain; charset=utf-8' },
  });
}

/**
 * The `wasi:http/incoming-handler` export the build wires to `serve`: each
 * request is handed to the handler as a standard `Request`.
 */
export const incomingHandler = {
  async handle(incoming, outparam) {
    let response;
    try {
      if (!served) throw new WharfError('the service never called serve(handler)');
      response = toResponse(await served(toRequest(incoming)));
    } catch (err) {
      response = failure(err);
    }
    await respond(outparam, response);
  },
};
