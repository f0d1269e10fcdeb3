"""Interop check run by the Swift tests: publish a task with Python's pika, exactly as the
README's wire format says, receive the callback and webhook, and verify both signatures with the
`standardwebhooks` package. Prints one JSON line with what it saw; exits non-zero on failure.

usage: pika_publisher.py AMQP_URL SECRET
"""
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
from standardwebhooks.webhooks import Webhook

amqp_url, secret = sys.argv[1], sys.argv[2]
seen = {}
done = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            Webhook(secret).verify(body, headers)
            verified = True
        except Exception as error:  # noqa: BLE001 - report any verification failure
            verified = f"{type(error).__name__}: {error}"
        seen[self.path] = {"verified": verified, "body": json.loads(body), "id": headers.get("webhook-id"),
                           "attempt": headers.get("asyncqueue-attempt")}
        answer = json.dumps({"echo": json.loads(body), "from": "python"}).encode() if self.path == "/cb" else b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        if self.path == "/hook":
            done.set()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{server.server_address[1]}"

task_id = "py-" + uuid.uuid4().hex
connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
channel = connection.channel()
channel.confirm_delivery()
channel.basic_publish(
    exchange="aq.tasks",
    routing_key="default",
    body=json.dumps({"callbackUrl": f"{base}/cb", "payload": {"from": "pika", "n": 7},
                     "webhookUrl": f"{base}/hook", "retries": 2, "timeout": 10}),
    properties=pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=task_id),
    mandatory=True,
)
connection.close()

ok = done.wait(30)
server.shutdown()
print(json.dumps({"taskId": task_id, "ok": ok, "seen": seen}))
sys.exit(0 if ok else 1)
