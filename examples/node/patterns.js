// The guide's four async processing patterns as a small Node app on AsyncQueue's HTTP gateway:
// fire-and-forget, request-reply through a webhook, fan-out/fan-in as a native batch, and
// chaining as a native chain. Only node:http and fetch; no framework, no database (a Map).
//
//   AQ_GATEWAY_URL=http://127.0.0.1:8080 AQ_GATEWAY_TOKEN=… node examples/node/patterns.js
//
// runs each pattern once through the app's endpoints and prints what arrives. aq-bridge must be
// able to reach the app: it listens on 127.0.0.1 (PORT, default any free port); set AQ_APP_URL
// when the bridge reaches it by another address. With AQ_SIGNING_SECRET (the bridge's
// AQ_SIGNING_SECRETS), the endpoints AsyncQueue calls check the Standard Webhooks signature.
import { createHmac, randomUUID, timingSafeEqual } from 'node:crypto';
import { EventEmitter, on } from 'node:events';
import http from 'node:http';
import { pathToFileURL } from 'node:url';
import { AsyncQueueError, createClient } from './aq.js';

// --- A tiny app: app.post(path, handler) with req.body and res.status(code).json(body) -------------
function createApp() {
  const routes = new Map();
  const server = http.createServer(async (req, res) => {
    res.status = (code) => { res.statusCode = code; return res; };
    res.json = (body) => { res.setHeader('content-type', 'application/json'); res.end(JSON.stringify(body)); };
    const chunks = [];
    try {
      for await (const chunk of req) chunks.push(chunk);
    } catch {
      return; // the client went away
    }
    req.rawBody = Buffer.concat(chunks).toString('utf8');
    const handler = req.method === 'POST' && routes.get(new URL(req.url, 'http://app').pathname);
    if (!handler) return res.status(404).json({ error: 'not found' });
    try {
      req.body = req.rawBody ? JSON.parse(req.rawBody) : null;
    } catch {
      return res.status(400).json({ error: 'the body is not JSON' });
    }
    try {
      await handler(req, res);
    } catch (err) {
      console.error(`${req.url}: ${err instanceof AsyncQueueError ? err.message : err.stack}`);
      if (!res.headersSent) res.status(500).json({ error: err.message }); // 5xx: AsyncQueue retries
    }
  });
  return { server, post: (path, handler) => routes.set(path, handler) };
}

// Standard Webhooks: webhook-signature holds "v1,<base64 HMAC-SHA256 of id.timestamp.body>" per secret.
function signatureProblem(req, secret) {
  const id = req.headers['webhook-id'], timestamp = req.headers['webhook-timestamp'];
  const signatures = req.headers['webhook-signature'];
  if (!id || !timestamp || !signatures) return 'unsigned';
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > 300) return 'timestamp too far from now';
  const key = secret.startsWith('whsec_') ? Buffer.from(secret.slice(6), 'base64') : Buffer.from(secret);
  const expected = createHmac('sha256', key).update(`${id}.${timestamp}.${req.rawBody}`).digest();
  const valid = signatures.split(' ').some((s) => {
    const given = Buffer.from(s.replace(/^v1,/, ''), 'base64');
    return s.startsWith('v1,') && given.length === expected.length && timingSafeEqual(given, expected);
  });
  return valid ? null : 'bad signature';
}

// What the endpoints saw, for a caller (test.mjs, main below) to wait on: every callback and
// webhook request is recorded as {name, body, taskId, attempt, answer?} and emitted under its name.
class Events extends EventEmitter {
  seen = [];

  constructor() {
    super();
    this.setMaxListeners(0); // any number of waiters
  }

  record(name, event) {
    this.seen.push({ name, ...event });
    this.emit(name, event);
  }

  list(name, match = () => true) {
    return this.seen.filter((e) => e.name === name && match(e));
  }

  /** The first `name` event matching `match`, already seen or still to come. */
  async wait(name, match = () => true, timeoutMs = 60_000) {
    const [seen] = this.list(name, match);
    if (seen) return seen;
    try {
      for await (const [event] of on(this, name, { signal: AbortSignal.timeout(timeoutMs) })) {
        if (match(event)) return { name, ...event };
      }
    } catch (err) {
      if (err.name === 'AbortError') throw new Error(`no ${name} request within ${Math.round(timeoutMs / 1000)} s`);
      throw err;
    }
  }
}

// Illustrative stand-ins for the real work.
const stockScore = (symbol) => [...symbol].reduce((sum, c) => sum + c.charCodeAt(0), 0) % 100;

export async function start({
  gatewayUrl = process.env.AQ_GATEWAY_URL,
  token = process.env.AQ_GATEWAY_TOKEN,
  port = Number(process.env.PORT ?? 0),
  publicUrl = process.env.AQ_APP_URL,
  signingSecret = process.env.AQ_SIGNING_SECRET,
  log = console.log, // where the webhooks' notes go
} = {}) {
  if (!gatewayUrl || !token) throw new Error('set AQ_GATEWAY_URL and AQ_GATEWAY_TOKEN (aq-gateway and its bearer token)');
  const aq = createClient({ baseUrl: gatewayUrl, token });
  const app = createApp();
  const events = new Events();
  const db = new Map(); // the app's "database"

  // An endpoint AsyncQueue calls: checks the signature (when a secret is set) and records the request.
  const fromAsyncQueue = (name, handler) => async (req, res) => {
    const problem = signingSecret && signatureProblem(req, signingSecret);
    if (problem) {
      console.error(`${req.url}: refused a request that is not AsyncQueue's (${problem})`);
      return res.status(401).json({ error: problem });
    }
    const event = { body: req.body, taskId: req.headers['asyncqueue-task-id'], attempt: Number(req.headers['asyncqueue-attempt'] ?? 1) };
    const json = res.json;
    res.json = (answer) => { json(answer); events.record(name, { ...event, status: res.statusCode, answer }); };
    await handler(req, res);
  };

  await new Promise((resolve, reject) => app.server.listen(port, '127.0.0.1', resolve).once('error', reject));
  const url = `http://127.0.0.1:${app.server.address().port}`;
  const base = (publicUrl ?? url).replace(/\/+$/, '');

  // --- Step 1: fire-and-forget ---------------------------------------------------------------------
  // Send a welcome email; nobody waits for it. failureWebhookUrl hears only of permanent failures.
  app.post('/api/signup', async (req, res) => {
    const user = { id: randomUUID(), email: req.body.email };
    db.set(user.id, user);
    await aq.tasks.create({
      callbackUrl: `${base}/api/send-welcome-email`,
      payload: { userId: user.id, email: user.email },
      failureWebhookUrl: `${base}/api/on-task-failed`,
      retries: 3,
    });
    res.json({ userId: user.id }); // respond immediately
  });

  app.post('/api/send-welcome-email', fromAsyncQueue('send-welcome-email', async (req, res) => {
    // webhook-id (the task id) is the same on every attempt: deduplicate on it in a real app.
    const { email } = req.body;
    if (email.startsWith('nobody@')) return res.status(422).json({ error: 'mailbox does not exist' }); // 4xx: not retried
    res.json({ sent: true });
  }));

  app.post('/api/on-task-failed', fromAsyncQueue('on-task-failed', async (req, res) => {
    const { taskId, error } = req.body;
    log(`  on-task-failed: task ${taskId} failed for good: ${error.reason} (${error.message})`);
    res.json({ received: true });
  }));

  // --- Step 2: request-reply with a webhook -----------------------------------------------------------
  app.post('/api/reports', async (req, res) => {
    const jobId = randomUUID();
    db.set(jobId, { id: jobId, status: 'pending' });
    await aq.tasks.create({
      callbackUrl: `${base}/api/generate-report`,
      payload: { jobId, params: req.body },
      webhookUrl: `${base}/api/on-report-ready`,
      retries: 2,
      timeout: 120,
    }, { idempotencyKey: jobId }); // the task id is the job id: a retried create is the same task
    res.json({ jobId, status: 'pending' });
  });

  app.post('/api/generate-report', fromAsyncQueue('generate-report', async (req, res) => {
    const { jobId, params } = req.body;
    res.json({ jobId, reportUrl: `https://files.example/reports/${jobId}.pdf`, year: params?.year ?? null });
  }));

  app.post('/api/on-report-ready', fromAsyncQueue('on-report-ready', async (req, res) => {
    if (req.body.status !== 'completed') {
      db.set(req.body.taskId, { id: req.body.taskId, status: 'failed', error: req.body.error });
      return res.json({ received: true });
    }
    const { jobId, reportUrl } = req.body.result;
    db.set(jobId, { id: jobId, status: 'completed', reportUrl }); // then notify the user
    res.json({ received: true });
  }));

  // --- Step 3: fan-out / fan-in as one native batch ---------------------------------------------------
  // AsyncQueue runs the children in parallel and POSTs one report with every result, in input
  // order: no counter in a database, no race between webhooks.
  app.post('/api/analyze-portfolio', async (req, res) => {
    const { stocks } = req.body;
    const { batchId } = await aq.batches.create({
      batch: { webhookUrl: `${base}/api/on-portfolio-analyzed`, join: 'allSettled', deadline: 300 },
      tasks: stocks.map((symbol) => ({
        callbackUrl: `${base}/api/analyze-stock`,
        payload: { symbol },
        retries: 2,
        timeout: 30,
      })),
    });
    db.set(batchId, { id: batchId, status: 'processing', totalTasks: stocks.length });
    res.json({ batchId, status: 'processing', totalTasks: stocks.length });
  });

  app.post('/api/analyze-stock', fromAsyncQueue('analyze-stock', async (req, res) => {
    const { symbol } = req.body;
    if (!/^[A-Z.]{1,6}$/.test(symbol)) return res.status(422).json({ error: `unknown symbol ${symbol}` });
    res.json({ symbol, analysis: { score: stockScore(symbol) } });
  }));

  app.post('/api/on-portfolio-analyzed', fromAsyncQueue('on-portfolio-analyzed', async (req, res) => {
    const { batchId, status, counts, children } = req.body;
    const analyzed = children.filter((c) => c.status === 'completed').map((c) => c.result);
    const portfolioSummary = {
      scores: Object.fromEntries(analyzed.map((r) => [r.symbol, r.analysis.score])),
      average: analyzed.length ? analyzed.reduce((sum, r) => sum + r.analysis.score, 0) / analyzed.length : null,
    };
    db.set(batchId, { id: batchId, status, counts, portfolioSummary }); // then notify the user
    res.json({ received: true });
  }));

  // --- Step 4: chaining as one native chain ------------------------------------------------------------
  // validate → charge → ship: AsyncQueue runs the steps in order, gives each the previous step's
  // result, and reports the whole run once. No central webhook deciding the next step.
  app.post('/api/orders', async (req, res) => {
    const order = { orderId: req.body.orderId ?? randomUUID(), items: req.body.items };
    const { chainId } = await aq.chains.create({
      chain: {
        webhookUrl: `${base}/api/orders/on-done`,
        stepWebhookUrl: `${base}/api/orders/on-step-done`, // optional: a progress note per step
      },
      payload: order,
      steps: [
        { callbackUrl: `${base}/api/orders/validate`, retries: 2 },
        { callbackUrl: `${base}/api/orders/charge`, retries: 2, timeout: 30 },
        { callbackUrl: `${base}/api/orders/ship`, retries: 2 },
      ],
    });
    db.set(order.orderId, { ...order, chainId, status: 'running' });
    res.json({ orderId: order.orderId, chainId, status: 'running' });
  });

  // Each step gets {chainId, step, payload: the order, previousResult: the last step's answer}.
  app.post('/api/orders/validate', fromAsyncQueue('validate-order', async (req, res) => {
    const { payload: { orderId, items } } = req.body;
    if (!items?.length) return res.status(422).json({ error: 'an order needs items' }); // ends the chain
    const total = items.reduce((sum, item) => sum + item.qty * item.price, 0);
    res.json({ orderId, valid: true, total });
  }));

  app.post('/api/orders/charge', fromAsyncQueue('charge-order', async (req, res) => {
    const { chainId, previousResult: { orderId, total } } = req.body;
    res.json({ orderId, total, chargeId: `ch_${chainId.slice(0, 8)}` });
  }));

  app.post('/api/orders/ship', fromAsyncQueue('ship-order', async (req, res) => {
    const { step, previousResult: { orderId, chargeId } } = req.body;
    res.json({ orderId, chargeId, trackingNumber: `TRK-${orderId}-${step}` });
  }));

  app.post('/api/orders/on-step-done', fromAsyncQueue('order-step-done', async (req, res) => {
    const { chainId, step, result } = req.body;
    log(`  on-step-done: order chain ${chainId}, step ${step} → ${JSON.stringify(result)}`);
    res.json({ received: true });
  }));

  app.post('/api/orders/on-done', fromAsyncQueue('order-done', async (req, res) => {
    const { chainId, status, result, failedStep } = req.body;
    const order = [...db.values()].find((o) => o.chainId === chainId);
    if (order) Object.assign(order, status === 'completed' ? { status: 'shipped', ...result } : { status: 'failed', failedStep });
    res.json({ received: true });
  }));

  return {
    url, // where the app listens
    publicUrl: base, // where AsyncQueue calls it
    events,
    db,
    aq,
    close: () => new Promise((resolve) => {
      app.server.close(() => resolve());
      app.server.closeAllConnections(); // the bridge keeps connections alive
    }),
  };
}

// --- `node patterns.js`: start the app, run each pattern once, print what happens ----------------------
async function main() {
  const app = await start();
  console.log(`example app listening on ${app.url}`);
  const post = async (path, body) => {
    const res = await fetch(`${app.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const json = await res.json();
    if (!res.ok) throw new Error(`POST ${path} → ${res.status}: ${json.error}`);
    return json;
  };
  const { events } = app;
  const unfinished = new Set();
  const pattern = (name, run) => {
    unfinished.add(name);
    return run().then(() => unfinished.delete(name), (err) => { throw new Error(`${name}: ${err.message}`, { cause: err }); });
  };
  const timer = setTimeout(() => {
    console.error(`did not finish within 60 s: ${[...unfinished].join(', ')} (is aq-bridge running, and can it reach ${app.publicUrl}?)`);
    process.exit(1);
  }, 60_000);

  try {
    await Promise.all([
      pattern('fire-and-forget', async () => {
        const { userId } = await post('/api/signup', { email: 'ada@example.com' });
        console.log(`fire-and-forget: POST /api/signup → user ${userId}, welcome email queued`);
        const email = await events.wait('send-welcome-email', (e) => e.body.userId === userId);
        console.log(`fire-and-forget: send-welcome-email ran for ${email.body.email} (task ${email.taskId}, attempt ${email.attempt})`);
      }),
      pattern('request-reply', async () => {
        const { jobId } = await post('/api/reports', { year: 2026 });
        console.log(`request-reply: POST /api/reports → job ${jobId} pending`);
        const hook = await events.wait('on-report-ready', (e) => e.body.taskId === jobId);
        console.log(`request-reply: on-report-ready got ${JSON.stringify(hook.body)}`);
      }),
      pattern('fan-out/fan-in', async () => {
        const stocks = ['AAPL', 'MSFT', 'GOOG', 'AMZN'];
        const { batchId } = await post('/api/analyze-portfolio', { stocks });
        console.log(`fan-out/fan-in: POST /api/analyze-portfolio → batch ${batchId} of ${stocks.length} stocks`);
        const hook = await events.wait('on-portfolio-analyzed', (e) => e.body.batchId === batchId);
        const { status, counts, children } = hook.body;
        console.log(`fan-out/fan-in: one report, ${status}, counts ${JSON.stringify(counts)}: ` +
          children.map((c) => `${c.result?.symbol ?? c.index}=${c.result?.analysis.score ?? c.status}`).join(' '));
        console.log(`fan-out/fan-in: portfolio summary ${JSON.stringify(app.db.get(batchId).portfolioSummary)}`);
      }),
      pattern('chaining', async () => {
        const { orderId, chainId } = await post('/api/orders', { orderId: 'order-7', items: [{ sku: 'A-1', qty: 2, price: 15 }, { sku: 'B-2', qty: 1, price: 12 }] });
        console.log(`chaining: POST /api/orders → order ${orderId}, chain ${chainId}: validate → charge → ship`);
        const hook = await events.wait('order-done', (e) => e.body.chainId === chainId);
        console.log(`chaining: on-done got ${hook.body.status}, result ${JSON.stringify(hook.body.result)}, ` +
          `steps ${hook.body.steps.map((s) => `${s.step}:${s.status}`).join(' ')}`);
      }),
    ]);
    console.log('all four patterns ran');
  } catch (err) {
    console.error(err.message);
    process.exitCode = 1;
  }
  clearTimeout(timer);
  await app.close();
  process.exit(process.exitCode ?? 0);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err) => {
    console.error(err.message);
    process.exit(1);
  });
}
