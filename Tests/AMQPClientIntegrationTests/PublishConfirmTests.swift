import AMQPClient
import Foundation
import Testing

@Suite(.timeLimit(.minutes(3))) struct PublishConfirmTests {
    @Test func fiftyThousandConfirmedPublishesNoneLostNoneConfirmedTwice() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, durable: true)
        try await channel.enableConfirms()
        let total = 50_000
        var confirms: [AMQPPublishConfirm] = []
        confirms.reserveCapacity(total)
        for index in 0..<total {
            confirms.append(channel.beginPublish(
                Array("message \(index)".utf8), routingKey: queue,
                properties: AMQPProperties(deliveryMode: .persistent, messageId: "m-\(index)")))
        }
        var confirmed = 0
        for confirm in confirms {
            if case .confirmed = try await confirm.result() { confirmed += 1 }
        }
        #expect(confirmed == total)
        let info = try await channel.declareQueue(queue, passive: true)
        #expect(info.messageCount == UInt32(total))

        // Every message is in the queue exactly once.
        let consumerChannel = try await connection.openChannel()
        try await consumerChannel.setPrefetch(2000)
        var seen = Set<String>()
        var duplicates = 0
        for try await delivery in try await consumerChannel.consume(queue) {
            if !seen.insert(delivery.properties.messageId ?? "").inserted { duplicates += 1 }
            if seen.count % 500 == 0 || seen.count == total { try delivery.ack(multiple: true) }
            if seen.count == total { break }
        }
        #expect(seen.count == total)
        #expect(duplicates == 0)
        #expect(seen == Set((0..<total).map { "m-\($0)" }))
        try await channel.deleteQueue(queue)
        await connection.close()
    }

    /// A publish goes out as one write of frames we encode with rabbitmq-c's encoders (up to
    /// 4 MiB; larger ones through amqp_basic_publish): bodies at and across frame boundaries,
    /// empty, large, and every property, read back byte for byte.
    @Test func bodiesAcrossFrameBoundariesAndEveryPropertyArriveIntact() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        try await channel.enableConfirms()
        let frameBody = 131_072 - 8  // the broker's default frame_max, less a body frame's overhead
        let sizes = [0, 1, 100, frameBody - 1, frameBody, frameBody + 1, 2 * frameBody, 3 * frameBody + 5, 1 << 20, 5 << 20]
        let headers: AMQPTable = ["s": .string("é日本"), "i": .int32(-7), "l": .int64(Int64.max), "b": .bool(true), "d": .double(2.5),
                                  "t": .table(["n": .array([.int8(1), .string("x")])]), "x": .bytes([0, 255, 10])]
        let properties = AMQPProperties(contentType: "application/octet-stream", contentEncoding: "identity", headers: headers,
                                        deliveryMode: .persistent, priority: 3, correlationId: "c-1", replyTo: "r", expiration: "600000",
                                        timestamp: 1_764_000_000, type: "kind", appId: "tests")
        var sent: [([UInt8], AMQPProperties)] = []
        // Then a content header of 100 KB (more than the 64 KiB of room the buffer's size counts
        // on), and messages after the large ones (the buffer given back after 1 MiB).
        var bigHeader = properties
        bigHeader.headers?["big"] = .string(String(repeating: "h", count: 100_000))
        let cases = sizes.map { ($0, properties) } + [(10, bigHeader), (100, properties), (frameBody + 1, properties)]
        for (index, (size, base)) in cases.enumerated() {
            let body = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ index) }
            var p = base
            p.messageId = "m-\(index)"
            sent.append((body, p))
            #expect(try await channel.beginPublish(body, routingKey: queue, properties: p).result() == .confirmed)
        }
        var received = 0
        for try await delivery in try await channel.consume(queue) {
            let index = received
            #expect(delivery.body == sent[index].0, "body \(index) (\(sent[index].0.count) bytes)")
            #expect(delivery.properties == sent[index].1, "properties of message \(index)")
            try delivery.ack()
            received += 1
            if received == sent.count { break }
        }
        #expect(received == sent.count)
        await connection.close()
    }

    @Test func unroutableMandatoryPublishIsReturnedAndMatchedToItsPublish() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        let nowhere = TestBroker.uniqueName("nowhere")
        let routed = channel.beginPublish(Array("a".utf8), routingKey: queue, properties: .init(messageId: "routed"), mandatory: true)
        let lost = channel.beginPublish(Array("b".utf8), routingKey: nowhere, properties: .init(messageId: "lost"), mandatory: true)
        let lostWithoutId = channel.beginPublish(Array("c".utf8), exchange: "amq.direct", routingKey: nowhere, mandatory: true)
        #expect(try await routed.result() == .confirmed)
        guard case .returned(let returned) = try await lost.result() else {
            Issue.record("the unroutable publish was not returned")
            return
        }
        #expect(returned.replyCode == 312)
        #expect(returned.replyText == "NO_ROUTE")
        #expect(returned.routingKey == nowhere)
        #expect(returned.properties.messageId == "lost")
        #expect(returned.body == Array("b".utf8))
        guard case .returned(let second) = try await lostWithoutId.result() else {
            Issue.record("the unroutable publish without message id was not returned")
            return
        }
        #expect(second.exchange == "amq.direct")
        #expect(second.body == Array("c".utf8))
        // Not mandatory: silently dropped by the broker, still confirmed.
        #expect(try await channel.publish("d", routingKey: nowhere) == .confirmed)
        await connection.close()
    }

    @Test func everyPropertyAndHeaderTypeArrivesIntact() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        let headers: AMQPTable = [
            "bool": true, "i8": .int8(-5), "u8": .uint8(250), "i16": .int16(-300), "u16": .uint16(60000),
            "i32": .int32(-70000), "u32": .uint32(4_000_000_000), "i64": .int64(1 << 40), "f32": .float(0.5),
            "f64": .double(2.5), "decimal": .decimal(scale: 3, value: 1234), "string": "ünïcode", "bytes": .bytes([1, 2, 3]),
            "array": [1, "x", ["k": "v"]], "table": ["a": ["b": 1]], "timestamp": .timestamp(1_700_000_000), "void": .void,
        ]
        let properties = AMQPProperties(
            contentType: "application/json", contentEncoding: "identity", headers: headers, deliveryMode: .persistent,
            priority: 3, correlationId: "corr", replyTo: "reply.queue", expiration: "600000", messageId: "id-1",
            timestamp: 1_700_000_001, type: "task", userId: "guest", appId: "aq-tests")
        try await channel.publish(Array("{}".utf8), routingKey: queue, properties: properties)
        let delivery = try #require(try await channel.get(queue))
        #expect(delivery.properties == properties)
        #expect(delivery.body == Array("{}".utf8))
        #expect(delivery.messageCount == 0)
        #expect(!delivery.isRedelivered)
        try delivery.ack()
        #expect(try await channel.get(queue) == nil)
        await connection.close()
    }

    @Test func nackAndRejectDeadLetterOrRequeue() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let dlq = TestBroker.uniqueName("dlq")
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(dlq, exclusive: true)
        try await channel.declareQueue(queue, exclusive: true, arguments: ["x-dead-letter-exchange": "", "x-dead-letter-routing-key": .string(dlq)])
        try await channel.publish("one", routingKey: queue)
        try await channel.publish("two", routingKey: queue)
        let first = try #require(try await channel.get(queue))
        try first.reject(requeue: true)
        let again = try #require(try await channel.get(queue))
        #expect(again.bodyString == "one")
        #expect(again.isRedelivered)
        try again.reject(requeue: false)
        let second = try #require(try await channel.get(queue))
        try second.nack(requeue: false)
        try await waitFor("both messages in the dead-letter queue") {
            try await channel.declareQueue(dlq, passive: true).messageCount == 2
        }
        let dead = try #require(try await channel.get(dlq, noAck: true))
        #expect(dead.properties.headers?["x-death"] != nil)
        #expect(throws: AMQPError.self) { try dead.ack() }
        await connection.close()
    }
}
