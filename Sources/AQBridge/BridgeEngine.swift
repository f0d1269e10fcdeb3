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
    /// HTTP requests in flight for this queue (the topology's `concurrency`).
    public var concurrency: Int
}

/// The bridge itself: consumes tasks, calls back over HTTP, retries through the broker's delay
/// tiers, dead-letters, sends webhooks. It lives on the AMQP connection's thread (an
/// ``AMQPConnectionExtension``), with its libcurl transfers polled in the same loop: a task goes
/// from delivery to HTTP and back to its acknowledgement without a thread hop or a lock.
///
/// Every outcome that changes what the broker holds follows "confirm, then ack": the retry copy,
/// the dead letter or the webhook job is published and confirmed before the task is acked.
///
/// What a publisher sent is never taken for the bridge's own bookkeeping: the `aq-…` headers that
/// steer it (a webhook job, the attempt number) count only on messages whose `user_id` — which
/// the broker checks against the publishing connection's login — is a trusted user (the bridge's
/// own by default); and every copy the bridge publishes carries the properties and headers it
/// chooses, never the publisher's routing (`CC`/`BCC`), expiry or identity.
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
        var maxPerHost: Int
        var maxInFlightBytes: Int
        /// The longest a task should wait in memory for its host before it is parked.
        var maxHostWait: Duration
        var retryJitter: Bool
        var policy: AddressPolicy
        /// The AMQP user the bridge publishes as (stamped in `user_id` on every copy).
        var bridgeUser: String
        /// Users whose messages may carry bookkeeping headers.
        var trustedPublishers: Set<String>
    }

    final class Run {
        /// Its body is let go once a parked copy is on the wire (see `park`).
        var delivery: AMQPDelivery
        let queue: ServedQueue
        let queueIndex: Int
        let attempt: Int
        /// The broker vouches that one of the trusted users published this message.
        let trusted: Bool
        var task: TaskSpec?
        /// Bytes this run holds in memory (its body, a result waiting for the webhook).
        var bytes: Int
        /// In flight: not yet acked, handed back or abandoned.
        var active = false
        init(delivery: AMQPDelivery, queue: ServedQueue, queueIndex: Int, attempt: Int, trusted: Bool) {
            self.delivery = delivery
            self.queue = queue
            self.queueIndex = queueIndex
            self.attempt = attempt
            self.trusted = trusted
            self.bytes = delivery.body.count
        }
    }

    /// An HTTP request waiting for its turn (see ``Admission``); its headers, signature included,
    /// are made when it starts, so a signature is never older than the request.
    final class Request {
        let run: Run
        let url: String
        let host: String
        /// The Standard Webhooks id: the task id for the callback, `<task id>:result` for the webhook.
        let id: String
        let taskId: String
        let attempt: Int
        let body: [UInt8]
        let timeout: Duration
        let maxResponseBytes: Int
        let done: (Result<HTTPAnswer, HTTPError>) -> Void
        init(run: Run, url: String, host: String, id: String, taskId: String, attempt: Int, body: [UInt8], timeout: Duration,
             maxResponseBytes: Int, done: @escaping (Result<HTTPAnswer, HTTPError>) -> Void) {
            self.run = run
            self.url = url
            self.host = host
            self.id = id
            self.taskId = taskId
            self.attempt = attempt
            self.body = body
            self.timeout = timeout
            self.maxResponseBytes = maxResponseBytes
            self.done = done
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
    var admission: Admission<Request>
    /// Bytes held by active runs, and the most ever held at once.
    private(set) var inFlightBytes = 0
    private(set) var peakInFlightBytes = 0
    /// `Content-Type` and `AsyncQueue-Queue`, built once per queue.
    private var sharedHeaderLists: [String: SharedHeaders] = [:]
    /// URL → `scheme://host:port`, so a URL seen before costs one lookup (bounded; emptied when full).
    private var hostKeys: [String: String] = [:]
    /// The tier a parked task waits in: the shortest of at least 5 s.
    let parkTier: TimeSpan?
    var draining = false
    private var lastOverdueCheck = ContinuousClock.now
    private var pendingCounts = [Int](repeating: 0, count: BridgeMetrics.Counter.allCases.count)
    private var countsDirty = false
    var onDrained: (() -> Void)?

    init(context: AMQPThreadContext, settings: Settings, metrics: BridgeMetrics, logger: Logger) {
        self.context = context
        self.settings = settings
        self.metrics = metrics
        self.logger = logger
        self.http = CurlMulti(maxInFlight: settings.httpConnections, maxConnections: settings.httpConnections,
                              maxHostConnections: settings.maxPerHost, policy: settings.policy)
        self.admission = Admission(limits: .init(
            perQueue: settings.queues.map(\.concurrency), perHost: settings.maxPerHost, total: settings.httpConnections,
            maxWait: settings.maxHostWait))
        self.parkTier = settings.spec.retryTiers.first { $0.milliseconds >= 5000 } ?? settings.spec.retryTiers.last
    }

    /// The largest delivery read at all: 16 MiB, or max_payload_bytes when larger.
    static func readCap(_ maxPayloadBytes: Int) -> Int { max(16 << 20, maxPayloadBytes) }

    /// Opens the channels and starts a consumer per queue.
    func start() throws(AMQPError) {
        self.publishChannel = try self.context.openChannel()
        try self.context.enableConfirms(channel: self.publishChannel)
        self.consumeChannel = try self.context.openChannel()
        try self.context.setPrefetch(channel: self.consumeChannel, count: UInt16(clamping: self.settings.prefetch))
        for (index, queue) in self.settings.queues.enumerated() {
            let tag = try self.context.consume(
                channel: self.consumeChannel, queue: queue.queueName,
                // A task over the read cap is never buffered: the client rejects it to the
                // dead-letter exchange whole and reports it here. Below it, a task over
                // max_payload_bytes is dead-lettered with the reason (see `received`).
                maxBodyBytes: Self.readCap(queue.defaults.maxPayloadBytes),
                handler: { [unowned self] delivery in self.received(delivery, queue: queue, index: index) },
                onUnreadable: { [unowned self] unreadable in self.unreadable(unreadable, queue: queue) },
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
        // Twice a second: tasks whose host slowed down or stopped answering go back to the broker.
        if self.admission.waiting > 0 {
            let now = ContinuousClock.now
            if now - self.lastOverdueCheck >= .milliseconds(500) {
                self.lastOverdueCheck = now
                for request in self.admission.overdue(now: now) where request.run.active {
                    self.park(request.run, reason: "\(request.host) is too slow to answer it within max_host_wait")
                }
            }
        }
        self.publishMetrics()
        return busy
    }
    func connectionClosed() {
        self.http.cancelAll(HTTPError(kind: .other, message: "the bridge is shutting down"))
    }

    // MARK: Bookkeeping

    private func begin(_ run: Run) {
        run.active = true
        self.runs[ObjectIdentifier(run)] = run
        self.inFlightBytes += run.bytes
        self.peakInFlightBytes = max(self.peakInFlightBytes, self.inFlightBytes)
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
        self.metrics.inFlightBytes.store(self.inFlightBytes, ordering: .relaxed)
        self.metrics.peakInFlightBytes.store(self.peakInFlightBytes, ordering: .relaxed)
        self.metrics.waitingRequests.store(self.admission.waiting, ordering: .relaxed)
    }

    /// The delivery is settled (acked, handed back, or abandoned to the broker's redelivery).
    private func end(_ run: Run) {
        guard run.active else { return }
        run.active = false
        self.runs[ObjectIdentifier(run)] = nil
        self.inFlightBytes -= run.bytes
        self.countsDirty = true
        if self.draining && self.runs.isEmpty { self.onDrained?() }
    }

    private func hold(_ run: Run, bytes: Int) {
        run.bytes += bytes
        self.inFlightBytes += bytes
        self.peakInFlightBytes = max(self.peakInFlightBytes, self.inFlightBytes)
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

    // MARK: Deliveries

    func received(_ delivery: AMQPDelivery, queue: ServedQueue, index: Int) {
        let properties = delivery.properties
        let trusted = properties.userId.map { self.settings.trustedPublishers.contains($0) } ?? false
        // Bookkeeping headers count only on messages the broker says a trusted user published.
        let headers = trusted ? properties.headers : nil
        let attempt = Int(min(max(1, headers?["aq-attempt"]?.intValue ?? 1), 1_000_000))
        let run = Run(delivery: delivery, queue: queue, queueIndex: index, attempt: attempt, trusted: trusted)
        self.begin(run)
        if headers?["aq-kind"]?.stringValue == "webhook" {
            self.webhookJob(run)
            return
        }
        // Memory: past the budget, a task waits in the broker instead (one run always proceeds).
        // A task too large to run at all is not parked: it is dead-lettered below.
        if self.inFlightBytes > self.settings.maxInFlightBytes, self.runs.count > 1,
           delivery.body.count <= queue.defaults.maxPayloadBytes {
            return self.park(run, reason: "the bridge holds \(self.inFlightBytes) bytes of tasks (max_inflight_bytes \(self.settings.maxInFlightBytes))")
        }
        self.count(.tasksReceived)
        switch TaskParser.parse(delivery.body, messageId: properties.messageId, defaults: queue.defaults) {
        case .failure(let malformed):
            self.count(.tasksMalformed)
            self.logger.warning("malformed task dead-lettered", metadata: ["queue": "\(queue.name)", "reason": "\(malformed.reason)"])
            self.deadLetter(run, reason: "malformed", error: malformed.reason, status: nil, taskId: TaskParser.safeId(properties.messageId)) { [unowned self] in
                self.ack(run)
            }
        case .success(let task):
            run.task = task
            self.callback(run, task)
        }
    }

    /// The client rejected a delivery it could not read (it is in the dead-letter queue whole).
    func unreadable(_ delivery: AMQPUnreadableDelivery, queue: ServedQueue) {
        self.count(.tasksUnreadable)
        self.logger.warning("task rejected unread to the dead-letter queue", metadata: [
            "queue": "\(queue.name)", "task.id": "\(TaskParser.safeId(delivery.properties?.messageId) ?? "-")",
            "bytes": "\(delivery.bodySize)", "reason": "\(delivery.problem)",
        ])
    }

    // MARK: HTTP requests, admitted per queue and per host

    /// The host a request to `url` counts against (see ``Admission``).
    private func hostKey(_ url: String) -> String {
        if let key = self.hostKeys[url] { return key }
        let key = URLText.authority(url)?.origin ?? "invalid"
        if self.hostKeys.count >= 4096 { self.hostKeys.removeAll(keepingCapacity: true) }
        self.hostKeys[url] = key
        return key
    }

    private func sharedHeaders(_ queue: String) -> SharedHeaders {
        if let shared = self.sharedHeaderLists[queue] { return shared }
        let shared = SharedHeaders(["Content-Type: application/json", "AsyncQueue-Queue: \(queue)"])
        self.sharedHeaderLists[queue] = shared
        return shared
    }

    /// Sends the request now if its queue and host have room, else lines it up (or parks the
    /// task, for a callback to a host with a long line).
    private func submit(_ request: Request, parkable: Bool) {
        switch self.admission.submit(request, queue: request.run.queueIndex, host: request.host, parkable: parkable, now: .now) {
        case .start: self.send(request)
        case .wait: break
        case .park:
            self.park(request.run, reason: "\(request.host) would keep it waiting longer than max_host_wait (\(self.admission.waiting(host: request.host)) in line)")
        }
    }

    private func send(_ request: Request) {
        guard request.run.active else {
            // Its task was handed back while it waited: free the slot for the next one.
            for next in self.admission.finished(queue: request.run.queueIndex, host: request.host, latency: nil, now: .now) { self.send(next) }
            return
        }
        let started = ContinuousClock.now
        var headers = ["AsyncQueue-Task-Id: \(request.taskId)", "AsyncQueue-Attempt: \(request.attempt)", "webhook-id: \(request.id)"]
        if self.settings.signer.isEnabled {
            let timestamp = Int(Date().timeIntervalSince1970)
            headers.append("webhook-timestamp: \(timestamp)")
            headers.append("webhook-signature: \(self.settings.signer.signature(id: request.id, timestamp: timestamp, body: request.body))")
        }
        let http = HTTPRequest(url: request.url, headers: headers, body: request.body, timeout: request.timeout,
                               maxResponseBytes: request.maxResponseBytes, sharedHeaders: self.sharedHeaders(request.run.queue.name))
        self.http.start(http) { [unowned self] result in
            // An answer (any status) tells how fast the host is; a failure to connect does not.
            let now = ContinuousClock.now
            let answered = (try? result.get()) != nil
            for next in self.admission.finished(queue: request.run.queueIndex, host: request.host,
                                                latency: answered ? now - started : nil, now: now) { self.send(next) }
            request.done(result)
        }
    }

    // MARK: Callback

    private func callback(_ run: Run, _ task: TaskSpec) {
        let request = Request(
            run: run, url: task.callbackURL, host: self.hostKey(task.callbackURL), id: task.id, taskId: task.id, attempt: run.attempt, body: task.payload,
            timeout: task.timeout, maxResponseBytes: self.settings.maxResponseBytes
        ) { [unowned self] result in
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
        self.submit(request, parkable: true)
    }

    /// The callback's answer as the webhook's `result`: its JSON, `null` when empty, else the
    /// text as a JSON string (bytes that are not UTF-8 become U+FFFD: nothing is embedded raw).
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
        self.hold(run, bytes: body.count)
        self.count(.tasksCompleted)
        self.webhook(run, url: webhook, taskId: task.id, body: body, attempt: 1)
    }

    private func retry(_ run: Run, _ task: TaskSpec, reason: String, retryAfter: Duration?) {
        guard self.context.isCurrent(run.delivery) else { return self.end(run) }  // the broker redelivers it
        guard let tier = RetryPolicy.tier(forRetry: run.attempt, retryAfter: retryAfter, tiers: self.settings.spec.retryTiers, jitter: self.settings.retryJitter) else {
            return self.failed(run, task, outcome: .permanent(reason: reason + " (no retry tiers)", status: nil), responseBody: [])
        }
        let properties = self.copy(of: run, messageId: task.id, adding: [
            "retry-tier": .string(self.settings.spec.retryTierHeader(for: tier)),
            "aq-attempt": .int32(Int32(clamping: run.attempt + 1)),
            "aq-last-error": .string(Self.clip(reason, 200)),
        ])
        self.logger.debug("task retry scheduled", metadata: ["task.id": "\(task.id)", "attempt": "\(run.attempt)", "tier": "\(tier)", "reason": "\(reason)"])
        self.publishThenAck(run, exchange: self.settings.spec.retryExchange, properties: properties, body: run.delivery.body,
                            counting: .tasksRetried, "the retry") { [unowned self] error in
            // The copy cannot be published as it is (its headers do not fit AMQP): that is
            // permanent for this task, and only for it.
            self.failed(run, task, outcome: .permanent(reason: "the retry could not be published: \(error.message)", status: nil), responseBody: [])
        }
    }

    /// Sends the task back to the broker for a while without spending an attempt: its host has a
    /// long line, or the bridge holds too many bytes. It returns after the park tier's delay.
    private func park(_ run: Run, reason: String) {
        guard self.context.isCurrent(run.delivery) else { return self.end(run) }
        guard let tier = self.parkTier else { return self.requeue(run, "cannot park without retry tiers") }
        let parked = Int32(clamping: (run.trusted ? run.delivery.properties.headers?["aq-parked"]?.intValue ?? 0 : 0) + 1)
        let properties = self.copy(of: run, messageId: run.delivery.properties.messageId, adding: [
            "retry-tier": .string(self.settings.spec.retryTierHeader(for: tier)),
            "aq-attempt": .int32(Int32(clamping: run.attempt)),
            "aq-parked": .int32(parked),
        ])
        self.logger.debug("task parked", metadata: ["queue": "\(run.queue.name)", "tier": "\(tier)", "reason": "\(reason)"])
        self.publishThenAck(run, exchange: self.settings.spec.retryExchange, properties: properties, body: run.delivery.body,
                            counting: .tasksParked, "the parked task") { [unowned self] error in
            self.requeue(run, "could not park: \(error)")
        }
        // The copy is on the wire; whatever happens next (ack, or nack on failure) needs no body.
        if run.active {
            run.delivery = run.delivery.withoutBody()
            self.inFlightBytes -= run.bytes
            run.bytes = 0
        }
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

    // MARK: Publishing copies

    /// Properties for a copy of the delivery the bridge publishes: what the bridge chooses, never
    /// the publisher's `user_id` (the broker would refuse it), `expiration` (a dead letter would
    /// vanish), `CC`/`BCC` (they would route the copy to other queues), priority, or the broker's
    /// and the bridge's own headers (`x-…`, `aq-…`, `retry-tier`), which are set afresh.
    func copy(of run: Run, messageId: String?, adding ours: AMQPTable, keepPublisherHeaders: Bool = true) -> AMQPProperties {
        let original = run.delivery.properties
        var headers = AMQPTable()
        if keepPublisherHeaders, let theirs = original.headers {
            for entry in theirs where !Self.isReservedHeader(entry.key) { headers[entry.key] = entry.value }
        }
        for entry in ours { headers[entry.key] = entry.value }
        return AMQPProperties(
            contentType: original.contentType ?? "application/json", contentEncoding: original.contentEncoding, headers: headers,
            deliveryMode: .persistent, correlationId: original.correlationId, replyTo: original.replyTo, messageId: messageId,
            timestamp: original.timestamp, type: original.type, userId: self.settings.bridgeUser, appId: original.appId)
    }

    static func isReservedHeader(_ key: String) -> Bool {
        let lower = key.lowercased()
        return lower == "cc" || lower == "bcc" || lower.hasPrefix("x-") || lower.hasPrefix("aq-") || lower == "retry-tier"
    }

    static func clip(_ text: String, _ limit: Int) -> String {
        text.utf8.count <= limit ? text : String(decoding: text.utf8.prefix(limit), as: UTF8.self)
    }

    /// Publishes a copy to the dead-letter exchange with the reason in headers; `then` after
    /// the broker confirmed it. `base` and `body` default to the delivery itself (a webhook that
    /// is given up on dead-letters the webhook's body instead). A copy whose publisher headers do
    /// not fit AMQP goes without them; if even that cannot be published, the delivery is rejected
    /// to the queue's own dead-letter exchange (the broker keeps it whole).
    private func deadLetter(_ run: Run, reason: String, error: String, status: Int?, taskId: String?,
                            attempts: Int? = nil, base: AMQPProperties? = nil, body: [UInt8]? = nil,
                            then: @escaping () -> Void) {
        guard self.context.isCurrent(run.delivery) else { return self.end(run) }
        let errorText = error
        var ours: AMQPTable = [
            "aq-reason": .string(reason),
            "aq-error": .string(Self.clip(error, 500)),
            "aq-attempts": .int32(Int32(clamping: attempts ?? run.attempt)),
            "aq-queue": .string(run.queue.name),
            "aq-dead-lettered-at": .timestamp(UInt64(Date().timeIntervalSince1970)),
        ]
        if let status { ours["aq-last-status"] = .int32(Int32(clamping: status)) }
        if let taskId { ours["aq-task-id"] = .string(taskId) }
        func properties(keepPublisherHeaders: Bool) -> AMQPProperties {
            guard var base else {
                return self.copy(of: run, messageId: taskId ?? TaskParser.safeId(run.delivery.properties.messageId), adding: ours,
                                 keepPublisherHeaders: keepPublisherHeaders)
            }
            var headers = base.headers ?? [:]
            for entry in ours { headers[entry.key] = entry.value }
            base.headers = headers
            base.deliveryMode = .persistent
            base.userId = self.settings.bridgeUser
            return base
        }
        let payload = body ?? run.delivery.body
        let exchange = self.settings.spec.deadLetterExchange
        let handle: (Result<Void, AMQPError>, Bool) -> Void = { [unowned self] result, lastTry in
            guard self.isActive(run) else { return }
            switch result {
            case .success:
                self.count(.deadLettered)
                then()
            case .failure(let error) where error.code == .invalidArgument && lastTry:
                // Nothing the bridge can publish fits: the broker dead-letters the original.
                self.logger.warning("dead letter could not be published; rejected to the queue's dead-letter exchange", metadata: ["error": "\(error)"])
                if self.context.isCurrent(run.delivery) { self.context.nack(run.delivery, requeue: false) }
                self.count(.deadLettered)
                self.end(run)
            case .failure(let error):
                self.requeue(run, "could not dead-letter: \(error)")
            }
        }
        self.publish(exchange: exchange, routingKey: run.queue.queueName, properties: properties(keepPublisherHeaders: true), body: payload) { [unowned self] result in
            if case .failure(let error) = result, error.code == .invalidArgument, base == nil {
                var minimal = properties(keepPublisherHeaders: false)
                minimal.headers?["aq-error"] = .string(Self.clip("\(Self.clip(errorText, 250)) [the publisher's headers were dropped: \(Self.clip(error.message, 200))]", 500))
                self.publish(exchange: exchange, routingKey: run.queue.queueName, properties: minimal, body: payload) { result in
                    handle(result, true)
                }
                return
            }
            handle(result, true)
        }
    }

    /// Publishes what comes next (a retry copy, a webhook job, a parked task), waits for the
    /// broker's confirm, then acks the delivery; hands the delivery back if the publish failed,
    /// or calls `unpublishable` when the copy can never be published as it is.
    private func publishThenAck(_ run: Run, exchange: String, properties: AMQPProperties, body: [UInt8],
                                counting counter: BridgeMetrics.Counter, _ what: String,
                                unpublishable: @escaping (AMQPError) -> Void) {
        self.publish(exchange: exchange, routingKey: run.queue.queueName, properties: properties, body: body) { [unowned self] result in
            guard self.isActive(run) else { return }
            switch result {
            case .success:
                self.count(counter)
                self.ack(run)
            case .failure(let error) where error.code == .invalidArgument:
                unpublishable(error)
            case .failure(let error):
                self.requeue(run, "could not publish \(what): \(error)")
            }
        }
    }

    // MARK: Webhooks

    private func webhook(_ run: Run, url: String, taskId: String, body: [UInt8], attempt: Int) {
        let id = "\(taskId):result"
        let timeout = self.settings.webhookTimeout
        let request = Request(run: run, url: url, host: self.hostKey(url), id: id, taskId: taskId, attempt: attempt, body: body, timeout: timeout,
                              maxResponseBytes: 64 * 1024) { [unowned self] result in
            guard self.isActive(run) else { return }
            let outcome = RetryPolicy.classify(result, timeout: timeout)
            if case .success = outcome {
                self.count(.webhooksDelivered)
                return self.ack(run)
            }
            guard self.context.isCurrent(run.delivery) else { return self.end(run) }
            let base = AMQPProperties(contentType: "application/json", headers: ["aq-kind": "webhook", "aq-webhook-url": .string(url)],
                                      messageId: id, userId: self.settings.bridgeUser)
            let giveUp = { [unowned self] in
                self.count(.webhooksFailed)
                self.logger.warning("webhook given up", metadata: ["task.id": "\(taskId)", "attempts": "\(attempt)", "error": "\(outcome.reason)"])
                self.deadLetter(run, reason: "webhook-failed", error: outcome.reason, status: outcome.status, taskId: taskId,
                                attempts: attempt, base: base, body: body) { [unowned self] in
                    self.ack(run)
                }
            }
            if case .retryable(_, _, let retryAfter) = outcome, attempt < self.settings.webhookAttempts,
               let tier = RetryPolicy.tier(forRetry: attempt, retryAfter: retryAfter, tiers: self.settings.spec.retryTiers, jitter: self.settings.retryJitter) {
                // Its own schedule: a webhook job waits in a tier; the callback never runs again.
                let properties = AMQPProperties(
                    contentType: "application/json",
                    headers: ["aq-kind": "webhook", "aq-webhook-url": .string(url), "aq-task-id": .string(taskId),
                              "aq-attempt": .int32(Int32(clamping: attempt + 1)), "retry-tier": .string(self.settings.spec.retryTierHeader(for: tier)),
                              "aq-last-error": .string(Self.clip(outcome.reason, 200))],
                    deliveryMode: .persistent, messageId: id, userId: self.settings.bridgeUser)
                self.publishThenAck(run, exchange: self.settings.spec.retryExchange, properties: properties, body: body,
                                    counting: .webhooksRetried, "the webhook retry") { _ in giveUp() }
                return
            }
            giveUp()
        }
        self.submit(request, parkable: false)
    }

    /// A webhook waiting in a retry tier came back: deliver it (only it). Only a trusted
    /// publisher's message gets here (see ``received(_:queue:index:)``).
    private func webhookJob(_ run: Run) {
        let headers = run.delivery.properties.headers
        guard let url = headers?["aq-webhook-url"]?.stringValue, TaskParser.urlProblem(url) == nil,
              let taskId = TaskParser.safeId(headers?["aq-task-id"]?.stringValue)
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
                done(.failure(AMQPError(code: .publishNacked, message: "no queue took the message on exchange '\(exchange)' (\(returned.replyText)); is the topology applied?")))
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
        _ = self.admission.drainWaiting()
        let runs = Array(self.runs.values)
        for run in runs { self.requeue(run, "shutdown") }
        return runs.count
    }
}
