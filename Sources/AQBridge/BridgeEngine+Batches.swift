import AMQPClient
import AQTopology
import Foundation

/// A child's place in its batch.
struct BatchLink {
    var id: String
    var index: Int
    var join: BatchJoin
    /// Replayed from the dead letters into its open batch: its outcome replaces its failure.
    var rejoin = false
}

/// The broker objects of one batch (see ``BatchAggregator`` for what each holds).
struct BatchQueues {
    var replies: String
    var state: String
    var results: String

    init(spec: TopologySpec, id: String) {
        let base = spec.batchQueueName(forBatch: id)
        self.replies = spec.batchReplyQueueName(forBatch: id)
        self.state = base + ".state"
        self.results = base + ".results"
    }
}

/// Outcomes waiting to go to one batch together.
struct OutcomeBuffer {
    var body: [UInt8] = []
    var count = 0
    var waiting: [(Result<Bool, AMQPError>) -> Void] = []
    var bytes: Int { self.body.count }

    mutating func add(_ json: [UInt8], _ done: @escaping (Result<Bool, AMQPError>) -> Void) {
        // One outcome: the object; more: an array of them (the aggregator reads both).
        if self.count == 0 {
            self.body = json
        } else {
            if self.count == 1 { self.body = [UInt8(ascii: "[")] + self.body } else { self.body.removeLast() }
            self.body.append(UInt8(ascii: ","))
            self.body += json
            self.body.append(UInt8(ascii: "]"))
        }
        self.count += 1
        self.waiting.append(done)
    }
}

/// A batch whose reply queue this bridge consumes. Until its first delivery it is a standby
/// (another bridge aggregates); then it restores the checkpoint and aggregates.
final class BatchRun {
    let id: String
    let queues: BatchQueues
    var consumerTag: String?
    var machine: BatchAggregator?
    /// Reply-queue deliveries not yet acked, oldest first.
    var held: [AMQPDelivery] = []
    /// Deliveries not yet fed to the machine (it is fed from the turn, not from the callback).
    var inbox: [AMQPDelivery] = []
    var finishing = false
    /// Bumped whenever the machine is replaced or dropped: a persist or finish begun for an
    /// earlier machine must not act on a later one.
    var generation = 0

    init(id: String, queues: BatchQueues) {
        self.id = id
        self.queues = queues
    }
}

extension BridgeEngine {
    /// Reply-queue deliveries one aggregator takes at once (above the aggregator's fold size).
    static let batchPrefetch = 1000
    /// Messages read from a state queue at once: it holds one or two checkpoints; anything else
    /// in it (published there by someone else) is removed a bounded number at a time, so a
    /// flooded queue cannot hold the connection thread.
    static let maxStateReads = 64
    /// The largest batch webhook body; see ``BatchReport``.
    static let maxBatchReportBytes = 8 << 20
    /// How often a batch's timer comes back while the batch is open: how soon another bridge
    /// takes over a batch whose bridges all went away.
    static let batchTimerInterval: Int64 = 30_000

    /// The broker vouches that a trusted user (the bridge's own, or `trusted_publishers`)
    /// published it: only then do its `aq-…` headers and batch bookkeeping count.
    func isTrusted(_ properties: AMQPProperties) -> Bool {
        properties.userId.map { self.settings.trustedPublishers.contains($0) } ?? false
    }

    // MARK: Creating

    /// Who created a batch: the publisher's `user_id` (the broker checks it), and for a trusted
    /// publisher that speaks for several clients (aq-gateway: its tokens) the `aq-tenant` it
    /// names. Parts and re-creates of a batch are taken only from its creator.
    static func creator(of run: Run) -> String? {
        // A copy the bridge parked says whose it was.
        if run.trusted, let creator = run.delivery.properties.headers?["aq-creator"]?.stringValue { return creator.isEmpty ? nil : creator }
        guard let user = run.delivery.properties.userId else { return nil }
        if run.trusted, let tenant = run.delivery.properties.headers?["aq-tenant"]?.stringValue, !tenant.isEmpty {
            return user + "/" + tenant
        }
        return user
    }

    /// A message with `batch` or `batchPart`: checked whole; its queues declared, its checkpoint,
    /// children and timer published and confirmed; only then acked.
    func batchMessage(_ run: Run) {
        let known = self.workQueueNames
        let creator = Self.creator(of: run)
        let parsed = BatchParser.parse(run.delivery.body, messageId: run.delivery.properties.messageId, queue: run.queue.name,
                                       defaults: run.queue.defaults, isWorkQueue: { known.contains($0) })
        let message: BatchMessage
        switch parsed {
        case .failure(let malformed):
            // A refused part's children still end (as failed) so that their batch is not left
            // waiting — only when the part comes from the batch's own creator.
            var failures: (id: String, indexes: Range<Int>)?
            if let part = malformed.part, part.count > 0, case .open(let checkpoint?) = self.batchState(part.batchId),
               checkpoint.manifest.creator == creator {
                failures = (part.batchId, part.offset..<(part.offset + part.count))
            }
            return self.refuseBatch(run, malformed.reason, notify: malformed.notify, failures: failures)
        case .success(let value):
            message = value
        }
        let id = message.batchId
        // A part needs its batch open; a create whose id is taken must come from the same creator.
        let state = self.batchState(id)
        var join = BatchJoin.allSettled
        let parked = run.parkedCount
        if case .open(nil) = state, parked < 3 {
            // Its queues exist but no checkpoint could be read: its create is being carried out,
            // or another bridge is reading its checkpoint back this very moment. Either way who
            // created it is unknown now, so nothing is decided: it waits in the broker a little.
            return self.park(run, reason: "batch \(id)'s checkpoint could not be read yet")
        }
        switch (message.kind, state) {
        case (.create(let manifest), .open(let existing?)):
            if existing.manifest.creator != creator {
                return self.refuseBatch(run, "batch id '\(id.prefix(80))' is in use by another publisher", notify: manifest.failureWebhookURL ?? manifest.webhookURL, failures: nil)
            }
            join = existing.manifest.join
        case (.create(let manifest), _):
            join = manifest.join
        case (.part, .gone):
            // Its create may still be on its way (another bridge): wait in the broker a little.
            if parked < 3 { return self.park(run, reason: "batch \(id) is not open yet") }
            return self.refuseBatch(run, "batchPart for batch '\(id.prefix(80))', which is not open (it ended, or was never created)", notify: nil, failures: nil)
        case (.part, .open(nil)):
            // Still no checkpoint after waiting: the part cannot be checked against its creator.
            return self.refuseBatch(run, "batchPart for batch '\(id.prefix(80))', whose checkpoint could not be read (its create did not finish)", notify: nil, failures: nil)
        case (.part, .open(let existing?)):
            if existing.manifest.creator != creator {
                return self.refuseBatch(run, "batchPart from another publisher than the batch's creator", notify: nil, failures: nil)
            }
            join = existing.manifest.join
        case (_, .unknown(let error)):
            // Parked, not handed straight back (see `requeue`): the batch's node may be down
            // (a cluster) for a while.
            return self.requeue(run, "could not read the state of batch \(id): \(error)")
        }
        self.launchBatch(run, message, join: join, creator: creator, continuation: nil)
    }

    /// Declares the batch's queues and publishes its first checkpoint (when it has none), its
    /// timer and its children, all confirmed; then acks `run` and starts aggregating. With a
    /// `continuation` (a chain step's message), the batch is that step: its children's callbacks
    /// get the chain's envelope, and its end advances the chain instead of sending a webhook.
    func launchBatch(_ run: Run, _ message: BatchMessage, join: BatchJoin, creator: String?, continuation: ChainMessage?) {
        let spec = self.settings.spec
        let id = message.batchId
        let queues = BatchQueues(spec: spec, id: id)
        let stateCount: UInt32
        do throws(AMQPError) {
            stateCount = try self.declareBatchQueues(queues, id: id)
        } catch {
            return self.retryLater(run, "could not declare the queues of batch \(id)", error)
        }
        var outstanding = 1
        var failure: AMQPError?
        let done: (Result<Void, AMQPError>) -> Void = { [unowned self] result in
            if case .failure(let error) = result, failure == nil { failure = error }
            outstanding -= 1
            guard outstanding == 0, self.isActive(run) else { return }
            if let failure {
                return self.retryLater(run, "could not create batch \(id)", failure)
            }
            if case .create = message.kind { self.count(.batchesCreated) }
            self.ack(run)
            self.batchWork.append { [unowned self] in self.aggregate(id) }
        }
        if case .create(var manifest) = message.kind {
            if stateCount == 0 {
                // The first checkpoint. A create delivered again finds one and leaves it.
                manifest.creator = creator
                if let continuation, let step = continuation.step {
                    manifest.continuation = Data(continuation.stepMessage(step: step, history: continuation.history, results: continuation.results))
                }
                outstanding += 1
                self.publish(exchange: "", routingKey: queues.state, properties: self.batchProperties(kind: "checkpoint", id: id),
                             body: BatchCheckpoint(manifest: manifest).encoded(), done)
            }
            outstanding += 1
            self.publishTimer(id: id, workQueue: run.queue, deadline: manifest.deadline, done)
        }
        for child in message.children {
            outstanding += 1
            let properties = AMQPProperties(
                contentType: "application/json",
                headers: ["aq-batch": .string(id), "aq-batch-index": .int64(Int64(child.index)),
                          "aq-batch-join": .string(join.rawValue)],
                deliveryMode: .persistent, messageId: child.spec.id, timestamp: UInt64(Date().timeIntervalSince1970),
                userId: self.settings.bridgeUser)
            var body = child.body
            if let continuation, let step = continuation.step {
                body = Self.chainChildBody(child, chain: continuation, step: step)
            }
            self.publish(exchange: spec.taskExchange, routingKey: child.queue ?? run.queue.name, properties: properties, body: body, done)
        }
        done(.success(()))
    }

    /// Dead-letters a batch message with the reason and tells its webhook; `failures` are the
    /// children of a refused part, reported to their batch as failed (confirmed) first.
    private func refuseBatch(_ run: Run, _ reason: String, notify: String?, failures: (id: String, indexes: Range<Int>)?) {
        guard let failures else { return self.rejectMalformed(run, "batch", reason, webhook: notify) }
        self.rejectMalformed(run, "batch", reason, webhook: notify) { [unowned self] tell in
            let error = Array("{\"reason\":\"malformed\",\"message\":\(JSONScan.quote(reason))}".utf8)
            var buffer = OutcomeBuffer()
            for index in failures.indexes {
                buffer.add(ChildOutcome.make(index: index, taskId: "\(failures.id):\(index)", status: .failed, attempts: 0, result: nil, error: error).json) { _ in }
            }
            self.publishToBatch(failures.id, kind: "outcome", body: buffer.body) { [unowned self] result in
                guard self.isActive(run) else { return }
                if case .failure(let error) = result, error.code != .invalidArgument {
                    return self.requeue(run, "could not report a refused part to batch \(failures.id): \(error)")
                }
                tell()
            }
        }
    }

    enum BatchState {
        /// Its queues exist; the newest checkpoint, when one could be read.
        case open(BatchCheckpoint?)
        case gone
        case unknown(AMQPError)
    }

    /// Whether a batch's queues exist, and its checkpoint (read and given back at once).
    func batchState(_ id: String) -> BatchState {
        let queues = BatchQueues(spec: self.settings.spec, id: id)
        do throws(AMQPError) {
            try self.context.declareQueue(channel: self.adminChannel, name: queues.state, passive: true)
            var best: BatchCheckpoint?
            var read: [AMQPDelivery] = []
            while read.count < Self.maxStateReads, let delivery = try self.context.get(channel: self.adminChannel, queue: queues.state) {
                read.append(delivery.withoutBody())
                if self.isTrusted(delivery.properties), let checkpoint = BatchCheckpoint.decode(delivery.body),
                   checkpoint.manifest.id == id, checkpoint.version >= (best?.version ?? -1) {
                    best = checkpoint
                }
            }
            for delivery in read { self.context.nack(delivery, requeue: true) }
            return .open(best)
        } catch {
            // A queue whose node is down (a cluster) is not gone: it returns with its node.
            return error.replyCode == .notFound && !error.isQueueUnavailable ? .gone : .unknown(error)
        }
    }

    /// Declares the batch's reply queue (single active consumer, bound to the batch exchange by
    /// the batch id), state and results queues; returns how many messages the state queue holds.
    private func declareBatchQueues(_ queues: BatchQueues, id: String) throws(AMQPError) -> UInt32 {
        let spec = self.settings.spec
        // A batch of this id again (a chain step replayed): not the ended one's queues to delete.
        for name in [queues.replies, queues.results, queues.state] { self.batchQueuesToDelete[name] = nil }
        try self.context.declareQueue(channel: self.adminChannel, name: queues.replies, arguments: ["x-single-active-consumer": .bool(true)])
        try self.context.bindQueue(channel: self.adminChannel, queue: queues.replies, exchange: spec.batchExchange, routingKey: id)
        try self.context.declareQueue(channel: self.adminChannel, name: queues.results)
        return try self.context.declareQueue(channel: self.adminChannel, name: queues.state).messageCount
    }

    func batchProperties(kind: String, id: String) -> AMQPProperties {
        AMQPProperties(contentType: "application/json", headers: ["aq-batch-msg": .string(kind), "aq-batch": .string(id)],
                       deliveryMode: .persistent, timestamp: UInt64(Date().timeIntervalSince1970), userId: self.settings.bridgeUser)
    }

    /// Publishes to the batch's reply queue (through the batch exchange). `done` gets true when
    /// a queue took it, false when the batch is gone (nothing to report to), and a failure that
    /// ``AMQPError/isQueueUnavailable`` when the queue exists but its node is down (a cluster):
    /// a returned message is only "gone" once a look at the queue (next turn) says so.
    func publishToBatch(_ id: String, kind: String, body: [UInt8], _ done: @escaping (Result<Bool, AMQPError>) -> Void) {
        self.context.publish(channel: self.publishChannel, exchange: self.settings.spec.batchExchange, routingKey: id,
                             properties: self.batchProperties(kind: kind, id: id), body: body, mandatory: true) { [unowned self] result in
            switch result {
            case .success(.returned):
                self.batchWork.append { [unowned self] in done(self.whyReturned(batch: id)) }
            case .success: done(.success(true))
            case .failure(let error): done(.failure(error))
            }
        }
    }

    /// Why a message to a batch came back: its reply queue is gone (`false`: the batch ended), or
    /// it is there but could not take it (its node is down, or was a moment ago).
    private func whyReturned(batch id: String) -> Result<Bool, AMQPError> {
        let replies = BatchQueues(spec: self.settings.spec, id: id).replies
        do throws(AMQPError) {
            try self.context.declareQueue(channel: self.adminChannel, name: replies, passive: true)
            // There again: it was unreachable when the message came back (its node restarting).
            return .failure(AMQPError(code: .channelClosedByServer, message: "batch \(id)'s reply queue returned the message",
                                      replyCode: .notFound, replyText: "the queue exists but its node is down or inaccessible"))
        } catch {
            if error.replyCode == .notFound && !error.isQueueUnavailable { return .success(false) }
            return .failure(error)
        }
    }

    /// The batch's timer: a message that waits in a retry tier and comes back to `workQueue`
    /// every ``batchTimerInterval`` (sooner for the deadline), to whichever bridge is there.
    func publishTimer(id: String, workQueue: ServedQueue, deadline: Int64?, _ done: @escaping (Result<Void, AMQPError>) -> Void) {
        let now = Self.unixMilliseconds()
        let wait = min(Self.batchTimerInterval, max(0, (deadline ?? Int64.max) - now))
        let tiers = self.settings.spec.retryTiers
        guard let tier = tiers.last(where: { $0.milliseconds <= wait }) ?? tiers.first else {
            return done(.failure(AMQPError(code: .publishNacked, message: "batches need retry tiers for their timers")))
        }
        var headers: AMQPTable = ["aq-kind": "batch-timer", "aq-batch": .string(id), "retry-tier": .string(self.settings.spec.retryTierHeader(for: tier))]
        if let deadline { headers["aq-not-before"] = .int64(deadline) }
        let properties = AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent,
                                        messageId: "\(id):timer", userId: self.settings.bridgeUser)
        self.publish(exchange: self.settings.spec.retryExchange, routingKey: workQueue.queueName, properties: properties, body: Array("{}".utf8), done)
    }

    // MARK: Children

    /// Whether a batch's reply queue still exists (a fail-fast batch deletes it when it fails).
    func batchIsOpen(_ id: String) -> Bool {
        let queues = BatchQueues(spec: self.settings.spec, id: id)
        do throws(AMQPError) {
            try self.context.declareQueue(channel: self.adminChannel, name: queues.replies, passive: true)
            return true
        } catch {
            // 404: gone (unless its node is down: it comes back with it). Anything else: run the
            // child rather than skip it on a doubt.
            return error.replyCode != .notFound || error.isQueueUnavailable
        }
    }

    /// Publishes a child's final outcome to its batch (confirmed), then `then`. A batch that is
    /// gone (it ended) takes nothing: the child goes on alone.
    func reportToBatch(_ run: Run, _ batch: BatchLink, _ outcome: Outcome, then: @escaping () -> Void) {
        var error: [UInt8]?
        if let failure = outcome.failure {
            error = Array("{\"reason\":\(JSONScan.quote(failure.reason)),\"message\":\(JSONScan.quote(failure.message)),\"status\":\(failure.status.map(String.init) ?? "null"),\"retryable\":\(failure.retryable)}".utf8)
        }
        let child = ChildOutcome.make(index: batch.index, taskId: outcome.taskId ?? "\(batch.id):\(batch.index)",
                                      status: outcome.failure == nil ? .completed : .failed, attempts: outcome.attempts,
                                      result: outcome.failure == nil ? (outcome.result ?? Array("null".utf8)) : nil, error: error,
                                      rejoined: batch.rejoin)
        self.bufferOutcome(batch.id, child.json) { [unowned self] result in
            guard self.isActive(run) else { return }
            switch result {
            case .success(let taken):
                if taken { self.count(.batchOutcomes) }
                then()
            case .failure(let error) where error.code == .invalidArgument:
                self.logger.warning("a batch outcome could not be published", metadata: ["batch": "\(batch.id)", "error": "\(error)"])
                then()
            case .failure(let error) where error.isQueueUnavailable:
                // The batch's node is down (a cluster): the child waits in a retry tier, without
                // spending an attempt, and reports when it runs again after the node is back.
                self.requeue(run, "batch \(batch.id)'s queues are unavailable: \(error.message)")
            case .failure(let error):
                self.requeue(run, "could not report to batch \(batch.id): \(error)")
            }
        }
    }

    /// Outcomes of one turn for the same batch go out as one message (a JSON array): half the
    /// broker's work per child at high rates. Flushed at the end of the turn, or at 64 KiB.
    func bufferOutcome(_ id: String, _ json: [UInt8], _ done: @escaping (Result<Bool, AMQPError>) -> Void) {
        var buffer = self.outcomeBuffers.removeValue(forKey: id) ?? OutcomeBuffer()
        buffer.add(json, done)
        if buffer.bytes >= 64 * 1024 {
            self.publishOutcomes(id, buffer)
        } else {
            self.outcomeBuffers[id] = buffer
        }
    }

    func flushOutcomes() {
        let buffers = self.outcomeBuffers
        self.outcomeBuffers.removeAll(keepingCapacity: true)
        for (id, buffer) in buffers { self.publishOutcomes(id, buffer) }
    }

    private func publishOutcomes(_ id: String, _ buffer: OutcomeBuffer) {
        self.publishToBatch(id, kind: "outcome", body: buffer.body) { result in
            for done in buffer.waiting { done(result) }
        }
    }

    /// Deletes the queues of ended batches that could not be deleted at their end.
    func retryBatchQueueDeletions(now: ContinuousClock.Instant) {
        guard now - self.lastBatchQueueDeletion >= .seconds(2) else { return }
        self.lastBatchQueueDeletion = now
        for (queue, attempts) in self.batchQueuesToDelete {
            do throws(AMQPError) {
                try self.context.deleteQueue(channel: self.adminChannel, name: queue)
                self.batchQueuesToDelete[queue] = nil
            } catch {
                self.batchQueuesToDelete[queue] = attempts >= 150 ? nil : attempts + 1
            }
        }
    }

    // MARK: The timer

    /// A batch's timer came back: make sure this bridge consumes the batch (as aggregator or
    /// standby), mark the deadline when it has passed, else send the timer round again.
    func batchTimer(_ run: Run) {
        let headers = run.delivery.properties.headers
        guard let id = headers?["aq-batch"]?.stringValue else {
            return self.deadLetter(run, reason: "malformed", error: "a batch timer without aq-batch", status: nil, taskId: nil) { [unowned self] in self.ack(run) }
        }
        guard self.batchIsOpen(id) else { return self.ack(run) }  // the batch is over: the timer stops
        self.aggregate(id)
        let deadline = headers?["aq-not-before"]?.intValue
        // Past the deadline: the mark ends the batch. Either way the timer goes round again until
        // the batch is gone, and wakes the aggregator (one that died after ending the batch but
        // before its clean-up is finished by the next).
        let kind = deadline.map { $0 <= Self.unixMilliseconds() } == true ? "deadline" : "wake"
        self.publishToBatch(id, kind: kind, body: Array("{}".utf8)) { [unowned self] _ in
            self.publishTimer(id: id, workQueue: run.queue, deadline: deadline) { [unowned self] result in
                guard self.isActive(run) else { return }
                if case .failure(let error) = result { return self.requeue(run, "could not send batch \(id)'s timer round: \(error)") }
                self.ack(run)
            }
        }
    }

    // MARK: Aggregating

    /// Consumes the batch's reply queue, unless this bridge already does. With single active
    /// consumer, the broker gives it to one bridge at a time; the others wait as standbys.
    func aggregate(_ id: String) {
        guard self.batches[id] == nil, !self.draining else { return }
        let batch = BatchRun(id: id, queues: BatchQueues(spec: self.settings.spec, id: id))
        self.batches[id] = batch
        do throws(AMQPError) {
            batch.consumerTag = try self.context.consume(
                channel: self.batchChannel, queue: batch.queues.replies,
                handler: { [unowned self] delivery in
                    // Fed from the turn: restoring and persisting make broker round trips.
                    guard self.batches[id] === batch else { return self.context.nack(delivery, requeue: true) }
                    batch.inbox.append(delivery)
                },
                onEnd: { [unowned self] error in
                    // Cancelled by the broker (the queue was deleted: another bridge finished it).
                    if self.batches[id] === batch { self.batches[id] = nil }
                    if let error, !batch.finishing { self.logger.debug("batch consumer ended", metadata: ["batch": "\(id)", "error": "\(error)"]) }
                })
        } catch {
            self.batches[id] = nil
            self.logger.warning("could not consume a batch's reply queue", metadata: ["batch": "\(id)", "error": "\(error)"])
        }
    }

    private func feed(_ batch: BatchRun, now: ContinuousClock.Instant) {
        // While it finishes, what arrives waits (deleted with the queue, or given back if the
        // finish fails).
        guard !batch.finishing else { return }
        var index = 0
        while index < batch.inbox.count, self.batches[batch.id] === batch, !batch.finishing {
            self.batchDelivery(batch, batch.inbox[index], now: now)
            index += 1
        }
        if index > 0 { batch.inbox.removeFirst(min(index, batch.inbox.count)) }
    }

    private func batchDelivery(_ batch: BatchRun, _ delivery: AMQPDelivery, now: ContinuousClock.Instant) {
        guard self.context.isCurrent(delivery) else { return }
        // After a reconnect the held deliveries come again under new tags: start over.
        if batch.machine != nil, let first = batch.held.first, !self.context.isCurrent(first) {
            batch.machine = nil
            batch.generation += 1
            batch.held.removeAll()
        }
        if batch.machine == nil {
            guard self.restore(batch, now: now) else {
                // No checkpoint yet (its create is being carried out), or it could not be read:
                // let go (this delivery and the rest go back); the timer brings it round again.
                return self.stopAggregating(batch)
            }
        }
        batch.held.append(delivery.withoutBody())  // held for its ack only
        let inputs: [BatchAggregator.Input]
        let headers = self.isTrusted(delivery.properties) ? delivery.properties.headers : nil
        switch headers?["aq-batch-msg"]?.stringValue {
        case "outcome"? where delivery.body.first == UInt8(ascii: "["):
            // Several children's outcomes, published together by one bridge in one turn.
            var outcomes: [ChildOutcome] = []
            try? JSONScan.forEachElement(delivery.body) { (member: JSONScan.Member) throws(JSONScan.Failure) in
                if member.kind == .object, let outcome = ChildOutcome.parse(Array(delivery.body[member.range])) { outcomes.append(outcome) }
            }
            inputs = outcomes.map { .outcome($0) }
        case "outcome"?: inputs = [ChildOutcome.parse(delivery.body).map { .outcome($0) } ?? .ignored]
        case "deadline"?: inputs = [.deadline]
        default: inputs = [.ignored]
        }
        if let actions = batch.machine?.receive(inputs, tag: delivery.deliveryTag, now: now) { self.carryOut(batch, actions) }
    }

    /// Reads the newest checkpoint from the state queue and starts the machine; false when there
    /// is none. Older checkpoints (a crash can leave one) are removed; the newest is given back,
    /// so the queue always holds it and `aq batch status` can read it.
    private func restore(_ batch: BatchRun, now: ContinuousClock.Instant) -> Bool {
        var read: [(AMQPDelivery, BatchCheckpoint?)] = []
        do throws(AMQPError) {
            while read.count < Self.maxStateReads, let delivery = try self.context.get(channel: self.adminChannel, queue: batch.queues.state) {
                let trusted = self.isTrusted(delivery.properties)
                read.append((delivery, trusted ? BatchCheckpoint.decode(delivery.body) : nil))
            }
        } catch {
            // A partial read could miss the newest: give back what was read and try later.
            self.logger.warning("could not read a batch's checkpoint", metadata: ["batch": "\(batch.id)", "error": "\(error)"])
            for (delivery, _) in read where self.context.isCurrent(delivery) { self.context.nack(delivery, requeue: true) }
            return false
        }
        let best = read.compactMap(\.1).filter { $0.manifest.id == batch.id }.max { $0.version < $1.version }
        for (delivery, checkpoint) in read where self.context.isCurrent(delivery) {
            // Older ones, and what is not a checkpoint of ours, are removed; the newest is given back.
            let ours = checkpoint.map { $0.manifest.id == batch.id } ?? false
            if !ours || (best.map { checkpoint?.version ?? -1 < $0.version } ?? false) {
                self.context.ack(delivery)
            } else {
                self.context.nack(delivery, requeue: true)
            }
        }
        guard let best else { return false }
        let (machine, actions) = BatchAggregator.restore(best, now: now)
        batch.generation += 1
        batch.machine = machine
        self.carryOut(batch, actions)
        return true
    }

    func tickBatches(now: ContinuousClock.Instant) {
        for batch in Array(self.batches.values) where !batch.inbox.isEmpty { self.feed(batch, now: now) }
        for batch in self.batches.values where batch.machine != nil && !batch.finishing {
            if let actions = batch.machine?.tick(now: now), !actions.isEmpty { self.carryOut(batch, actions) }
        }
    }

    private func carryOut(_ batch: BatchRun, _ actions: [BatchAggregator.Action]) {
        for action in actions {
            switch action {
            case .persist(let segment, let checkpoint, let ackUpTo): self.persist(batch, segment: segment, checkpoint: checkpoint, ackUpTo: ackUpTo)
            case .finish(let checkpoint): self.finish(batch, checkpoint)
            }
        }
    }

    /// Segment, then checkpoint, both confirmed; then the old checkpoint and the folded replies
    /// are acked. Any failure: this bridge lets the batch go (its deliveries return to the
    /// broker) and takes it up again from the broker's state.
    private func persist(_ batch: BatchRun, segment: [UInt8]?, checkpoint: BatchCheckpoint, ackUpTo: UInt64?) {
        let id = batch.id
        // Only the machine that asked for this persist may see it done.
        let generation = batch.generation
        let current = { [unowned self] in self.batches[id] === batch && batch.machine != nil && batch.generation == generation }
        let writeCheckpoint = { [unowned self] in
            self.publish(exchange: "", routingKey: batch.queues.state, properties: self.batchProperties(kind: "checkpoint", id: id),
                         body: checkpoint.encoded()) { [unowned self] result in self.batchWork.append { [unowned self] in
                guard current() else { return }
                if case .failure(let error) = result { return self.dropBatch(batch, "could not write its checkpoint: \(error)") }
                // The checkpoints before it are out of date: removed, up to the new one (given back).
                do throws(AMQPError) {
                    for _ in 0..<Self.maxStateReads {
                        guard let delivery = try self.context.get(channel: self.adminChannel, queue: batch.queues.state) else { break }
                        let trusted = self.isTrusted(delivery.properties)
                        // Not ours (untrusted or unreadable): removed like an old one.
                        let version = trusted ? BatchCheckpoint.decode(delivery.body)?.version ?? -1 : -1
                        if version >= checkpoint.version {
                            self.context.nack(delivery, requeue: true)
                            break
                        }
                        self.context.ack(delivery)
                    }
                } catch {
                    return self.dropBatch(batch, "could not read its checkpoint back: \(error)")
                }
                if segment == nil {
                    // A refresh (every 10 minutes at most while deliveries are held): the results
                    // queue is otherwise only published to, which does not count as use for its
                    // expiry policy; declaring it again does.
                    _ = try? self.context.declareQueue(channel: self.adminChannel, name: batch.queues.results)
                }
                if let ackUpTo {
                    // One by one: the batch channel carries every batch's deliveries, so a
                    // `multiple` ack would settle other batches' too (the client merges runs).
                    for delivery in batch.held where delivery.deliveryTag <= ackUpTo && self.context.isCurrent(delivery) { self.context.ack(delivery) }
                    batch.held.removeAll { $0.deliveryTag <= ackUpTo }
                }
                if segment != nil, checkpoint.status == nil {
                    self.emit(.batchProgress, queue: checkpoint.manifest.queue, taskId: id,
                              fields: ",\"batchId\":\(JSONScan.quote(id)),\"size\":\(checkpoint.manifest.size),\"settled\":\(checkpoint.settled.population),\"failed\":\(checkpoint.failed.population)")
                }
                if let actions = batch.machine?.persisted(now: .now) { self.carryOut(batch, actions) }
            } }
        }
        guard let segment else { return writeCheckpoint() }
        self.publish(exchange: "", routingKey: batch.queues.results, properties: self.batchProperties(kind: "segment", id: id), body: segment) { [unowned self] result in
            guard current() else { return }
            if case .failure(let error) = result { return self.batchWork.append { [unowned self] in self.dropBatch(batch, "could not write a result segment: \(error)") } }
            writeCheckpoint()
        }
    }

    /// The batch is over: its report is built from the result segments and sent as a webhook
    /// job (confirmed, then delivered with retries like any webhook), then its queues are deleted.
    private func finish(_ batch: BatchRun, _ checkpoint: BatchCheckpoint) {
        batch.finishing = true
        let manifest = checkpoint.manifest
        // The report travels as a webhook job on the work queue: it must stay readable there.
        let limit = self.settings.queues.first { $0.name == manifest.queue }?.defaults.maxPayloadBytes ?? TaskDefaults().maxPayloadBytes
        var builder = BatchReport(checkpoint, maxBytes: min(Self.maxBatchReportBytes, limit))
        // One segment at a time, not acked (the queue is deleted below), kept without its body
        // to be given back if the report cannot go out.
        var segments: [AMQPDelivery] = []
        let giveBack = { [unowned self] in
            for delivery in segments where self.context.isCurrent(delivery) { self.context.nack(delivery, requeue: true) }
            segments.removeAll()
        }
        do throws(AMQPError) {
            while let delivery = try self.context.get(channel: self.adminChannel, queue: batch.queues.results) {
                if self.isTrusted(delivery.properties) { builder.add(segment: delivery.body) }
                segments.append(delivery.withoutBody())
            }
        } catch {
            giveBack()
            batch.finishing = false
            return self.dropBatch(batch, "could not read its results: \(error)")
        }
        if segments.count < checkpoint.segments {
            // Fewer than the checkpoint counts: another bridge holds the rest, finishing the
            // batch too (a handover across a node's restart). Its report is the one; if it dies
            // before sending it, the segments come back and the timer makes this batch end again.
            giveBack()
            batch.finishing = false
            return self.dropBatch(batch, "read \(segments.count) of its \(checkpoint.segments) result segments: another bridge is finishing it")
        }
        let status = checkpoint.status ?? .completed
        let url = status == .completed ? manifest.webhookURL : (manifest.failureWebhookURL ?? manifest.webhookURL)
        let cleanUp = { [unowned self] in
            self.count(.batchesEnded)
            self.emit(.batchEnded, queue: manifest.queue, taskId: batch.id,
                      fields: ",\"batchId\":\(JSONScan.quote(batch.id)),\"status\":\"\(status.rawValue)\",\"size\":\(manifest.size),\"settled\":\(checkpoint.settled.population),\"failed\":\(checkpoint.failed.population)")
            self.logger.info("batch ended", metadata: ["batch": "\(batch.id)", "status": "\(status.rawValue)", "size": "\(manifest.size)",
                                                       "settled": "\(checkpoint.settled.population)"])
            if let tag = batch.consumerTag {
                do throws(AMQPError) { try self.context.cancelConsumer(channel: self.batchChannel, tag: tag) } catch {}
            }
            for queue in [batch.queues.replies, batch.queues.results, batch.queues.state] {
                do throws(AMQPError) { try self.context.deleteQueue(channel: self.adminChannel, name: queue) } catch {
                    // Its node may be down (a cluster): tried again every 2 s for 5 minutes;
                    // after that (or if this bridge dies), the expiry policy removes it.
                    self.logger.warning("could not delete a batch queue yet", metadata: ["queue": "\(queue)", "error": "\(error)"])
                    self.batchQueuesToDelete[queue] = 0
                }
            }
            if self.batches[batch.id] === batch { self.batches[batch.id] = nil }
        }
        if let continuation = manifest.continuation {
            // A chain's batch step: its end advances (or fails) the chain instead of a webhook.
            return self.chainBatchStepEnded(Array(continuation), status: status, report: builder.build(), createdAt: manifest.createdAt) { [unowned self] result in
                self.batchWork.append {
                    if case .failure(let error) = result, error.code != .invalidArgument {
                        giveBack()
                        batch.finishing = false
                        return self.dropBatch(batch, "could not advance its chain: \(error)")
                    }
                    if case .failure(let error) = result {
                        // The next step can never be published as it is (its context is too big).
                        self.logger.warning("a chain stops after its batch step", metadata: ["batch": "\(batch.id)", "error": "\(error)"])
                    }
                    cleanUp()
                }
            }
        }
        guard let url else { return cleanUp() }
        let report = builder.build()
        var properties = self.webhookJob(url: url, taskId: manifest.id, attempt: 1, tier: nil, lastError: nil, webhookId: manifest.id)
        properties.headers?["aq-batch-status"] = .string(status.rawValue)
        let workQueue = self.settings.spec.queueName(forWorkQueue: manifest.queue)
        self.publish(exchange: "", routingKey: workQueue, properties: properties, body: report) { [unowned self] result in self.batchWork.append {
            if case .failure(let error) = result {
                giveBack()
                batch.finishing = false
                return self.dropBatch(batch, "could not publish its webhook: \(error)")
            }
            cleanUp()
        } }
    }

    /// Lets the batch go after a failure: its deliveries return to the broker, and the next
    /// timer round (or another bridge) takes it up again from the broker's state.
    private func dropBatch(_ batch: BatchRun, _ why: String) {
        self.logger.warning("batch aggregation interrupted; the broker keeps its state", metadata: ["batch": "\(batch.id)", "reason": "\(why)"])
        self.stopAggregating(batch)
    }

    private func stopAggregating(_ batch: BatchRun) {
        if self.batches[batch.id] === batch { self.batches[batch.id] = nil }
        batch.machine = nil
        batch.generation += 1
        if let tag = batch.consumerTag {
            // Cancelling leaves its unacked deliveries with the channel; nack them back.
            do throws(AMQPError) { try self.context.cancelConsumer(channel: self.batchChannel, tag: tag) } catch {}
        }
        for delivery in batch.held + batch.inbox where self.context.isCurrent(delivery) { self.context.nack(delivery, requeue: true) }
        batch.held.removeAll()
        batch.inbox.removeAll()
    }
}
