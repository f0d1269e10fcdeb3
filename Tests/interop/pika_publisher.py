"""Interop check run by the Swift tests: publish a task with Python's pika, exactly as the
README's wire format says, receive the callback and webhook, and verify both signatures with the
`standardwebhooks` package. Prints one JSON line with what it saw; exits non-zero on failure.

usage: pika_publisher.py AMQP_URL SECRET
"""
import json
import sys
import threading
import uuid

from aq_interop import publish, serve, verify

amqp_url, secret = sys.argv[1], sys.argv[2]
seen = {}
done = threading.Event()


def respond(path, headers, body):
    seen[path] = {"verified": verify(secret, body, headers), "body": json.loads(body), "id": headers.get("webhook-id"),
                  "attempt": headers.get("asyncqueue-attempt")}
    return {"echo": json.loads(body), "from": "python"} if path == "/cb" else {}


server, base = serve(respond, answered=lambda path: done.set() if path == "/hook" else None)
task_id = "py-" + uuid.uuid4().hex
publish(amqp_url, {"callbackUrl": f"{base}/cb", "payload": {"from": "pika", "n": 7},
                   "webhookUrl": f"{base}/hook", "retries": 2, "timeout": 10}, message_id=task_id)
ok = done.wait(30)
server.shutdown()
print(json.dumps({"taskId": task_id, "ok": ok, "seen": seen}))
sys.exit(0 if ok else 1)
