// A JavaScript service that calls another service: fetch('http://users.internal/')
// reaches the users service in-process (its manifest must allow
// "http://users.internal"). GET / answers the users it got, counted.

addEventListener('fetch', (event) =>
  event.respondWith(
    (async () => {
      const upstream = await fetch('http://users.internal/');
      if (!upstream.ok) {
        return new Response(JSON.stringify({ error: `users answered ${upstream.status}` }), {
          status: 502,
          headers: { 'content-type': 'application/json' },
        });
      }
      const users = await upstream.json();
      return new Response(JSON.stringify({ source: 'js', count: users.length, users }), {
        headers: { 'content-type': 'application/json' },
      });
    })(),
  ),
);
