import AMQPClient
import AQTopology
import ArgumentParser
import Foundation

extension AQCommand {
    struct Events: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Watch aq-bridge's lifecycle events (exchange aq.events).", subcommands: [Tail.self])
    }
}

extension AQCommand.Events {
    struct Tail: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print lifecycle events as they happen.",
            discussion: """
                Binds a queue of its own (server-named, gone when the command ends) to aq.events with each --filter, a \
                topic pattern on <event>.<work queue>: task.failed.# (failures anywhere), #.reports (one work queue), \
                chain.# (chains). The bridges publish what their `events` setting asks for: failures (the default) or all. \
                Exit status: 0 after --count events or --timeout seconds, 1 a problem.
                """)

        @Option(help: ArgumentHelp("A topic pattern on <event>.<work queue> (repeatable; default #).", valueName: "pattern"))
        var filter: [String] = []
        @Option(help: "Stop after this many events (0: never).")
        var count = 0
        @Option(help: "Stop after this many seconds (0: never).")
        var timeout: Double = 0
        @Flag(help: "Print each event's JSON as it came.")
        var json = false
        @OptionGroup var files: FileOptions
        @OptionGroup var broker: BrokerOptions

        func run() async throws {
            let spec = try self.files.load()
            let target = try self.broker.target()
            let filters = self.filter.isEmpty ? ["#"] : self.filter
            let count = self.count, timeout = seconds(self.timeout), json = self.json
            try await runReporting {
                try await withConnection(target) { connection in
                    let channel = try await connection.openChannel()
                    let queue = try await channel.declareQueue("", durable: false, exclusive: true, autoDelete: true)
                    for pattern in filters { try await channel.bindQueue(queue.name, to: spec.eventsExchange, routingKey: pattern) }
                    printError("watching \(spec.eventsExchange) for \(filters.joined(separator: ", "))")
                    let consumer = try await channel.consume(queue.name, exclusive: true, noAck: true)
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        group.addTask {
                            var seen = 0
                            for try await event in consumer {
                                // Written at once (not through print's buffer): a pipe reader sees each event live.
                                FileHandle.standardOutput.write(Data(((json ? event.bodyString : Self.line(event.body)) + "\n").utf8))
                                seen += 1
                                if count > 0, seen >= count { return }
                            }
                        }
                        if timeout > 0 {
                            group.addTask { try await Task.sleep(for: .milliseconds(Int64(timeout * 1000))) }
                        }
                        try await group.next()
                        group.cancelAll()
                    }
                }
            }
        }

        /// `2026-12-01T22:30:11.123Z task.failed default t-1 attempt=3 durationMs=12 reason=…`.
        static func line(_ body: [UInt8]) -> String {
            guard let object = try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any] else { return String(decoding: body, as: UTF8.self) }
            let at = (object["at"] as? Double).map { Date(timeIntervalSince1970: $0 / 1000) } ?? Date()
            let formatter = ISO8601DateFormatter()
            formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            var parts = [formatter.string(from: at), object["event"] as? String ?? "?", object["queue"] as? String ?? "-", object["taskId"] as? String ?? "-"]
            for (key, value) in object.sorted(by: { $0.key < $1.key }) where !["at", "event", "queue", "taskId"].contains(key) {
                parts.append("\(key)=\(value)")
            }
            return parts.joined(separator: " ")
        }
    }
}
