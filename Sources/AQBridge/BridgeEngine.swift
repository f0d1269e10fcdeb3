import AMQPClient
import AQHTTP
import AQTopology
import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// A work queue the bridge serves.
public struct ServedQueue: Sendable {
    public var name: String
    public var queueName: String
    public var defaults: TaskDefaults
}

/// The bridge itself: consumes tasks, calls back over HTTP, retries through the broker's delay
/// tiers, dead-letters, sends webhooks. It lives on the AMQP connection's thread (an
/// ``AMQPConnectionExtension``), with its libcurl transfers polled in the same loop: a task goes
/// from delivery to HTTP and back to its acknowledgement without a thread hop or a lock.
///
/// Every outcome that changes what the broker holds follows "confirm, then ack": the retry copy,
/// the dead letter or the webhook job is published and confirmed before the task is acked.
final class BridgeEngine: AMQPConnectionExtension {
    struct Settings {
        var spec: TopologySpec
        var queues: [ServedQueue]
        var prefetch: Int
        var signer: WebhookSigner
        var maxResponseBytes: Int
        var webhookTimeout: Duration
        var webhookAttempts: Int
        var httpConnections: Int
        var retryJitter: Bool
    }

    final class Run {
        let delivery: AMQPDelivery
        let queue: ServedQueue
        let attempt: Int
        var task: TaskSpec?
        /// In flight: not yet acked, handed back or abandoned.
        var active = false
        init(delivery: AMQPDelivery, queue: ServedQueue, attempt: Int) {
            self.delivery = delivery
            self.queue = queue
            self.attempt = attempt
        }
    }

    let context: AMQPThreadContext
    let settings: Settings
    let metrics: BridgeMetrics
    let logger: Logger
    let http: CurlMulti
    var publishChannel: UInt16 = 0
    var consumeChannel: UInt16 = 0
    var consumers: [(channel: UInt16, tag: String)] = []
    var runs: [ObjectIdentifier: Run] = [:]
    /// `Content-Type` and `AsyncQueue-Queue`, built once per queue.
    private var sharedHeaderLists: [String: SharedHeaders] = [:]
    var draining = false
    private var pendingCounts = [Int](repeating: 0, count: BridgeMetrics.Counter.allCases.count)
    private var countsDirty = false
    var onDrained: (() -> Void)?

    init(context: AMQPThreadContext, settings: Settings, metrics: BridgeMetrics, logger: Logger) {
        self.context = context
        self.settings = settings
        self.metrics = metrics
        self.logger = logger
        self.http = CurlMulti(maxInFlight: settings.httpConnections, maxConnections: settings.httpConnections)
    }

    /// Opens the channels and starts a consumer per queue.
    func start() throws(AMQPError) {
        self.publishChannel = try self.context.openChannel()
        try self.context.enableConfirms(channel: self.publishChannel)
        self.consumeChannel = try self.context.openChannel()
        try self.context.setPrefetch(channel: self.consumeChannel, count: UInt16(clamping: self.settings.prefetch))
        for queue in self.settings.queues {
            let tag = try self.context.consume(
                channel: self.consumeChannel, queue: queue.queueName,
                handler: { [unowned self] delivery in self.received(delivery, queue: queue) },
                onEnd: { [unowned self] error in
                    if let error { self.logger.error("consumer ended", metadata: ["queue": "\(queue.queueName)", "error": "\(error)"]) }
                    self.metrics.consuming.store(false, ordering: .relaxed)
                })
            self.consumers.append((self.consumeChannel, tag))
        }
        self.metrics.consuming.store(true, ordering: .relaxed)
    }

    // MARK: AMQPConnectionExtension

    func pollRequests(into fds: inout [pollfd]) -> Int32? { self.http.pollRequests(into: &fds) }
    func handle(_ fds: ArraySlice<pollfd>) { self.http.handle(fds) }
    func runTurn() -> Bool {
        self.metrics.connected.store(self.context.isConnected, ordering: .relaxed)
        let busy = self.http.runTurn()
        self.publishMetrics()
        return busy
    }
    func connectionClosed() {
        self.http.cancelAll(HTTPError(kind: .other, message: "the bridge is shutting down"))
    }

    // MARK: Deliveries

    private func begin(_ run: Run) {
        run.active = true
        self.runs[ObjectIdentifier(run)] = run
        self.countsDirty = true
    }

    private func isActive(_ run: Run) -> Bool { run.active }

    /// Counts locally; ``publishMetrics()`` hands them to the shared metrics once per turn.
    private func count(_ counter: BridgeMetrics.Counter) {
        self.pendingCounts[counter.index] += 1
        self.countsDirty = true
    }

    private func publishMetrics() {
        guard self.countsDirty else { return }
        self.countsDirty = false
        self.metrics.merge(&self.pendingCounts)
        self.metrics.inFlight.store(self.runs.count, ordering: .relaxed)
    }

    /// The delivery is settled (acked, handed back, or abandoned to the broker's redelivery).
    private func end(_ run: Run) {
        guard run.active else { return }
        run.active = false
        self.runs[ObjectIdentifier(run)] = nil
        self.countsDirty = true
        if self.draining && self.runs.isEmpty { self.onDrained?() }
    }

    private func ack(_ run: Run) {
        self.context.ack(run.delivery)
        self.end(run)
    }

    /// Hands the delivery back (it will be delivered again), e.g. when a publish failed.
    private func requeue(_ run: Run, _ why: String) {
        if self.context.isCurrent(run.delivery) { self.context.nack(run.delivery, requeue: true) }
        self.count(.tasksRequeued)
        self.logger.warning("task handed back to the broker", metadata: ["queue": "\(run.queue.name)", "reason": "\(why)"])
        self.end(run)
    }

    func received(_ delivery: AMQPDelivery, queue: ServedQueue) {
        let headers = delivery.properties.headers
        let attempt = Int(min(max(1, headers?["aq-attempt"]?.intValue ?? 1), 1_000_000))
        let run = Run(delivery: delivery, queue: queue, attempt: attempt)
        self.begin(run)
        if headers?["aq-kind"]?.stringValue == "webhook" {
            self.webhookJob(run)
            return
        }
        self.count(.tasksReceived)
        switch TaskParser.parse(delivery.body, messageId: delivery.properties.messageId, defaults: queue.defaults) {
        case .failure(let malformed):
            self.count(.tasksMalformed)
            self.logger.warning("malformed task dead-lettered", metadata: ["queue": "\(queue.name)", "reason": "\(malformed.reason)"])
            self.deadLetter(run, reason: "malformed", error: malformed.reason, status: nil, taskId: delivery.properties.messageId) { [unowned self] in
                self.ack(run)
            }
        case .success(let task):
            run.task = task
            self.callback(run, task)
        }
    }

    // MARK: Callback

    private func sharedHeaders(_ queue: String) -> SharedHeaders {
        if let shared = self.sharedHeaderLists[queue] { return shared }
        let shared = SharedHeaders(["Content-Type: application/json", "AsyncQueue-Queue: \(queue)"])
        self.sharedHeaderLists[queue] = shared
        return shared
    }

    /// `id` is the Standard Webhooks message id (the idempotency key): the task id for the
    /// callback, `<task id>:result` for the webhook.
    private func headers(id: String, taskId: String, attempt: Int, body: [UInt8]) -> [String] {
        var headers = ["AsyncQueue-Task-Id: \(taskId)", "AsyncQueue-Attempt: \(attempt)"]
        if self.settings.signer.isEnabled {
            let timestamp = Int(Date().timeIntervalSince1970)
            headers.append("webhook-id: \(id)")
            headers.append("webhook-timestamp: \(timestamp)")
            headers.append("webhook-signature: \(self.settings.signer.signature(id: id, timestamp: timestamp, body: body))")
        } else {
            headers.append("webhook-id: \(id)")
        }
        return headers
    }

    private func callback(_ run: Run, _ task: TaskSpec) {
        let request = HTTPRequest(
            url: task.callbackURL, headers: self.headers(id: task.id, taskId: task.id, attempt: run.attempt, body: task.payload),
            body: task.payload, timeout: task.timeout, maxResponseBytes: self.settings.maxResponseBytes,
            sharedHeaders: self.sharedHeaders(run.queue.name))
        self.http.start(request) { [unowned self] result in
            guard self.isActive(run) else { return }
            let outcome = RetryPolicy.classify(result, timeout: task.timeout)
            switch outcome {
            case .success:
                self.count(.callbacks2xx)
                let answer = try? result.get()
                self.completed(run, task, result: Self.resultJSON(answer?.body ?? []))
            case .retryable(let reason, _, let retryAfter) where run.attempt <= task.retries:
                self.count(.callbacksFailed)
                self.retry(run, task, reason: reason, retryAfter: retryAfter)
            default:
                self.count(.callbacksFailed)
                let body = (try? result.get())?.body ?? []
                self.failed(run, task, outcome: outcome, responseBody: body)
            }
        }
    }

    /// The callback's answer as the webhook's `result`: its JSON, `null` when empty, else the
    /// text as a JSON string.
    static func resultJSON(_ body: [UInt8]) -> [UInt8] {
        if body.allSatisfy({ $0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09 }) { return Array("null".utf8) }
        if JSONScan.isValid(body) { return body }
        return Array(JSONScan.quote(String(decoding: body, as: UTF8.self)).utf8)
    }

    private func completed(_ run: Run, _ task: TaskSpec, result: [UInt8]) {
        guard let webhook = task.webhookURL else {
            self.count(.tasksCompleted)
            self.ack(run)
            return
        }
        var body = Array("{\"taskId\":\(JSONScan.quote(task.id)),\"status\":\"completed\",\"queue\":\(JSONScan.quote(run.queue.name)),\"attempts\":\(run.attempt),\"result\":".utf8)
        body += result
        body.append(UInt8(ascii: "}"))
        self.count(.tasksCompleted)
        self.webhook(run, url: webhook, taskId: task.id, body: body, attempt: 1)
    }

    private func retry(_ run: Run, _ task: TaskSpec, reason: String, retryAfter: Duration?) {
        guard self.context.isCurrent(run.delivery) else { return self.end(run) }  // the broker redelivers it
        guard let tier = RetryPolicy.tier(forRetry: run.attempt, retryAfter: retryAfter, tiers: self.settings.spec.retryTiers, jitter: self.settings.retryJitter) else {
            return self.failed(run, task, outcome: .permanent(reason: reason + " (no retry tiers)", status: nil), responseBody: [])
        }
        var properties = run.delivery.properties
        var headers = properties.headers ?? [:]
        headers["retry-tier"] = .string(self.settings.spec.retryTierHeader(for: tier))
        headers["aq-attempt"] = .int32(Int32(clamping: run.attempt + 1))
        headers["aq-last-error"] = .string(String(reason.prefix(200)))
        properties.headers = headers
        properties.messageId = task.id
        properties.deliveryMode = .persistent
        self.logger.debug("task retry scheduled", metadata: ["task.id": "\(task.id)", "attempt": "\(run.attempt)", "tier": "\(tier)", "reason": "\(reason)"])
        self.publishThenAck(run, exchange: self.settings.spec.retryExchange, properties: properties, body: run.delivery.body,
                            counting: .tasksRetried, "the retry")
    }

    private func failed(_ run: Run, _ task: TaskSpec, outcome: AttemptOutcome, responseBody: [UInt8]) {
        guard self.context.isCurrent(run.delivery) else { return self.end(run) }
        let exhausted: Bool
        if case .retryable = outcome { exhausted = true } else { exhausted = false }
        let reason = exhausted ? "retries-exhausted" : "not-retryable"
        self.count(.tasksFailed)
        self.logger.info("task failed", metadata: ["task.id": "\(task.id)", "queue": "\(run.queue.name)", "attempts": "\(run.attempt)", "reason": "\(reason)", "error": "\(outcome.reason)"])
        self.deadLetter(run, reason: reason, error: outcome.reason, status: outcome.status, taskId: task.id) { [unowned self] in
            guard let webhook = task.webhookURL else { return self.ack(run) }
            let snippet = String(decoding: responseBody.prefix(1024), as: UTF8.self)
            let status = outcome.status.map(String.init) ?? "null"
            let body = "{\"taskId\":\(JSONScan.quote(task.id)),\"status\":\"failed\",\"queue\":\(JSONScan.quote(run.queue.name)),\"attempts\":\(run.attempt),\"result\":null,\"error\":{\"reason\":\(JSONScan.quote(outcome.reason)),\"status\":\(status),\"body\":\(JSONScan.quote(snippet)),\"retryable\":\(exhausted)}}"
            self.webhook(run, url: webhook, taskId: task.id, body: Array(body.utf8), attempt: 1)
        }
    }

    /// Publishes a copy to the dead-letter exchange with the reason in headers; `then` after
    /// the broker confirmed it. `base` and `body` default to the delivery itself (a webhook that
    /// is given up on dead-letters the webhook's body instead).
    private func deadLetter(_ run: Run, reason: String, error: String, status: Int?, taskId: String?,
                            attempts: Int? = nil, base: AMQPProperties? = nil, body: [UInt8]? = nil,
                            then: @escaping () -> Void) {
        guard self.context.isCurrent(run.delivery) else { return self.end(run) }
        var properties = base ?? run.delivery.properties
        var headers = properties.headers ?? [:]
        headers["aq-reason"] = .string(reason)
        headers["aq-error"] = .string(String(error.prefix(500)))
        headers["aq-attempts"] = .int32(Int32(clamping: attempts ?? run.attempt))
        headers["aq-queue"] = .string(run.queue.name)
        if let status { headers["aq-last-status"] = .int32(Int32(clamping: status)) }
        if let taskId { headers["aq-task-id"] = .string(taskId) }
        headers["aq-dead-lettered-at"] = .timestamp(UInt64(Date().timeIntervalSince1970))
        headers["retry-tier"] = nil
        properties.headers = headers
        properties.deliveryMode = .persistent
        self.publish(exchange: self.settings.spec.deadLetterExchange, routingKey: run.queue.queueName,
                     properties: properties, body: body ?? run.delivery.body) { [unowned self] result in
            guard self.isActive(run) else { return }
            switch result {
            case .success:
                self.count(.deadLettered)
                then()
            case .failure(let error):
                self.requeue(run, "could not dead-letter: \(error)")
            }
        }
    }

    /// Publishes what comes next (a retry copy, a webhook job), waits for the broker's confirm,
    /// then acks the delivery; hands the delivery back if the publish failed.
    private func publishThenAck(_ run: Run, exchange: String, properties: AMQPProperties, body: [UInt8],
                                counting counter: BridgeMetrics.Counter, _ what: String) {
        self.publish(exchange: exchange, routingKey: run.queue.queueName, properties: properties, body: body) { [unowned self] result in
            guard self.isActive(run) else { return }
            switch result {
            case .success:
                self.count(counter)
                self.ack(run)
            case .failure(let error):
                self.requeue(run, "could not publish \(what): \(error)")
            }
        }
    }

    // MARK: Webhooks

    private func webhook(_ run: Run, url: String, taskId: String, body: [UInt8], attempt: Int) {
        let id = "\(taskId):result"
        let timeout = self.settings.webhookTimeout
        let request = HTTPRequest(url: url, headers: self.headers(id: id, taskId: taskId, attempt: attempt, body: body),
                                  body: body, timeout: timeout, maxResponseBytes: 64 * 1024, sharedHeaders: self.sharedHeaders(run.queue.name))
        self.http.start(request) { [unowned self] result in
            guard self.isActive(run) else { return }
            let outcome = RetryPolicy.classify(result, timeout: timeout)
            if case .success = outcome {
                self.count(.webhooksDelivered)
                return self.ack(run)
            }
            guard self.context.isCurrent(run.delivery) else { return self.end(run) }
            if case .retryable(_, _, let retryAfter) = outcome, attempt < self.settings.webhookAttempts,
               let tier = RetryPolicy.tier(forRetry: attempt, retryAfter: retryAfter, tiers: self.settings.spec.retryTiers, jitter: self.settings.retryJitter) {
                // Its own schedule: a webhook job waits in a tier; the callback never runs again.
                let properties = AMQPProperties(
                    contentType: "application/json",
                    headers: ["aq-kind": "webhook", "aq-webhook-url": .string(url), "aq-task-id": .string(taskId),
                              "aq-attempt": .int32(Int32(clamping: attempt + 1)), "retry-tier": .string(self.settings.spec.retryTierHeader(for: tier)),
                              "aq-last-error": .string(String(outcome.reason.prefix(200)))],
                    deliveryMode: .persistent, messageId: id)
                self.publishThenAck(run, exchange: self.settings.spec.retryExchange, properties: properties, body: body,
                                    counting: .webhooksRetried, "the webhook retry")
                return
            }
            self.count(.webhooksFailed)
            self.logger.warning("webhook given up", metadata: ["task.id": "\(taskId)", "attempts": "\(attempt)", "error": "\(outcome.reason)"])
            let base = AMQPProperties(contentType: "application/json",
                                      headers: ["aq-kind": "webhook", "aq-webhook-url": .string(url)], messageId: id)
            self.deadLetter(run, reason: "webhook-failed", error: outcome.reason, status: outcome.status, taskId: taskId,
                            attempts: attempt, base: base, body: body) { [unowned self] in
                self.ack(run)
            }
        }
    }

    /// A webhook waiting in a retry tier came back: deliver it (only it).
    private func webhookJob(_ run: Run) {
        let headers = run.delivery.properties.headers
        guard let url = headers?["aq-webhook-url"]?.stringValue, TaskParser.urlProblem(url) == nil,
              let taskId = headers?["aq-task-id"]?.stringValue
        else {
            self.deadLetter(run, reason: "malformed", error: "a webhook job without a valid aq-webhook-url or aq-task-id", status: nil, taskId: nil) { [unowned self] in
                self.ack(run)
            }
            return
        }
        self.webhook(run, url: url, taskId: taskId, body: run.delivery.body, attempt: run.attempt)
    }

    /// Publishes with `mandatory`, so a message no queue takes (a retry tier missing from the
    /// broker, say) comes back as a failure instead of vanishing; `done` runs on this thread.
    private func publish(exchange: String, routingKey: String, properties: AMQPProperties, body: [UInt8],
                         _ done: @escaping (Result<Void, AMQPError>) -> Void) {
        self.context.publish(channel: self.publishChannel, exchange: exchange, routingKey: routingKey, properties: properties,
                             body: body, mandatory: true) { result in
            switch result {
            case .success(.returned(let returned)):
                done(.failure(AMQPError(code: .invalidArgument, message: "no queue took the message on exchange '\(exchange)' (\(returned.replyText)); is the topology applied?")))
            case .success: done(.success(()))
            case .failure(let error): done(.failure(error))
            }
        }
    }

    // MARK: Shutdown

    /// Stops taking tasks; `done` runs (on this thread) when none is in flight.
    func drain(_ done: @escaping () -> Void) {
        self.draining = true
        for consumer in self.consumers {
            do throws(AMQPError) { try self.context.cancelConsumer(channel: consumer.channel, tag: consumer.tag) } catch {
                self.logger.warning("could not cancel a consumer", metadata: ["error": "\(error)"])
            }
        }
        self.consumers.removeAll()
        self.metrics.consuming.store(false, ordering: .relaxed)
        if self.runs.isEmpty { done() } else { self.onDrained = done }
    }

    /// Hands every task still in flight back to the broker (shutdown grace ran out).
    func handBack() -> Int {
        let runs = Array(self.runs.values)
        for run in runs { self.requeue(run, "shutdown") }
        return runs.count
    }
}
