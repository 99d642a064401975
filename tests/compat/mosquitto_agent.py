"""The Mosquitto command-line clients (mosquitto_pub -l, mosquitto_sub) driven line by line by
tests/it/compat.rs, with the same protocol as paho_agent.py.

usage: mosquitto_agent.py HOST PORT USER PASS CLIENT_ID KEEPALIVE
stdin:  `sub TOPIC` | `pub QOS TOPIC PAYLOAD` | `quit`
stdout: `connected` | `connfail RC` | `suback CODES` | `sent PAYLOAD` | `acked PAYLOAD` |
        `msg TOPIC PAYLOAD` | `closed WHY` | `bye`
The command-line clients take one topic per process, so each (QoS, topic) gets its own
`mosquitto_pub -l` (a line of stdin is one publish) and each subscription its own
`mosquitto_sub`; `-d` makes them print the packets they send and receive, which is what this
reads. `connected` and `closed` report the first publisher, the one for the device's event
topic (`/devices/USER/event`), started at once. Only the tools' ordinary options are used: their
own keepalive, reconnect and QoS 1 resend.
"""
import re
import subprocess
import sys
import threading

host, port, user, password, client_id, keepalive = sys.argv[1:7]
out_lock = threading.Lock()


def say(*words):
    with out_lock:
        print(*words, flush=True)


# The tools print with stdio, block-buffered into a pipe: stdbuf makes it a line at a time.
LINE_BUFFERED = ["stdbuf", "-oL"]
common = ["-h", host, "-p", port, "-u", user, "-P", password, "-k", keepalive, "-d", "-V", "mqttv311"]
CONNACK = re.compile(r"received CONNACK \((\d+)\)")
SENDING = re.compile(r"sending PUBLISH \(d(\d), q(\d), r\d, m(\d+),")
PUBACK = re.compile(r"received PUBACK \(Mid: (\d+)")
SUBSCRIBED = re.compile(r"^Subscribed \(mid: \d+\): (.*)$")


class Publisher:
    def __init__(self, n, qos, topic, primary):
        self.qos = qos
        self.queue = []  # payloads written, not yet seen sent
        self.by_mid = {}  # mid -> payload, QoS 1 not yet acknowledged
        self.lock = threading.Lock()
        self.p = subprocess.Popen(
            [*LINE_BUFFERED, "mosquitto_pub", *common, "-i", f"{client_id}-p{n}", "-q", str(qos), "-t", topic, "-l"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        threading.Thread(target=self.read, args=(primary,), daemon=True).start()

    def send(self, payload):
        with self.lock:
            self.queue.append(payload)
        self.p.stdin.write(payload + "\n")
        self.p.stdin.flush()

    def read(self, primary):
        for line in self.p.stdout:
            line = line.rstrip("\n")
            m = CONNACK.search(line)
            if m and primary:
                say("connected" if m.group(1) == "0" else "connfail " + m.group(1))
                continue
            m = SENDING.search(line)
            if m:
                dup, qos, mid = m.group(1), m.group(2), int(m.group(3))
                with self.lock:
                    if qos == "0":
                        if self.queue:
                            say("sent", self.queue.pop(0))
                    elif mid not in self.by_mid and self.queue:
                        self.by_mid[mid] = self.queue.pop(0)
                continue
            m = PUBACK.search(line)
            if m:
                with self.lock:
                    payload = self.by_mid.pop(int(m.group(1)), None)
                if payload is not None:
                    say("acked", payload)
                continue
            if primary and ("lost" in line.lower() or line.startswith("Error")):
                say("closed", line.replace(" ", "_"))
        if primary:
            say("closed", "exit")

    def stop(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=5)
        except Exception:
            self.p.kill()


class Subscriber:
    def __init__(self, n, topic):
        self.p = subprocess.Popen(
            [*LINE_BUFFERED, "mosquitto_sub", *common, "-i", f"{client_id}-s{n}", "-q", "1", "-t", topic, "-F", "msg %t %p"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.p.stdout:
            line = line.rstrip("\n")
            m = SUBSCRIBED.match(line)
            if m:
                say("suback", m.group(1).replace(" ", "").replace(",", ","))
            elif line.startswith("msg "):
                say(line)

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=5)


publishers = {}
subscribers = []
publishers[(1, f"/devices/{user}/event")] = Publisher(0, 1, f"/devices/{user}/event", True)

for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    if words[0] == "sub":
        subscribers.append(Subscriber(len(subscribers), words[1]))
    elif words[0] == "pub":
        qos, topic, payload = int(words[1]), words[2], words[3]
        key = (qos, topic)
        if key not in publishers:
            publishers[key] = Publisher(len(publishers), qos, topic, False)
        publishers[key].send(payload)
    elif words[0] == "quit":
        break

for p in publishers.values():
    p.stop()
for s in subscribers:
    s.stop()
say("bye")
