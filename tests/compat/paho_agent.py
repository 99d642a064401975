"""A stock paho-mqtt client driven line by line by tests/it/compat.rs.

usage: paho_agent.py HOST PORT USER PASS CLIENT_ID KEEPALIVE
stdin:  `sub TOPIC` | `pub QOS TOPIC PAYLOAD` | `quit`
stdout: `connected` | `connfail RC` | `suback CODES` | `sent PAYLOAD` (QoS 0 written) |
        `acked PAYLOAD` (QoS 1 PUBACKed) | `msg TOPIC PAYLOAD` | `closed RC` | `bye`
It only uses paho's ordinary API (loop_start: automatic reconnect, QoS 1 resend on reconnect);
the test does the judging. Payloads contain no spaces or newlines.
"""
import sys
import threading

import paho.mqtt.client as mqtt

host, port, user, password, client_id, keepalive = sys.argv[1:7]
out_lock = threading.Lock()


def say(*words):
    with out_lock:
        print(*words, flush=True)


pending = {}  # mid -> payload of QoS 1 publishes not yet acknowledged
pending_lock = threading.Lock()

c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
c.username_pw_set(user, password)
c.reconnect_delay_set(min_delay=1, max_delay=2)


def on_connect(client, userdata, flags, rc, props=None):
    if rc == 0:
        say("connected")
    else:
        say("connfail", int(rc.value) if hasattr(rc, "value") else int(rc))


def on_disconnect(client, userdata, flags, rc, props=None):
    say("closed", int(rc.value) if hasattr(rc, "value") else int(rc))


def on_subscribe(client, userdata, mid, codes, props=None):
    say("suback", ",".join(str(int(x.value) if hasattr(x, "value") else int(x)) for x in codes))


def on_publish(client, userdata, mid, rc=None, props=None):
    with pending_lock:
        payload = pending.pop(mid, None)
    if payload is not None:
        say("acked", payload)


def on_message(client, userdata, m):
    say("msg", m.topic, m.payload.decode("utf-8", "replace").replace("\n", " "))


c.on_connect = on_connect
c.on_disconnect = on_disconnect
c.on_subscribe = on_subscribe
c.on_publish = on_publish
c.on_message = on_message
c.connect_async(host, int(port), keepalive=int(keepalive))
c.loop_start()

for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    if words[0] == "sub":
        c.subscribe(words[1], qos=1)
    elif words[0] == "pub":
        qos, topic, payload = int(words[1]), words[2], words[3]
        with pending_lock:
            info = c.publish(topic, payload, qos=qos)
            if qos == 1:
                pending[info.mid] = payload
        if qos == 0:
            say("sent", payload)
    elif words[0] == "quit":
        break

c.disconnect()
c.loop_stop()
say("bye")
