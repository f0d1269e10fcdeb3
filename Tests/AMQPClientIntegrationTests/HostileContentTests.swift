import AMQPClient
import AQTestSupport
import Foundation
import Synchronization
import Testing

/// What one message, or one publish, can cost the connection: nothing beyond itself.
@Suite(.timeLimit(.minutes(3))) struct HostileContentTests {
    typealias Table = RawAMQPPublisher.Table

    /// A queue that dead-letters into `dead`, both gone with the connection.
    static func queueWithDeadLetters(_ channel: AMQPChannel) async throws -> (queue: String, dead: String) {
        let queue = TestBroker.uniqueName(), dead = TestBroker.uniqueName("aq.test.dead"), dlx = TestBroker.uniqueName("aq.test.dlx")
        try await channel.declareExchange(dlx, type: .fanout, autoDelete: true)
        try await channel.declareQueue(dead, exclusive: true)
        try await channel.bindQueue(dead, to: dlx)
        try await channel.declareQueue(queue, exclusive: true, arguments: ["x-dead-letter-exchange": .string(dlx)])
        return (queue, dead)
    }

    @Test func aMessageTheClientCannotReadIsRejectedAloneAndTheConnectionCarriesOn() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let (queue, dead) = try await Self.queueWithDeadLetters(channel)
        let raw = try RawAMQPPublisher(url: TestBroker.url)
        defer { raw.close() }
        func publish(_ id: String, headers: [UInt8]? = nil, body: [UInt8] = Array("{}".utf8)) throws {
            #expect(try raw.publish(exchange: "", routingKey: queue, properties: RawAMQPPublisher.Properties.make(headers: headers, messageId: id), body: body))
        }
        // An empty field name at the top and nested (rabbitmq-c's amqp_read_message refused
        // these and the connection used to drop); readable now.
        let emptyNames = Table.encode([([], Table.string("top")), (Array("inner".utf8), Table.table(Table.encode([([], Table.string("deep"))])))])
        try publish("first")
        try publish("empty-names", headers: emptyNames)
        try publish("many-fields", headers: Table.many(12_000))
        try publish("deep", headers: Table.nested(depth: 20_000))
        try publish("big-body", body: [UInt8](repeating: 0x61, count: 10_000))
        try publish("last")

        try await channel.setPrefetch(50)
        var iterator = try await channel.consume(queue, maxBodyBytes: 4096).makeAsyncIterator()
        var ids: [String] = []
        var emptyNameHeaders: AMQPTable?
        while ids.count < 3 {
            let delivery = try await next(&iterator)
            ids.append(delivery.properties.messageId ?? "?")
            if delivery.properties.messageId == "empty-names" { emptyNameHeaders = delivery.properties.headers }
            try delivery.ack()
        }
        #expect(ids == ["first", "empty-names", "last"])
        #expect(emptyNameHeaders?[""] == .string("top"))
        #expect(emptyNameHeaders?["inner"] == .table(["": .string("deep")]))
        // The three the client could not read went to the dead-letter exchange whole.
        try await waitFor("the unreadable messages in the dead-letter queue") {
            try await channel.declareQueue(dead, passive: true).messageCount == 3
        }
        #expect(connection.isConnected)
        #expect(connection.connectCount == 1, "no reconnect: a message's content never becomes a connection loss")
        await connection.close()
    }

    @Test func basicGetHandsBackAnUnreadableMessageWithItsProblem() async throws {
        var configuration = try AMQPConfiguration(url: TestBroker.url)
        configuration.contentLimits.maxHeaderFields = 100
        let connection = try await AMQPConnection.connect(configuration: configuration)
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        let raw = try RawAMQPPublisher(url: TestBroker.url)
        defer { raw.close() }
        try raw.publish(exchange: "", routingKey: queue, properties: RawAMQPPublisher.Properties.make(headers: Table.many(500), messageId: "m"), body: Array("x".utf8))
        try raw.publish(exchange: "", routingKey: queue, properties: RawAMQPPublisher.Properties.make(messageId: "ok"), body: Array("y".utf8))
        let unreadable = try #require(try await channel.get(queue))
        #expect(unreadable.contentProblem?.contains("more than 100 fields") == true, "\(unreadable.contentProblem ?? "nil")")
        #expect(unreadable.body.isEmpty)
        try unreadable.ack()
        let fine = try #require(try await channel.get(queue))
        #expect(fine.contentProblem == nil)
        #expect(fine.properties.messageId == "ok")
        #expect(fine.bodyString == "y")
        try fine.ack()
        #expect(connection.connectCount == 1)
        await connection.close()
    }

    @Test func aPublishThatDoesNotFitAMQPFailsAloneWithAClearError() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        let long = String(repeating: "k", count: 300)
        let cases: [(String, AMQPProperties, String)] = [
            ("routing key over 255 bytes", AMQPProperties(), long),
            ("message_id over 255 bytes", AMQPProperties(messageId: String(repeating: "t", count: 250) + ":result"), queue),
            ("correlation_id over 255 bytes", AMQPProperties(correlationId: long), queue),
            ("header name over 255 bytes", AMQPProperties(headers: [long: "v"]), queue),
            ("nested header name over 255 bytes", AMQPProperties(headers: ["outer": .table([long: 1])]), queue),
            ("headers that do not fit a frame", AMQPProperties(headers: ["big": .string(String(repeating: "x", count: 200_000))]), queue),
        ]
        for (what, properties, routingKey) in cases {
            // In flight beside it: an unrelated publish must not become "outcome unknown".
            let neighbour = channel.beginPublish(Array("n".utf8), routingKey: queue, properties: .init(messageId: "neighbour"))
            do {
                try await channel.publish(Array("x".utf8), routingKey: routingKey, properties: properties)
                Issue.record("\(what): the publish was sent")
            } catch let error as AMQPError {
                #expect(error.code == .invalidArgument, "\(what): \(error)")
                #expect(!error.isOutcomeUnknown, "\(what)")
            }
            #expect(try await neighbour.result() == .confirmed, "\(what)")
        }
        #expect(try await channel.publish(Array("after".utf8), routingKey: queue) == .confirmed)
        #expect(connection.isConnected)
        #expect(connection.connectCount == 1)
        await connection.close()
    }

    @Test func aReturnIsMatchedByExchangeRoutingKeyAndMessageIdTogether() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        let nowhere = TestBroker.uniqueName("nowhere")
        // Same message id: the routable one first, the unroutable one second.
        let routed = channel.beginPublish(Array("a".utf8), routingKey: queue, properties: .init(messageId: "same"), mandatory: true)
        let lost = channel.beginPublish(Array("b".utf8), routingKey: nowhere, properties: .init(messageId: "same"), mandatory: true)
        #expect(try await routed.result() == .confirmed)
        guard case .returned(let returned) = try await lost.result() else {
            Issue.record("the unroutable publish was reported confirmed")
            return
        }
        #expect(returned.routingKey == nowhere)
        #expect(returned.body == Array("b".utf8))
        await connection.close()
    }
}

/// A broker that stops answering (frozen, partitioned) with publishes in flight.
@Suite(.serialized, .timeLimit(.minutes(3))) struct FrozenPeerTests {
    static func connectThroughProxy(_ proxy: FreezableProxy) async throws -> AMQPConnection {
        var configuration = try AMQPConfiguration(url: TestBroker.url)
        configuration.host = "127.0.0.1"
        configuration.port = proxy.port
        configuration.heartbeat = 2
        configuration.rpcTimeout = .seconds(3)
        configuration.recovery.initialDelay = .milliseconds(100)
        configuration.recovery.maximumDelay = .milliseconds(500)
        return try await AMQPConnection.connect(configuration: configuration)
    }

    static func brokerEndpoint() throws -> (String, Int) {
        let configuration = try AMQPConfiguration(url: TestBroker.url)
        return (configuration.host, configuration.port)
    }

    /// Publishes `body` with confirms every few milliseconds until `stop`, keeping the confirms.
    static func publishUntilDisconnected(_ connection: AMQPConnection, _ channel: AMQPChannel, queue: String, body: [UInt8],
                                         perTick: Int = 10, maxPublishes: Int = 20_000,
                                         within timeout: Duration) async throws -> (confirms: [AMQPPublishConfirm], disconnected: Bool) {
        var confirms: [AMQPPublishConfirm] = []
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if !connection.isConnected { return (confirms, true) }
            if confirms.count < maxPublishes {
                for _ in 0..<perTick { confirms.append(channel.beginPublish(body, routingKey: queue)) }
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        return (confirms, !connection.isConnected)
    }

    @Test func heartbeatsFindAFrozenPeerWhilePublishesAreInFlight() async throws {
        let (host, port) = try Self.brokerEndpoint()
        let proxy = try FreezableProxy(targetHost: host, targetPort: port)
        defer { proxy.stop() }
        let connection = try await Self.connectThroughProxy(proxy)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, durable: false, autoDelete: true)
        #expect(try await channel.publish(Array("warm".utf8), routingKey: queue) == .confirmed)

        proxy.freeze()
        let (confirms, disconnected) = try await Self.publishUntilDisconnected(connection, channel, queue: queue, body: Array("x".utf8), within: .seconds(20))
        #expect(disconnected, "the connection never noticed the frozen peer (heartbeat 2 s)")
        // Every publish in flight has an answer: confirmed before the freeze, or outcome unknown.
        var unknown = 0
        for confirm in confirms {
            do { _ = try await confirm.result() } catch let error as AMQPError {
                #expect(error.isOutcomeUnknown || error.code == .notConnected, "\(error)")
                unknown += 1
            }
        }
        #expect(unknown > 0)
        // The thread was never stuck: the connection recovers through a fresh proxied connection.
        proxy.cutExisting()
        proxy.thaw()
        try await waitFor("recovery after the frozen peer", timeout: .seconds(20)) { connection.isConnected }
        #expect(try await channel.publish(Array("after".utf8), routingKey: queue) == .confirmed)
        await connection.close()
    }

    @Test func aFrozenPeerThatFillsTheSendBufferStillEndsInRecovery() async throws {
        let (host, port) = try Self.brokerEndpoint()
        let proxy = try FreezableProxy(targetHost: host, targetPort: port)
        defer { proxy.stop() }
        let connection = try await Self.connectThroughProxy(proxy)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, durable: false, autoDelete: true, arguments: ["x-max-length": 10])
        proxy.freeze()
        // 256 KiB per publish: the kernel buffers fill within a second and rabbitmq-c blocks in a
        // send, then in its infinite read; only the watchdog gets the thread out.
        let (_, disconnected) = try await Self.publishUntilDisconnected(
            connection, channel, queue: queue, body: [UInt8](repeating: 0x62, count: 256 << 10), perTick: 1, maxPublishes: 200,
            within: .seconds(40))
        #expect(disconnected, "the connection thread stayed stuck")
        proxy.cutExisting()
        proxy.thaw()
        try await waitFor("recovery after the frozen peer", timeout: .seconds(20)) { connection.isConnected }
        #expect(try await channel.publish(Array("after".utf8), routingKey: queue) == .confirmed)
        await connection.close()
    }
}

/// Code on the connection thread that publishes again from a publish's completion.
@Suite(.timeLimit(.minutes(1))) struct ReentrantPublishTests {
    @Test func aCompletionMayPublishOnTheSameChannel() async throws {
        let connection = try await TestBroker.connect()
        let queue = TestBroker.uniqueName()
        let channel = try await connection.openChannel()
        try await channel.declareQueue(queue, exclusive: true)
        let outcomes = Mutex<[String]>([])
        try await connection.withThreadContext { context in
            let id = try context.openChannel()
            try context.enableConfirms(channel: id)
            // A confirmed publish whose completion publishes; a returned one whose completion
            // publishes twice more (as a bridge does: a reply, then a dead letter).
            context.publish(channel: id, exchange: "", routingKey: queue, properties: AMQPProperties(), body: Array("1".utf8)) { result in
                outcomes.withLock { $0.append("1:\(result)") }
                context.publish(channel: id, exchange: "", routingKey: queue, properties: AMQPProperties(), body: Array("2".utf8)) { result in
                    outcomes.withLock { $0.append("2:\(result)") }
                }
            }
            context.publish(channel: id, exchange: "", routingKey: "no-such-queue", properties: AMQPProperties(), body: Array("3".utf8), mandatory: true) { result in
                outcomes.withLock { $0.append("3:\(result)") }
                for n in 4...5 {
                    context.publish(channel: id, exchange: "", routingKey: queue, properties: AMQPProperties(), body: Array("\(n)".utf8)) { result in
                        outcomes.withLock { $0.append("\(n):\(result)") }
                    }
                }
            }
        }
        try await waitFor("five publishes to complete") { outcomes.withLock { $0.count } == 5 }
        let all = outcomes.withLock { $0 }
        #expect(all.filter { $0.hasSuffix("confirmed)") }.count == 4, "\(all)")
        #expect(all.contains { $0.hasPrefix("3:success(AMQPClient.AMQPPublishResult.returned") }, "\(all)")
        #expect(try await channel.declareQueue(queue, passive: true).messageCount == 4)
        await connection.close()
    }
}
