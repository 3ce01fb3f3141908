// A tiny node http server for bench/run-servers.sh: 200 text on GET /.
// Listens on process.env.PORT when set, else on fd 3 (socket activation).
// On SIGTERM: server.close(), then exit once it is done, as a typical node
// app does.
'use strict';
const http = require('http');

const body = `node generation ${process.env.BATON_GENERATION || '?'}\n`;
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});

if (process.env.PORT) {
  server.listen(Number(process.env.PORT), '127.0.0.1');
} else {
  server.listen({ fd: 3 });
}

process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
});
