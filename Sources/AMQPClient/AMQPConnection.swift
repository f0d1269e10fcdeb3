import Logging

/// A connection to a RabbitMQ broker (AMQP 0-9-1), over rabbitmq-c.
///
/// Each connection owns one OS thread that alone touches the rabbitmq-c state: it runs the frame
/// loop, sends heartbeats while your code is busy, tracks publisher confirms and feeds consumers.
/// Every method here is safe to call from any task.
///
/// ```swift
/// let connection = try await AMQPConnection.connect("amqp://guest:guest@127.0.0.1:5672/%2F")
/// let channel = try await connection.openChannel()
/// try await channel.declareQueue("jobs", durable: true)
/// try await channel.enableConfirms()
/// _ = try await channel.publish(Array("hello".utf8), routingKey: "jobs", properties: .init(deliveryMode: .persistent))
/// await connection.close()
/// ```
///
/// When the connection breaks (broker restart, `rabbitmqctl close_connection`, missed heartbeats)
/// it reconnects with backoff, re-declares every exchange, queue and binding declared through it,
/// reopens its channels with their confirm mode and prefetch, and resumes its consumers. Publishes
/// waiting for a confirm at that moment fail with ``AMQPError/isOutcomeUnknown`` set; deliveries
/// not yet acknowledged are redelivered by the broker.
public final class AMQPConnection: Sendable {
    let shared: ConnectionShared
    /// The connection thread as a task executor: iterate a consumer there and its deliveries
    /// reach the task without a thread hop (see ``AMQPConnectionExecutor``).
    public let executor: AMQPConnectionExecutor

    private init(shared: ConnectionShared) {
        self.shared = shared
        self.executor = AMQPConnectionExecutor(shared: shared)
    }

    deinit {
        // Nobody can reach the connection any more: let its thread close and exit.
        self.shared.mailbox.submit { driver in driver.close(waiter: nil) }
    }

    /// Connects to the broker a URL names (see ``AMQPConfiguration/init(url:)``).
    ///
    /// - Throws: ``AMQPError`` naming what was wrong: an invalid URL, an unreachable host,
    ///   wrong credentials, a virtual host that does not exist.
    public static func connect(_ url: String, connectionName: String? = nil, logger: Logger? = nil) async throws -> AMQPConnection {
        var configuration = try AMQPConfiguration(url: url)
        if let connectionName { configuration.connectionName = connectionName }
        return try await self.connect(configuration: configuration, logger: logger)
    }

    /// Connects with a configuration.
    public static func connect(configuration: AMQPConfiguration, logger: Logger? = nil) async throws -> AMQPConnection {
        let logger = logger ?? Logger(label: "asyncqueue.amqp", factory: { _ in SwiftLogNoOpLogHandler() })
        let shared = try ConnectionShared(logger: logger)
        try await ConnectionDriver.start(configuration: configuration, shared: shared)
        return AMQPConnection(shared: shared)
    }

    /// Opens a new channel.
    public func openChannel() async throws -> AMQPChannel {
        let id = try await self.shared.perform { driver throws(AMQPError) in try driver.openChannel() }
        return AMQPChannel(connection: self, id: id)
    }

    /// Closes the connection: consumers end, unconfirmed publishes fail (outcome unknown), and the
    /// connection thread exits. Never hangs on a dead peer (the close handshake has a 2 s limit).
    public func close() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let submitted = self.shared.mailbox.submit { driver in driver.close(waiter: continuation) }
            if !submitted { continuation.resume() }
        }
    }

    /// True while logged in (false while reconnecting or after close).
    public var isConnected: Bool { self.shared.status.withLock { $0.connected } }

    /// The address (cluster node) the connection is on now, or was on last.
    public var endpoint: AMQPConfiguration.Endpoint? { self.shared.status.withLock { $0.endpoint } }

    /// True while the broker blocks publishing on this connection (`connection.blocked`).
    public var isBlocked: Bool { self.shared.status.withLock { $0.blocked } }

    /// How many times the connection has logged in (1 after connect; +1 per recovery).
    public var connectCount: Int { self.shared.status.withLock { $0.connectCount } }

    /// The connection's events from now on: disconnects, recoveries, blocks, close.
    public func events() -> AsyncStream<AMQPConnectionEvent> { self.shared.events() }

    /// An identifier unique in this process, used in thread names and logs.
    public var id: Int { self.shared.id }
}
