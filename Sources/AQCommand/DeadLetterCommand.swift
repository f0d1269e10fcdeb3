import AMQPClient
import AQTopology
import ArgumentParser
import Foundation

extension AQCommand {
    struct DeadLetters: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "dlq",
            abstract: "Inspect, replay and purge the dead letters (queue aq.dead).",
            discussion: """
                Every command reads aq.dead through consumers and holds what it reads unacknowledged until it ends: what it \
                does not remove goes back to the queue when its channel closes, in the order RabbitMQ requeues (aq.dead has \
                no delivery limit, so reading never costs a letter anything). It reads the letters that were there when it \
                started, once each. Two commands at once each see only what the other does not hold.
                """,
            subcommands: [List.self, Show.self, Replay.self, Purge.self])
    }
}

struct DeadLetterFilterOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Only this reason (repeatable): retries-exhausted, not-retryable, malformed, webhook-failed, delivery_limit, expired, …", valueName: "reason"))
    var reason: [String] = []
    @Option(help: ArgumentHelp("Only letters from this work queue (repeatable).", valueName: "name"))
    var queue: [String] = []
    @Option(help: ArgumentHelp("Only this task id, or ids starting with it when it ends with * (repeatable).", valueName: "id"))
    var task: [String] = []
    @Option(help: ArgumentHelp("Only letters dead-lettered since: 30m, 2h, 7d, or an ISO 8601 date.", valueName: "when"))
    var since: String?

    func filter() throws -> DeadLetterFilter {
        var since: Date?
        if let text = self.since {
            guard let date = DeadLetterFilter.parseSince(text) else {
                printError("--since: '\(text)' is neither a duration (30m, 2h, 7d) nor an ISO 8601 date")
                throw ExitCode.failure
            }
            since = date
        }
        return DeadLetterFilter(reasons: Set(self.reason), queues: Set(self.queue), tasks: self.task, since: since)
    }
}

/// Removes (acks) letters for a scan, counting them per consumer: a consumer's held letters
/// are what it has been delivered minus what was removed.
final class LetterRemover {
    /// Reader channels in transaction mode: a letter's removal and what is published on its
    /// channel (``channel(of:)``) take effect together, at that channel's commit.
    let transactional: Bool
    private(set) var removed: [String: Int] = [:]
    /// The reader channel of each consumer tag.
    var channels: [String: AMQPChannel] = [:]

    init(transactional: Bool = false) {
        self.transactional = transactional
    }

    func remove(_ delivery: AMQPDelivery) throws {
        try delivery.ack()
        // In a transaction the ack holds the letter (and its prefetch credit) until the commit.
        if !self.transactional { self.removed[delivery.consumerTag ?? "", default: 0] += 1 }
    }

    /// `count` removals on `tag`'s channel were committed.
    func committed(_ count: Int, tag: String) {
        self.removed[tag, default: 0] += count
    }

    /// The channel `delivery` came through (its ack goes there).
    func channel(of delivery: AMQPDelivery) -> AMQPChannel? {
        self.channels[delivery.consumerTag ?? ""]
    }
}

/// Reads aq.dead once through: each letter is handed to `visit`, which may remove it (through
/// the remover). Whatever is not removed returns to the queue when the channels close.
struct DeadLetterReader {
    let spec: TopologySpec
    let target: BrokerTarget

    /// The logins whose AsyncQueue headers on a letter are believed: ours (the bridge's, as the
    /// README asks) and `AQ_TRUSTED_PUBLISHERS`, as aq-bridge reads it.
    var trustedUsers: Set<String> {
        let listed = ProcessInfo.processInfo.environment["AQ_TRUSTED_PUBLISHERS"]?
            .split(whereSeparator: { $0 == "," || $0 == " " }).map(String.init) ?? []
        return Set(listed + [self.target.amqp.user])
    }

    struct Scan {
        var total = 0
        var read = 0
    }

    /// Letters one consumer may hold unacknowledged: the most a scan buffers at once.
    static let perChannel = 5_000

    /// `finish` runs before the channels close (acks sent after it would be lost).
    func scan(remover: LetterRemover = LetterRemover(), _ visit: (AMQPDelivery, DeadLetter) async throws -> Void,
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
            await connection.close()
            return scan
        } catch {
            await connection.close()
            throw error
        }
    }
}

func formatDate(_ date: Date?) -> String {
    guard let date else { return "-" }
    return ISO8601DateFormatter().string(from: date)
}

func summaryLine(_ counts: [String: Int]) -> String {
    counts.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
}

func letterJSON(_ letter: DeadLetter) -> [String: Any] {
    var object: [String: Any] = ["kind": letter.kind.rawValue, "reason": letter.reason, "bodyBytes": letter.bodyBytes]
    if let v = letter.taskId { object["taskId"] = v }
    if let v = letter.queue { object["queue"] = v }
    if let v = letter.error { object["error"] = v }
    if let v = letter.status { object["status"] = v }
    if let v = letter.attempts { object["attempts"] = v }
    if let v = letter.deadLetteredAt { object["deadLetteredAt"] = formatDate(v) }
    if let v = letter.chainId { object["chainId"] = v }
    if let v = letter.chainStep { object["chainStep"] = v }
    if let v = letter.batchId { object["batchId"] = v }
    if let v = letter.batchIndex { object["batchIndex"] = v }
    return object
}

func printJSON(_ object: Any) {
    guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]) else { return }
    print(String(decoding: data, as: UTF8.self))
}

extension AQCommand.DeadLetters {
    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List dead letters without removing them: task id, work queue, reason, status, attempts, when, the error.",
            discussion: "Ends with a summary of every matching letter by reason. --json prints one JSON object per letter, then {\"summary\": …}.")

        @OptionGroup var filters: DeadLetterFilterOptions
        @Option(help: "Show at most this many letters (0: all); the summary counts every match.")
        var limit = 50
        @Flag(help: "Print JSON lines.")
        var json = false
        @OptionGroup var files: FileOptions
        @OptionGroup var broker: BrokerOptions

        static func row(_ letter: DeadLetter) -> String {
            let error = (letter.error ?? "").replacingOccurrences(of: "\n", with: " ")
            let status = letter.status.map(String.init) ?? "-"
            let attempts = letter.attempts.map(String.init) ?? "-"
            var columns = [(letter.taskId ?? "-").padding(36), (letter.queue ?? "-").padding(12), letter.reason.padding(18)]
            columns += [status.padding(6), attempts.padding(8), formatDate(letter.deadLetteredAt).padding(20), String(error.prefix(80))]
            return columns.joined(separator: " ")
        }

        func run() async throws {
            let spec = try self.files.load()
            let filter = try self.filters.filter()
            var shown = 0
            var matching: [String: Int] = [:]
            let limit = self.limit, json = self.json
            if !json {
                let header: [String] = ["TASK ID".padding(36), "QUEUE".padding(12), "REASON".padding(18), "STATUS", "ATTEMPTS", "DEAD-LETTERED".padding(20), "ERROR"]
                print(header.joined(separator: " "))
            }
            let scan = try await runReporting {
                try await DeadLetterReader(spec: spec, target: try self.broker.target()).scan { _, letter in
                    guard filter.matches(letter) else { return }
                    matching[letter.reason, default: 0] += 1
                    guard limit == 0 || shown < limit else { return }
                    shown += 1
                    if json { return printJSON(letterJSON(letter)) }
                    print(Self.row(letter))
                }
            }
            let total = matching.values.reduce(0, +)
            if json {
                let summary: [String: Any] = ["inQueue": scan.total, "read": scan.read, "matching": total, "shown": shown, "byReason": matching]
                printJSON(["summary": summary])
            } else {
                let reasons = total > 0 ? ": " + summaryLine(matching) : ""
                print("\(scan.total) dead letter(s) in \(spec.deadLetterQueue); \(total) matching, \(shown) shown\(reasons)")
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show the dead letters of one task whole: properties, headers, body, chain or batch context.")

        @Argument(help: "The task id (a chain step's is <chain id>:<step>; a batch child's <batch id>:<index>).")
        var id: String
        @OptionGroup var files: FileOptions
        @OptionGroup var broker: BrokerOptions

        func run() async throws {
            let spec = try self.files.load()
            let id = self.id
            var found = 0
            _ = try await runReporting {
                try await DeadLetterReader(spec: spec, target: try self.broker.target()).scan { delivery, letter in
                    guard letter.taskId == id || delivery.properties.messageId == id else { return }
                    found += 1
                    Self.describe(delivery, letter)
                }
            }
            if found == 0 {
                printError("no dead letter with task id '\(id)'")
                throw ExitCode.failure
            }
        }

        static func describe(_ delivery: AMQPDelivery, _ letter: DeadLetter) {
            let p = delivery.properties
            print("dead letter \(letter.taskId ?? "-") (\(letter.kind.rawValue)): \(letter.reason)" + (letter.error.map { ": \($0)" } ?? ""))
            print("  work queue \(letter.queue ?? "-"), attempts \(letter.attempts.map(String.init) ?? "-"), last status \(letter.status.map(String.init) ?? "-"), dead-lettered \(formatDate(letter.deadLetteredAt))")
            if let chain = letter.chainId, let step = letter.chainStep {
                print("  chain \(chain), step \(step): `aq dlq replay --task \(chain):\(step)` resumes the chain there")
            }
            if let batch = letter.batchId { print("  batch \(batch), child \(letter.batchIndex.map(String.init) ?? "?")") }
            print("properties:")
            for (key, value) in [("message_id", p.messageId), ("correlation_id", p.correlationId), ("reply_to", p.replyTo), ("content_type", p.contentType),
                                 ("user_id", p.userId), ("app_id", p.appId), ("type", p.type)] {
                if let value { print("  \(key): \(value)") }
            }
            if let timestamp = p.timestamp { print("  timestamp: \(formatDate(Date(timeIntervalSince1970: TimeInterval(timestamp))))") }
            print("headers:")
            for entry in (p.headers ?? AMQPTable()).sorted(by: { $0.key < $1.key }) { print("  \(entry.key): \(Self.text(entry.value))") }
            print("body (\(delivery.body.count) bytes):")
            if let object = try? JSONSerialization.jsonObject(with: Data(delivery.body)),
               let pretty = try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]) {
                print(String(decoding: pretty, as: UTF8.self))
            } else {
                print(String(decoding: delivery.body.prefix(64 << 10), as: UTF8.self))
            }
            print("")
        }

        static func text(_ value: AMQPFieldValue) -> String {
            switch value {
            case .string(let s): return s
            case .timestamp(let t): return formatDate(Date(timeIntervalSince1970: TimeInterval(t)))
            case .array(let items): return "[" + items.map(Self.text).joined(separator: ", ") + "]"
            case .table(let table): return "{" + table.map { "\($0.key): \(Self.text($0.value))" }.joined(separator: ", ") + "}"
            default:
                if let n = value.intValue { return String(n) }
                if let b = value.boolValue { return String(b) }
                return "\(value)"
            }
        }
    }

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Publish dead letters back where they came from; each copy and the removal of its letter take effect together.",
            discussion: """
                A task goes to its work queue with a fresh attempt count; a webhook that could not be delivered goes back \
                as a webhook job (the callback does not run again); a chain step resumes its chain at that step; an outcome \
                its reply_to did not take goes to that queue again. A batch child re-joins its batch while the batch is \
                open (its outcome replaces the failure the batch counted); a child of a batch that has ended stays (the \
                batch's webhook reported it). Malformed and unrouted letters, and letters the \
                bridge rejected unread, stay: replaying them would fail the same way. Webhook jobs carry AsyncQueue headers \
                the bridge honours only from a trusted publisher: replay them with the bridge's user (or one in \
                trusted_publishers). Copies and the removal of their letters are committed together (an AMQP \
                transaction per --window letters): interrupted at any point (even kill -9), every letter is either \
                replayed and gone or untouched; run it again. A letter whose queue does not exist stays.
                """)

        @OptionGroup var filters: DeadLetterFilterOptions
        @Option(help: "At most this many letters per second (0: no limit).")
        var rate: Double = 0
        @Option(help: "Letters replayed per transaction (each commit waits for the broker's disks).")
        var window = 256
        @Flag(help: "Say what would be replayed and where; change nothing.")
        var dryRun = false
        @OptionGroup var files: FileOptions
        @OptionGroup var broker: BrokerOptions

        /// A copy published in a reader channel's open transaction, with the letter it replays.
        struct Pending {
            var delivery: AMQPDelivery
            var letter: DeadLetter
            var exchange: String
            var routingKey: String
            var messageId: String?
        }

        func run() async throws {
            let spec = try self.files.load()
            let filter = try self.filters.filter()
            let target = try self.broker.target()
            let dryRun = self.dryRun, rate = self.rate.isFinite ? min(max(self.rate, 0), 1e6) : 0, window = min(max(1, self.window), DeadLetterReader.perChannel)
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
                    printError("\(what): no queue took the copy (\(reason)); the dead letter was put back")
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
            let scan = try await runReporting {
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
                            printError("\(letter.taskId ?? "-"): queue '\(queue)' does not exist; the dead letter stays")
                            return
                        }
                        if dryRun {
                            print("\(letter.taskId ?? "-") (\(letter.kind.rawValue), \(letter.reason)) -> exchange '\(exchange)', routing key '\(routingKey)'")
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
            }
            await connection.close()
            let verb = dryRun ? "would replay" : "replayed"
            let elapsed = (ContinuousClock.now - started).components
            let seconds = Double(elapsed.seconds) + Double(elapsed.attoseconds) / 1e18
            print("\(verb) \(replayed) of \(scan.total) dead letter(s) in \(String(format: "%.1f", seconds)) s"
                  + (failed > 0 ? "; \(failed) could not be published (they stay)" : ""))
            for (why, count) in skipped.sorted(by: { $0.value > $1.value }) { print("  left \(count): \(why)") }
            if failed > 0 { throw ExitCode.failure }
        }
    }

    struct Purge: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete dead letters (those matching the filters). Without --yes, only counts them.")

        @OptionGroup var filters: DeadLetterFilterOptions
        @Flag(help: "Delete them.")
        var yes = false
        @OptionGroup var files: FileOptions
        @OptionGroup var broker: BrokerOptions

        func run() async throws {
            let spec = try self.files.load()
            let filter = try self.filters.filter()
            let yes = self.yes
            var matching: [String: Int] = [:]
            let remover = LetterRemover()
            let scan = try await runReporting {
                try await DeadLetterReader(spec: spec, target: try self.broker.target()).scan(remover: remover) { delivery, letter in
                    guard filter.matches(letter) else { return }
                    matching[letter.reason, default: 0] += 1
                    if yes { try remover.remove(delivery) }
                }
            }
            let total = matching.values.reduce(0, +)
            let detail = total > 0 ? " (" + summaryLine(matching) + ")" : ""
            guard yes else {
                print("\(total) of \(scan.total) dead letter(s) match\(detail); run again with --yes to delete them")
                if total > 0 { throw ExitCode(2) }
                return
            }
            print("deleted \(total) of \(scan.total) dead letter(s)\(detail)")
        }
    }
}

/// Runs `body`; an AMQP or other error becomes a message and exit status 1.
func runReporting<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let exit as ExitCode {
        throw exit
    } catch let error as AMQPError where error.replyCode == .notFound {
        printError("\(error.message) (is the topology applied? `aq topology apply`)")
        throw ExitCode.failure
    } catch {
        printError("\(error)")
        throw ExitCode.failure
    }
}

extension String {
    func padding(_ width: Int) -> String {
        self.count >= width ? String(self.prefix(width)) : self + String(repeating: " ", count: width - self.count)
    }
}
