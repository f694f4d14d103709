// The work of the JSON-heavy benchmark, shared word for word by the Wharf
// service (./index.js) and its Express twin (xtask/peers/express/app.js):
// build an order of about 2.4 KB, stringify it, parse it back, keep the
// lines over a price and sum them.

const SKUS = ['coffee', 'tea', 'croissant', 'bagel', 'juice', 'muffin', 'scone', 'cocoa'];

export function buildOrder(seed) {
  const lines = [];
  for (let i = 0; i < 30; i++) {
    lines.push({
      sku: `${SKUS[i % SKUS.length]}-${i}`,
      quantity: 1 + ((seed + i) % 4),
      unit_cents: 150 + ((seed * 7 + i * 31) % 600),
      note: i % 2 === 0 ? 'no sugar, extra hot, to go please' : '',
    });
  }
  return {
    id: `order-${seed}`,
    customer: { id: seed % 1000, name: 'Ada Lovelace', email: 'ada@example.com' },
    placed_at: '2026-12-06T12:00:00Z',
    lines,
  };
}

let next = 0;

export function summarise() {
  next = (next + 1) % 100000;
  const text = JSON.stringify(buildOrder(next));
  const order = JSON.parse(text);
  const kept = order.lines.filter((line) => line.unit_cents >= 300);
  const total = kept.reduce((sum, line) => sum + line.quantity * line.unit_cents, 0);
  return {
    id: order.id,
    bytes: text.length,
    lines: order.lines.length,
    kept: kept.length,
    total_cents: total,
  };
}
