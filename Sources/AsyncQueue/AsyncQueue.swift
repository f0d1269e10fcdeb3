import AMQPClient
import AQTopology
import Foundation
import Synchronization

/// The Swift client: publish tasks for aq-bridge, in the spirit of `aq.tasks.create(...)`.
///
/// ```swift
/// let aq = try await AsyncQueue.connect("amqp://guest:guest@127.0.0.1:5672/%2F")
/// let id = try await aq.tasks.create(
///     callbackUrl: "https://your-app.com/api/send-welcome-email",
///     payload: ["userId": 42, "email": "ada@example.com"],
///     webhookUrl: "https://your-app.com/api/on-task-failed", retries: 3)
/// ```
public final class AsyncQueue: Sendable {
    public let connection: AMQPConnection
    let channel: AMQPChannel
    let taskExchange: String
    public let tasks: Tasks
    /// Fan-out / fan-in: a batch of tasks with one webhook when all are done.
    public let batches: Batches
    /// Chaining: steps run in order, each given the previous step's result.
    public let chains: Chains

    /// - Parameters:
    ///   - taskExchange: the topology's task exchange (`aq.tasks` by default).
    ///   - workQueuePrefix: the topology's work queue prefix (`aq.work.`): `create` checks that
    ///     the queue it is asked for exists.
    public init(connection: AMQPConnection, taskExchange: String = "aq.tasks", workQueuePrefix: String = "aq.work.") async throws {
        self.connection = connection
        self.channel = try await connection.openChannel()
        try await self.channel.enableConfirms()
        self.taskExchange = taskExchange
        let directory = WorkQueueDirectory(connection: connection, prefix: workQueuePrefix)
        self.tasks = Tasks(channel: self.channel, exchange: taskExchange, queues: directory)
        self.batches = Batches(channel: self.channel, exchange: taskExchange, queues: directory)
        self.chains = Chains(channel: self.channel, exchange: taskExchange, queues: directory)
    }

    public static func connect(_ url: String, taskExchange: String = "aq.tasks", workQueuePrefix: String = "aq.work.") async throws -> AsyncQueue {
        let connection = try await AMQPConnection.connect(url, connectionName: "asyncqueue-client")
        return try await AsyncQueue(connection: connection, taskExchange: taskExchange, workQueuePrefix: workQueuePrefix)
    }

    public func close() async { await self.connection.close() }

    /// The task body on the wire.
    struct Wire<P: Encodable>: Encodable {
        var callbackUrl: String
        var payload: P
        var webhookUrl: String?
        var failureWebhookUrl: String?
        var retries: Int?
        var timeout: Double?
        var delay: Double?
        var notBefore: Double?
    }

    /// Options for a task beyond its callback and payload (see the README's wire format).
    public struct Options: Sendable {
        /// Where the outcome goes: every outcome, or only successes when `failureWebhookUrl` is set.
        public var webhookUrl: String?
        /// Where a failure goes (and only failures: set it alone to hear only about failures).
        public var failureWebhookUrl: String?
        public var retries: Int?
        /// Seconds per attempt.
        public var timeout: Double?
        /// Seconds from now before the callback may run.
        public var delay: Double?
        /// The earliest time the callback may run, at most 30 days ahead (give one of delay, notBefore).
        public var notBefore: Date?
        /// A queue the outcome is published to (the RabbitMQ RPC convention), with `correlationId`.
        /// The bridge takes only names its `reply_to_allow` prefixes allow (by default
        /// server-named `amq.gen-…` queues, direct reply-to, `reply.…` and `aq.reply.…`).
        public var replyTo: String?
        public var correlationId: String?

        public init(webhookUrl: String? = nil, failureWebhookUrl: String? = nil, retries: Int? = nil, timeout: Double? = nil,
                    delay: Double? = nil, notBefore: Date? = nil, replyTo: String? = nil, correlationId: String? = nil) {
            self.webhookUrl = webhookUrl
            self.failureWebhookUrl = failureWebhookUrl
            self.retries = retries
            self.timeout = timeout
            self.delay = delay
            self.notBefore = notBefore
            self.replyTo = replyTo
            self.correlationId = correlationId
        }
    }

    public struct Tasks: Sendable {
        let channel: AMQPChannel
        let exchange: String
        let queues: WorkQueueDirectory

        /// Publishes a task and returns its id once the broker has confirmed it.
        ///
        /// - Parameters:
        ///   - queue: the work queue (routing key), `default` unless given. A name that is not a
        ///     declared work queue is refused here (checked once per name, then cached).
        ///   - payload: any `Encodable`, POSTed as JSON to `callbackUrl`.
        ///   - retries, timeout: nil uses the work queue's defaults (timeout in seconds).
        ///   - id: the task id (AMQP `message_id`, at most 200 bytes, no control characters); a
        ///     UUID when nil. Receivers see it as `webhook-id` and `AsyncQueue-Task-Id` on every
        ///     attempt and can deduplicate with it. Creating twice with one id publishes two tasks
        ///     (both run): AsyncQueue does not deduplicate creates.
        @discardableResult
        public func create<Payload: Encodable & Sendable>(
            callbackUrl: String, payload: Payload, webhookUrl: String? = nil, failureWebhookUrl: String? = nil,
            retries: Int? = nil, timeout: Double? = nil, delay: Double? = nil, notBefore: Date? = nil,
            queue: String = "default", id: String? = nil, replyTo: String? = nil, correlationId: String? = nil
        ) async throws -> String {
            try await self.create(callbackUrl: callbackUrl, payload: payload, options: Options(
                webhookUrl: webhookUrl, failureWebhookUrl: failureWebhookUrl, retries: retries, timeout: timeout, delay: delay,
                notBefore: notBefore, replyTo: replyTo, correlationId: correlationId), queue: queue, id: id)
        }

        /// A payload given as a dictionary literal of JSON-like values.
        @discardableResult
        public func create(
            callbackUrl: String, payload: [String: JSONValue], webhookUrl: String? = nil, failureWebhookUrl: String? = nil,
            retries: Int? = nil, timeout: Double? = nil, delay: Double? = nil, notBefore: Date? = nil,
            queue: String = "default", id: String? = nil, replyTo: String? = nil, correlationId: String? = nil
        ) async throws -> String {
            try await self.create(callbackUrl: callbackUrl, payload: JSONValue.object(payload), webhookUrl: webhookUrl,
                                  failureWebhookUrl: failureWebhookUrl, retries: retries, timeout: timeout, delay: delay,
                                  notBefore: notBefore, queue: queue, id: id, replyTo: replyTo, correlationId: correlationId)
        }

        @discardableResult
        public func create<Payload: Encodable & Sendable>(
            callbackUrl: String, payload: Payload, options: Options, queue: String = "default", id: String? = nil
        ) async throws -> String {
            let id = try AsyncQueue.checkedId(id, what: "task", maxBytes: 200)
            if options.delay != nil && options.notBefore != nil {
                throw AMQPError(code: .invalidArgument, message: "give delay or notBefore, not both")
            }
            try await self.queues.check(queue)
            let body = try Self.encode(Wire(
                callbackUrl: callbackUrl, payload: payload, webhookUrl: options.webhookUrl, failureWebhookUrl: options.failureWebhookUrl,
                retries: options.retries, timeout: options.timeout, delay: options.delay,
                notBefore: options.notBefore.map { ($0.timeIntervalSince1970 * 1000).rounded() / 1000 }))
            let result = try await self.channel.publish(
                body, exchange: self.exchange, routingKey: queue,
                properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent,
                                           correlationId: options.correlationId, replyTo: options.replyTo, messageId: id,
                                           timestamp: UInt64(Date().timeIntervalSince1970), appId: "asyncqueue-swift"),
                mandatory: false)
            if case .returned(let returned) = result {
                throw AMQPError(code: .invalidArgument, message: "no work queue took the task (routing key '\(queue)'): \(returned.replyText)")
            }
            return id
        }

        static func encode<Payload: Encodable>(_ wire: Wire<Payload>) throws -> [UInt8] {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.withoutEscapingSlashes]
            return Array(try encoder.encode(wire))
        }
    }
}

extension AsyncQueue {
    /// The id given, or a UUID; refused when it would not fit the bridge's ids (AMQP's 255-byte
    /// `message_id` once suffixed) or holds control characters.
    static func checkedId(_ id: String?, what: String, maxBytes: Int) throws -> String {
        let id = id ?? UUID().uuidString.lowercased()
        guard !id.isEmpty, id.utf8.count <= maxBytes,
              !id.unicodeScalars.contains(where: { $0.value < 0x20 || (0x7F...0x9F).contains($0.value) || $0.value == 0x2028 || $0.value == 0x2029 })
        else {
            throw AMQPError(code: .invalidArgument, message: "a \(what) id must be 1 to \(maxBytes) bytes without control characters")
        }
        return id
    }

    /// One child of a batch: a task like any other, minus its id (`<batch id>:<index>`).
    public struct BatchTask<Payload: Encodable & Sendable>: Sendable, Encodable {
        public var callbackUrl: String
        public var payload: Payload
        /// A per-child webhook still works (code that counted completions itself can migrate step by step).
        public var webhookUrl: String?
        public var failureWebhookUrl: String?
        public var retries: Int?
        public var timeout: Double?
        public var delay: Double?
        /// The work queue it runs on, when not the batch's.
        public var queue: String?

        public init(callbackUrl: String, payload: Payload, webhookUrl: String? = nil, failureWebhookUrl: String? = nil,
                    retries: Int? = nil, timeout: Double? = nil, delay: Double? = nil, queue: String? = nil) {
            self.callbackUrl = callbackUrl
            self.payload = payload
            self.webhookUrl = webhookUrl
            self.failureWebhookUrl = failureWebhookUrl
            self.retries = retries
            self.timeout = timeout
            self.delay = delay
            self.queue = queue
        }
    }

    public enum Join: String, Sendable, Encodable {
        /// Wait for every child and report each (the default).
        case allSettled
        /// Fail at the first child that fails for good; children not yet started are skipped.
        case all
    }

    public struct Batches: Sendable {
        let channel: AMQPChannel
        let exchange: String
        let queues: WorkQueueDirectory

        /// Children per message: a bigger batch is sent as an opening message and parts.
        public static let childrenPerMessage = 10_000
        /// Bytes of children per message (the bridge's `max_payload_bytes` is 1 MiB by default).
        public static let bytesPerMessage = 512 * 1024

        struct Options: Encodable {
            var id: String
            var webhookUrl: String?
            var failureWebhookUrl: String?
            var join: Join?
            var deadline: Double?
            var size: Int?
        }

        struct Part: Encodable {
            var id: String
            var offset: Int
        }

        /// Creates a batch and returns its id once the broker has confirmed every message of it.
        /// aq-bridge runs the children (ids `<batch id>:<index>`) and, when the batch ends, POSTs
        /// one report to `webhookUrl`: status (`completed`, `failed`, `expired`), counts and each
        /// child's outcome in input order.
        ///
        /// - Parameters:
        ///   - join: `.allSettled` waits for every child; `.all` fails at the first failure.
        ///   - deadline: seconds; at the deadline the batch ends as `expired` with what arrived.
        ///   - failureWebhookUrl: where a failed or expired batch is reported instead.
        ///   - queue: the work queue the children run on unless a child names its own.
        ///   - id: the batch id (at most 192 bytes); a UUID when nil.
        @discardableResult
        public func create<Payload: Encodable & Sendable>(
            _ tasks: [BatchTask<Payload>], webhookUrl: String? = nil, failureWebhookUrl: String? = nil, join: Join = .allSettled,
            deadline: Double? = nil, queue: String = "default", id: String? = nil
        ) async throws -> String {
            let id = try AsyncQueue.checkedId(id, what: "batch", maxBytes: 192)
            guard !tasks.isEmpty else { throw AMQPError(code: .invalidArgument, message: "a batch needs at least one task") }
            try await self.queues.check(queue)
            for name in Set(tasks.compactMap(\.queue)) { try await self.queues.check(name) }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.withoutEscapingSlashes]
            // Messages of at most 10,000 children and 512 KiB (the bridge takes 1 MiB by default).
            var chunks: [[UInt8]] = []
            var current: [UInt8] = []
            var counts: [Int] = []
            var count = 0
            for task in tasks {
                let json = Array(try encoder.encode(task))
                if count > 0, count == Self.childrenPerMessage || current.count + json.count + 1 > Self.bytesPerMessage {
                    chunks.append(current)
                    counts.append(count)
                    current = []
                    count = 0
                }
                if !current.isEmpty { current.append(UInt8(ascii: ",")) }
                current += json
                count += 1
            }
            chunks.append(current)
            counts.append(count)
            var confirms: [AMQPPublishConfirm] = []
            var offset = 0
            for (index, chunk) in chunks.enumerated() {
                let head: [UInt8]
                if index == 0 {
                    let options = Options(id: id, webhookUrl: webhookUrl, failureWebhookUrl: failureWebhookUrl, join: join, deadline: deadline,
                                          size: chunks.count > 1 ? tasks.count : nil)
                    head = Array(#"{"batch":"#.utf8) + Array(try encoder.encode(options))
                } else {
                    head = Array(#"{"batchPart":"#.utf8) + Array(try encoder.encode(Part(id: id, offset: offset)))
                }
                let body = head + Array(#","tasks":["#.utf8) + chunk + Array("]}".utf8)
                confirms.append(self.channel.beginPublish(
                    body, exchange: self.exchange, routingKey: queue,
                    properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: index == 0 ? id : "\(id):part:\(offset)",
                                               timestamp: UInt64(Date().timeIntervalSince1970), appId: "asyncqueue-swift")))
                offset += counts[index]
            }
            for confirm in confirms { _ = try await confirm.result() }
            return id
        }
    }
}

extension AsyncQueue {
    /// One step of a chain: a callback with its own retries, timeout and work queue, or a batch
    /// (``fanOut(_:join:deadline:)``) whose report the next step receives.
    public struct ChainStep: Sendable {
        let json: [UInt8]
        let queues: [String]

        struct Plain: Encodable {
            var callbackUrl: String
            var retries: Int?
            var timeout: Double?
            var queue: String?
        }

        struct FanOut<P: Encodable & Sendable>: Encodable {
            struct Options: Encodable {
                var join: Join
                var deadline: Double?
            }
            var batch: Options
            var tasks: [BatchTask<P>]
        }

        static var encoder: JSONEncoder {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.withoutEscapingSlashes]
            return encoder
        }

        public init(callbackUrl: String, retries: Int? = nil, timeout: Double? = nil, queue: String? = nil) {
            // Encoding strings and numbers cannot fail; an empty step would be refused by the bridge.
            self.json = (try? Self.encoder.encode(Plain(callbackUrl: callbackUrl, retries: retries, timeout: timeout, queue: queue))).map { Array($0) } ?? []
            self.queues = queue.map { [$0] } ?? []
        }

        private init(json: [UInt8], queues: [String]) {
            self.json = json
            self.queues = queues
        }

        /// A step that fans out: the children run in parallel (each callback gets the chain's
        /// envelope around its own payload, with the previous step's result) and the next step
        /// receives the batch's report.
        public static func fanOut<Payload: Encodable & Sendable>(_ tasks: [BatchTask<Payload>], join: Join = .allSettled,
                                                                 deadline: Double? = nil) throws -> ChainStep {
            let json = Array(try Self.encoder.encode(FanOut(batch: .init(join: join, deadline: deadline), tasks: tasks)))
            return ChainStep(json: json, queues: tasks.compactMap(\.queue))
        }
    }

    public struct Chains: Sendable {
        let channel: AMQPChannel
        let exchange: String
        let queues: WorkQueueDirectory

        struct Options: Encodable {
            var id: String
            var webhookUrl: String?
            var failureWebhookUrl: String?
            var stepWebhookUrl: String?
        }

        /// Creates a chain and returns its id once the broker has confirmed it. aq-bridge runs
        /// the steps in order; step n's callback receives `{"chainId", "step": n, "payload",
        /// "previousResult"}`. `webhookUrl` gets the last result and every step's record;
        /// `stepWebhookUrl` hears of each step; a step that fails for good ends the chain
        /// (reported to `failureWebhookUrl`, else `webhookUrl`).
        @discardableResult
        public func create<Payload: Encodable & Sendable>(
            _ steps: [ChainStep], payload: Payload, webhookUrl: String? = nil, failureWebhookUrl: String? = nil,
            stepWebhookUrl: String? = nil, queue: String = "default", id: String? = nil
        ) async throws -> String {
            let id = try AsyncQueue.checkedId(id, what: "chain", maxBytes: 188)
            guard !id.contains(where: { $0 == "." || $0 == "*" || $0 == "#" }) else {
                throw AMQPError(code: .invalidArgument, message: "a chain id may not contain '.', '*' or '#'")
            }
            guard (1...100).contains(steps.count) else { throw AMQPError(code: .invalidArgument, message: "a chain has 1 to 100 steps") }
            try await self.queues.check(queue)
            for name in Set(steps.flatMap(\.queues)) { try await self.queues.check(name) }
            let encoder = ChainStep.encoder
            var body = Array(#"{"chain":"#.utf8) + Array(try encoder.encode(Options(id: id, webhookUrl: webhookUrl, failureWebhookUrl: failureWebhookUrl,
                                                                                  stepWebhookUrl: stepWebhookUrl)))
            body += Array(#","payload":"#.utf8) + Array(try encoder.encode(payload)) + Array(#","steps":["#.utf8)
            for (index, step) in steps.enumerated() {
                if index > 0 { body.append(UInt8(ascii: ",")) }
                body += step.json
            }
            body += Array("]}".utf8)
            try await self.channel.publish(
                body, exchange: self.exchange, routingKey: queue,
                properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: id,
                                           timestamp: UInt64(Date().timeIntervalSince1970), appId: "asyncqueue-swift"))
            return id
        }
    }
}

/// Which work queues exist, asked of the broker once per name (a passive declare) and
/// remembered, so a typo is an error at `create` instead of a task parked in the unrouted queue.
final class WorkQueueDirectory: Sendable {
    let connection: AMQPConnection
    let prefix: String
    private let known = Mutex<Set<String>>([])
    private let checker = Mutex<AMQPChannel?>(nil)

    init(connection: AMQPConnection, prefix: String) {
        self.connection = connection
        self.prefix = prefix
    }

    func check(_ queue: String) async throws {
        if self.known.withLock({ $0.contains(queue) }) { return }
        let channel: AMQPChannel
        if let existing = self.checker.withLock({ $0 }) {
            channel = existing
        } else {
            channel = try await self.connection.openChannel()
            self.checker.withLock { $0 = channel }
        }
        do {
            try await channel.declareQueue(self.prefix + queue, passive: true)
        } catch let error as AMQPError where error.replyCode == .notFound {
            throw AMQPError(code: .invalidArgument, message: "'\(queue)' is not a work queue (no queue \(self.prefix + queue) on the broker; see topology/)")
        }
        _ = self.known.withLock { $0.insert(queue) }
    }
}
