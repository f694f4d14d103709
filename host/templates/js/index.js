// {{name}}: a Wharf service. It answers
//
//   GET  /                -> a JSON greeting (its text from GREETING in {{name}}.toml)
//   GET  /hello?name=Ada  -> a greeting for the query parameter
//   POST /echo            -> the JSON body it was sent
//   GET  /count           -> a counter kept in the "{{name}}" bucket
//   POST /publish         -> publishes the body to {{name}}.events
//   anything else         -> 404
//
// Wharf strips the service's route (/{{name}}) from the path first. A
// handler gets a standard Request and returns a Response, text or JSON-able
// data; `npm install` any package and import it (bundled at build time).
import { serve, kv, env, publish, json } from './wharf/index.js';

const greeting = () => env.GREETING ?? 'Hello';

const routes = {
  'GET /': () => ({ message: `${greeting()} from {{name}}!` }),
  'GET /hello': (request, url) => ({
    message: `${greeting()}, ${url.searchParams.get('name') ?? 'world'}!`,
  }),
  'POST /echo': async (request) => {
    const text = await request.text();
    let received;
    try {
      received = JSON.parse(text);
    } catch {
      return json({ error: 'the body is not JSON' }, 400);
    }
    return { received, bytes: new TextEncoder().encode(text).length };
  },
  // State: the "{{name}}" bucket, granted in {{name}}.toml.
  'GET /count': () => ({ count: kv.open('{{name}}').increment('count') }),
  // Messages: {{name}}.events, granted in {{name}}.toml.
  'POST /publish': async (request) => {
    const sent = await publish('{{name}}.events', await request.text());
    return json(sent, 202);
  },
};

serve(async (request) => {
  const url = new URL(request.url);
  const route = routes[`${request.method} ${url.pathname}`];
  if (!route) {
    return json({ error: `no route for ${request.method} ${url.pathname}` }, 404);
  }
  return route(request, url);
});
