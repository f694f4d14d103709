// {{name}}: a Wharf service. It answers
//
//   GET  /                -> a JSON greeting
//   GET  /hello?name=Ada  -> a greeting for the query parameter
//   POST /echo            -> the JSON body it was sent
//   anything else         -> 404
//
// Wharf strips the service's route (/{{name}}) from the path first. This is
// the fetch-event API: one Request in, one Response out, as in a service
// worker. `tsc` compiles it to dist/index.js, which ComponentizeJS builds.

interface FetchEvent extends Event {
  readonly request: Request;
  respondWith(response: Response | Promise<Response>): void;
}

type Route = (request: Request, url: URL) => Response | Promise<Response>;

const json = (value: unknown, status = 200): Response =>
  new Response(JSON.stringify(value), {
    status,
    headers: { 'content-type': 'application/json' },
  });

const routes: Record<string, Route> = {
  'GET /': () => json({ message: 'Hello from {{name}}!' }),
  'GET /hello': (_request, url) =>
    json({ message: `Hello, ${url.searchParams.get('name') ?? 'world'}!` }),
  'POST /echo': async (request) => {
    const text = await request.text();
    let received: unknown;
    try {
      received = JSON.parse(text);
    } catch {
      return json({ error: 'the body is not JSON' }, 400);
    }
    return json({ received, bytes: new TextEncoder().encode(text).length });
  },
};

addEventListener('fetch', (event) => {
  const fetchEvent = event as FetchEvent;
  fetchEvent.respondWith(
    (async () => {
      const url = new URL(fetchEvent.request.url);
      const route = routes[`${fetchEvent.request.method} ${url.pathname}`];
      if (!route) {
        return json({ error: `no route for ${fetchEvent.request.method} ${url.pathname}` }, 404);
      }
      return route(fetchEvent.request, url);
    })(),
  );
});
