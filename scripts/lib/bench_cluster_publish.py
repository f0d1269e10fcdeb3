"""Preloads N tasks for scripts/bench-cluster: persistent, each confirmed, to aq.tasks.

usage: bench_cluster_publish.py AMQP_URL N SINK_BASE
"""
import sys

import pika

url, count, sink = sys.argv[1], int(sys.argv[2]), sys.argv[3]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.confirm_delivery()
properties = lambda i: pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=f"task-{i}")
body = lambda i: ('{"callbackUrl":"%s/cb","payload":{"i":%d,"msg":"hello"},"webhookUrl":"%s/hook","retries":3,"timeout":10}' % (sink, i, sink)).encode()
# BlockingChannel waits for each confirm: slow, but this is the preload, before the clock starts.
for i in range(count):
    channel.basic_publish("aq.tasks", "default", body(i), properties(i))
connection.close()
