// A stock MQTT.js client driven line by line by tests/it/compat.rs (same protocol as paho_agent.py).
//
// usage: node mqttjs_agent.js HOST PORT USER PASS CLIENT_ID KEEPALIVE
// stdin:  `sub TOPIC` | `pub QOS TOPIC PAYLOAD` | `quit`
// stdout: `connected` | `connfail RC` | `suback CODES` | `sent PAYLOAD` | `acked PAYLOAD` |
//         `msg TOPIC PAYLOAD` | `closed REASON` | `bye`
// Only MQTT.js's ordinary API: automatic reconnect, in-flight QoS 1 resent from its store.
'use strict';
const mqtt = require('mqtt');
const readline = require('readline');

const [host, port, user, password, clientId, keepalive] = process.argv.slice(2);
const say = (...w) => process.stdout.write(w.join(' ') + '\n');

const c = mqtt.connect({
  host,
  port: Number(port),
  protocolVersion: 4,
  username: user,
  password,
  clientId,
  keepalive: Number(keepalive),
  clean: true,
  reconnectPeriod: 1000,
  connectTimeout: 5000,
});
c.on('connect', () => say('connected'));
c.on('error', (e) => say('connfail', e.code === undefined ? 'error' : e.code));
c.on('close', () => say('closed', 'close'));
c.on('message', (topic, payload) => say('msg', topic, payload.toString().replace(/\n/g, ' ')));

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const w = line.trim().split(/\s+/);
  if (w[0] === 'sub') {
    c.subscribe(w[1], { qos: 1 }, (err, granted) => {
      say('suback', err ? 'error' : granted.map((g) => g.qos).join(','));
    });
  } else if (w[0] === 'pub') {
    const qos = Number(w[1]);
    const payload = w[3];
    c.publish(w[2], payload, { qos }, (err) => {
      if (err) say('puberr', payload, err.message.replace(/\s+/g, '_'));
      else say(qos === 0 ? 'sent' : 'acked', payload);
    });
  } else if (w[0] === 'quit') {
    c.end(false, {}, () => {
      say('bye');
      process.exit(0);
    });
  }
});
