// A minimal Node.js cache with KV Responder's public kv shapes, as a performance yardstick.
//
//   node bench/node_reference.js PORT [TENANT]
//
// GET/PUT/DELETE /<tenant>/kv/<key>, POST /<tenant>/bulk, GET /<tenant>/health/ready. Values are kept as
// their serialized JSON (as KV Responder keeps them); TTLs expire lazily on read. One process, no cluster.
'use strict';
const http = require('http');

const port = parseInt(process.argv[2] || '3100', 10);
const tenant = process.argv[3] || 'bench';
const prefix = '/' + tenant + '/';
const store = new Map(); // key -> {value: string (JSON), version: string, expires_at: number|null}
let clock = 0;

function send(res, status, obj) {
  const body = typeof obj === 'string' ? obj : JSON.stringify(obj);
  res.writeHead(status, {'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body)});
  res.end(body);
}

function error(res, status, code, message) {
  send(res, status, {error: code, message: message});
}

function live(key) {
  const entry = store.get(key);
  if (entry === undefined) return undefined;
  if (entry.expires_at !== null && entry.expires_at * 1000 <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry;
}

function write(key, body) {
  if (body === null || typeof body !== 'object' || Array.isArray(body) || !('value' in body)) {
    return {status: 400};
  }
  const ttl = body.ttl === undefined || body.ttl === null ? null : body.ttl;
  if (ttl !== null && (typeof ttl !== 'number' || !(ttl > 0))) return {status: 400};
  const created = live(key) === undefined;
  const entry = {
    value: JSON.stringify(body.value),
    version: (Date.now() * 1000 + (clock++ % 1000)).toString(16),
    expires_at: ttl === null ? null : Math.round((Date.now() / 1000 + ttl) * 1000) / 1000,
  };
  store.set(key, entry);
  return {status: created ? 201 : 200, entry: entry};
}

function readBody(req, callback) {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    let parsed;
    try {
      parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch (e) {
      callback(e, null);
      return;
    }
    callback(null, parsed);
  });
}

const server = http.createServer((req, res) => {
  const url = req.url;
  if (!url.startsWith(prefix)) return error(res, 404, 'not_found', 'No such tenant.');
  const rest = url.slice(prefix.length).split('?')[0];
  if (rest.startsWith('kv/')) {
    let key;
    try {
      key = decodeURIComponent(rest.slice(3));
    } catch (e) {
      return error(res, 400, 'invalid_key', 'Bad percent-encoding.');
    }
    if (!key || Buffer.byteLength(key) > 250) return error(res, 400, 'invalid_key', 'Bad key.');
    if (req.method === 'GET' || req.method === 'HEAD') {
      const entry = live(key);
      if (entry === undefined) return error(res, 404, 'not_found', 'No value is stored under this key.');
      const body = '{"key":' + JSON.stringify(key) + ',"value":' + entry.value + ',"version":"' + entry.version +
        '","expires_at":' + (entry.expires_at === null ? 'null' : entry.expires_at) + '}';
      return send(res, 200, body);
    }
    if (req.method === 'PUT') {
      return readBody(req, (err, body) => {
        if (err) return error(res, 400, 'invalid_json', 'The body is not valid JSON.');
        const result = write(key, body);
        if (result.status === 400) return error(res, 400, 'invalid_body', 'Bad body.');
        send(res, result.status, {key: key, version: result.entry.version, expires_at: result.entry.expires_at});
      });
    }
    if (req.method === 'DELETE') {
      if (live(key) === undefined) return error(res, 404, 'not_found', 'No value is stored under this key.');
      store.delete(key);
      return send(res, 200, {key: key, deleted: true});
    }
    return error(res, 405, 'method_not_allowed', 'GET, HEAD, PUT or DELETE.');
  }
  if (rest === 'bulk' && req.method === 'POST') {
    return readBody(req, (err, body) => {
      if (err || body === null || typeof body !== 'object') return error(res, 400, 'invalid_body', 'Bad body.');
      const out = {get: {}, put: [], delete: []};
      for (const key of body.get || []) {
        const entry = live(key);
        out.get[key] = entry === undefined ? null :
          {value: JSON.parse(entry.value), version: entry.version, expires_at: entry.expires_at};
      }
      for (const item of body.put || []) {
        const result = write(item.key, {value: item.value, ttl: item.ttl});
        out.put.push({key: item.key, status: result.status, version: result.entry && result.entry.version});
      }
      for (const key of body.delete || []) {
        const existed = live(key) !== undefined;
        store.delete(key);
        out.delete.push({key: key, status: existed ? 200 : 404});
      }
      send(res, 200, out);
    });
  }
  if (rest === 'health/ready' || rest === 'health/live') return send(res, 200, {status: 'ready', node: 'node-ref'});
  return error(res, 404, 'not_found', 'No such route.');
});

server.keepAliveTimeout = 60000;
server.listen(port, '127.0.0.1');
process.on('SIGTERM', () => server.close(() => process.exit(0)));
