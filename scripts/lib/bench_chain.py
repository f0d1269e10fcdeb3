"""Used by scripts/bench-chain: chains and plain tasks through aq-bridge.

  chain:   N chains of S steps whose callbacks and final webhooks go to the nginx sink; done when
           the sink's webhook log holds every final webhook. Prints "<steps> <seconds> <cpu>".
  plain:   N*S plain tasks (callback and webhook each to the sink), the yardstick; prints
           "<tasks> <seconds> <cpu>".
           Both publish with ../shared/bench's C publisher (aqpub: confirms, a window of 1,000)
           to aq.work.default and run COMMAND (the bridge) for the run, then stop it (SIGTERM);
           <cpu> is its CPU seconds. --live: the bridge runs first, the clock starts with the
           first publish (publishing costs the broker inside the clock, as the bridge's own
           next-step publishes do); --preload: everything is published first, the clock starts
           with the bridge.
  handoff: publish M chains of S steps, one at a time, whose callbacks come here; prints the
           median and p99 of the hand-off between steps in ms: from the moment step n's answer
           was sent to the moment step n+1's callback arrived.

usage: bench_chain.py chain|plain --live|--preload SINK_URL SINK_HOOK_LOG N STEPS -- COMMAND...
       bench_chain.py handoff AMQP_URL M STEPS
"""
import json
import os
import statistics
import subprocess
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
if mode == "handoff":
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
# No confirm per message (pika's blocking channel waits for each): the run counts the chains
# that end, so a lost publish would show as a run that never finishes.


def publish(callback, steps, tag, hook=None):
    body = {"chain": {"id": tag, "webhookUrl": hook or f"{base}/done"}, "payload": {"msg": "hello"},
            "steps": [{"callbackUrl": callback} for _ in range(steps)]}
    channel.basic_publish(exchange="aq.tasks", routing_key="default", body=json.dumps(body),
                          properties=pika.BasicProperties(content_type="application/json", delivery_mode=2))


def hook_lines(log):
    try:
        with open(log, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


if mode in ("chain", "plain"):
    live = amqp_url == "--live"
    sink, log, n, steps = sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    command = sys.argv[sys.argv.index("--") + 1:]
    aqpub = os.path.join(os.environ.get("AQB_BIN", os.environ.get("AQB_TMP", "/tmp/aqbench") + "/bin"), "aqpub")
    vhost = os.environ.get("AMQP_VHOST", "/bench")
    run = uuid.uuid4().hex[:8]
    if mode == "plain":
        count, expected = n * steps, n * steps  # one webhook per task
        template = json.dumps({"callbackUrl": f"{sink}/cb", "webhookUrl": f"{sink}/hook", "payload": {"msg": "hello"}})
    else:
        count, expected = n, n  # one final webhook per chain
        template = json.dumps({"chain": {"id": f"bench-{run}-{{i}}", "webhookUrl": f"{sink}/hook"}, "payload": {"msg": "hello"},
                               "steps": [{"callbackUrl": f"{sink}/cb"} for _ in range(steps)]})
    publisher = [aqpub, "-v", vhost, "-q", "aq.work.default", "-t", template, "-M", f"{mode}-{run}-", "-W", "1000",
                 "-T", "300", "-n", str(count)]
    # What an interrupted run left behind goes first.
    subprocess.run([aqpub, "-v", vhost, "-q", "aq.work.default", "-X", "-n", "0"], check=True, stdout=subprocess.DEVNULL)
    baseline = hook_lines(log)
    if live:
        bridge = subprocess.Popen(command)
        start = time.time()
        subprocess.run(publisher + ["-C"], check=True, stdout=subprocess.DEVNULL)
    else:
        subprocess.run(publisher, check=True, stdout=subprocess.DEVNULL)
        start = time.time()
        bridge = subprocess.Popen(command)
    deadline = time.time() + 600
    with open(log, "rb") as log_file:
        log_file.seek(0, 2)
        seen = hook_lines(log) - baseline
        while seen < expected:
            chunk = log_file.read()
            if chunk:
                seen += chunk.count(b"\n")
                continue
            if time.time() > deadline or bridge.poll() is not None:
                sys.exit(f"only {seen} of {expected} ended")
            time.sleep(0.005)
    seconds = time.time() - start
    bridge.terminate()
    _, _, usage = os.wait4(bridge.pid, 0)
    print(f"{n * steps} {seconds:.3f} {usage.ru_utime + usage.ru_stime:.3f}")
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
