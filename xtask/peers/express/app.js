// The classic Node.js microservice: what a Wharf service replaces.
// Usage: node app.js PORT   (prints "listening on http://127.0.0.1:PORT")
//
//   GET /hello -> the hello JSON of guests/js/hello
//   GET /order -> the JSON-heavy summary of guests/js/order-handler, from
//                 the very same order.js
const express = require('express');
const path = require('node:path');
const { pathToFileURL } = require('node:url');

const orderModule = path.join(__dirname, '../../../guests/js/order-handler/order.js');

import(pathToFileURL(orderModule).href).then(({ summarise }) => {
  const app = express();
  app.get('/hello', (req, res) => {
    res.json({ message: 'Hello from the microservice!' });
  });
  app.get('/order', (req, res) => {
    res.json(summarise());
  });

  const port = Number(process.argv[2] || 3001);
  const server = app.listen(port, '127.0.0.1', () => {
    console.error(`listening on http://127.0.0.1:${server.address().port}`);
  });
});
