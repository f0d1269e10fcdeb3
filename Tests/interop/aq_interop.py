"""What the interop scripts share: an HTTP receiver on 127.0.0.1 and a confirmed publish to
aq.tasks, written with the standard library and pika as any Python user would.
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika


def verify(secret, body, headers):
    """True when `standardwebhooks` verifies the request, else the error it gave."""
    from standardwebhooks.webhooks import Webhook
    try:
        Webhook(secret).verify(body, headers)
        return True
    except Exception as error:  # noqa: BLE001 - report any verification failure
        return f"{type(error).__name__}: {error}"


def serve(respond, answered=lambda path: None):
    """Starts a receiver: `respond(path, headers, body)` returns the JSON answer (a dict),
    headers lower-cased, body the raw bytes; `answered(path)` runs once the answer is sent.
    Returns (server, base URL)."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            answer = json.dumps(respond(self.path, headers, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            answered(self.path)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def publish(amqp_url, message, message_id=None):
    """Publishes `message` (a dict) to aq.tasks for the work queue `default`, as the README's wire
    format says: persistent, JSON, mandatory, and waits for the broker's confirm."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        exchange="aq.tasks",
        routing_key="default",
        body=json.dumps(message),
        properties=pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=message_id),
        mandatory=True,
    )
    connection.close()
