// The Express hello-world microservice, rewritten for Wharf:
//
//   app.get('/', (req, res) => res.json({ message: 'Hello from the microservice!' }));
//
// Routes (the path is what is left after Wharf strips the mount point):
//   GET  /       -> 200 {"message": "Hello from the microservice!"}
//   POST /echo   -> 201, the JSON body it was sent, with an x-handled-by header
//   anything else -> 404 {"error": ...}

const json = (value, status = 200, headers = {}) =>
  new Response(JSON.stringify(value), {
    status,
    headers: { 'content-type': 'application/json', ...headers },
  });

const routes = {
  'GET /': () => json({ message: 'Hello from the microservice!' }),
  'POST /echo': async (request) =>
    json({ received: await request.json(), lang: 'js' }, 201, { 'x-handled-by': 'wharf-js' }),
};

async function handle(request) {
  const { pathname } = new URL(request.url);
  const route = routes[`${request.method} ${pathname}`];
  if (!route) {
    return json({ error: `no route for ${request.method} ${pathname}` }, 404, {
      'x-handled-by': 'wharf-js',
    });
  }
  try {
    return await route(request);
  } catch (err) {
    return json({ error: String(err) }, 400);
  }
}

addEventListener('fetch', (event) => event.respondWith(handle(event.request)));
