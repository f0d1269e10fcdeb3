"""Interop check run by the Swift tests: create a batch with Python's pika, exactly as the
README's wire format says, answer its children's callbacks and receive the one batch webhook,
verified with `standardwebhooks`. Prints one JSON line with the report; exits non-zero on failure.

usage: pika_batch.py AMQP_URL SECRET
"""
import json
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
from standardwebhooks.webhooks import Webhook

amqp_url, secret = sys.argv[1], sys.argv[2]
report = {}
done = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.path == "/analyze":
            symbol = json.loads(body)["symbol"]
            answer = json.dumps({"symbol": symbol, "score": len(symbol)}).encode()
        else:
            try:
                Webhook(secret).verify(body, headers)
                report["verified"] = True
            except Exception as error:  # noqa: BLE001 - report any verification failure
                report["verified"] = f"{type(error).__name__}: {error}"
            report["id"] = headers.get("webhook-id")
            report["body"] = json.loads(body)
            answer = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        if self.path == "/on-portfolio-done":
            done.set()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{server.server_address[1]}"

batch_id = "py-" + uuid.uuid4().hex
symbols = ["AAPL", "MSFT", "GOOG", "AMZN"]
connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
channel = connection.channel()
channel.confirm_delivery()
channel.basic_publish(
    exchange="aq.tasks",
    routing_key="default",
    body=json.dumps({
        "batch": {"id": batch_id, "webhookUrl": f"{base}/on-portfolio-done", "deadline": 60},
        "tasks": [{"callbackUrl": f"{base}/analyze", "payload": {"symbol": s}, "retries": 2} for s in symbols],
    }),
    properties=pika.BasicProperties(content_type="application/json", delivery_mode=2),
    mandatory=True,
)
connection.close()

ok = done.wait(30)
server.shutdown()
print(json.dumps({"batchId": batch_id, "ok": ok, "report": report}))
sys.exit(0 if ok else 1)
