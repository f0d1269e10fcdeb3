import AMQPClient
import AQTopology
import ArgumentParser
import Foundation

extension AQCommand {
    struct Tasks: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create tasks from a shell or a script.", subcommands: [CreateTask.self])
    }

    struct Batches: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create batches (fan-out / fan-in) from a shell or a script.",
                                                        subcommands: [CreateMessage.self])
    }

    struct Chains: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create chains from a shell or a script.", subcommands: [CreateMessage.self])
    }
}

/// Reads JSON from a flag, a file, or standard input (`-`).
func readJSON(text: String?, file: String?, what: String) throws -> Any? {
    let data: Data
    if let text {
        data = Data(text.utf8)
    } else if let file {
        if file == "-" {
            data = FileHandle.standardInput.readDataToEndOfFile()
        } else {
            guard let read = FileManager.default.contents(atPath: file) else {
                printError("\(what): cannot read '\(file)'")
                throw ExitCode.failure
            }
            data = read
        }
    } else {
        return nil
    }
    do {
        return try JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed])
    } catch {
        printError("\(what) is not JSON: \(error.localizedDescription)")
        throw ExitCode.failure
    }
}

/// A number of seconds from the command line, kept to what a sleep can take (0 to 30 days).
func seconds(_ value: Double) -> Double { value.isFinite ? min(max(value, 0), 30 * 86_400) : 30 * 86_400 }

/// The body of the first message from `consumer` that `matches`, or nil after `seconds`.
func firstBody(from consumer: AMQPConsumer, within seconds: Double,
               where matches: @escaping @Sendable (AMQPDelivery) -> Bool) async throws -> [UInt8]? {
    try await withThrowingTaskGroup(of: [UInt8]?.self) { group in
        group.addTask {
            for try await message in consumer where matches(message) { return message.body }
            return nil
        }
        group.addTask {
            try await Task.sleep(for: .milliseconds(Int64(seconds * 1000)))
            return nil
        }
        let first = try await group.next() ?? nil
        group.cancelAll()
        return first
    }
}

/// Runs `body` with a connection, closed after it whatever happens.
func withConnection<T>(_ target: BrokerTarget, _ body: (AMQPConnection) async throws -> T) async throws -> T {
    let connection = try await AMQPConnection.connect(configuration: target.amqp)
    do {
        let value = try await body(connection)
        await connection.close()
        return value
    } catch {
        await connection.close()
        throw error
    }
}

/// Publishes one message to `aq.tasks` (confirmed, mandatory) with a work queue as routing key.
func publishCreate(_ body: [UInt8], queue: String, id: String, replyTo: String? = nil, spec: TopologySpec,
                   channel: AMQPChannel) async throws {
    guard spec.workQueues.contains(where: { $0.name == queue }) else {
        printError("'\(queue)' is not a work queue in the topology files (known: \(spec.workQueues.map(\.name).joined(separator: ", ")))")
        throw ExitCode.failure
    }
    try await channel.enableConfirms()
    let properties = AMQPProperties(contentType: "application/json", deliveryMode: .persistent, correlationId: replyTo == nil ? nil : id,
                                    replyTo: replyTo, messageId: id, timestamp: UInt64(Date().timeIntervalSince1970), appId: "aq-cli")
    let result = try await channel.publish(body, exchange: spec.taskExchange, routingKey: queue, properties: properties, mandatory: true)
    if case .returned(let returned) = result {
        printError("no queue took the message (\(returned.replyText)): is the topology applied? (`aq topology apply`)")
        throw ExitCode.failure
    }
}

extension AQCommand.Tasks {
    struct CreateTask: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create",
            abstract: "Publish one task (confirmed by the broker) and print its id.",
            discussion: """
                The payload comes from --payload (JSON text), --payload-file FILE, or --payload-file - (standard input); \
                {} when none is given. With --wait, the command waits for the outcome through a reply queue of its own \
                (reply_to; the bridge's reply_to_allow admits server-named queues by default) and prints it. \
                Exit status: 0 published (with --wait: completed), 1 a problem (with --wait: the task failed), \
                3 --wait timed out (the task goes on).
                """)

        @Option(help: "The URL the bridge POSTs the payload to.")
        var callbackUrl: String
        @Option(help: "The payload as JSON text.")
        var payload: String?
        @Option(help: ArgumentHelp("Read the payload from this file (- for standard input).", valueName: "file"))
        var payloadFile: String?
        @Option(help: "Where the outcome is POSTed.")
        var webhookUrl: String?
        @Option(help: "Where a failure is POSTed instead.")
        var failureWebhookUrl: String?
        @Option(help: "Retries after the first attempt (default: the work queue's).")
        var retries: Int?
        @Option(help: "Seconds per attempt (default: the work queue's).")
        var timeout: Double?
        @Option(help: "Seconds to wait before the first attempt.")
        var delay: Double?
        @Option(help: "The work queue.")
        var queue = "default"
        @Option(help: "The task id (default: a UUID).")
        var id: String?
        @Flag(help: "Wait for the outcome and print it.")
        var wait = false
        @Option(help: "Seconds --wait waits.")
        var waitTimeout: Double = 60
        @OptionGroup var files: FileOptions
        @OptionGroup var broker: BrokerOptions

        func run() async throws {
            let spec = try self.files.load()
            let target = try self.broker.target()
            var task: [String: Any] = ["callbackUrl": self.callbackUrl,
                                       "payload": try readJSON(text: self.payload, file: self.payloadFile, what: "the payload") ?? [String: Any]()]
            if let v = self.webhookUrl { task["webhookUrl"] = v }
            if let v = self.failureWebhookUrl { task["failureWebhookUrl"] = v }
            if let v = self.retries { task["retries"] = v }
            if let v = self.timeout { task["timeout"] = v }
            if let v = self.delay { task["delay"] = v }
            let body = Array(try JSONSerialization.data(withJSONObject: task, options: [.withoutEscapingSlashes, .fragmentsAllowed]))
            let id = self.id ?? UUID().uuidString.lowercased()
            let wait = self.wait, timeout = seconds(self.waitTimeout), queue = self.queue
            let outcome: [UInt8]? = try await runReporting { try await withConnection(target) { connection in
                let channel = try await connection.openChannel()
                guard wait else {
                    try await publishCreate(body, queue: queue, id: id, spec: spec, channel: channel)
                    return nil
                }
                // A server-named, exclusive reply queue: gone with this connection.
                let replies = try await connection.openChannel()
                let info = try await replies.declareQueue("", durable: false, exclusive: true, autoDelete: true)
                let consumer = try await replies.consume(info.name, exclusive: true, noAck: true)
                try await publishCreate(body, queue: queue, id: id, replyTo: info.name, spec: spec, channel: channel)
                printError("task \(id) published; waiting up to \(timeout) s for its outcome")
                return try await firstBody(from: consumer, within: timeout) { $0.properties.correlationId == id }
            } }
            guard wait else { return print(id) }
            guard let outcome else {
                printError("no outcome for task \(id) within \(timeout) s; it goes on (see `aq dlq show \(id)` if it fails)")
                throw ExitCode(3)
            }
            print(String(decoding: outcome, as: UTF8.self))
            let status = (try? JSONSerialization.jsonObject(with: Data(outcome)) as? [String: Any])?["status"] as? String
            if status != "completed" { throw ExitCode.failure }
        }
    }
}

/// `aq batches create` and `aq chains create`: the wire format's JSON, published as given.
struct CreateMessage: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Publish a batch or chain message (the wire format's JSON, confirmed by the broker) and print its id.",
        discussion: """
            The message comes from --json (text), --message-file FILE or --message-file - (standard input). Its id is batch.id or chain.id, \
            else --id (the message_id), else a UUID. With --wait, the command waits for the batch's or chain's end through the \
            lifecycle events (aq.events; the bridges' `events` must not be off) and prints that event. Follow a batch with \
            `aq batch status ID`. Exit status: 0 published (with --wait: completed), 1 a problem (with --wait: it failed or \
            expired), 3 --wait timed out (it goes on).
            """)

    @Option(help: "The message as JSON text.")
    var json: String?
    @Option(help: ArgumentHelp("Read the message from this file (- for standard input).", valueName: "file"))
    var messageFile: String?
    @Option(help: "The work queue it is published to.")
    var queue = "default"
    @Option(help: "The message id (the batch or chain id when the message names none).")
    var id: String?
    @Flag(help: "Wait for the end (a lifecycle event) and print it.")
    var wait = false
    @Option(help: "Seconds --wait waits.")
    var waitTimeout: Double = 300
    @OptionGroup var files: FileOptions
    @OptionGroup var broker: BrokerOptions

    func run() async throws {
        let spec = try self.files.load()
        let target = try self.broker.target()
        guard let object = try readJSON(text: self.json, file: self.messageFile, what: "the message") as? [String: Any] else {
            printError("give the message as a JSON object with --json or --message-file")
            throw ExitCode.failure
        }
        let kind = object["batch"] != nil ? "batch" : object["chain"] != nil ? "chain" : nil
        guard let kind else {
            printError("the message has neither \"batch\" nor \"chain\" (tasks: `aq tasks create`)")
            throw ExitCode.failure
        }
        let named = (object[kind] as? [String: Any])?["id"] as? String
        let id = named ?? self.id ?? UUID().uuidString.lowercased()
        let body = Array(try JSONSerialization.data(withJSONObject: object, options: [.withoutEscapingSlashes]))
        let queue = self.queue, wait = self.wait, timeout = seconds(self.waitTimeout)
        let ended: [UInt8]? = try await runReporting {
            try await withConnection(target) { connection in
                guard wait else {
                    try await publishCreate(body, queue: queue, id: id, spec: spec, channel: try await connection.openChannel())
                    return nil
                }
                // Bound before the publish, so the end cannot pass unseen.
                let events = try await connection.openChannel()
                let watch = try await events.declareQueue("", durable: false, exclusive: true, autoDelete: true)
                let ends = kind == "batch" ? ["batch.ended"] : ["chain.completed", "chain.failed"]
                for event in ends { try await events.bindQueue(watch.name, to: spec.eventsExchange, routingKey: "\(event).#") }
                let consumer = try await events.consume(watch.name, exclusive: true, noAck: true)
                try await publishCreate(body, queue: queue, id: id, spec: spec, channel: try await connection.openChannel())
                printError("\(kind) \(id) published; waiting up to \(timeout) s for its end")
                let key = kind == "batch" ? "batchId" : "chainId"
                return try await firstBody(from: consumer, within: timeout) { event in
                    (try? JSONSerialization.jsonObject(with: Data(event.body)) as? [String: Any])?[key] as? String == id
                }
            }
        }
        guard wait else { return print(id) }
        guard let ended else {
            printError("no end for \(kind) \(id) within \(timeout) s; it goes on")
            throw ExitCode(3)
        }
        print(String(decoding: ended, as: UTF8.self))
        let end = try? JSONSerialization.jsonObject(with: Data(ended)) as? [String: Any]
        let completed = kind == "batch" ? end?["status"] as? String == "completed" : end?["event"] as? String == "chain.completed"
        if !completed { throw ExitCode.failure }
    }
}
