import AMQPClient
import Foundation
import Synchronization
import Testing

@Suite(.timeLimit(.minutes(2))) struct RecoveryTests {
    /// A list of addresses (a cluster's nodes): a dead one is passed over when connecting and
    /// when recovering, and the connection says which one it is on.
    @Test func aDeadAddressInTheListIsPassedOverAtConnectAndAtRecovery() async throws {
        let real = try AMQPConfiguration(url: TestBroker.url)
        let name = "aq-test-endpoints-\(UUID().uuidString.prefix(8))"
        // Port 1 on loopback: nothing listens there; the connect is refused at once.
        let list = "amqp://\(real.user):\(real.password)@127.0.0.1:1/%2F \(TestBroker.url)"
        var configuration = try AMQPConfiguration(url: list)
        configuration.connectionName = name
        configuration.recovery.initialDelay = .milliseconds(50)
        #expect(configuration.endpoints.count == 2)
        let connection = try await AMQPConnection.connect(configuration: configuration)
        #expect(connection.endpoint == .init(host: real.host, port: real.port))
        let events = connection.events()
        let pid = try #require(try TestBroker.connectionPid(named: name))
        try TestBroker.rabbitmqctl("close_connection", pid, "test: node went away")
        var sawDisconnect = false
        for await event in events {
            if case .disconnected = event { sawDisconnect = true }
            if case .connected = event, sawDisconnect { break }
        }
        #expect(connection.isConnected)
        #expect(connection.endpoint == .init(host: real.host, port: real.port))
        await connection.close()

        // No address answers: one error names every attempt.
        do {
            _ = try await AMQPConnection.connect(configuration: try AMQPConfiguration(url: "amqp://127.0.0.1:1 amqp://127.0.0.1:2"))
            Issue.record("connected to nothing")
        } catch let error as AMQPError {
            #expect(error.message.contains("any of 2 brokers"), "\(error.message)")
            #expect(error.message.contains("127.0.0.1:1") && error.message.contains("127.0.0.1:2"), "\(error.message)")
        }
    }

    @Test func closedByTheBrokerItReconnectsRedeclaresAndConsumptionContinues() async throws {
        let name = "aq-test-recovery-\(UUID().uuidString.prefix(8))"
        var configuration = try AMQPConfiguration(url: TestBroker.url)
        configuration.connectionName = name
        configuration.recovery.initialDelay = .milliseconds(50)
        let connection = try await AMQPConnection.connect(configuration: configuration)
        let events = connection.events()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        try await channel.setPrefetch(10)
        // An auto-delete queue vanishes with the connection: recovery must declare it again.
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, durable: false, autoDelete: true)
        try await channel.bindQueue(queue, to: "amq.direct", routingKey: queue)
        var deliveries = try await channel.consume(queue).makeAsyncIterator()
        try await channel.publish("before", exchange: "amq.direct", routingKey: queue)
        let before = try await next(&deliveries)
        #expect(before.bodyString == "before")
        try before.ack()

        let pid = try #require(try TestBroker.connectionPid(named: name))
        try TestBroker.rabbitmqctl("close_connection", pid, "test: forced close")

        var sawDisconnect = false
        for await event in events {
            if case .disconnected(let error) = event {
                #expect(error.code == .connectionClosedByServer)
                #expect(error.replyCode == .connectionForced)
                sawDisconnect = true
            }
            if case .connected = event, sawDisconnect { break }
        }
        #expect(connection.connectCount == 2)
        #expect(connection.isConnected)

        // The same channel handle publishes; the same consumer sequence receives.
        #expect(try await channel.publish("after", exchange: "amq.direct", routingKey: queue) == .confirmed)
        let after = try await next(&deliveries)
        #expect(after.bodyString == "after")
        try after.ack()
        await connection.close()
    }

    @Test func aBusyApplicationKeepsItsConnectionThroughHeartbeats() async throws {
        let connection = try await TestBroker.connect(heartbeat: 2)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        try await channel.setPrefetch(1)
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        var deliveries = try await channel.consume(queue).makeAsyncIterator()
        try await channel.publish("first", routingKey: queue)
        let first = try await next(&deliveries)

        // Ten seconds of work that never yields to the AMQP library: 5 heartbeat intervals.
        let busy = ContinuousClock.now
        while ContinuousClock.now - busy < .seconds(10) {
            usleep(500_000)  // blocks this thread, like CPU-bound work would
        }
        try first.ack()
        try await channel.publish("second", routingKey: queue)
        let second = try await next(&deliveries)
        #expect(second.bodyString == "second")
        try second.ack()
        #expect(connection.connectCount == 1, "the connection never dropped")
        #expect(connection.isConnected)
        await connection.close()
    }

    @Test func deletingAConsumedQueueEndsTheSequenceWithAnError() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, durable: false)
        let consumer = try await channel.consume(queue)
        let other = try await connection.openChannel()
        try await other.deleteQueue(queue)
        let error = await #expect(throws: AMQPError.self) {
            for try await _ in consumer {}
        }
        #expect(error?.code == .consumerCancelled)
        #expect(error?.message.contains(queue) == true)
        await connection.close()
    }

    @Test func cancellingAConsumerEndsTheSequenceCleanly() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        let consumer = try await channel.consume(queue)
        try await consumer.cancel()
        var count = 0
        for try await _ in consumer { count += 1 }
        #expect(count == 0)
        // The channel stays usable.
        try await channel.publish("x", routingKey: queue)
        await connection.close()
    }

    @Test func closeIsCleanAndLaterCallsFailClearly() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        let consumer = try await channel.consume(queue)
        await connection.close()
        var count = 0
        for try await _ in consumer { count += 1 }
        #expect(count == 0)
        #expect(!connection.isConnected)
        let error = await #expect(throws: AMQPError.self) { try await channel.publish("x", routingKey: queue) }
        #expect(error?.code == .connectionClosed)
        await connection.close()  // twice is fine
    }

    @Test func blockedConnectionHoldsPublishesUntilUnblocked() async throws {
        let connection = try await TestBroker.connect()
        let events = connection.events()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        try TestBroker.rabbitmqctl("set_vm_memory_high_watermark", "0.000001")
        do {
            // The broker blocks a connection when it next publishes during an alarm.
            let first = channel.beginPublish(Array("during alarm".utf8), routingKey: queue)
            for await event in events {
                if case .blocked = event { break }
            }
            #expect(connection.isBlocked)
            let held = channel.beginPublish(Array("held".utf8), routingKey: queue)
            try TestBroker.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
            #expect(try await first.result() == .confirmed)
            #expect(try await held.result() == .confirmed)
            #expect(!connection.isBlocked)
        } catch {
            _ = try? TestBroker.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
            throw error
        }
        #expect(try await channel.declareQueue(queue, passive: true).messageCount == 2)
        await connection.close()
    }
}

/// Thread-hosted consumers whose deliveries arrive while a recovered connection is still
/// restoring the next consumers: they are settled on the spot, not left unacknowledged.
@Suite(.timeLimit(.minutes(2))) struct RestoreDispatchTests {
    @Test func deliveriesDuringRestoreCanBeAcked() async throws {
        let name = "aq-test-restore-\(UUID().uuidString.prefix(8))"
        var configuration = try AMQPConfiguration(url: TestBroker.url)
        configuration.connectionName = name
        configuration.recovery.initialDelay = .milliseconds(50)
        let connection = try await AMQPConnection.connect(configuration: configuration)
        let setup = try await connection.openChannel()
        try await setup.enableConfirms()
        let queues = (0..<3).map { _ in TestBroker.uniqueName() }
        for queue in queues { try await setup.declareQueue(queue, durable: true) }
        defer { Task { for queue in queues { _ = try? await setup.deleteQueue(queue) } } }
        let acked = Mutex(0)
        let events = connection.events()
        try await connection.withThreadContext { context in
            let channel = try context.openChannel()
            try context.setPrefetch(channel: channel, count: 500)
            for queue in queues {
                _ = try context.consume(channel: channel, queue: queue, handler: { delivery in
                    context.ack(delivery)  // at once, on the connection thread
                    acked.withLock { $0 += 1 }
                }, onEnd: { _ in })
            }
        }
        // A backlog in the first queue, then the broker drops the connection: on recovery its
        // consumer starts first, and its deliveries arrive while the other two still start.
        let pid = try #require(try TestBroker.connectionPid(named: name))
        let publisher = try await TestBroker.connect()
        let publish = try await publisher.openChannel()
        try await publish.enableConfirms()
        try TestBroker.rabbitmqctl("close_connection", pid, "test: recovery with a backlog")
        var confirms: [AMQPPublishConfirm] = []
        for index in 0..<2000 { confirms.append(publish.beginPublish(Array("m\(index)".utf8), routingKey: queues[0])) }
        for confirm in confirms { _ = try await confirm.result() }
        for await event in events { if case .connected = event { break } }
        try await waitFor("every delivery acked", timeout: .seconds(30)) { acked.withLock { $0 } >= 2000 }
        // Acked means gone: nothing is left unacknowledged on the live channel.
        try await waitFor("the queue to be empty") { try await publish.declareQueue(queues[0], passive: true).messageCount == 0 }
        let unacked = try TestBroker.rabbitmqctl("-q", "list_queues", "name", "messages_unacknowledged")
            .split(separator: "\n").first { $0.hasPrefix(queues[0]) }
        #expect(unacked?.hasSuffix("\t0") == true, "\(unacked ?? "")")
        await publisher.close()
        await connection.close()
    }
}
