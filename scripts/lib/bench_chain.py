"""Used by scripts/bench-chain: chains through a running aq-bridge.

  throughput: publish N chains of S steps whose callbacks and final webhooks go to the nginx
              sink, wait until its webhook log holds every final webhook; prints
              "<steps> <seconds>".
  handoff:    publish M chains of S steps, one at a time, whose callbacks come here; prints the
              median and p99 of the hand-off between steps in ms: from the moment step n's answer
              was sent to the moment step n+1's callback arrived.

usage: bench_chain.py throughput AMQP_URL SINK_CB_URL SINK_HOOK_URL SINK_HOOK_LOG N STEPS
       bench_chain.py handoff AMQP_URL M STEPS
"""
import json
import statistics
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika

mode, amqp_url = sys.argv[1], sys.argv[2]
finals = set()
lock = threading.Lock()
answered = {}
handoffs = []
all_done = threading.Event()
expected = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # or each answer's body waits for the header's ACK (~40 ms)

    def do_POST(self):
        arrived = time.time()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        if self.path == "/done":
            with lock:
                finals.add(body["chainId"])
                if len(finals) >= expected:
                    all_done.set()
            answer = b"{}"
        else:
            chain, step = body["chainId"], body["step"]
            with lock:
                if step > 1 and (chain, step - 1) in answered:
                    handoffs.append((arrived - answered[(chain, step - 1)]) * 1000)
            answer = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        self.wfile.flush()
        if self.path != "/done":
            with lock:
                answered[(body["chainId"], body["step"])] = time.time()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{server.server_address[1]}"
connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
channel = connection.channel()
# No confirm per message (pika's blocking channel waits for each): the run counts the chains
# that end, so a lost publish would show as a run that never finishes.


def publish(callback, steps, tag, hook=None):
    body = {"chain": {"id": tag, "webhookUrl": hook or f"{base}/done"}, "payload": {"msg": "hello"},
            "steps": [{"callbackUrl": callback} for _ in range(steps)]}
    channel.basic_publish(exchange="aq.tasks", routing_key="default", body=json.dumps(body),
                          properties=pika.BasicProperties(content_type="application/json", delivery_mode=2))


if mode == "throughput":
    callback, hook, log, n, steps = sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7])

    # Follow the log from its current end, counting new lines without re-reading it.
    try:
        log_file = open(log, "rb")
        log_file.seek(0, 2)
    except FileNotFoundError:
        open(log, "ab").close()
        log_file = open(log, "rb")
    seen_lines = 0
    start = time.time()
    for i in range(n):
        publish(callback, steps, f"bench-{uuid.uuid4().hex[:8]}-{i}", hook)
    deadline = time.time() + 600
    while seen_lines < n:
        chunk = log_file.read()
        if chunk:
            seen_lines += chunk.count(b"\n")
            continue
        if time.time() > deadline:
            sys.exit(f"only {seen_lines} of {n} chains ended")
        time.sleep(0.02)
    print(f"{n * steps} {time.time() - start:.3f}")
else:
    m, steps = int(sys.argv[3]), int(sys.argv[4])
    for i in range(m):
        expected = i + 1
        all_done.clear()
        publish(f"{base}/step", steps, f"lat-{uuid.uuid4().hex[:8]}-{i}")
        if not all_done.wait(30):
            sys.exit("a chain did not end")
    handoffs.sort()
    print(f"{statistics.median(handoffs):.2f} {handoffs[int(len(handoffs) * 0.99) - 1]:.2f} {len(handoffs)}")
connection.close()
server.shutdown()
