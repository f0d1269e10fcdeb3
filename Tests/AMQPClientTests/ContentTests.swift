import CAQRabbitMQ
import Testing
@testable import AMQPClient

/// Content frames read by the client itself, the limits on what a header may cost, and the
/// checks that keep a publish that does not fit AMQP from reaching the wire.
@Suite struct ContentTests {
    static func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

    @Test func aMessageIsAssembledFromItsHeaderAndBodyFrames() {
        var content = IncomingContent(origin: .getOk(deliveryTag: 1, redelivered: false, exchange: "", routingKey: "q", messageCount: 0),
                                      maxBodyBytes: 100)
        #expect(content.header(properties: .success(AMQPProperties(messageId: "m")), bodySize: 11) == .needMore)
        #expect(Self.bytes("hello ").withUnsafeBytes { content.body($0) } == .needMore)
        #expect(Self.bytes("world").withUnsafeBytes { content.body($0) } == .complete)
        #expect(content.body == Self.bytes("hello world"))
        #expect(content.properties?.messageId == "m")
        #expect(content.problem == nil)
    }

    @Test func anEmptyBodyIsCompleteAtItsHeader() {
        var content = IncomingContent(origin: .returned(replyCode: 312, replyText: "NO_ROUTE", exchange: "", routingKey: "x"), maxBodyBytes: 10)
        #expect(content.header(properties: .success(AMQPProperties()), bodySize: 0) == .complete)
    }

    @Test func aBodyOverTheCapIsReadToItsEndWithoutBeingKept() {
        var content = IncomingContent(origin: .getOk(deliveryTag: 1, redelivered: false, exchange: "", routingKey: "q", messageCount: 0),
                                      maxBodyBytes: 4)
        #expect(content.header(properties: .success(AMQPProperties(messageId: "big")), bodySize: 10) == .needMore)
        #expect(Self.bytes("12345").withUnsafeBytes { content.body($0) } == .needMore)
        #expect(Self.bytes("67890").withUnsafeBytes { content.body($0) } == .complete)
        #expect(content.body.isEmpty)
        #expect(content.problem == "its body of 10 bytes is over the limit of 4 bytes")
        #expect(content.properties?.messageId == "big", "the properties stay readable")
    }

    @Test func framesThatBreakTheProtocolAreReported() {
        var early = IncomingContent(origin: .getOk(deliveryTag: 1, redelivered: false, exchange: "", routingKey: "q", messageCount: 0), maxBodyBytes: 10)
        guard case .protocolError = Self.bytes("x").withUnsafeBytes({ early.body($0) }) else {
            Issue.record("a body frame before the header was accepted")
            return
        }
        var over = IncomingContent(origin: .getOk(deliveryTag: 1, redelivered: false, exchange: "", routingKey: "q", messageCount: 0), maxBodyBytes: 10)
        _ = over.header(properties: .success(AMQPProperties()), bodySize: 2)
        guard case .protocolError = Self.bytes("xyz").withUnsafeBytes({ over.body($0) }) else {
            Issue.record("more body than announced was accepted")
            return
        }
    }

    @Test func propertiesOverTheLimitsMakeTheMessageUnreadable() {
        var content = IncomingContent(origin: .getOk(deliveryTag: 1, redelivered: false, exchange: "", routingKey: "q", messageCount: 0), maxBodyBytes: 10)
        #expect(content.header(properties: .failure(ContentProblem(description: "too many")), bodySize: 1) == .needMore)
        #expect(Self.bytes("x").withUnsafeBytes { content.body($0) } == .complete)
        #expect(content.problem == "too many")
        #expect(content.properties == nil)
    }

    /// Header tables decoded by rabbitmq-c, checked by the client before anything is copied.
    @Test func headerLimitsCountNestedFieldsAndBoundTheDepth() {
        let arena = CArena()
        let limits = AMQPContentLimits(maxHeaderFields: 10, maxHeaderDepth: 3)
        func check(_ headers: AMQPTable) -> String? {
            var c = amqp_basic_properties_t()
            c._flags = UInt32(AMQP_BASIC_HEADERS_FLAG)
            c.headers = arena.table(headers)
            return CDecode.check(c, limits: limits)?.description
        }
        #expect(check(["a": 1, "b": ["c": 2, "d": [1, 2, 3]]]) == nil)
        #expect(check(AMQPTable((0..<11).map { AMQPTable.Entry(key: "k\($0)", value: 1) }))?.contains("more than 10 fields") == true)
        #expect(check(["a": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])?.contains("more than 10 fields") == true, "array elements count")
        #expect(check(["a": ["b": ["c": 1]]]) == nil)
        #expect(check(["a": ["b": ["c": ["d": 1]]]])?.contains("deeper than 3") == true)
        #expect(check(["a": [[[1]]]])?.contains("deeper than 3") == true, "arrays nest too")
    }

    @Test func aDecodedTableKeepsTheFirstPositionAndTheLastValueOfADuplicateKey() {
        let many = (0..<40).map { AMQPTable.Entry(key: "k\($0 % 20)", value: .int64(Int64($0))) }
        let table = AMQPTable(decoded: many)
        #expect(table.count == 20)
        #expect(table.keys == (0..<20).map { "k\($0)" })
        #expect(table["k3"] == .int64(23))
        #expect(AMQPTable(decoded: many) == AMQPTable(many), "the same as the general initialiser")
        let empty = AMQPTable(decoded: [AMQPTable.Entry(key: "", value: "x")])
        #expect(empty[""] == .string("x"))
    }

    // MARK: Publishes that must fail before the wire

    @Test func theHeaderFrameSizeIsWhatRabbitMQCEncodes() {
        let samples: [AMQPProperties] = [
            AMQPProperties(),
            AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: "task-1"),
            AMQPProperties(contentType: "a", contentEncoding: "gzip", headers: CLayerTests.everyType, deliveryMode: .transient, priority: 3,
                           correlationId: "c", replyTo: "r", expiration: "60000", messageId: "m", timestamp: 1_700_000_000,
                           type: "t", userId: "guest", appId: "app"),
            AMQPProperties(headers: ["": "", "nested": ["deeper": [1, 2, ["x": .bytes([1, 2, 3])]]]]),
        ]
        for properties in samples {
            let arena = CArena()
            var c = arena.properties(properties)
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            let encoded = buffer.withUnsafeMutableBytes { raw -> Int32 in
                amqp_encode_properties(UInt16(AMQP_BASIC_CLASS), &c, amqp_bytes_t(len: raw.count, bytes: raw.baseAddress))
            }
            #expect(encoded > 0)
            // Class id, weight and body size (12 bytes) precede what amqp_encode_properties writes.
            #expect(WireCheck.headerFramePayloadSize(properties) == 12 + Int(encoded), "\(properties)")
        }
    }

    @Test func whatDoesNotFitAMQPIsNamed() {
        let long = String(repeating: "x", count: 256)
        #expect(WireCheck.publish(exchange: "", routingKey: "q", properties: AMQPProperties(), frameMax: 131_072) == nil)
        #expect(WireCheck.publish(exchange: long, routingKey: "q", properties: AMQPProperties(), frameMax: 131_072)?.contains("the exchange name is 256 bytes") == true)
        #expect(WireCheck.publish(exchange: "", routingKey: long, properties: AMQPProperties(), frameMax: 131_072)?.contains("the routing key") == true)
        #expect(WireCheck.publish(exchange: "", routingKey: "q", properties: AMQPProperties(messageId: long), frameMax: 131_072)?.contains("message_id") == true)
        #expect(WireCheck.publish(exchange: "", routingKey: "q", properties: AMQPProperties(userId: long), frameMax: 131_072)?.contains("user_id") == true)
        #expect(WireCheck.publish(exchange: "", routingKey: "q", properties: AMQPProperties(headers: ["a": [["b": .table([long: 1])]]]), frameMax: 131_072)?
            .contains("a key in headers.a") == true)
        let big = AMQPProperties(headers: ["h": .string(String(repeating: "y", count: 5000))])
        #expect(WireCheck.publish(exchange: "", routingKey: "q", properties: big, frameMax: 4096)?.contains("do not fit one content header frame") == true)
        #expect(WireCheck.publish(exchange: "", routingKey: "q", properties: big, frameMax: 131_072) == nil)
        #expect(WireCheck.publish(exchange: "", routingKey: String(repeating: "é", count: 127), properties: AMQPProperties(), frameMax: 131_072) == nil,
                "254 bytes fit")
        #expect(WireCheck.publish(exchange: "", routingKey: String(repeating: "é", count: 128), properties: AMQPProperties(), frameMax: 131_072) != nil,
                "bytes are counted, not characters")
    }
}
