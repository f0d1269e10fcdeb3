"""Interop check run by the Swift tests: create a chain with Python's pika, exactly as the README's
wire format says, answer its steps and receive the final webhook. Prints one JSON line with what it
saw; exits non-zero on failure.

usage: pika_chain.py AMQP_URL
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika

amqp_url = sys.argv[1]
seen = {"steps": []}
done = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        if self.path == "/done":
            seen["final"] = body
            answer = b"{}"
        else:
            seen["steps"].append(body)
            previous = (body.get("previousResult") or {}).get("n", body["payload"]["start"])
            answer = json.dumps({"n": previous + 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        if self.path == "/done":
            done.set()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{server.server_address[1]}"
connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
channel = connection.channel()
channel.confirm_delivery()
channel.basic_publish(
    exchange="aq.tasks",
    routing_key="default",
    body=json.dumps({"chain": {"id": "py-chain", "webhookUrl": f"{base}/done"}, "payload": {"start": 40},
                     "steps": [{"callbackUrl": f"{base}/step"}, {"callbackUrl": f"{base}/step", "retries": 1}]}),
    properties=pika.BasicProperties(content_type="application/json", delivery_mode=2),
    mandatory=True,
)
connection.close()
ok = done.wait(30)
server.shutdown()
print(json.dumps({"ok": ok, "seen": seen}))
sys.exit(0 if ok else 1)
