"""Used by scripts/bench-batch: publish one batch of N children (callbacks to the sink) with
pika, in messages of at most 10,000 children, and wait for its report on a small HTTP receiver.
Prints "<publish start> <report arrival>" as Unix times.

usage: bench_batch.py AMQP_URL CALLBACK_URL N
"""
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import pika

amqp_url, callback, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
arrived = {}
done = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        arrived["at"] = time.time()
        arrived["report"] = json.loads(body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        done.set()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
batch_id = "bench-" + uuid.uuid4().hex[:12]
children = [json.dumps({"callbackUrl": callback, "payload": {"i": i, "msg": "hello"}}) for i in range(n)]
connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
channel = connection.channel()
channel.confirm_delivery()
start = time.time()
for offset in range(0, n, 5000):
    head = {"batch": {"id": batch_id, "size": n, "webhookUrl": f"http://127.0.0.1:{server.server_address[1]}/done"}} if offset == 0 \
        else {"batchPart": {"id": batch_id, "offset": offset}}
    body = json.dumps(head)[:-1] + ',"tasks":[' + ",".join(children[offset:offset + 5000]) + "]}"
    channel.basic_publish(exchange="aq.tasks", routing_key="default", body=body,
                          properties=pika.BasicProperties(content_type="application/json", delivery_mode=2))
connection.close()
if not done.wait(600):
    sys.exit("no report within 600 s")
counts = arrived["report"].get("counts", {})
if counts.get("completed") != n:
    sys.exit(f"report counts {counts}, expected {n} completed")
print(f"{start:.3f} {arrived['at']:.3f}")
