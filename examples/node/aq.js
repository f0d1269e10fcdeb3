// A small client for aq-gateway, AsyncQueue's HTTP API (Node 18+, no dependencies).
//
//   const aq = createClient({ baseUrl: 'http://127.0.0.1:8080', token: process.env.AQ_GATEWAY_TOKEN });
//   const { taskId } = await aq.tasks.create({ callbackUrl, payload }, { queue: 'reports' });
//
// Every request carries an Idempotency-Key (yours, else the task's, batch's or chain's id, else a
// fresh UUID): the gateway answers a repeated key with its first reply and publishes once, so a
// request that failed on the network or got a 503 is retried with the same key, safely.
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';

export class AsyncQueueError extends Error {
  constructor(status, body, options) {
    const detail = body?.message ?? JSON.stringify(body);
    super(`aq-gateway ${status ? `answered ${status} ` : ''}${body?.error ?? ''}: ${detail}${body?.field ? ` (field ${body.field})` : ''}`, options);
    this.name = 'AsyncQueueError';
    this.status = status; // 400, 401, 403, 413, 422, 503 (after the retries), or null: no answer
    this.body = body; // {error, message, field?}
    this.code = body?.error;
    this.field = body?.field;
  }
}

export function createClient({ baseUrl, token, attempts = 5, timeoutMs = 15_000, backoffMs = 200 }) {
  if (!baseUrl) throw new Error('createClient: baseUrl is required (e.g. http://127.0.0.1:8080)');
  const base = baseUrl.replace(/\/+$/, '');

  async function post(path, body, { queue, idempotencyKey, traceparent } = {}, ownId) {
    const url = `${base}${path}${queue ? `?queue=${encodeURIComponent(queue)}` : ''}`;
    const headers = {
      'content-type': 'application/json',
      authorization: `Bearer ${token}`,
      'idempotency-key': idempotencyKey ?? ownId ?? randomUUID(),
      ...(traceparent && { traceparent }),
    };
    const data = JSON.stringify(body); // the same bytes on every try: the gateway compares them
    for (let attempt = 1; ; attempt++) {
      let status, text;
      try {
        const res = await fetch(url, { method: 'POST', headers, body: data, signal: AbortSignal.timeout(timeoutMs) });
        status = res.status;
        text = await res.text();
      } catch (err) {
        // No answer (refused, reset, timed out): the task may or may not be queued; the key makes a retry safe.
        if (attempt >= attempts) {
          throw new AsyncQueueError(null, { error: 'unreachable', message: `no answer from ${base} in ${attempts} tries (${err.cause?.message ?? err.message})` }, { cause: err });
        }
        await sleep(backoffMs * 2 ** (attempt - 1));
        continue;
      }
      let json;
      try { json = text ? JSON.parse(text) : null; } catch { json = { error: 'not_json', message: text.slice(0, 200) }; }
      if (status >= 200 && status < 300) return json;
      if (status === 503 && attempt < attempts) { // not queued (the broker did not confirm): retry
        await sleep(backoffMs * 2 ** (attempt - 1));
        continue;
      }
      throw new AsyncQueueError(status, json);
    }
  }

  return {
    // → {taskId, queue}
    tasks: { create: (task, options) => post('/v1/tasks', task, options, task.taskId) },
    // {batch: {webhookUrl, join?, deadline?, ...}, tasks: [...]} → {batchId, queue, children}
    batches: { create: (batch, options) => post('/v1/batches', batch, options, batch.batch?.id) },
    // {chain: {webhookUrl, stepWebhookUrl?, ...}, payload, steps: [...]} → {chainId, queue}
    chains: { create: (chain, options) => post('/v1/chains', chain, options, chain.chain?.id) },
  };
}
