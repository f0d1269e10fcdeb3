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
    /// The alternate exchange's queue: tasks whose routing key named no work queue. Nothing in
    /// it runs; each is dead-lettered with the reason and its publisher told.
    public var isUnrouted = false
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
        var httpClient: HTTPClient.Engine = .automatic
        var maxInFlightBytes: Int
        /// The longest a task should wait in memory for its host before it is parked.
        var maxHostWait: Duration
        var retryJitter: Bool
        var policy: AddressPolicy
        /// The AMQP user the bridge publishes as (stamped in `user_id` on every copy).
        var bridgeUser: String
        /// Users whose messages may carry bookkeeping headers.
        var trustedPublishers: Set<String>
        /// Prefixes a `reply_to` queue name must have (`*`: any).
        var replyToAllow: [String]
        var events: LifecycleEvents = .failures
    }

    /// A served queue, shared by the runs of its deliveries (a run holds 8 bytes, not a copy).
    final class Served {
        let queue: ServedQueue
        let index: Int
        init(_ queue: ServedQueue, index: Int) {
            self.queue = queue
            self.index = index
        }
    }

    final class Run {
        /// Its body is let go once a parked copy is on the wire (see `park`).
        var delivery: AMQPDelivery
        let served: Served
        var queue: ServedQueue { self.served.queue }
        var queueIndex: Int { self.served.index }
        let attempt: Int
        /// The broker vouches that one of the trusted users published this message.
        let trusted: Bool
        /// How many times it has been parked (`aq-parked`, counted only from a trusted publisher).
        var parkedCount: Int64 { self.trusted ? self.delivery.properties.headers?["aq-parked"]?.intValue ?? 0 : 0 }
        var task: TaskSpec?
        /// The batch it is a child of (from the trusted `aq-batch…` headers the creating bridge set).
        var batch: BatchLink?
        var batchReported = false
        /// The chain step it runs (its message carries the chain's context).
        var chain: ChainRun?
        /// Bytes this run holds in memory (its body, a result waiting for the webhook).
        var bytes: Int
        /// Its body was let go (a batch's children hold their own bytes): it can be handed back
        /// to the broker (nack) but not copied (park).
        var bodyReleased = false
        /// A task, chain message or batch message: a parked copy of it is the same message
        /// (webhook jobs, batch timers and unrouted messages carry headers a copy would lose).
        var parkable = false
        /// A park was tried: if it fails, the delivery is handed back (a failed park must not
        /// park again — with the channel down, that recursed until the stack overflowed).
        var parkTried = false
        /// In flight: not yet acked, handed back or abandoned.
        var active = false
        /// When the bridge received it (for the events' durations).
        let began = ContinuousClock.now
        /// Its W3C trace context: the task's `traceparent` field, else (a webhook job, a chain
        /// step) its message's header, when valid. Not cached: most tasks have neither, and a
        /// cache would cost every task held 24 bytes.
        var traceparent: String? {
            self.task?.traceparent ?? self.delivery.properties.headers?["traceparent"]?.stringValue.flatMap(TaskParser.validTraceparent)
        }
        init(delivery: AMQPDelivery, served: Served, attempt: Int, trusted: Bool) {
            self.delivery = delivery
            self.served = served
            self.attempt = attempt
            self.trusted = trusted
            self.bytes = delivery.body.count
        }
    }

    /// An HTTP request waiting for its turn (see ``Admission``); its headers, signature included,
    /// are made when it starts, so a signature is never older than the request.
    ///
    /// A callback is its run and host only: its URL, id, attempt, body and timeout are its run's
    /// task's, and its answer goes to ``BridgeEngine/callbackAnswered(_:_:)``. Thousands of
    /// callbacks can wait at once; a copy of each of those fields and a closure would cost 200
    /// bytes apiece. A webhook carries its own (``Webhook``).
    final class Request {
        let run: Run
        /// The host it counts against (see ``BridgeEngine/hostKey(_:)``).
        let host: Int
        /// Nil for a callback.
        let webhook: Webhook?

        final class Webhook {
            let url: String
            /// `<task id>:result`, or the id of the webhook job it delivers.
            let id: String
            let taskId: String
            let attempt: Int
            /// Parked, it becomes a webhook job with this body.
            let body: [UInt8]
            let timeout: Duration
            let done: (Result<HTTPAnswer, HTTPError>) -> Void
            init(url: String, id: String, taskId: String, attempt: Int, body: [UInt8], timeout: Duration,
                 done: @escaping (Result<HTTPAnswer, HTTPError>) -> Void) {
                self.url = url
                self.id = id
                self.taskId = taskId
                self.attempt = attempt
                self.body = body
                self.timeout = timeout
                self.done = done
            }
        }

        init(callback run: Run, host: Int) {
            self.run = run
            self.host = host
            self.webhook = nil
        }

        init(run: Run, host: Int, webhook: Webhook) {
            self.run = run
            self.host = host
            self.webhook = webhook
        }

        // A callback's run always has its task (``BridgeEngine/callback(_:_:)`` sets it first).
        var url: String { self.webhook?.url ?? self.run.task?.callbackURL ?? "" }
        /// The Standard Webhooks id: the task id for the callback, `<task id>:result` for the webhook.
        var id: String { self.webhook?.id ?? self.run.task?.id ?? "" }
        var taskId: String { self.webhook?.taskId ?? self.run.task?.id ?? "" }
        var attempt: Int { self.webhook?.attempt ?? self.run.attempt }
        var body: ArraySlice<UInt8> { self.webhook.map { $0.body[...] } ?? self.run.task?.payload ?? [] }
        var timeout: Duration { self.webhook?.timeout ?? self.run.task?.timeout ?? .seconds(30) }
    }

    let context: AMQPThreadContext
    let settings: Settings
    let metrics: BridgeMetrics
    let logger: Logger
    let http: HTTPClient
    /// Each secret's HMAC state, kept on this thread.
    let signing: SigningContext
    var publishChannel: UInt16 = 0
    /// Where lifecycle events go (nil: events off, or their exchange missing).
    var eventsChannel: UInt16?
    var consumeChannel: UInt16 = 0
    /// Run-time declarations, passive checks and basic.get (a 404 closes and reopens only it).
    var adminChannel: UInt16 = 0
    /// Consumers of batch reply queues (single active consumer: one aggregator per batch).
    var batchChannel: UInt16 = 0
    /// Batches this bridge consumes the reply queue of (as their aggregator, or waiting as standby).
    var batches: [String: BatchRun] = [:]
    var lastBatchTick = ContinuousClock.now
    /// Batch work that makes broker round trips (declare, basic.get, delete): run from the turn,
    /// never from inside a delivery or confirm callback, where a nested RPC would read frames
    /// that belong to the one being dispatched.
    var batchWork: [() -> Void] = []
    /// Queues of ended batches still to delete (their node was down), with attempts so far.
    var batchQueuesToDelete: [String: Int] = [:]
    var lastBatchQueueDeletion = ContinuousClock.now
    /// Batch outcomes of this turn, per batch (see ``bufferOutcome(_:_:_:)``).
    var outcomeBuffers: [String: OutcomeBuffer] = [:]
    var consumers: [(channel: UInt16, tag: String)] = []
    var runs: [ObjectIdentifier: Run] = [:]
    var admission: Admission<Request, Int>
    /// Reused by ``finished(_:latency:now:)``.
    private var startedScratch: [Request] = []
    /// Bytes held by active runs, and the most ever held at once.
    var inFlightBytes = 0
    private(set) var peakInFlightBytes = 0
    /// `Content-Type` and `AsyncQueue-Queue`, built once per queue.
    private var sharedHeaderLists: [String: SharedHeaders] = [:]
    /// Authority (scheme, host, port) → host number (bounded: numbers of idle hosts are freed
    /// at 4096), and the numbers' `scheme://host:port` names, for logs.
    private var hostNumbers: [URLText.Authority: Int] = [:]
    private var hostNames: [String?] = []
    private var freeHostNumbers: [Int] = []
    /// The tier a parked task waits in: the shortest of at least 5 s.
    let parkTier: TimeSpan?
    /// The topology's work queue names (a chain's steps may name any of them).
    let workQueueNames: Set<String>
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
        self.http = HTTPClient(engine: settings.httpClient, maxInFlight: settings.httpConnections, maxConnections: settings.httpConnections,
                               maxHostConnections: settings.maxPerHost, policy: settings.policy)
        self.admission = Admission(limits: .init(
            perQueue: settings.queues.map(\.concurrency), perHost: settings.maxPerHost, total: settings.httpConnections,
            maxWait: settings.maxHostWait))
        self.parkTier = settings.spec.retryTiers.first { $0.milliseconds >= 5000 } ?? settings.spec.retryTiers.last
        self.signing = settings.signer.makeContext()
        self.workQueueNames = Set(settings.spec.workQueues.map(\.name))
    }


    /// Opens the channels and starts a consumer per queue.
    func start() throws(AMQPError) {
        self.publishChannel = try self.context.openChannel()
        try self.context.enableConfirms(channel: self.publishChannel)
        self.consumeChannel = try self.context.openChannel()
        try self.context.setPrefetch(channel: self.consumeChannel, count: UInt16(clamping: self.settings.prefetch))
        self.adminChannel = try self.context.openChannel()
        self.batchChannel = try self.context.openChannel()
        self.startEvents()
        try self.context.setPrefetch(channel: self.batchChannel, count: UInt16(Self.batchPrefetch))
        for (index, queue) in self.settings.queues.enumerated() {
            let served = Served(queue, index: index)
            let tag = try self.context.consume(
                channel: self.consumeChannel, queue: queue.queueName,
                // A task over max_payload_bytes is never buffered: the client rejects it to the
                // queue's dead-letter exchange whole and reports it here (`unreadable`).
                maxBodyBytes: queue.defaults.maxPayloadBytes,
                handler: { [unowned self] delivery in self.received(delivery, served) },
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
        var busy = self.http.runTurn()
        // Twice a second: tasks whose host slowed down or stopped answering go back to the broker.
        if self.admission.waiting > 0 {
            let now = ContinuousClock.now
            if now - self.lastOverdueCheck >= .milliseconds(500) {
                self.lastOverdueCheck = now
                for request in self.admission.overdue(now: now) where request.run.active {
                    self.parkRequest(request, reason: "\(self.hostName(request.host)) is too slow to answer it within max_host_wait")
                }
            }
        }
        if !self.outcomeBuffers.isEmpty { self.flushOutcomes() }
        if !self.batchQueuesToDelete.isEmpty { self.retryBatchQueueDeletions(now: .now) }
        if !self.batchWork.isEmpty {
            let work = self.batchWork
            self.batchWork.removeAll()
            for item in work { item() }
            busy = true
        }
        if !self.batches.isEmpty {
            let now = ContinuousClock.now
            if now - self.lastBatchTick >= .milliseconds(50) {
                self.lastBatchTick = now
                self.tickBatches(now: now)
            }
        }
        self.publishMetrics()
        return busy
    }
    func connectionClosed() {
        self.http.cancelAll(HTTPError(kind: .other, message: "the bridge is shutting down"))
    }

    // MARK: Bookkeeping

    func begin(_ run: Run) {
        run.active = true
        self.runs[ObjectIdentifier(run)] = run
        self.inFlightBytes += run.bytes
        self.peakInFlightBytes = max(self.peakInFlightBytes, self.inFlightBytes)
        self.countsDirty = true
    }

    func isActive(_ run: Run) -> Bool { run.active }

    /// Counts locally; ``publishMetrics()`` hands them to the shared metrics once per turn.
    func count(_ counter: BridgeMetrics.Counter) {
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
    func end(_ run: Run) {
        guard run.active else { return }
        run.active = false
        self.runs[ObjectIdentifier(run)] = nil
        self.inFlightBytes -= run.bytes
        self.countsDirty = true
        if self.draining && self.runs.isEmpty { self.onDrained?() }
    }

    func hold(_ run: Run, bytes: Int) {
        run.bytes += bytes
        self.inFlightBytes += bytes
        self.peakInFlightBytes = max(self.peakInFlightBytes, self.inFlightBytes)
    }

    func ack(_ run: Run) {
        self.context.ack(run.delivery)
        self.end(run)
    }

    /// A broker error on the way (a publish failed or was nacked, a queue could not be read):
    /// see ``requeue(_:_:)``.
    func retryLater(_ run: Run, _ why: String, _ error: AMQPError) {
        self.requeue(run, "\(why): \(error)")
    }

    /// The task could not go on now (a publish failed, a batch's queues could not be read): it
    /// waits in a retry tier without spending an attempt (``park(_:reason:)``) and runs again.
    /// Not handed straight back: it would come again at once, and while the cause lasts —
    /// seconds, on a cluster whose node is down or whose quorum queue elects a leader — it would
    /// run into the work queue's delivery limit and be dead-lettered. Handed back (nack) only
    /// when it cannot be parked (its body was let go, no retry tiers).
    func requeue(_ run: Run, _ why: String) {
        if run.parkable, !run.parkTried, !run.bodyReleased, self.parkTier != nil, self.context.isCurrent(run.delivery),
           run.parkedCount < Self.maxParksForErrors {
            return self.park(run, reason: why)
        }
        self.handBack(run, why)
    }

    /// After this many parks (a minute or more of a lasting broker error), a task is handed back
    /// again: the work queue's delivery limit then bounds what a cause that never clears costs.
    static let maxParksForErrors: Int64 = 12

    /// Hands the delivery back to the broker (it will be delivered again at once).
    func handBack(_ run: Run, _ why: String) {
        if self.context.isCurrent(run.delivery) { self.context.nack(run.delivery, requeue: true) }
        self.count(.tasksRequeued)
        self.logger.warning("task handed back to the broker", metadata: ["queue": "\(run.queue.name)", "reason": "\(why)"])
        self.end(run)
    }

    // MARK: Deliveries

    func received(_ delivery: AMQPDelivery, _ served: Served) {
        let queue = served.queue
        let properties = delivery.properties
        let trusted = self.isTrusted(properties)
        // Bookkeeping headers count only on messages the broker says a trusted user published.
        let headers = trusted ? properties.headers : nil
        let attempt = Int(min(max(1, headers?["aq-attempt"]?.intValue ?? 1), 1_000_000))
        let run = Run(delivery: delivery, served: served, attempt: attempt, trusted: trusted)
        self.begin(run)
        switch headers?["aq-kind"]?.stringValue {
        case "webhook"?: return self.webhookJob(run)
        case "batch-timer"?: return self.batchWork.append { [unowned self] in self.batchTimer(run) }
        default: break
        }
        if let id = headers?["aq-batch"]?.stringValue, let index = headers?["aq-batch-index"]?.intValue {
            run.batch = BatchLink(id: id, index: Int(clamping: index), join: headers?["aq-batch-join"]?.stringValue.flatMap(BatchJoin.init(rawValue:)) ?? .allSettled,
                                  rejoin: headers?["aq-batch-rejoin"]?.boolValue ?? false)
        }
        if queue.isUnrouted { return self.unrouted(run) }
        // Memory: past the budget, a task waits in the broker instead (one run always proceeds).
        // It is parked unread: parking must cost far less than running, or a burst of large
        // tasks keeps the thread busy bouncing them while the admitted ones starve.
        if self.inFlightBytes > self.settings.maxInFlightBytes, self.runs.count > 1 {
            return self.park(run, reason: "the bridge holds \(self.inFlightBytes) bytes of tasks (max_inflight_bytes \(self.settings.maxInFlightBytes))")
        }
        self.count(.tasksReceived)
        if headers?["aq-chain"] != nil, delivery.body.count <= queue.defaults.maxPayloadBytes {
            // A chain's step message that a bridge published (the broker vouches for its
            // publisher; copies the bridge makes of a delivery never carry aq-* headers): read as
            // a chain at once, without the task reader's pass. ChainParser checks it as strictly
            // as any chain message; a body that is not a chain step (a task, a batch) is
            // dead-lettered with its reason instead of run as what it looks like.
            run.parkable = true
            return self.chainMessage(run)
        }
        switch TaskParser.parse(delivery.body, messageId: properties.messageId, defaults: queue.defaults) {
        case .failure(let malformed) where malformed.isBatch:
            run.parkable = true
            self.batchWork.append { [unowned self] in self.batchMessage(run) }
        case .failure(let malformed) where malformed.isChain:
            run.parkable = true
            self.chainMessage(run)
        case .failure(let malformed):
            self.rejectMalformed(run, "task", malformed.reason, webhook: malformed.notify)
        case .success(let task):
            if let problem = self.replyProblem(properties.replyTo) {
                return self.rejectMalformed(run, "task", problem, taskId: task.id, webhook: task.webhook(forFailure: true), reply: false)
            }
            run.task = task
            run.parkable = true
            self.emit(.taskReceived, queue: queue.name, taskId: task.id, attempt: run.attempt)
            if let batch = run.batch, batch.join == .all {
                // A child of a fail-fast batch runs only while its batch is open.
                return self.batchWork.append { [unowned self] in
                    guard self.isActive(run) else { return }
                    guard self.batchIsOpen(batch.id) else {
                        self.count(.batchChildrenSkipped)
                        return self.ack(run)
                    }
                    self.proceed(run, task)
                }
            }
            self.proceed(run, task)
        }
    }

    /// A task that was read and checked: held until it is due, or called back now.
    func proceed(_ run: Run, _ task: TaskSpec) {
        if let due = self.dueTime(run, task), due > Self.unixMilliseconds() {
            return self.delay(run, task, until: due)
        }
        self.callback(run, task)
    }

    /// A message that is not what it claims to be: counted, logged, dead-lettered with the reason
    /// (`aq-reason: malformed`), and its publisher told at `webhook` (and its `reply_to`, unless
    /// `reply` is false) — after `first`, when given (it calls on with the next step).
    func rejectMalformed(_ run: Run, _ kind: String, _ reason: String, taskId: String? = nil, webhook: String?, reply: Bool = true,
                         first: ((@escaping () -> Void) -> Void)? = nil) {
        self.count(.tasksMalformed)
        self.logger.warning("malformed \(kind) dead-lettered", metadata: ["queue": "\(run.queue.name)", "reason": "\(reason)"])
        let id = taskId ?? TaskParser.safeId(run.delivery.properties.messageId) ?? Self.stableId(run.delivery.body)
        self.deadLetter(run, reason: "malformed", error: reason, status: nil, taskId: id) { [unowned self] in
            let tell = { [unowned self] in self.notify(run, .malformed(taskId: id, queue: run.queue.name, reason), webhook: webhook, reply: reply) }
            guard let first else { return tell() }
            first(tell)
        }
    }

    /// The client rejected a delivery it could not read (it is in the dead-letter queue whole).
    func unreadable(_ delivery: AMQPUnreadableDelivery, queue: ServedQueue) {
        self.count(.tasksUnreadable)
        self.logger.warning("task rejected unread to the dead-letter queue", metadata: [
            "queue": "\(queue.name)", "task.id": "\(TaskParser.safeId(delivery.properties?.messageId) ?? "-")",
            "bytes": "\(delivery.bodySize)", "reason": "\(delivery.problem)",
        ])
        // A batch child that cannot be read still ends, as failed, or its batch would wait for it.
        if let properties = delivery.properties, self.isTrusted(properties), let id = properties.headers?["aq-batch"]?.stringValue,
           let index = properties.headers?["aq-batch-index"]?.intValue {
            let error = Array("{\"reason\":\"unreadable\",\"message\":\(JSONScan.quote(delivery.problem))}".utf8)
            let outcome = ChildOutcome.make(index: Int(clamping: index), taskId: "\(id):\(index)", status: .failed, attempts: 0, result: nil, error: error)
            self.bufferOutcome(id, outcome.json) { _ in }
        }
    }

    // MARK: HTTP requests, admitted per queue and per host

    /// The host a request to `url` counts against (see ``Admission``).
    func hostKey(_ url: String) -> Int {
        // Keyed by the parsed authority, not the URL: URLs differ task by task (ids in paths
        // and queries), their hosts rarely; a host of 15 bytes or less needs no allocation.
        let authority = URLText.authority(url) ?? URLText.Authority(scheme: "", host: "invalid", port: 0)
        if let known = self.hostNumbers[authority] { return known }
        if self.hostNumbers.count >= 4096 { self.forgetHosts() }
        let key: Int
        let name = authority.scheme.isEmpty ? "invalid" : authority.origin
        if let free = self.freeHostNumbers.popLast() {
            key = free
            self.hostNames[key] = name
        } else {
            key = self.hostNames.count
            self.hostNames.append(name)
        }
        self.hostNumbers[authority] = key
        return key
    }

    /// Whatever URLs tasks name, the maps stay bounded: the numbers of hosts with nothing in
    /// flight or waiting are freed for reuse.
    private func forgetHosts() {
        for (authority, key) in self.hostNumbers where !self.admission.isInUse(host: key) {
            self.hostNumbers[authority] = nil
            self.hostNames[key] = nil
            self.freeHostNumbers.append(key)
        }
    }

    private func hostName(_ key: Int) -> String { key < self.hostNames.count ? self.hostNames[key] ?? "?" : "?" }

    private func sharedHeaders(_ queue: String) -> SharedHeaders {
        if let shared = self.sharedHeaderLists[queue] { return shared }
        let shared = SharedHeaders(["Content-Type: application/json", "AsyncQueue-Queue: \(queue)"])
        self.sharedHeaderLists[queue] = shared
        return shared
    }

    /// Sends the request now if its queue and host have room, else lines it up, or parks it
    /// (the task, or its webhook as a webhook job) when its host would keep it waiting too long.
    func submit(_ request: Request) {
        switch self.admission.submit(request, queue: request.run.queueIndex, host: request.host, parkable: self.parkTier != nil,
                                      urgent: request.webhook != nil, now: .now) {
        case .start: self.send(request)
        case .wait: break
        case .park:
            self.parkRequest(request, reason: "\(self.hostName(request.host)) would keep it waiting longer than max_host_wait (\(self.admission.waiting(host: request.host)) in line)")
        }
    }

    private func parkRequest(_ request: Request, reason: String) {
        guard request.run.active else { return }
        if let webhook = request.webhook {
            self.parkWebhook(request.run, url: webhook.url, taskId: webhook.taskId, body: webhook.body, attempt: webhook.attempt, webhookId: webhook.id, reason: reason)
        } else {
            self.park(request.run, reason: reason)
        }
    }

    /// Requests to send, sent one after another: a request that fails at once (a refused URL)
    /// frees its slot for the next without nesting a call per request.
    private var sendQueue: [Request] = []
    private var sendQueueHead = 0
    private var sending = false

    private func send(_ request: Request) {
        self.sendQueue.append(request)
        guard !self.sending else { return }
        self.sending = true
        while self.sendQueueHead < self.sendQueue.count {
            let next = self.sendQueue[self.sendQueueHead]
            self.sendQueueHead += 1
            self.start(next)
        }
        self.sendQueue.removeAll(keepingCapacity: true)
        self.sendQueueHead = 0
        self.sending = false
    }

    private func start(_ request: Request) {
        guard request.run.active else {
            // Its task was handed back while it waited: free the slot for the next one.
            return self.finished(request, latency: nil, now: .now)
        }
        let started = ContinuousClock.now
        // The lines written as bytes into one buffer: one allocation for them all.
        let traceparent = request.run.traceparent
        var headers = HeaderLines(capacity: 256 + request.taskId.utf8.count + request.id.utf8.count + (traceparent?.utf8.count ?? 0))
        headers.append { $0 += "AsyncQueue-Task-Id: ".utf8; $0 += request.taskId.utf8 }
        headers.append { $0 += "AsyncQueue-Attempt: ".utf8; HeaderLines.appendDecimal(request.attempt, to: &$0) }
        headers.append { $0 += "webhook-id: ".utf8; $0 += request.id.utf8 }
        if let traceparent { headers.append { $0 += "traceparent: ".utf8; $0 += traceparent.utf8 } }
        if self.signing.isEnabled {
            let timestamp = Int(Date().timeIntervalSince1970)
            headers.append { $0 += "webhook-timestamp: ".utf8; HeaderLines.appendDecimal(timestamp, to: &$0) }
            headers.append { self.signing.appendHeaderLine(id: request.id, timestamp: timestamp, body: request.body, to: &$0) }
        }
        let http = HTTPRequest(url: request.url, headers: headers, body: request.body, timeout: request.timeout,
                               maxResponseBytes: request.webhook == nil ? self.settings.maxResponseBytes : Self.maxWebhookResponseBytes,
                               sharedHeaders: self.sharedHeaders(request.run.queue.name))
        self.http.start(http) { [unowned self] result in
            // An answer (any status) tells how fast the host is; a failure to connect does not.
            let now = ContinuousClock.now
            let answered = (try? result.get()) != nil
            self.finished(request, latency: answered ? now - started : nil, now: now)
            if let webhook = request.webhook { webhook.done(result) } else { self.callbackAnswered(request.run, result) }
        }
    }

    /// A request's slots are free: the waiting requests that may start now are sent.
    private func finished(_ request: Request, latency: Duration?, now: ContinuousClock.Instant) {
        // The buffer is kept between calls (taken while in use: a send may finish another request).
        var started = self.startedScratch
        self.startedScratch = []
        self.admission.finished(queue: request.run.queueIndex, host: request.host, latency: latency, now: now, into: &started)
        for next in started { self.send(next) }
        started.removeAll(keepingCapacity: true)
        self.startedScratch = started
    }

    // MARK: Callback

    private func callback(_ run: Run, _ task: TaskSpec) {
        run.task = task
        self.submit(Request(callback: run, host: self.hostKey(task.callbackURL)))
    }

    /// A callback's answer (or its failure).
    private func callbackAnswered(_ run: Run, _ result: Result<HTTPAnswer, HTTPError>) {
        guard self.isActive(run), let task = run.task else { return }
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

    /// The callback's answer as the webhook's `result`: its JSON, `null` when empty, else the
    /// text as a JSON string (bytes that are not UTF-8 become U+FFFD: nothing is embedded raw).
    static func resultJSON(_ body: [UInt8]) -> [UInt8] {
        if body.allSatisfy({ $0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09 }) { return Array("null".utf8) }
        if JSONScan.isValid(body) { return body }
        return Array(JSONScan.quote(String(decoding: body, as: UTF8.self)).utf8)
    }

    private func completed(_ run: Run, _ task: TaskSpec, result: [UInt8]) {
        self.count(.tasksCompleted)
        self.emit(.taskCompleted, queue: run.queue.name, taskId: task.id, attempt: run.attempt, run: run)
        self.hold(run, bytes: result.count)
        if let chain = run.chain { return self.chainStepCompleted(run, chain, result: result) }
        self.notify(run, Outcome(taskId: task.id, queue: run.queue.name, attempts: run.attempt, result: result), webhook: task.webhook(forFailure: false))
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
        self.emit(.taskRetried, queue: run.queue.name, taskId: task.id, attempt: run.attempt, run: run,
                  fields: ",\"delayMs\":\(tier.milliseconds),\"reason\":\(JSONScan.quote(Self.clip(reason, 200)))")
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
    func park(_ run: Run, reason: String) {
        guard run.active, self.context.isCurrent(run.delivery) else { return self.end(run) }
        guard !run.bodyReleased, !run.parkTried else { return self.handBack(run, reason) }
        run.parkTried = true
        guard let tier = self.parkTier else { return self.handBack(run, "cannot park without retry tiers (\(reason))") }
        let parked = Int32(clamping: run.parkedCount + 1)
        var ours: AMQPTable = [
            "retry-tier": .string(self.settings.spec.retryTierHeader(for: tier)),
            "aq-attempt": .int32(Int32(clamping: run.attempt)),
            "aq-parked": .int32(parked),
        ]
        // A delayed task keeps its due time: its delay must not start again from its return. A
        // task parked unread keeps the due time it was given, and its copy the time it was first
        // seen, which a `delay` counts from.
        if let task = run.task, let due = self.dueTime(run, task) {
            ours["aq-not-before"] = .int64(due)
        } else if run.task == nil, run.trusted, let due = run.delivery.properties.headers?["aq-not-before"]?.intValue {
            ours["aq-not-before"] = .int64(due)
        }
        if run.task == nil, run.chain == nil {
            // A batch message: its copy is the bridge's, but its batch stays its creator's
            // (empty: a publisher that set no user_id).
            ours["aq-creator"] = .string(Self.creator(of: run) ?? "")
        }
        var properties = self.copy(of: run, messageId: run.task?.id ?? run.delivery.properties.messageId, adding: ours)
        if properties.timestamp == nil { properties.timestamp = UInt64(Self.unixMilliseconds() / 1000) }
        self.logger.debug("task parked", metadata: ["queue": "\(run.queue.name)", "tier": "\(tier)", "reason": "\(reason)"])
        self.publishThenAck(run, exchange: self.settings.spec.retryExchange, properties: properties, body: run.delivery.body,
                            counting: .tasksParked, "the parked task") { [unowned self] error in
            self.handBack(run, "could not park: \(error)")
        }
        // The copy is on the wire; whatever happens next (ack, or nack on failure) needs no body.
        if run.active {
            run.delivery = run.delivery.withoutBody()
            run.bodyReleased = true
            self.inFlightBytes -= run.bytes
            run.bytes = 0
        }
    }

    func failed(_ run: Run, _ task: TaskSpec, outcome: AttemptOutcome, responseBody: [UInt8]) {
        guard self.context.isCurrent(run.delivery) else { return self.end(run) }
        let exhausted: Bool
        if case .retryable = outcome { exhausted = true } else { exhausted = false }
        let reason = exhausted ? "retries-exhausted" : "not-retryable"
        self.count(.tasksFailed)
        self.emit(.taskFailed, queue: run.queue.name, taskId: task.id, attempt: run.attempt, run: run,
                  fields: ",\"reason\":\"\(reason)\",\"error\":\(JSONScan.quote(Self.clip(outcome.reason, 200)))")
        var metadata: Logger.Metadata = ["task.id": "\(task.id)", "queue": "\(run.queue.name)", "attempts": "\(run.attempt)", "reason": "\(reason)", "error": "\(outcome.reason)"]
        if let traceparent = run.traceparent { metadata["traceparent"] = "\(traceparent)" }
        self.logger.info("task failed", metadata: metadata)
        self.deadLetter(run, reason: reason, error: outcome.reason, status: outcome.status, taskId: task.id) { [unowned self] in
            let failure = Outcome.Failure(reason: reason, message: outcome.reason, status: outcome.status,
                                          body: Array(responseBody.prefix(1024)), retryable: exhausted)
            self.notify(run, Outcome(taskId: task.id, queue: run.queue.name, attempts: run.attempt, failure: failure),
                        webhook: task.webhook(forFailure: true))
        }
    }

    // MARK: Telling the publisher: replies over AMQP, webhooks

    /// A task's outcome, as the webhook and the reply carry it.
    struct Outcome {
        struct Failure {
            /// What kind of failure: retries-exhausted, not-retryable, malformed, unrouted.
            var reason: String
            /// What happened, in words ("HTTP 503", "no answer within 30s", the parser's message).
            var message: String
            var status: Int?
            /// The start of the last answer's body.
            var body: [UInt8]
            var retryable: Bool
        }
        var taskId: String?
        var queue: String
        var attempts: Int
        var result: [UInt8]?
        var failure: Failure?

        init(taskId: String?, queue: String, attempts: Int, result: [UInt8]) {
            self.taskId = taskId
            self.queue = queue
            self.attempts = attempts
            self.result = result
        }

        init(taskId: String?, queue: String, attempts: Int, failure: Failure) {
            self.taskId = taskId
            self.queue = queue
            self.attempts = attempts
            self.failure = failure
        }

        /// What a publisher is told about a message that was not a valid task, batch or chain.
        static func malformed(taskId: String?, queue: String, _ message: String) -> Outcome {
            Outcome(taskId: taskId, queue: queue, attempts: 0, failure: .init(reason: "malformed", message: message, status: nil, body: [], retryable: false))
        }

        var status: String { self.failure == nil ? "completed" : "failed" }

        /// `{"taskId":…,"status":…,"queue":…,"attempts":…,"result":…[,"error":{…}]}`
        var json: [UInt8] {
            // In one buffer (this runs for every task with a webhook or a reply).
            var out: [UInt8] = []
            out.reserveCapacity(96 + (self.taskId?.utf8.count ?? 4) + self.queue.utf8.count + (self.result?.count ?? 4)
                                + (self.failure.map { 160 + $0.reason.utf8.count + $0.message.utf8.count + 2 * $0.body.count } ?? 0))
            out += "{\"taskId\":".utf8
            if let taskId = self.taskId { JSONScan.appendQuoted(taskId, to: &out) } else { out += "null".utf8 }
            out += ",\"status\":\"".utf8
            out += self.status.utf8
            out += "\",\"queue\":".utf8
            JSONScan.appendQuoted(self.queue, to: &out)
            out += ",\"attempts\":".utf8
            HeaderLines.appendDecimal(self.attempts, to: &out)
            out += ",\"result\":".utf8
            if let result = self.result { out += result } else { out += "null".utf8 }
            if let failure {
                let snippet = String(decoding: failure.body, as: UTF8.self)
                out += Array(",\"error\":{\"reason\":\(JSONScan.quote(failure.reason)),\"message\":\(JSONScan.quote(failure.message)),\"status\":\(failure.status.map(String.init) ?? "null"),\"body\":\(JSONScan.quote(snippet)),\"retryable\":\(failure.retryable)}".utf8)
            }
            out.append(UInt8(ascii: "}"))
            return out
        }
    }

    /// Tells the publisher the outcome — on its `reply_to` queue (confirmed), then at the webhook —
    /// and acks the delivery once both are done (or handed on: a webhook that fails becomes a
    /// webhook job, a reply no queue takes is dead-lettered).
    func notify(_ run: Run, _ outcome: Outcome, webhook: String?, reply: Bool = true) {
        if let chain = run.chain, outcome.failure != nil { return self.chainStepFailed(run, chain, outcome) }
        if let batch = run.batch, !run.batchReported {
            // A batch child's final outcome goes to its batch first (confirmed), then on as usual.
            run.batchReported = true
            return self.reportToBatch(run, batch, outcome) { [unowned self] in self.notify(run, outcome, webhook: webhook, reply: reply) }
        }
        let body = outcome.json
        let then = { [unowned self] in
            guard let webhook, let taskId = outcome.taskId ?? TaskParser.safeId(run.delivery.properties.messageId) else { return self.ack(run) }
            self.webhook(run, url: webhook, taskId: taskId, body: body, attempt: 1)
        }
        guard reply, let replyTo = run.delivery.properties.replyTo, !replyTo.isEmpty, self.replyProblem(replyTo) == nil else { return then() }
        self.reply(run, to: replyTo, outcome: outcome, body: body, then: then)
    }

    /// Why a task's `reply_to` cannot be used, or nil. Replies go through the default exchange
    /// with the bridge's permissions, so a publisher could aim them at any queue the bridge may
    /// write to: only names with an allowed prefix (`reply_to_allow`) are taken, and never the
    /// bridge's own queues.
    func replyProblem(_ replyTo: String?) -> String? {
        guard let replyTo, !replyTo.isEmpty else { return nil }
        let spec = self.settings.spec
        let reserved = [spec.workQueuePrefix, spec.retryQueuePrefix, spec.batchQueuePrefix]
        if reserved.contains(where: { replyTo.hasPrefix($0) }) || [spec.deadLetterQueue, spec.unroutedQueue].contains(replyTo) {
            return "reply_to '\(replyTo.prefix(80))' names one of AsyncQueue's own queues"
        }
        let allowed = self.settings.replyToAllow
        guard allowed.contains("*") || allowed.contains(where: { replyTo.hasPrefix($0) }) else {
            return "reply_to '\(replyTo.prefix(80))' is not allowed: reply queues must start with \(allowed.map { "'\($0)'" }.joined(separator: ", ")) (reply_to_allow)"
        }
        return nil
    }

    /// Publishes the outcome to the `reply_to` queue (the RabbitMQ RPC convention, its
    /// `correlation_id` echoed), waits for the confirm, then `then`. A queue that does not exist
    /// is not a lost outcome: the outcome is dead-lettered (`aq-reason: reply-undeliverable`).
    private func reply(_ run: Run, to replyTo: String, outcome: Outcome, body: [UInt8], then: @escaping () -> Void) {
        let taskId = outcome.taskId ?? "-"
        let properties = AMQPProperties(
            contentType: "application/json",
            headers: ["aq-task-id": .string(taskId), "aq-status": .string(outcome.status), "aq-queue": .string(run.queue.name)],
            deliveryMode: .persistent, correlationId: run.delivery.properties.correlationId, messageId: "\(taskId):result",
            timestamp: UInt64(Date().timeIntervalSince1970), userId: self.settings.bridgeUser)
        self.context.publish(channel: self.publishChannel, exchange: "", routingKey: replyTo, properties: properties, body: body,
                             mandatory: true) { [unowned self] result in
            guard self.isActive(run) else { return }
            switch result {
            case .success(.returned):
                self.count(.repliesFailed)
                self.logger.warning("reply_to queue does not exist; the outcome is dead-lettered", metadata: ["task.id": "\(taskId)", "reply_to": "\(replyTo.prefix(80))"])
                let base = AMQPProperties(contentType: "application/json", headers: ["aq-kind": "reply", "aq-reply-to": .string(replyTo)],
                                          correlationId: run.delivery.properties.correlationId, messageId: "\(taskId):result")
                self.deadLetter(run, reason: "reply-undeliverable", error: "no queue named '\(replyTo.prefix(200))' took the reply",
                                status: nil, taskId: outcome.taskId, base: base, body: body, then: then)
            case .success:
                self.count(.repliesPublished)
                then()
            case .failure(let error) where error.code == .invalidArgument:
                self.count(.repliesFailed)
                self.deadLetter(run, reason: "reply-undeliverable", error: "the reply could not be published: \(error.message)",
                                status: nil, taskId: outcome.taskId, base: AMQPProperties(contentType: "application/json", messageId: "\(taskId):result"),
                                body: body, then: then)
            case .failure(let error):
                self.requeue(run, "could not publish the reply: \(error)")
            }
        }
    }

    // MARK: Delay and unrouted tasks

    static func unixMilliseconds() -> Int64 { Int64((Date().timeIntervalSince1970 * 1000).rounded()) }

    /// An id for a message that has none of its own: the same for every delivery of it.
    static func stableId(_ body: [UInt8]) -> String {
        "body-" + SHA256.hash(body).prefix(12).map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
    }

    /// When the callback may run (Unix ms), or nil for now. A copy the bridge parked carries it in
    /// `aq-not-before`; otherwise `delay` counts from the message's `timestamp` (when the
    /// publisher set one, not in the future) or from its first delivery.
    private func dueTime(_ run: Run, _ task: TaskSpec) -> Int64? {
        if run.trusted, let due = run.delivery.properties.headers?["aq-not-before"]?.intValue { return due }
        switch task.due {
        case nil: return nil
        case .at(let milliseconds)?: return milliseconds
        case .after(let delay)?:
            let now = Self.unixMilliseconds()
            var start = now
            if let stamp = run.delivery.properties.timestamp, stamp <= UInt64(now / 1000) { start = Int64(stamp) * 1000 }
            let (seconds, attoseconds) = delay.components
            return start + seconds * 1000 + attoseconds / 1_000_000_000_000_000
        }
    }

    /// Holds the task in the broker until it is due: in the longest retry tier that does not
    /// overshoot, hop after hop; the attempt count is untouched.
    private func delay(_ run: Run, _ task: TaskSpec, until due: Int64) {
        guard self.context.isCurrent(run.delivery) else { return self.end(run) }
        let remaining = due - Self.unixMilliseconds()
        let tiers = self.settings.spec.retryTiers
        guard let tier = tiers.last(where: { $0.milliseconds <= remaining }) ?? tiers.first else {
            return self.callback(run, task)  // no tiers: run it now rather than never
        }
        let properties = self.copy(of: run, messageId: task.id, adding: [
            "retry-tier": .string(self.settings.spec.retryTierHeader(for: tier)),
            "aq-attempt": .int32(Int32(clamping: run.attempt)),
            "aq-not-before": .int64(due),
        ])
        self.publishThenAck(run, exchange: self.settings.spec.retryExchange, properties: properties, body: run.delivery.body,
                            counting: .tasksDelayed, "the delayed task") { [unowned self] error in
            self.failed(run, task, outcome: .permanent(reason: "the delayed task could not be published: \(error.message)", status: nil), responseBody: [])
        }
    }

    /// A task whose routing key named no work queue (it reached the alternate exchange's queue):
    /// dead-lettered with the reason, its publisher told.
    private func unrouted(_ run: Run) {
        self.count(.tasksUnrouted)
        let key = run.delivery.routingKey
        let message = "no work queue named '\(key.prefix(100))' (the routing key on \(self.settings.spec.taskExchange) names the work queue)"
        self.logger.warning("unrouted task dead-lettered", metadata: ["routing_key": "\(key.prefix(100))"])
        let parsed = TaskParser.parse(run.delivery.body, messageId: run.delivery.properties.messageId, defaults: run.queue.defaults)
        let taskId: String?, webhook: String?
        switch parsed {
        case .success(let task): (taskId, webhook) = (task.id, task.webhook(forFailure: true))
        case .failure(let malformed):
            (taskId, webhook) = (TaskParser.safeId(run.delivery.properties.messageId) ?? Self.stableId(run.delivery.body), malformed.notify)
        }
        self.deadLetter(run, reason: "unrouted", error: message, status: nil, taskId: taskId) { [unowned self] in
            let outcome = Outcome(taskId: taskId, queue: String(key.prefix(255)), attempts: 0,
                                  failure: .init(reason: "unrouted", message: message, status: nil, body: [], retryable: false))
            self.notify(run, outcome, webhook: webhook)
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
        if let batch = run.batch {
            // A batch child stays one through retries, delays and parking.
            headers["aq-batch"] = .string(batch.id)
            headers["aq-batch-index"] = .int64(Int64(batch.index))
            headers["aq-batch-join"] = .string(batch.join.rawValue)
            if batch.rejoin { headers["aq-batch-rejoin"] = .bool(true) }
        }
        if let chain = run.chain {
            // A chain step's start stays when it was first published, through its retries.
            headers["aq-step-at"] = .int64(chain.startedAt)
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
    func deadLetter(_ run: Run, reason: String, error: String, status: Int?, taskId: String?,
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
                self.emit(.taskDeadLettered, queue: run.queue.name, taskId: taskId, attempt: attempts ?? run.attempt, run: run,
                          fields: ",\"reason\":\(JSONScan.quote(reason))")
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
    func publishThenAck(_ run: Run, exchange: String, properties: AMQPProperties, body: [UInt8],
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

    func webhook(_ run: Run, url: String, taskId: String, body: [UInt8], attempt: Int, id webhookId: String? = nil) {
        let id = webhookId ?? "\(taskId):result"
        let timeout = self.settings.webhookTimeout
        let webhook = Request.Webhook(url: url, id: id, taskId: taskId, attempt: attempt, body: body, timeout: timeout) { [unowned self] result in
            guard self.isActive(run) else { return }
            let outcome = RetryPolicy.classify(result, timeout: timeout)
            if case .success = outcome {
                self.count(.webhooksDelivered)
                self.emit(.webhookDelivered, queue: run.queue.name, taskId: taskId, attempt: attempt, run: run)
                return self.ack(run)
            }
            guard self.context.isCurrent(run.delivery) else { return self.end(run) }
            // The webhook id goes with it: a replay sends the webhook under the same id.
            let base = AMQPProperties(contentType: "application/json",
                                      headers: ["aq-kind": "webhook", "aq-webhook-url": .string(url), "aq-webhook-id": .string(id)],
                                      messageId: id, userId: self.settings.bridgeUser)
            let giveUp = { [unowned self] in
                self.count(.webhooksFailed)
                self.emit(.webhookGivenUp, queue: run.queue.name, taskId: taskId, attempt: attempt, run: run,
                          fields: ",\"error\":\(JSONScan.quote(Self.clip(outcome.reason, 200)))")
                self.logger.warning("webhook given up", metadata: ["task.id": "\(taskId)", "attempts": "\(attempt)", "error": "\(outcome.reason)"])
                self.deadLetter(run, reason: "webhook-failed", error: outcome.reason, status: outcome.status, taskId: taskId,
                                attempts: attempt, base: base, body: body) { [unowned self] in
                    self.ack(run)
                }
            }
            if case .retryable(_, _, let retryAfter) = outcome, attempt < self.settings.webhookAttempts,
               let tier = RetryPolicy.tier(forRetry: attempt, retryAfter: retryAfter, tiers: self.settings.spec.retryTiers, jitter: self.settings.retryJitter) {
                // Its own schedule: a webhook job waits in a tier; the callback never runs again.
                var properties = self.webhookJob(url: url, taskId: taskId, attempt: attempt + 1, tier: tier, lastError: outcome.reason, webhookId: webhookId)
                if let traceparent = run.traceparent { properties.headers?["traceparent"] = .string(traceparent) }
                self.publishThenAck(run, exchange: self.settings.spec.retryExchange, properties: properties, body: body,
                                    counting: .webhooksRetried, "the webhook retry") { _ in giveUp() }
                return
            }
            giveUp()
        }
        self.submit(Request(run: run, host: self.hostKey(url), webhook: webhook))
    }

    /// The most of a webhook endpoint's answer the bridge reads (it only needs the status).
    static let maxWebhookResponseBytes = 64 * 1024

    /// Properties of a webhook job: the webhook alone, waiting in a retry tier.
    func webhookJob(url: String, taskId: String, attempt: Int, tier: TimeSpan?, lastError: String?, webhookId: String? = nil) -> AMQPProperties {
        var headers: AMQPTable = ["aq-kind": "webhook", "aq-webhook-url": .string(url), "aq-task-id": .string(taskId),
                                  "aq-attempt": .int32(Int32(clamping: attempt))]
        if let tier { headers["retry-tier"] = .string(self.settings.spec.retryTierHeader(for: tier)) }
        if let lastError { headers["aq-last-error"] = .string(Self.clip(lastError, 200)) }
        if let webhookId { headers["aq-webhook-id"] = .string(webhookId) }
        return AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent, messageId: webhookId ?? "\(taskId):result",
                              userId: self.settings.bridgeUser)
    }

    /// A webhook whose host would keep it waiting too long goes to the broker as a webhook job,
    /// its attempt unchanged: the task's delivery is acked and the prefetch window freed.
    private func parkWebhook(_ run: Run, url: String, taskId: String, body: [UInt8], attempt: Int, webhookId: String, reason: String) {
        guard self.context.isCurrent(run.delivery) else { return self.end(run) }
        guard let tier = self.parkTier else { return }  // no tiers: it keeps its place in line
        self.logger.debug("webhook parked", metadata: ["task.id": "\(taskId)", "reason": "\(reason)"])
        var properties = self.webhookJob(url: url, taskId: taskId, attempt: attempt, tier: tier, lastError: nil, webhookId: webhookId)
        if let traceparent = run.traceparent { properties.headers?["traceparent"] = .string(traceparent) }
        self.publishThenAck(run, exchange: self.settings.spec.retryExchange,
                            properties: properties, body: body,
                            counting: .tasksParked, "the parked webhook") { [unowned self] error in
            self.requeue(run, "could not park the webhook: \(error)")
        }
    }

    /// A webhook waiting in a retry tier came back: deliver it (only it). Only a trusted
    /// publisher's message gets here (see ``received(_:_:)``).
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
        self.webhook(run, url: url, taskId: taskId, body: run.delivery.body, attempt: run.attempt,
                     id: TaskParser.safeId(headers?["aq-webhook-id"]?.stringValue))
    }

    /// Publishes with `mandatory`, so a message no queue takes (a retry tier missing from the
    /// broker, say) comes back as a failure instead of vanishing; `done` runs on this thread.
    func publish(exchange: String, routingKey: String, properties: AMQPProperties, body: [UInt8],
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
        for run in runs { self.handBack(run, "shutdown") }
        return runs.count
    }
}
