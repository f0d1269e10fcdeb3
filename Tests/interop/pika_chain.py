"""Interop check run by the Swift tests: create a chain with Python's pika, exactly as the README's
wire format says, answer its steps and receive the final webhook. Prints one JSON line with what it
saw; exits non-zero on failure.

usage: pika_chain.py AMQP_URL
"""
import json
import sys
import threading

from aq_interop import publish, serve

amqp_url = sys.argv[1]
seen = {"steps": []}
done = threading.Event()


def respond(path, headers, body):
    body = json.loads(body)
    if path == "/done":
        seen["final"] = body
        return {}
    seen["steps"].append(body)
    previous = (body.get("previousResult") or {}).get("n", body["payload"]["start"])
    return {"n": previous + 1}


server, base = serve(respond, answered=lambda path: done.set() if path == "/done" else None)
publish(amqp_url, {"chain": {"id": "py-chain", "webhookUrl": f"{base}/done"}, "payload": {"start": 40},
                   "steps": [{"callbackUrl": f"{base}/step"}, {"callbackUrl": f"{base}/step", "retries": 1}]})
ok = done.wait(30)
server.shutdown()
print(json.dumps({"ok": ok, "seen": seen}))
sys.exit(0 if ok else 1)
