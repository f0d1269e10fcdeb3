import AMQPClient
import Foundation

// The dead-letter operations behind `aq dlq` and the gateway's dashboard: reading aq.dead
// without disturbing it, and replaying letters where they came from.

/// Removes (acks) letters for a scan, counting them per consumer: a consumer's held letters
/// are what it has been delivered minus what was removed.
public final class LetterRemover {
    /// Reader channels in transaction mode: a letter's removal and what is published on its
    /// channel (``channel(of:)``) take effect together, at that channel's commit.
    public let transactional: Bool
    public private(set) var removed: [String: Int] = [:]
    /// The reader channel of each consumer tag.
    public var channels: [String: AMQPChannel] = [:]

    public init(transactional: Bool = false) {
        self.transactional = transactional
    }

    public func remove(_ delivery: AMQPDelivery) throws {
        try delivery.ack()
        // In a transaction the ack holds the letter (and its prefetch credit) until the commit.
        if !self.transactional { self.removed[delivery.consumerTag ?? "", default: 0] += 1 }
    }

    /// `count` removals on `tag`'s channel were committed.
    public func committed(_ count: Int, tag: String) {
        self.removed[tag, default: 0] += count
    }

    /// The channel `delivery` came through (its ack goes there).
    public func channel(of delivery: AMQPDelivery) -> AMQPChannel? {
        self.channels[delivery.consumerTag ?? ""]
    }
}

/// Reads aq.dead once through: each letter is handed to `visit`, which may remove it (through
/// the remover). Whatever is not removed returns to the queue when the channels close.
public struct DeadLetterReader {
    public let spec: TopologySpec
    public let target: BrokerTarget

    public init(spec: TopologySpec, target: BrokerTarget) {
        self.spec = spec
        self.target = target
    }

    /// The logins whose AsyncQueue headers on a letter are believed: ours (the bridge's, as the
    /// README asks) and `AQ_TRUSTED_PUBLISHERS`, as aq-bridge reads it.
    public var trustedUsers: Set<String> {
        let listed = ProcessInfo.processInfo.environment["AQ_TRUSTED_PUBLISHERS"]?
            .split(whereSeparator: { $0 == "," || $0 == " " }).map(String.init) ?? []
        return Set(listed + [self.target.amqp.user])
    }

    public struct Scan: Sendable {
        public var total = 0
        public var read = 0
    }

    /// Letters one consumer may hold unacknowledged: the most a scan buffers at once.
    public static let perChannel = 5_000

    /// `finish` runs before the channels close (acks sent after it would be lost).
    public func scan(remover: LetterRemover = LetterRemover(), _ visit: (AMQPDelivery, DeadLetter) async throws -> Void,
              finish: () async throws -> Void = {}) async throws -> Scan {
        var configuration = self.target.amqp
        // Never refuse a letter as unreadable: a consumer's refusal would drop it (aq.dead has no
        // dead-letter exchange of its own).
        configuration.contentLimits = AMQPContentLimits(maxHeaderFields: .max, maxHeaderDepth: .max, maxBodyBytes: .max)
        // No reconnection: the letters held would come back and be read twice; a scan whose
        // connection broke fails (run it again).
        configuration.recovery.enabled = false
        let trusted = self.trustedUsers
        let connection = try await AMQPConnection.connect(configuration: configuration)
        do {
            let channel = try await connection.openChannel()
            let queue = self.spec.deadLetterQueue
            let info = try await channel.declareQueue(queue, passive: true)
            var scan = Scan(total: Int(info.messageCount))
            var readers: [AMQPChannel] = []
            if scan.total > 0 {
                // Consumers stream the letters (a basic.get per letter is a quorum-queue command
                // each, 1-2 ms), and every letter stays unacknowledged until removed. A consumer
                // holds at most `perChannel`; once the newest holds that many, the next letters
                // come through a new channel's consumer. So no more than about `perChannel`
                // letters wait in memory at once, and a scan can hold up to 2,047 channels' worth.
                // What arrives after the start (a replayed task failing again) is not read: the
                // scan stops at the count it started with.
                enum Arrival: Sendable { case letter(AMQPDelivery), tick }
                let (stream, feed) = AsyncThrowingStream<Arrival, any Error>.makeStream()
                var consumers: [AMQPConsumer] = []
                var feeders: [Task<Void, Never>] = []
                var delivered: [String: Int] = [:]
                func addConsumer() async throws {
                    let reader = readers.isEmpty ? channel : try await connection.openChannel()
                    readers.append(reader)
                    try await reader.setPrefetch(UInt16(Self.perChannel))
                    if remover.transactional { try await reader.enableTransactions() }
                    let consumer = try await reader.consume(queue, maxBodyBytes: .max)
                    consumers.append(consumer)
                    remover.channels[consumer.tag] = reader
                    feeders.append(Task {
                        do {
                            for try await delivery in consumer { feed.yield(.letter(delivery)) }
                        } catch {
                            feed.finish(throwing: error)
                        }
                    })
                }
                try await addConsumer()
                // The count at the start may not all come: another command holds some, or they
                // expired. Once nothing arrived for a second and nothing is ready, the scan ends.
                let ticker = Task {
                    while !Task.isCancelled {
                        try? await Task.sleep(for: .seconds(1))
                        feed.yield(.tick)
                    }
                }
                defer { ticker.cancel() }
                var lastArrival = ContinuousClock.now
                for try await arrival in stream {
                    guard case .letter(let delivery) = arrival else {
                        if ContinuousClock.now - lastArrival >= .seconds(1),
                           try await channel.declareQueue(queue, passive: true).messageCount == 0 { break }
                        continue
                    }
                    lastArrival = .now
                    scan.read += 1
                    delivered[delivery.consumerTag ?? "", default: 0] += 1
                    try await visit(delivery, DeadLetter(delivery, spec: self.spec, trustedUsers: trusted))
                    if scan.read >= scan.total { break }
                    if let newest = consumers.last?.tag, delivered[newest, default: 0] - remover.removed[newest, default: 0] >= Self.perChannel {
                        try await addConsumer()
                    }
                }
                for consumer in consumers { try await consumer.cancel() }
                for feeder in feeders { feeder.cancel() }
                feed.finish()
            } else {
                readers.append(channel)
            }
            try await finish()
            // RabbitMQ 3.10 hands a channel's acks to a quorum queue asynchronously: acks sent
            // just before the channel closes can be lost (the letters come back). A basic.get is
            // a synchronous command to the queue behind them, so once it answers they are
            // applied; what it takes is given back unacknowledged like the rest.
            for reader in readers {
                _ = try await reader.get(queue)
                try await reader.close()
            }
            // A quorum queue takes back a closed channel's letters asynchronously too: wait (at
            // most 5 s) until they are ready again, so the next command (a `replay` right after a
            // `list`) sees every letter.
            if scan.read > 0 {
                let expected = scan.total - remover.removed.values.reduce(0, +)
                let checker = try await connection.openChannel()
                let deadline = ContinuousClock.now + .seconds(5)
                while Int(try await checker.declareQueue(queue, passive: true).messageCount) < expected, ContinuousClock.now < deadline {
                    try await Task.sleep(for: .milliseconds(10))
                }
            }
            await connection.close()
            return scan
        } catch {
            await connection.close()
            throw error
        }
    }
}


/// What a replay did.
public struct ReplayReport: Sendable {
    /// Letters in aq.dead when the replay started.
    public var total: Int
    /// Replayed (or, in a dry run, would be).
    public var replayed: Int
    /// Could not be published; they stay.
    public var failed: Int
    /// Left where they are, counted by why.
    public var skipped: [String: Int]
    public var seconds: Double
}

/// Replays dead letters (see `aq dlq replay`): each letter's copy is published on the channel it
/// came through, in transaction mode, and the letter acked in the same transaction; a commit
/// every `window` letters makes both take effect together.
public enum DeadLetterReplay {
    /// A copy published in a reader channel's open transaction, with the letter it replays.
    struct Pending {
        var delivery: AMQPDelivery
        var letter: DeadLetter
        var exchange: String
        var routingKey: String
        var messageId: String?
    }

    /// - Parameters:
    ///   - rate: letters per second at most (0: no limit).
    ///   - onPlanned: in a dry run, each letter that would be replayed and where.
    ///   - problem: each letter that could not be replayed and why.
    public static func run(spec: TopologySpec, target: BrokerTarget, filter: DeadLetterFilter, rate: Double = 0, window: Int = 256,
                           dryRun: Bool = false, onPlanned: (DeadLetter, String, String) -> Void = { _, _, _ in },
                           problem: (String) -> Void = { _ in }) async throws -> ReplayReport {
        let rate = rate.isFinite ? min(max(rate, 0), 1e6) : 0, window = min(max(1, window), DeadLetterReader.perChannel)
        var replayed = 0, failed = 0
        var skipped: [String: Int] = [:]
        let remover = LetterRemover(transactional: !dryRun)
        var pending: [String: [Pending]] = [:]  // per consumer tag, i.e. per reader channel
        var pendingCount = 0
        let started = ContinuousClock.now
        let connection = try await AMQPConnection.connect(configuration: target.amqp)
        // Checks that queues exist (a passive declare of a missing one closes it: it reopens),
        // and puts back a letter whose copy no queue took.
        let helper = try await connection.openChannel()
        try await helper.enableConfirms()
        var exists: [String: Bool] = [:]
        func queueExists(_ name: String) async throws -> Bool {
            if let known = exists[name] { return known }
            let found: Bool
            do {
                _ = try await helper.declareQueue(name, passive: true)
                found = true
            } catch let error as AMQPError where error.code == .channelClosedByServer {
                found = false
            }
            exists[name] = found
            return found
        }
        /// Commits one reader channel's transaction: its copies and its letters' removals.
        func commit(_ tag: String) async throws {
            guard let entries = pending.removeValue(forKey: tag), !entries.isEmpty,
                  let channel = remover.channels[tag] else { return }
            pendingCount -= entries.count
            var returned = try await channel.commit()
            remover.committed(entries.count, tag: tag)
            replayed += entries.count - returned.count
            guard !returned.isEmpty else { return }
            // A queue went away between the check and the commit: the letter was removed with
            // its copy, so it goes back into the dead-letter queue (confirmed). Published as
            // our login, it keeps AsyncQueue's headers only if they were believed: a letter
            // from an untrusted publisher must not become trusted by being put back. (If this
            // command dies in the instant between the commit and this publish, that letter
            // is lost: the one window left, and only when a queue is deleted mid-replay.)
            func putBack(_ body: [UInt8], _ original: AMQPProperties, trusted: Bool, what: String, reason: String) async throws {
                var properties = original
                properties.userId = target.amqp.user  // the broker checks it against our login
                if !trusted, var headers = properties.headers {
                    for key in headers.keys where key.hasPrefix("aq-") || key == "retry-tier" { headers[key] = nil }
                    properties.headers = headers
                }
                _ = try await helper.publish(body, routingKey: spec.deadLetterQueue, properties: properties)
                failed += 1
                problem("\(what): no queue took the copy (\(reason)); the dead letter was put back")
            }
            for entry in entries {
                guard let index = returned.firstIndex(where: {
                    $0.exchange == entry.exchange && $0.routingKey == entry.routingKey && $0.properties.messageId == entry.messageId
                }) else { continue }
                let reason = returned.remove(at: index).replyText
                try await putBack(entry.delivery.body, entry.delivery.properties, trusted: entry.letter.trusted,
                                  what: entry.letter.taskId ?? "-", reason: reason)
            }
            // Returns that match no letter of the window (not expected): the copy itself.
            for message in returned {
                try await putBack(message.body, message.properties, trusted: false, what: message.properties.messageId ?? "-", reason: message.replyText)
            }
        }
        let scan = try await {
            try await DeadLetterReader(spec: spec, target: target).scan(remover: remover, { delivery, letter in
                guard filter.matches(letter) else { return }
                switch ReplayPlan.make(letter, delivery, spec: spec) {
                case .skip(let why):
                    skipped[why, default: 0] += 1
                case .publish(let exchange, let routingKey, var properties, let body):
                    // A batch child re-joins its batch only while it is open (its reply queue
                    // exists); an ended batch's webhook has reported it already.
                    if letter.kind == .batchChild, let batch = letter.batchId,
                       !(try await queueExists(spec.batchReplyQueueName(forBatch: batch))) {
                        skipped["a child of a batch that has ended (its webhook reported the child): publish the task by hand to run it alone", default: 0] += 1
                        return
                    }
                    // The queue the copy goes to (through aq.chain: the step's work queue).
                    let queue = exchange.isEmpty ? routingKey : spec.queueName(forWorkQueue: letter.queue ?? "")
                    guard try await queueExists(queue) else {
                        failed += 1
                        problem("\(letter.taskId ?? "-"): queue '\(queue)' does not exist; the dead letter stays")
                        return
                    }
                    if dryRun {
                        onPlanned(letter, exchange, routingKey)
                        replayed += 1
                        return
                    }
                    guard let tag = delivery.consumerTag, let channel = remover.channel(of: delivery) else { return }
                    if rate >= 0.001 {
                        let due = started + .milliseconds(Int64(Double(replayed + failed + pendingCount) * 1000 / rate))
                        if due > .now { try await Task.sleep(until: due) }
                    }
                    // Our login as user_id (the broker checks it): a bridge trusts the
                    // AsyncQueue headers of a webhook job only from a trusted user.
                    properties.userId = target.amqp.user
                    // In the channel's transaction: the copy and the ack take effect together.
                    _ = channel.beginPublish(body, exchange: exchange, routingKey: routingKey, properties: properties, mandatory: true)
                    try remover.remove(delivery)
                    pending[tag, default: []].append(Pending(delivery: delivery, letter: letter, exchange: exchange,
                                                             routingKey: routingKey, messageId: properties.messageId))
                    pendingCount += 1
                    if pending[tag, default: []].count >= window { try await commit(tag) }
                }
            }, finish: {
                // Every transaction committed before the reader's channels close.
                for tag in pending.keys.sorted() { try await commit(tag) }
            })
        }()
        await connection.close()
        let elapsed = (ContinuousClock.now - started).components
        return ReplayReport(total: scan.total, replayed: replayed, failed: failed, skipped: skipped,
                            seconds: Double(elapsed.seconds) + Double(elapsed.attoseconds) / 1e18)
    }
}

extension DeadLetter {
    /// The letter's summary as JSON (`aq dlq list --json`, the dashboard).
    public var jsonObject: [String: Any] {
        var object: [String: Any] = ["kind": self.kind.rawValue, "reason": self.reason, "bodyBytes": self.bodyBytes]
        if let v = self.taskId { object["taskId"] = v }
        if let v = self.queue { object["queue"] = v }
        if let v = self.error { object["error"] = v }
        if let v = self.status { object["status"] = v }
        if let v = self.attempts { object["attempts"] = v }
        if let v = self.deadLetteredAt { object["deadLetteredAt"] = ISO8601DateFormatter().string(from: v) }
        if let v = self.chainId { object["chainId"] = v }
        if let v = self.chainStep { object["chainStep"] = v }
        if let v = self.batchId { object["batchId"] = v }
        if let v = self.batchIndex { object["batchIndex"] = v }
        return object
    }
}
