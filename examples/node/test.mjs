// End-to-end check of the Node examples against a running aq-gateway and aq-bridge:
//
//   AQ_GATEWAY_URL=http://127.0.0.1:8080 AQ_GATEWAY_TOKEN=… node examples/node/test.mjs
//
// Runs the four patterns through the app of patterns.js, plus the gateway's idempotency and
// validation, and asserts what matters. One line per check; exit 0 when all pass, 1 otherwise,
// and 1 after 90 s whatever happens.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { createClient } from './aq.js';
import { start } from './patterns.js';

setTimeout(() => {
  console.error('FAIL: the checks did not finish within 90 s');
  process.exit(1);
}, 90_000);

const gatewayUrl = process.env.AQ_GATEWAY_URL;
const token = process.env.AQ_GATEWAY_TOKEN;
if (!gatewayUrl || !token) {
  console.error('FAIL: set AQ_GATEWAY_URL and AQ_GATEWAY_TOKEN');
  process.exit(1);
}

const app = await start({ gatewayUrl, token, port: 0, log: () => {} });
const { events } = app;
const run = randomUUID().slice(0, 8); // tells this run's requests from earlier runs'
const deadline = Date.now() + 75_000; // every wait ends by then, so each check reports before the 90 s stop
const waitFor = (name, match) => events.wait(name, match, Math.max(1, deadline - Date.now())).catch((err) => {
  throw Date.now() >= deadline ? new Error(`no ${name} request before the test's deadline (is aq-bridge running, and can it reach ${app.publicUrl}?)`) : err;
});
let failed = 0;

async function check(name, body) {
  try {
    await body();
    console.log(`ok   ${name}`);
  } catch (err) {
    failed += 1;
    const [first, ...more] = err.message.split('\n');
    console.log(`FAIL ${name}: ${first}${more.length ? `\n${more.map((line) => `       ${line}`).join('\n')}` : ''}`);
  }
}

async function post(path, body) {
  const res = await fetch(`${app.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const json = await res.json();
  if (res.status !== 200) throw new Error(`POST ${path} → ${res.status}: ${json.error}`);
  return json;
}
// Started now, awaited by their checks later: a failure is reported there, not as an unhandled rejection.
const started = (promise) => (promise.catch(() => {}), promise);

// Start every pattern at once, then check each: the whole run takes as long as the slowest one.
const signup = started(post('/api/signup', { email: `ada+${run}@example.com` }));
const bounced = started(post('/api/signup', { email: 'nobody@example.com' }));
const report = started(post('/api/reports', { year: 2026, run }));
const stocks = ['AAPL', 'MSFT', 'nope', 'GOOG'];
const portfolio = started(post('/api/analyze-portfolio', { stocks }));
const order = { orderId: `order-${run}`, items: [{ sku: 'A-1', qty: 2, price: 15 }, { sku: 'B-2', qty: 1, price: 12 }] };
const ordered = started(post('/api/orders', order));
let welcomeTaskId, idempotentTaskId;

await check('fire-and-forget: the callback ran with the payload', async () => {
  const { userId } = await signup;
  const email = await waitFor('send-welcome-email', (e) => e.body.userId === userId);
  assert.deepEqual(email.body, { userId, email: `ada+${run}@example.com` });
  assert.equal(email.status, 200);
  assert.ok(email.taskId, 'AsyncQueue-Task-Id header');
  welcomeTaskId = email.taskId;
});

await check('fire-and-forget: failureWebhookUrl hears of a permanent failure', async () => {
  const { userId } = await bounced;
  const email = await waitFor('send-welcome-email', (e) => e.body.userId === userId);
  const hook = await waitFor('on-task-failed', (e) => e.body.taskId === email.taskId);
  assert.equal(hook.body.status, 'failed');
  assert.equal(hook.body.error.reason, 'not-retryable');
  assert.equal(hook.body.error.status, 422);
  assert.equal(events.list('send-welcome-email', (e) => e.taskId === email.taskId).length, 1, 'a 422 is not retried');
});

await check('request-reply: the webhook got the callback\'s result', async () => {
  const { jobId, status } = await report;
  assert.equal(status, 'pending');
  const callback = await waitFor('generate-report', (e) => e.body.jobId === jobId);
  assert.deepEqual(callback.body, { jobId, params: { year: 2026, run } });
  assert.equal(callback.taskId, jobId, 'the Idempotency-Key is the task id');
  const hook = await waitFor('on-report-ready', (e) => e.body.taskId === jobId);
  assert.equal(hook.body.status, 'completed');
  assert.equal(hook.body.attempts, 1);
  assert.deepEqual(hook.body.result, callback.answer);
  assert.equal(app.db.get(jobId).status, 'completed');
});

await check('fan-out/fan-in: one batch webhook, children in order with results and counts', async () => {
  const { batchId, totalTasks } = await portfolio;
  assert.equal(totalTasks, stocks.length);
  const hook = await waitFor('on-portfolio-analyzed', (e) => e.body.batchId === batchId);
  const { status, join, size, counts, children } = hook.body;
  assert.deepEqual({ status, join, size }, { status: 'completed', join: 'allSettled', size: 4 });
  assert.deepEqual(counts, { completed: 3, failed: 1, skipped: 0 });
  assert.deepEqual(children.map((c) => c.index), [0, 1, 2, 3]);
  for (const [i, child] of children.entries()) {
    assert.equal(child.taskId, `${batchId}:${i}`);
    const callback = await waitFor('analyze-stock', (e) => e.taskId === child.taskId);
    assert.deepEqual(callback.body, { symbol: stocks[i] });
    if (stocks[i] === 'nope') {
      assert.equal(child.status, 'failed');
      assert.equal(child.error.status, 422);
    } else {
      assert.equal(child.status, 'completed');
      assert.deepEqual(child.result, callback.answer);
      assert.equal(child.result.symbol, stocks[i]);
    }
  }
  assert.deepEqual(Object.keys(app.db.get(batchId).portfolioSummary.scores), ['AAPL', 'MSFT', 'GOOG']);
});

await check('chaining: each step saw the previous result; the chain webhook got the final result', async () => {
  const { chainId, orderId } = await ordered;
  assert.equal(orderId, order.orderId);
  const names = ['validate-order', 'charge-order', 'ship-order'];
  const steps = [];
  for (const [i, name] of names.entries()) {
    const step = await waitFor(name, (e) => e.body.chainId === chainId);
    assert.equal(step.body.step, i + 1);
    assert.equal(step.taskId, `${chainId}:${i + 1}`);
    assert.deepEqual(step.body.payload, order);
    assert.deepEqual(step.body.previousResult, i === 0 ? null : steps[i - 1].answer);
    steps.push(step);
  }
  assert.equal(steps[0].answer.total, 42);
  for (const [i, step] of steps.entries()) {
    const note = await waitFor('order-step-done', (e) => e.body.chainId === chainId && e.body.step === i + 1);
    assert.deepEqual(note.body.result, step.answer, `stepWebhookUrl, step ${i + 1}`);
  }
  const hook = await waitFor('order-done', (e) => e.body.chainId === chainId);
  assert.equal(hook.body.status, 'completed');
  assert.deepEqual(hook.body.result, steps[2].answer);
  assert.deepEqual(hook.body.steps.map((s) => [s.step, s.taskId, s.status]),
    [1, 2, 3].map((n) => [n, `${chainId}:${n}`, 'completed']));
  assert.equal(app.db.get(orderId).status, 'shipped');
});

await check('idempotency: a retry with the same Idempotency-Key creates one task', async () => {
  const key = `idem-${run}`;
  const task = { callbackUrl: `${app.publicUrl}/api/send-welcome-email`, payload: { userId: key, email: `idem+${run}@example.com` } };
  const first = await app.aq.tasks.create(task, { idempotencyKey: key });
  const retries = await Promise.all([1, 2, 3].map(() => app.aq.tasks.create(task, { idempotencyKey: key })));
  assert.deepEqual(first, { taskId: key, queue: 'default' });
  for (const reply of retries) assert.deepEqual(reply, first);
  await waitFor('send-welcome-email', (e) => e.taskId === key);
  idempotentTaskId = key;
  await assert.rejects(app.aq.tasks.create({ ...task, payload: { other: true } }, { idempotencyKey: key }),
    { status: 422, code: 'idempotency_key_reused' });
});

await check('validation: a bad request gets a 422 naming the field', async () => {
  await assert.rejects(app.aq.tasks.create({ callbackUrl: 'ftp://example.com/x', payload: {} }),
    { status: 422, code: 'invalid_task', field: 'callbackUrl' });
  await assert.rejects(app.aq.tasks.create({ callbackUrl: `${app.publicUrl}/api/send-welcome-email`, retries: -1 }),
    { status: 422, field: 'retries' });
  await assert.rejects(createClient({ baseUrl: gatewayUrl, token: 'not-a-token' }).tasks.create({ callbackUrl: app.publicUrl }),
    { status: 401, code: 'unauthorized' });
});

await check('one callback per task, no failure webhook for a success', async () => {
  await sleep(1000); // room for a duplicate to show up
  for (const id of [welcomeTaskId, idempotentTaskId].filter(Boolean)) {
    assert.equal(events.list('send-welcome-email', (e) => e.taskId === id).length, 1, `callbacks of task ${id}`);
  }
  assert.equal(events.list('on-task-failed', (e) => e.body.taskId === welcomeTaskId).length, 0);
});

await app.close();
console.log(failed ? `${failed} check(s) failed` : 'all checks passed');
process.exit(failed ? 1 : 0);
