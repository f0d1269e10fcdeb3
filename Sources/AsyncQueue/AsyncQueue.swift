import AMQPClient
import AQTopology
import Foundation

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

    /// - Parameter taskExchange: the topology's task exchange (`aq.tasks` by default).
    public init(connection: AMQPConnection, taskExchange: String = "aq.tasks") async throws {
        self.connection = connection
        self.channel = try await connection.openChannel()
        try await self.channel.enableConfirms()
        self.taskExchange = taskExchange
        self.tasks = Tasks(channel: self.channel, exchange: taskExchange)
    }

    public static func connect(_ url: String, taskExchange: String = "aq.tasks") async throws -> AsyncQueue {
        let connection = try await AMQPConnection.connect(url, connectionName: "asyncqueue-client")
        return try await AsyncQueue(connection: connection, taskExchange: taskExchange)
    }

    public func close() async { await self.connection.close() }

    /// The task body on the wire.
    struct Wire<P: Encodable>: Encodable {
        var callbackUrl: String
        var payload: P
        var webhookUrl: String?
        var retries: Int?
        var timeout: Double?
    }

    public struct Tasks: Sendable {
        let channel: AMQPChannel
        let exchange: String

        /// Publishes a task and returns its id once the broker has confirmed it.
        ///
        /// - Parameters:
        ///   - queue: the work queue (routing key), `default` unless given.
        ///   - payload: any `Encodable`, POSTed as JSON to `callbackUrl`.
        ///   - retries, timeout: nil uses the work queue's defaults (timeout in seconds).
        ///   - id: the task id (AMQP `message_id`, at most 200 bytes, no control characters); a
        ///     UUID when nil. Receivers see it as `webhook-id` and `AsyncQueue-Task-Id` on every
        ///     attempt and can deduplicate with it. Creating twice with one id publishes two tasks
        ///     (both run): AsyncQueue does not deduplicate creates.
        @discardableResult
        public func create<Payload: Encodable & Sendable>(
            callbackUrl: String, payload: Payload, webhookUrl: String? = nil, retries: Int? = nil,
            timeout: Double? = nil, queue: String = "default", id: String? = nil
        ) async throws -> String {
            let id = id ?? UUID().uuidString.lowercased()
            guard !id.isEmpty, id.utf8.count <= 200,
                  !id.unicodeScalars.contains(where: { $0.value < 0x20 || (0x7F...0x9F).contains($0.value) || $0.value == 0x2028 || $0.value == 0x2029 })
            else {
                throw AMQPError(code: .invalidArgument, message: "a task id must be 1 to 200 bytes without control characters")
            }
            let body = try Self.encode(callbackUrl: callbackUrl, payload: payload, webhookUrl: webhookUrl, retries: retries, timeout: timeout)
            let result = try await self.channel.publish(
                body, exchange: self.exchange, routingKey: queue,
                properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: id,
                                           timestamp: UInt64(Date().timeIntervalSince1970), appId: "asyncqueue-swift"),
                mandatory: false)
            if case .returned(let returned) = result {
                throw AMQPError(code: .invalidArgument, message: "no work queue took the task (routing key '\(queue)'): \(returned.replyText)")
            }
            return id
        }

        /// A payload given as a dictionary literal of JSON-like values.
        @discardableResult
        public func create(
            callbackUrl: String, payload: [String: JSONValue], webhookUrl: String? = nil, retries: Int? = nil,
            timeout: Double? = nil, queue: String = "default", id: String? = nil
        ) async throws -> String {
            try await self.create(callbackUrl: callbackUrl, payload: JSONValue.object(payload), webhookUrl: webhookUrl,
                                  retries: retries, timeout: timeout, queue: queue, id: id)
        }

        static func encode<Payload: Encodable>(callbackUrl: String, payload: Payload, webhookUrl: String?, retries: Int?, timeout: Double?) throws -> [UInt8] {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.withoutEscapingSlashes]
            return Array(try encoder.encode(Wire(callbackUrl: callbackUrl, payload: payload, webhookUrl: webhookUrl, retries: retries, timeout: timeout)))
        }
    }
}
