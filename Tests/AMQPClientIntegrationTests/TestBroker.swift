import AMQPClient
import AQTestSupport
import Foundation
import Testing

/// The real RabbitMQ the integration tests use: `AQ_TEST_AMQP_URL`, or the private node that
/// `scripts/test` starts (`scripts/broker start`). There is no mock: a missing broker fails.
enum TestBroker {
    static var url: String { TestEnvironment.amqpURL }

    static func connect(name: String = #function, heartbeat: Int? = nil) async throws -> AMQPConnection {
        var configuration = try AMQPConfiguration(url: self.url)
        configuration.connectionName = "aq-test-\(name)-\(UUID().uuidString.prefix(8))"
        if let heartbeat { configuration.heartbeat = heartbeat }
        configuration.recovery.initialDelay = .milliseconds(50)
        configuration.recovery.maximumDelay = .milliseconds(500)
        do {
            return try await AMQPConnection.connect(configuration: configuration)
        } catch {
            throw BrokerUnavailable(description: "the integration tests need a RabbitMQ at \(AMQPConfiguration.redact(self.url)) (run scripts/test, or scripts/broker start): \(error)")
        }
    }

    static func uniqueName(_ prefix: String = "aq.test") -> String {
        "\(prefix).\(UUID().uuidString.lowercased().prefix(12))"
    }

    @discardableResult
    static func rabbitmqctl(_ arguments: String...) throws -> String {
        try TestEnvironment.rabbitmqctl(arguments: arguments)
    }

    /// The broker-side pid of the connection with the given client-provided name.
    static func connectionPid(named name: String) throws -> String? {
        let listing = try self.rabbitmqctl("-q", "list_connections", "pid", "client_properties")
        for line in listing.split(separator: "\n") where line.contains("\"\(name)\"") {
            return line.split(separator: "\t").first.map(String.init)
        }
        return nil
    }
}

struct BrokerUnavailable: Error, CustomStringConvertible {
    var description: String
}

/// Waits for an event, up to a deadline: no sleeping in tests.
func waitFor(_ what: String, timeout: Duration = .seconds(20), _ condition: @Sendable () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    Issue.record("timed out after \(timeout) waiting for \(what)")
    throw BrokerUnavailable(description: "timed out waiting for \(what)")
}

/// Takes the next delivery or fails after a deadline.
func next(_ iterator: inout AMQPConsumer.AsyncIterator, timeout: Duration = .seconds(20)) async throws -> AMQPDelivery {
    let box = IteratorBox(iterator)
    let result = try await withThrowingTaskGroup(of: AMQPDelivery?.self) { group in
        group.addTask { try await box.next() }
        group.addTask {
            try await Task.sleep(for: timeout)
            return nil
        }
        let first = try await group.next() ?? nil
        group.cancelAll()
        return first
    }
    iterator = box.iterator
    guard let result else { throw BrokerUnavailable(description: "no delivery within \(timeout)") }
    return result
}

/// Lets a task group drive an iterator. Only one task calls `next()` at a time (the timeout task
/// never touches it), and the caller reads `iterator` back after the group finished.
final class IteratorBox: @unchecked Sendable {
    var iterator: AMQPConsumer.AsyncIterator
    init(_ iterator: AMQPConsumer.AsyncIterator) { self.iterator = iterator }
    func next() async throws -> AMQPDelivery? { try await self.iterator.next() }
}
