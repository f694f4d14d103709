// The demo's orders service, in JavaScript. Orders live in the `demo`
// key-value bucket; each new order is published to the `orders.created`
// topic with a plain fetch to the reserved host messages.internal (no
// messaging bindings needed), and the billing and email services are
// triggered by it.
//
//   POST /  {"user_id": 1, "item": "coffee", "amount_cents": 450}
//           -> 201 with the order, once the broker has accepted the message
//   GET  /            -> every order
//   GET  /?user=ID    -> the orders of one user (what the gateway asks)
import { open } from 'wasi:keyvalue/store@0.2.0-draft';
import { increment } from 'wasi:keyvalue/atomics@0.2.0-draft';

const json = (value, status = 200) =>
  new Response(JSON.stringify(value), {
    status,
    headers: { 'content-type': 'application/json' },
  });

const decode = (bytes) => JSON.parse(new TextDecoder().decode(bytes));

function listOrders(bucket, user) {
  const count = Number(new TextDecoder().decode(bucket.get('orders') ?? new TextEncoder().encode('0')));
  const orders = [];
  for (let id = 1; id <= count; id++) {
    const stored = bucket.get(`order:${id}`);
    if (stored) orders.push(decode(stored));
  }
  return user === null ? orders : orders.filter((order) => String(order.user_id) === user);
}

async function createOrder(bucket, request) {
  let input;
  try {
    input = await request.json();
  } catch {
    return json({ error: 'the body must be JSON: {"user_id": 1, "item": "coffee", "amount_cents": 450}' }, 400);
  }
  if (typeof input.item !== 'string' || !Number.isInteger(input.user_id)) {
    return json({ error: 'user_id (an integer) and item (a string) are required' }, 400);
  }
  const id = Number(increment(bucket, 'orders', 1n));
  const order = {
    id,
    user_id: input.user_id,
    item: input.item,
    amount_cents: Number.isInteger(input.amount_cents) ? input.amount_cents : 0,
  };
  bucket.set(`order:${id}`, new TextEncoder().encode(JSON.stringify(order)));
  const published = await fetch('http://messages.internal/orders.created', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(order),
  });
  if (published.status !== 202) {
    return json({ order, error: `not published: ${await published.text()}` }, 503);
  }
  return json(order, 201);
}

async function handle(request) {
  const url = new URL(request.url);
  try {
    const bucket = open('demo');
    if (request.method === 'POST') return await createOrder(bucket, request);
    return json(listOrders(bucket, url.searchParams.get('user')));
  } catch (err) {
    return json({ error: String(err?.payload?.val ?? err?.payload?.tag ?? err) }, 503);
  }
}

addEventListener('fetch', (event) => event.respondWith(handle(event.request)));
