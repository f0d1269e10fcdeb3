"""Used by scripts/bench-dlq: fills aq.dead with N dead letters as the bridge writes them, or
purges and counts queues.

usage: bench_dlq.py fill AMQP_URL N
       bench_dlq.py depth AMQP_URL QUEUE
       bench_dlq.py purge AMQP_URL QUEUE...
"""
import sys
import time

import pika

mode, url = sys.argv[1], sys.argv[2]
parameters = pika.URLParameters(url)
connection = pika.BlockingConnection(parameters)
channel = connection.channel()
if mode == "fill":
    n = int(sys.argv[3])
    reasons = ["retries-exhausted", "not-retryable", "retries-exhausted", "malformed"]
    now = int(time.time())
    for i in range(n):
        reason = reasons[i % len(reasons)]
        headers = {"aq-reason": reason, "aq-queue": "default", "aq-task-id": f"dlq-{i}", "aq-attempts": 4,
                   "aq-error": "HTTP 503: upstream unavailable", "aq-last-status": 503, "aq-dead-lettered-at": now}
        body = f'{{"callbackUrl":"http://127.0.0.1:18080/cb","payload":{{"order":{i},"items":[1,2,3]}}}}'
        channel.basic_publish("aq.dlx", "aq.work.default", body,
                              pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=f"dlq-{i}", headers=headers,
                                                   user_id=parameters.credentials.username))  # as the bridge writes them
    deadline = time.time() + 120
    while channel.queue_declare("aq.dead", passive=True).method.message_count < n:
        if time.time() > deadline:
            sys.exit("the letters did not all arrive")
        time.sleep(0.1)
elif mode == "depth":
    print(channel.queue_declare(sys.argv[3], passive=True).method.message_count)
else:
    for queue in sys.argv[3:]:
        channel.queue_purge(queue)
connection.close()
