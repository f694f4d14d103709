// The Node.js counter microservice Wharf's key-value bench is measured
// against: Express plus the `redis` npm client, incrementing a counter in
// Redis per request. Usage: node counter.js PORT REDIS_URL
const express = require('express');
const { createClient } = require('redis');

const [port, redisUrl] = [Number(process.argv[2]), process.argv[3]];
if (!port || !redisUrl) {
  // The bench starts its own Redis on a free port and passes both.
  console.error('usage: node counter.js PORT REDIS_URL');
  process.exit(2);
}
const client = createClient({ url: redisUrl });
client.on('error', (err) => console.error('redis:', err.message));

const app = express();
app.get('/incr', async (req, res) => {
  try {
    const count = await client.incr('express-hits');
    res.json({ count });
  } catch (err) {
    res.status(503).json({ error: err.message });
  }
});

client.connect().then(() => {
  const server = app.listen(port, '127.0.0.1', () => {
    console.error(`listening on http://127.0.0.1:${server.address().port}`);
  });
});
