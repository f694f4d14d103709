// The Node.js counter microservice Wharf's key-value bench is measured
// against: Express plus the `redis` npm client, incrementing a counter in
// Redis per request. Usage: node counter.js PORT REDIS_URL
const express = require('express');
const { createClient } = require('redis');

const port = Number(process.argv[2] || 3002);
const client = createClient({ url: process.argv[3] || 'redis://127.0.0.1:6379' });
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
