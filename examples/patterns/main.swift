// The seed guide's patterns against a running aq-bridge: fire-and-forget (with and without a
// failure-only webhook), request-reply, fan-out / fan-in as a native batch, and chaining as a
// native chain (one of whose steps fans out). A small app serves the callback and webhook endpoints on
// 127.0.0.1, publishes the tasks with the AsyncQueue Swift client, and prints what its webhooks
// receive.
//
// usage: aq-examples [--amqp URL] [--port N]      (AQ_AMQP_URL works too)
import AQHTTP
import AsyncQueue
import Foundation
import Synchronization

let arguments = CommandLine.arguments
func option(_ name: String) -> String? {
    guard let index = arguments.firstIndex(of: name), index + 1 < arguments.count else { return nil }
    return arguments[index + 1]
}
let amqpURL = option("--amqp") ?? ProcessInfo.processInfo.environment["AQ_AMQP_URL"] ?? "amqp://guest:guest@127.0.0.1:5672/%2F"
let port = Int(option("--port") ?? "0") ?? 0

// --- The app: callback and webhook endpoints -------------------------------------------------
let webhooks = Mutex<[(String, String)]>([])
let app = try HTTPServer(port: port) { request, responder in
    let body = (try? JSONSerialization.jsonObject(with: Data(request.body))) as? [String: Any] ?? [:]
    switch request.path {
    case "/api/send-welcome-email":
        // Callback: "send" the email. A mailbox that does not exist is a permanent failure.
        if (body["email"] as? String)?.hasPrefix("nobody@") == true {
            responder.respond(.json(#"{"error":"mailbox does not exist"}"#, status: 422))
        } else {
            responder.respond(.json(#"{"sent":true}"#))
        }
    case "/api/generate-report":
        // Callback: do the work, answer with the result.
        let jobId = body["jobId"] as? String ?? "?"
        responder.respond(.json(#"{"jobId":"\#(jobId)","reportUrl":"https://files.example/reports/\#(jobId).pdf"}"#))
    case "/api/analyze-stock":
        // Callback of one batch child: analyse one symbol (here: a made-up score).
        let symbol = body["symbol"] as? String ?? "?"
        responder.respond(.json(#"{"symbol":"\#(symbol)","analysis":{"score":\#(symbol.unicodeScalars.reduce(0) { $0 + Int($1.value) } % 100)}}"#))
    case "/api/pipeline/verify-identity":
        // Chain step 1: the chain's payload arrives in the envelope; no previous result yet.
        let userId = (body["payload"] as? [String: Any])?["userId"] as? Int ?? 0
        responder.respond(.json(#"{"userId":\#(userId),"verified":true}"#))
    case "/api/pipeline/check-bureau":
        // Chain step 2 fans out: one child per credit bureau, each with step 1's result.
        let bureau = (body["payload"] as? [String: Any])?["bureau"] as? String ?? "?"
        let verified = (body["previousResult"] as? [String: Any])?["verified"] as? Bool ?? false
        responder.respond(.json(#"{"bureau":"\#(bureau)","score":\#(verified ? 700 + bureau.count : 0)}"#))
    case "/api/pipeline/provision-account":
        // Chain step 3: gets the fan-out's report (every bureau's answer) as previousResult.
        let children = (body["previousResult"] as? [String: Any])?["children"] as? [[String: Any]] ?? []
        let scores = children.compactMap { ($0["result"] as? [String: Any])?["score"] as? Int }
        responder.respond(.json(#"{"account":"acct-\#(scores.count)","creditScore":\#(scores.max() ?? 0)}"#))
    case "/api/on-task-failed", "/api/on-report-ready", "/api/on-portfolio-analyzed", "/api/pipeline/on-onboarding-done":
        // Webhooks: the outcome arrives here once.
        webhooks.withLock { $0.append((request.path, request.bodyString)) }
        responder.respond(.json(#"{"received":true}"#))
    default:
        responder.respond(.text("not found\n", status: 404))
    }
}
let base = "http://127.0.0.1:\(app.port)"
print("example app listening on \(base)")

let aq = try await AsyncQueue.connect(amqpURL)

// --- Step 1: fire-and-forget --------------------------------------------------------------
// Send a welcome email; nobody waits for the result.
struct Welcome: Encodable, Sendable { var userId: Int; var email: String }
let welcome = try await aq.tasks.create(
    callbackUrl: "\(base)/api/send-welcome-email",
    payload: Welcome(userId: 1, email: "ada@example.com"))
print("fire-and-forget: task \(welcome) published")

// With a failure webhook: "the webhook fires only after all retries are exhausted, so you only
// hear about permanent failures" (seed step 1). failureWebhookUrl is told of failures only: the
// first task succeeds and its webhook stays silent; the second fails for good and is reported.
let fine = try await aq.tasks.create(
    callbackUrl: "\(base)/api/send-welcome-email",
    payload: Welcome(userId: 3, email: "grace@example.com"),
    failureWebhookUrl: "\(base)/api/on-task-failed",
    retries: 3)
let failing = try await aq.tasks.create(
    callbackUrl: "\(base)/api/send-welcome-email",
    payload: Welcome(userId: 2, email: "nobody@example.com"),
    failureWebhookUrl: "\(base)/api/on-task-failed",
    retries: 3)
print("fire-and-forget with failure webhook: tasks \(fine) (succeeds, no webhook) and \(failing) (fails) published")

// --- Step 2: request-reply with webhooks ----------------------------------------------------
let jobId = UUID().uuidString.lowercased()
let report = try await aq.tasks.create(
    callbackUrl: "\(base)/api/generate-report",
    payload: ["jobId": .string(jobId), "params": ["year": 2026]],
    webhookUrl: "\(base)/api/on-report-ready",
    retries: 2,
    timeout: 120)
print("request-reply: task \(report) published for job \(jobId)")

// --- Step 3: fan-out / fan-in, aggregated by AsyncQueue ---------------------------------------
// One batch instead of one task per stock plus a database counter: the bridge runs the children
// in parallel and POSTs one report, every child's result in input order, when all are done.
struct Stock: Encodable, Sendable { var symbol: String }
let stocks = ["AAPL", "MSFT", "GOOG", "AMZN"]
let portfolio = try await aq.batches.create(
    stocks.map { AsyncQueue.BatchTask(callbackUrl: "\(base)/api/analyze-stock", payload: Stock(symbol: $0), retries: 2, timeout: 30) },
    webhookUrl: "\(base)/api/on-portfolio-analyzed",
    deadline: 300)
print("fan-out/fan-in: batch \(portfolio) of \(stocks.count) stocks published")

// --- Step 4: chaining, advanced by AsyncQueue -------------------------------------------------
// verify-identity → (one credit check per bureau, in parallel) → provision-account: no central
// webhook looking up the next step, no pipeline table; one webhook tells the whole run.
struct Onboarding: Encodable, Sendable { var userId: Int }
struct Bureau: Encodable, Sendable { var bureau: String }
let pipeline = try await aq.chains.create(
    [
        AsyncQueue.ChainStep(callbackUrl: "\(base)/api/pipeline/verify-identity", retries: 2),
        try AsyncQueue.ChainStep.fanOut(
            ["equifax", "experian", "transunion"].map { AsyncQueue.BatchTask(callbackUrl: "\(base)/api/pipeline/check-bureau", payload: Bureau(bureau: $0)) },
            join: .all, deadline: 60),
        AsyncQueue.ChainStep(callbackUrl: "\(base)/api/pipeline/provision-account", retries: 2),
    ],
    payload: Onboarding(userId: 42),
    webhookUrl: "\(base)/api/pipeline/on-onboarding-done")
print("chaining: pipeline \(pipeline) of 3 steps (the second fans out to 3 credit bureaus) published")

// Wait for the four webhooks (bounded).
let deadline = ContinuousClock.now + .seconds(60)
while webhooks.withLock({ $0.count }) < 4 && ContinuousClock.now < deadline {
    try await Task.sleep(for: .milliseconds(50))
}
for (path, body) in webhooks.withLock({ $0 }) {
    print("webhook \(path): \(body)")
}
let received = webhooks.withLock { $0 }
await aq.close()
app.shutdown()
if received.count < 4 {
    print("expected 4 webhooks, got \(received.count): is aq-bridge running against \(URLText.redacted(amqpURL))?")
    exit(1)
}
if received.contains(where: { $0.1.contains(fine) }) {
    print("the failure webhook heard about task \(fine), which succeeded")
    exit(1)
}
print("all patterns ran")
