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

func formatDate(_ date: Date?) -> String {
    guard let date else { return "-" }
    return ISO8601DateFormatter().string(from: date)
}

func summaryLine(_ counts: [String: Int]) -> String {
    counts.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
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
                    if json { return printJSON(letter.jsonObject) }
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

        func run() async throws {
            let spec = try self.files.load()
            let filter = try self.filters.filter()
            let target = try self.broker.target()
            let report = try await runReporting {
                try await DeadLetterReplay.run(spec: spec, target: target, filter: filter, rate: self.rate, window: self.window, dryRun: self.dryRun,
                                               onPlanned: { letter, exchange, routingKey in
                                                   print("\(letter.taskId ?? "-") (\(letter.kind.rawValue), \(letter.reason)) -> exchange '\(exchange)', routing key '\(routingKey)'")
                                               }, problem: { printError($0) })
            }
            let verb = self.dryRun ? "would replay" : "replayed"
            print("\(verb) \(report.replayed) of \(report.total) dead letter(s) in \(String(format: "%.1f", report.seconds)) s"
                  + (report.failed > 0 ? "; \(report.failed) could not be published (they stay)" : ""))
            for (why, count) in report.skipped.sorted(by: { $0.value > $1.value }) { print("  left \(count): \(why)") }
            if report.failed > 0 { throw ExitCode.failure }
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
