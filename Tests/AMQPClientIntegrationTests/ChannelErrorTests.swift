import AMQPClient
import AQTestSupport
import Foundation
import Testing

@Suite(.timeLimit(.minutes(1))) struct ChannelErrorTests {
    @Test func publishToAMissingExchangeFailsThatPublishAndTheChannelWorksAgain() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let missing = TestBroker.uniqueName("missing")
        let error = await #expect(throws: AMQPError.self) {
            try await channel.publish("x", exchange: missing, routingKey: "k")
        }
        #expect(error?.code == .channelClosedByServer)
        #expect(error?.replyCode == .notFound)
        #expect(error?.isOutcomeUnknown == true)
        #expect(error?.replyText?.contains(missing) == true)

        // Reopened with confirm mode: publishing and declaring work again.
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        #expect(try await channel.publish("y", routingKey: queue) == .confirmed)
        await connection.close()
    }

    @Test func anAsynchronousErrorWithoutConfirmsSurfacesOnTheNextOperation() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        // No confirms: the publish returns at once; the broker's 404 arrives later.
        #expect(try await channel.publish("x", exchange: TestBroker.uniqueName("missing"), routingKey: "k") == .sent)
        try await waitFor("the broker's channel.close to arrive") {
            do {
                try await channel.declareQueue(TestBroker.uniqueName(), exclusive: true)
                return false
            } catch let error as AMQPError {
                #expect(error.code == .channelClosedByServer)
                #expect(error.replyCode == .notFound)
                #expect(error.method == "basic.publish")
                return true
            }
        }
        try await channel.declareQueue(TestBroker.uniqueName(), exclusive: true)
        await connection.close()
    }

    @Test func inequivalentRedeclareIsRefusedAndTheChannelRecovers() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true, arguments: ["x-max-length": 10])
        let error = await #expect(throws: AMQPError.self) {
            try await channel.declareQueue(queue, exclusive: true, arguments: ["x-max-length": 20])
        }
        #expect(error?.code == .channelClosedByServer)
        #expect(error?.replyCode == .preconditionFailed)
        #expect(error?.message.contains("declaring queue '\(queue)'") == true)
        #expect(error?.replyText?.contains("x-max-length") == true)
        try await channel.declareQueue(queue, exclusive: true, arguments: ["x-max-length": 10])
        await connection.close()
    }

    @Test func passiveDeclareOfAMissingQueueIsNotFound() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let error = await #expect(throws: AMQPError.self) {
            try await channel.declareQueue(TestBroker.uniqueName("absent"), passive: true)
        }
        #expect(error?.replyCode == .notFound)
        let exchangeError = await #expect(throws: AMQPError.self) {
            try await channel.declareExchange(TestBroker.uniqueName("absent"), type: .direct, passive: true)
        }
        #expect(exchangeError?.replyCode == .notFound)
        let bindError = await #expect(throws: AMQPError.self) {
            try await channel.bindQueue(TestBroker.uniqueName("absent"), to: "amq.direct", routingKey: "x")
        }
        #expect(bindError?.replyCode == .notFound)
        // A name RabbitMQ reserves.
        let reserved = await #expect(throws: AMQPError.self) {
            try await channel.declareQueue("amq.mine")
        }
        #expect(reserved?.replyCode == .accessRefused)
        #expect(try await channel.declareQueue("", exclusive: true).name.hasPrefix("amq.gen-"))
        await connection.close()
    }

    @Test func acksHeldBackBehindAnUnfinishedDeliveryAreSentBeforeTheChannelCloses() async throws {
        let connection = try await TestBroker.connect()
        let publisher = try await connection.openChannel()
        try await publisher.enableConfirms()
        let queue = TestBroker.uniqueName()
        try await publisher.declareQueue(queue, exclusive: true)
        for body in ["1", "2", "3"] { try await publisher.publish(body, routingKey: queue) }
        let consumer = try await connection.openChannel()
        try await consumer.setPrefetch(10)
        var received: [AMQPDelivery] = []
        for try await delivery in try await consumer.consume(queue) {
            received.append(delivery)
            if received.count == 3 { break }
        }
        // 2 and 3 are done while 1 is not: their acks are held back (waiting for 1's) ...
        try received[1].ack()
        try received[2].ack()
        // ... and go out before the close, which requeues only 1.
        try await consumer.close()
        let left = try #require(try await publisher.get(queue))
        #expect(left.bodyString == "1")
        try left.ack()
        #expect(try await publisher.get(queue) == nil)
        await connection.close()
    }

    @Test func ackingAStaleTagDoesNotKillTheChannel() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        try await channel.publish("a", routingKey: queue)
        let delivery = try #require(try await channel.get(queue))
        // Break the channel (404), so it is reopened and the delivery's tag is dead.
        _ = try? await channel.publish("x", exchange: TestBroker.uniqueName("missing"), routingKey: "k")
        try delivery.ack()  // dropped: the broker already requeued it
        let again = try #require(try await channel.get(queue))
        #expect(again.isRedelivered)
        try again.ack()
        #expect(try await channel.get(queue) == nil)
        await connection.close()
    }
}

@Suite(.timeLimit(.minutes(1))) struct ConnectErrorTests {
    private func connectError(_ url: String) async -> AMQPError? {
        do {
            var configuration = try AMQPConfiguration(url: url)
            configuration.connectTimeout = .seconds(3)
            let connection = try await AMQPConnection.connect(configuration: configuration)
            await connection.close()
            return nil
        } catch let error as AMQPError {
            return error
        } catch {
            return nil
        }
    }

    private var base: AMQPConfiguration { get throws { try AMQPConfiguration(url: TestBroker.url) } }

    @Test func wrongCredentials() async throws {
        let b = try self.base
        let error = await self.connectError("amqp://guest:wrong-password@\(b.host):\(b.port)/%2F")
        #expect(error?.code == .authenticationFailed)
        #expect(error?.message.contains("guest") == true)
        #expect(error?.message.contains("wrong-password") == false)
    }

    @Test func unknownVirtualHost() async throws {
        let b = try self.base
        let error = await self.connectError("amqp://guest:guest@\(b.host):\(b.port)/no-such-vhost")
        #expect(error?.code == .accessRefused)
        #expect(error?.message.contains("no-such-vhost") == true)
    }

    @Test func unreachableBroker() async throws {
        let error = await self.connectError("amqp://guest:guest@127.0.0.1:1/%2F")
        #expect(error?.code == .connectionFailed)
        #expect(error?.message.contains("127.0.0.1:1") == true)
        #expect(error?.message.lowercased().contains("refused") == true, "\(String(describing: error))")
    }

    @Test func unknownHost() async throws {
        let error = await self.connectError("amqp://guest:guest@no-such-host.invalid:5672/%2F")
        #expect(error?.code == .connectionFailed)
        #expect(error?.message.contains("no-such-host.invalid") == true)
    }

    @Test func notAnAMQPPort() async throws {
        // A TCP server that accepts and says nothing: login must time out, not hang.
        let listener = try TCPSilentListener()
        let error = await self.connectError("amqp://guest:guest@127.0.0.1:\(listener.port)/%2F")
        #expect(error != nil)
        #expect(error?.code == .timeout || error?.code == .connectionFailed || error?.code == .authenticationFailed)
    }

    @Test func tlsWithAMissingCAFile() async throws {
        let b = try self.base
        let error = await self.connectError("amqps://guest:guest@\(b.host):\(b.port)/%2F?cacertfile=/nonexistent/ca.pem")
        #expect(error?.code == .tlsFailed)
        #expect(error?.message.contains("/nonexistent/ca.pem") == true)
    }
}

/// A listening socket on 127.0.0.1 that never answers (the kernel accepts connections).
final class TCPSilentListener: Sendable {
    let fd: Int32
    let port: Int

    init() throws {
        (self.fd, self.port) = try TestEnvironment.listenOnLoopback()
    }

    deinit { close(self.fd) }
}
