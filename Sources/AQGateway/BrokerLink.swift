import AMQPClient
import Logging
import Synchronization

/// The gateway's one AMQP connection and its confirming channel. Connects in the background
/// (again and again while the broker is down); once connected, the client's recovery keeps it.
/// Requests made while there is no channel get 503.
final class BrokerLink: Sendable {
    private struct State {
        var connection: AMQPConnection?
        var channel: AMQPChannel?
        /// For passive declares (a missing queue closes it; the client reopens it).
        var admin: AMQPChannel?
        var closed = false
    }

    private let state = Mutex(State())
    private let configuration: AMQPConfiguration
    private let logger: Logger

    /// The login, stamped as `user_id` on what the gateway publishes (the broker checks it).
    var user: String { self.configuration.user }

    init(configuration: AMQPConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Connects, retrying every second until it does or the task is cancelled.
    func connect() async {
        var warned = false
        while !Task.isCancelled {
            do {
                let connection = try await AMQPConnection.connect(configuration: self.configuration, logger: self.logger)
                let channel = try await connection.openChannel()
                try await channel.enableConfirms()
                let admin = try await connection.openChannel()
                let keep = self.state.withLock { state -> Bool in
                    guard !state.closed else { return false }
                    state.connection = connection
                    state.channel = channel
                    state.admin = admin
                    return true
                }
                if !keep { await connection.close() }
                self.logger.info("connected to the broker")
                return
            } catch {
                if !warned { self.logger.warning("cannot reach the broker; retrying every second", metadata: ["error": "\(error)"]) }
                warned = true
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }

    /// The connection, once made (for the events consumer and the dashboard).
    var connection: AMQPConnection? {
        self.state.withLock { $0.connection }
    }

    var isReady: Bool {
        self.state.withLock { $0.connection?.isConnected ?? false }
    }

    func publish(_ body: [UInt8], exchange: String, routingKey: String, properties: AMQPProperties) async throws -> AMQPPublishResult {
        guard let channel = self.state.withLock({ $0.connection?.isConnected == true ? $0.channel : nil }) else {
            throw BrokerUnavailable()
        }
        return try await channel.publish(body, exchange: exchange, routingKey: routingKey, properties: properties, mandatory: true)
    }

    /// Whether a queue exists (a passive declare on the shared admin channel).
    func queueExists(_ name: String) async -> Bool {
        guard let admin = self.state.withLock({ $0.connection?.isConnected == true ? $0.admin : nil }) else { return false }
        do {
            _ = try await admin.declareQueue(name, passive: true)
            return true
        } catch {
            return false
        }
    }

    func close() async {
        let connection = self.state.withLock { state -> AMQPConnection? in
            state.closed = true
            defer { state.connection = nil; state.channel = nil; state.admin = nil }
            return state.connection
        }
        await connection?.close()
    }
}

struct BrokerUnavailable: Error, CustomStringConvertible {
    var description: String { "not connected to the broker" }
}
