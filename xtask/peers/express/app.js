// The classic Node.js microservice: what a Wharf hello service replaces.
// Usage: node app.js PORT   (prints "listening on http://127.0.0.1:PORT")
const express = require('express');

const app = express();
app.get('/hello', (req, res) => {
  res.json({ message: 'Hello from the microservice!' });
});

const port = Number(process.argv[2] || 3001);
const server = app.listen(port, '127.0.0.1', () => {
  console.error(`listening on http://127.0.0.1:${server.address().port}`);
});
