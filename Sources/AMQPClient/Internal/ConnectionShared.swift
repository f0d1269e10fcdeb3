import Logging
import Synchronization

/// What the public handles share with the connection thread: the mailbox and a status snapshot.
final class ConnectionShared: Sendable {
    struct Status: Sendable {
        var connected = false
        var blocked = false
        var closed = false
        var lastError: AMQPError?
        var connectCount = 0
        /// The address of the broker (node) the connection is on, or was on last.
        var endpoint: AMQPConfiguration.Endpoint?
        var listeners: [Int: AsyncStream<AMQPConnectionEvent>.Continuation] = [:]
        var nextListener = 0
    }

    let id: Int
    let mailbox: Mailbox
    let status = Mutex(Status())
    let logger: Logger

    private static let counter = Atomic<Int>(0)

    init(logger: Logger) throws(AMQPError) {
        self.id = Self.counter.add(1, ordering: .relaxed).newValue
        self.mailbox = try Mailbox()
        self.logger = logger
    }

    /// Runs `body` on the connection thread and returns its result.
    func perform<T: Sendable>(_ body: @escaping @Sendable (ConnectionDriver) throws(AMQPError) -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            let submitted = self.mailbox.submit { driver in
                // A round trip must not wait behind a corked socket (up to 200 ms), and must come
                // after every ack given before it (a held-back ack sent after a basic.get, say, is
                // no longer ordered before it: RabbitMQ may drop it if the channel closes next).
                driver.flushAcks()
                driver.releaseHeldAcks(all: true)
                driver.uncork()
                do {
                    continuation.resume(returning: try body(driver))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
            if !submitted { continuation.resume(throwing: self.closedError()) }
        }
    }

    func closedError() -> AMQPError {
        self.status.withLock { $0.lastError } ?? .connectionClosed()
    }

    func emit(_ event: AMQPConnectionEvent) {
        let listeners = self.status.withLock { status -> [AsyncStream<AMQPConnectionEvent>.Continuation] in
            switch event {
            case .connected: status.connected = true; status.connectCount += 1
            case .disconnected(let error): status.connected = false; status.blocked = false; status.lastError = error
            case .blocked: status.blocked = true
            case .unblocked: status.blocked = false
            case .closed: status.connected = false; status.closed = true
            }
            return Array(status.listeners.values)
        }
        for listener in listeners {
            listener.yield(event)
            if case .closed = event { listener.finish() }
        }
    }

    func events() -> AsyncStream<AMQPConnectionEvent> {
        let (stream, continuation) = AsyncStream.makeStream(of: AMQPConnectionEvent.self, bufferingPolicy: .bufferingNewest(64))
        let key: Int? = self.status.withLock { status in
            if status.closed { return nil }
            let key = status.nextListener
            status.nextListener += 1
            status.listeners[key] = continuation
            return key
        }
        if let key {
            continuation.onTermination = { [weak self] _ in
                _ = self?.status.withLock { $0.listeners.removeValue(forKey: key) }
            }
        } else {
            continuation.yield(.closed)
            continuation.finish()
        }
        return stream
    }
}

/// Changes in a connection's state, for readiness checks and logs.
public enum AMQPConnectionEvent: Sendable {
    /// Logged in (first time or after recovery; topology and consumers are restored).
    case connected
    /// The connection broke; recovery (if enabled) is under way.
    case disconnected(AMQPError)
    /// The broker blocked publishing (memory or disk alarm); publishes are held until unblocked.
    case blocked(reason: String)
    case unblocked
    /// The connection is closed for good.
    case closed
}
