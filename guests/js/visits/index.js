// A JavaScript service that keeps state in wasi:keyvalue and reads
// wasi:config, written like an Express handler. WIT imports are plain ES
// module imports (the world is `stateful-service`, see ./world).
//
//   GET /        -> {"service": ..., "visits": N}: an atomic per-visit counter
//   GET /last    -> {"last": ...}: the path of the previous visit
//
// Its manifest grants the `default` bucket; the name it reports comes from
// `[config] service_name`.
import { open } from 'wasi:keyvalue/store@0.2.0-draft';
import { increment } from 'wasi:keyvalue/atomics@0.2.0-draft';
import { get as getConfig } from 'wasi:config/store@0.2.0-rc.1';

const json = (value, status = 200) =>
  new Response(JSON.stringify(value), {
    status,
    headers: { 'content-type': 'application/json' },
  });

async function handle(request) {
  const { pathname } = new URL(request.url);
  try {
    const bucket = open('default');
    if (pathname === '/last') {
      const last = bucket.get('js-last');
      return json({ last: last ? new TextDecoder().decode(last) : null });
    }
    // u64 in WIT is a BigInt in JavaScript.
    const visits = increment(bucket, 'js-visits', 1n);
    bucket.set('js-last', new TextEncoder().encode(pathname));
    return json({ service: getConfig('service_name') ?? 'visits-js', visits: Number(visits) });
  } catch (err) {
    // A key-value error arrives as a thrown ComponentError with the variant.
    return json({ error: String(err?.payload?.val ?? err?.payload?.tag ?? err) }, 503);
  }
}

addEventListener('fetch', (event) => event.respondWith(handle(event.request)));
