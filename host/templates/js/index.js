// {{name}}: a Wharf service. It answers
//
//   GET  /                -> a JSON greeting
//   GET  /hello?name=Ada  -> a greeting for the query parameter
//   POST /echo            -> the JSON body it was sent
//   anything else         -> 404
//
// Wharf strips the service's route (/{{name}}) from the path first. This is
// the fetch-event API: one Request in, one Response out, as in a service
// worker.

const json = (value, status = 200) =>
  new Response(JSON.stringify(value), {
    status,
    headers: { 'content-type': 'application/json' },
  });

const greeting = () => 'Hello';

const routes = {
  'GET /': () => json({ message: `${greeting()} from {{name}}!` }),
  'GET /hello': (request, url) =>
    json({ message: `${greeting()}, ${url.searchParams.get('name') ?? 'world'}!` }),
  'POST /echo': async (request) => {
    const text = await request.text();
    let received;
    try {
      received = JSON.parse(text);
    } catch {
      return json({ error: 'the body is not JSON' }, 400);
    }
    return json({ received, bytes: new TextEncoder().encode(text).length });
  },
};

addEventListener('fetch', (event) =>
  event.respondWith(
    (async () => {
      const url = new URL(event.request.url);
      const route = routes[`${event.request.method} ${url.pathname}`];
      if (!route) {
        return json({ error: `no route for ${event.request.method} ${url.pathname}` }, 404);
      }
      return route(event.request, url);
    })(),
  ),
);
