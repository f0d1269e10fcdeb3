"""Interop check run by the Swift tests: create a batch with Python's pika, exactly as the
README's wire format says, answer its children's callbacks and receive the one batch webhook,
verified with `standardwebhooks`. Prints one JSON line with the report; exits non-zero on failure.

usage: pika_batch.py AMQP_URL SECRET
"""
import json
import sys
import threading
import uuid

from aq_interop import publish, serve, verify

amqp_url, secret = sys.argv[1], sys.argv[2]
report = {}
done = threading.Event()


def respond(path, headers, body):
    if path == "/analyze":
        symbol = json.loads(body)["symbol"]
        return {"symbol": symbol, "score": len(symbol)}
    report.update(verified=verify(secret, body, headers), id=headers.get("webhook-id"), body=json.loads(body))
    return {}


server, base = serve(respond, answered=lambda path: done.set() if path == "/on-portfolio-done" else None)
batch_id = "py-" + uuid.uuid4().hex
symbols = ["AAPL", "MSFT", "GOOG", "AMZN"]
publish(amqp_url, {
    "batch": {"id": batch_id, "webhookUrl": f"{base}/on-portfolio-done", "deadline": 60},
    "tasks": [{"callbackUrl": f"{base}/analyze", "payload": {"symbol": s}, "retries": 2} for s in symbols],
})
ok = done.wait(30)
server.shutdown()
print(json.dumps({"batchId": batch_id, "ok": ok, "report": report}))
sys.exit(0 if ok else 1)
