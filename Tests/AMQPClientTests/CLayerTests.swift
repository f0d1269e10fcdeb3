import CAQCurl
import CAQRabbitMQ
import Testing
@testable import AMQPClient

/// Round trips through rabbitmq-c's own table codec, and the reply-to-error mapping.
@Suite struct CLayerTests {
    static let everyType: AMQPTable = [
        "bool": .bool(true),
        "i8": .int8(-8), "u8": .uint8(200), "i16": .int16(-1600), "u16": .uint16(60000),
        "i32": .int32(-320_000), "u32": .uint32(4_000_000_000), "i64": .int64(-1 << 40), "u64": .uint64(1 << 63),
        "f32": .float(1.5), "f64": .double(-2.25),
        "decimal": .decimal(scale: 2, value: 12345),
        "string": "héllo", "bytes": .bytes([0, 1, 2, 255]),
        "array": [1, "two", .bool(false), .array([.int32(3)])],
        "table": ["nested": ["deeper": .int64(7)], "empty": .table([:])],
        "timestamp": .timestamp(1_700_000_000),
        "void": .void,
        "x-message-ttl": 60000,
    ]

    @Test func tableSurvivesRabbitMQCsEncoderAndDecoder() throws {
        let arena = CArena()
        var input = arena.table(Self.everyType)
        var buffer = [UInt8](repeating: 0, count: 4096)
        var decoded = AMQPTable()
        try buffer.withUnsafeMutableBytes { raw in
            let bytes = amqp_bytes_t(len: raw.count, bytes: raw.baseAddress)
            var offset = 0
            let encodeStatus = amqp_encode_table(bytes, &input, &offset)
            try #require(encodeStatus == AMQP_STATUS_OK.rawValue)
            var pool = amqp_pool_t()
            init_amqp_pool(&pool, 4096)
            defer { empty_amqp_pool(&pool) }
            var output = amqp_table_t()
            var readOffset = 0
            let decodeStatus = amqp_decode_table(amqp_bytes_t(len: offset, bytes: raw.baseAddress), &pool, &output, &readOffset)
            try #require(decodeStatus == AMQP_STATUS_OK.rawValue)
            #expect(readOffset == offset)
            decoded = CDecode.table(output)
        }
        withExtendedLifetime(arena) {}
        #expect(decoded == Self.everyType)
        #expect(decoded.keys == Self.everyType.keys, "order is kept")
    }

    @Test func tableSubscriptReplacesAndRemoves() {
        var table: AMQPTable = ["a": 1, "b": "x"]
        table["a"] = 2
        table["c"] = true
        table["b"] = nil
        #expect(table.keys == ["a", "c"])
        #expect(table["a"]?.intValue == 2)
        #expect(AMQPTable([.init(key: "k", value: 1), .init(key: "k", value: 2)])["k"] == 2)
    }

    @Test func propertiesRoundTripThroughTheCStruct() {
        let properties = AMQPProperties(
            contentType: "application/json", contentEncoding: "gzip", headers: ["attempt": .int32(3)],
            deliveryMode: .persistent, priority: 4, correlationId: "c-1", replyTo: "replies", expiration: "60000",
            messageId: "m-1", timestamp: 1_700_000_000, type: "task", userId: "guest", appId: "aq")
        let arena = CArena(capacity: 1024)
        let c = arena.properties(properties)
        #expect(CDecode.properties(c) == properties)
        #expect(CDecode.properties(arena.properties(AMQPProperties())) == AMQPProperties())
    }

    /// The six properties held apart (``AMQPProperties``' `rare`) behave as stored ones: each
    /// reads back what was set, a copy changes alone, and properties equal field by field are
    /// equal and hash alike however they were made (set, then cleared, is the same as never set).
    @Test func propertiesHeldApartBehaveAsValues() {
        var a = AMQPProperties(messageId: "m-1")
        a.correlationId = "c-1"
        a.replyTo = "replies"
        var b = a
        b.replyTo = "elsewhere"
        b.appId = "aq"
        #expect(a.correlationId == "c-1" && a.replyTo == "replies" && a.appId == nil)
        #expect(b.correlationId == "c-1" && b.replyTo == "elsewhere" && b.appId == "aq")
        #expect(a != b)
        b.replyTo = "replies"
        b.appId = nil
        #expect(a == b && a.hashValue == b.hashValue)
        var c = AMQPProperties(messageId: "m-1", type: "t")
        c.type = nil
        #expect(c == AMQPProperties(messageId: "m-1") && c.hashValue == AMQPProperties(messageId: "m-1").hashValue)
        c.contentEncoding = "gzip"
        c.expiration = "60000"
        #expect(AMQPProperties(contentEncoding: "gzip", expiration: "60000", messageId: "m-1") == c)
        #expect(Set([a, b, c]).count == 2)
    }

    /// Common content types decode to the same value as any other (one shared string).
    @Test func commonContentTypesDecodeToTheirValue() {
        let arena = CArena(capacity: 1024)
        for type in ["application/json", "application/json; charset=utf-8", "application/octet-stream", "application/jsonx", "text/plain", "application/jso"] {
            #expect(CDecode.properties(arena.properties(AMQPProperties(contentType: type))).contentType == type)
        }
    }

    @Test func channelCloseReplyBecomesATypedError() {
        var close = amqp_channel_close_t()
        close.reply_code = 404
        close.class_id = 60
        close.method_id = 40
        let text = Array("NOT_FOUND - no exchange 'nope' in vhost '/'".utf8)
        let error = text.withUnsafeBytes { raw -> AMQPError in
            close.reply_text = amqp_bytes_t(len: raw.count, bytes: UnsafeMutableRawPointer(mutating: raw.baseAddress))
            return withUnsafeMutablePointer(to: &close) { pointer in
                var reply = amqp_rpc_reply_t()
                reply.reply_type = AMQP_RESPONSE_SERVER_EXCEPTION
                reply.reply.id = AMQP_CHANNEL_CLOSE_METHOD
                reply.reply.decoded = UnsafeMutableRawPointer(pointer)
                return ConnectionDriver.serverError(reply, doing: "publishing to exchange 'nope'")
            }
        }
        #expect(error.code == .channelClosedByServer)
        #expect(error.replyCode == .notFound)
        #expect(error.method == "basic.publish")
        #expect(error.replyText == "NOT_FOUND - no exchange 'nope' in vhost '/'")
        #expect(error.message.contains("publishing to exchange 'nope' failed"))
        #expect(!error.isOutcomeUnknown)
        #expect(error.outcomeUnknown().isOutcomeUnknown)
        #expect(error.outcomeUnknown().isTransient)
    }

    @Test(arguments: [
        (UInt16(403), "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN", AMQPError.Code.authenticationFailed),
        (UInt16(530), "NOT_ALLOWED - vhost nope not found", AMQPError.Code.accessRefused),
        (UInt16(320), "CONNECTION_FORCED - shutdown", AMQPError.Code.connectionClosedByServer),
    ])
    func loginFailuresNameTheCause(code: UInt16, text: String, expected: AMQPError.Code) {
        var close = amqp_connection_close_t()
        close.reply_code = code
        let bytes = Array(text.utf8)
        let error = bytes.withUnsafeBytes { raw -> AMQPError? in
            close.reply_text = amqp_bytes_t(len: raw.count, bytes: UnsafeMutableRawPointer(mutating: raw.baseAddress))
            return withUnsafeMutablePointer(to: &close) { pointer in
                var reply = amqp_rpc_reply_t()
                reply.reply_type = AMQP_RESPONSE_SERVER_EXCEPTION
                reply.reply.id = AMQP_CONNECTION_CLOSE_METHOD
                reply.reply.decoded = UnsafeMutableRawPointer(pointer)
                return ConnectionDriver.loginError(reply, configuration: AMQPConfiguration(virtualHost: "nope"))
            }
        }
        #expect(error?.code == expected)
        #expect(error?.replyText == text)
    }

    @Test func libraryFailuresAreConnectionLoss() {
        let error = ConnectionDriver.libraryError(AMQP_STATUS_HEARTBEAT_TIMEOUT.rawValue, doing: "reading")
        #expect(error.code == .connectionLost)
        #expect(error.isTransient)
        #expect(error.message.contains("heartbeat"))
    }

    @Test func curlShimsCallThroughToLibcurl() throws {
        let version = try #require(curl_version())
        #expect(String(cString: version).hasPrefix("libcurl/"))
        let handle = try #require(curl_easy_init())
        defer { curl_easy_cleanup(handle) }
        #expect(aq_curl_easy_setopt_long(handle, CURLOPT_NOSIGNAL, 1) == CURLE_OK)
        #expect(aq_curl_easy_setopt_ptr(handle, CURLOPT_URL, "http://127.0.0.1:1/") == CURLE_OK)
    }
}

/// The pieces of the delivery path that avoid work per message: they must find, decode and hand
/// over exactly what the plain way would.
@Suite struct DeliveryPathTests {
    static func bytes<R>(_ text: String, _ body: (amqp_bytes_t) -> R) -> R {
        var copy = Array(text.utf8)
        return copy.withUnsafeMutableBytes { body(amqp_bytes_t(len: $0.count, bytes: $0.baseAddress)) }
    }

    @Test func bytesCompareAsTheirString() {
        for (string, bytes, same) in [("amq.ctag-abc", "amq.ctag-abc", true), ("amq.ctag-abc", "amq.ctag-abd", false),
                                      ("amq.ctag-abc", "amq.ctag-ab", false), ("", "", true), ("", "x", false),
                                      ("é-tag", "é-tag", true), ("é-tag", "e-tag", false)] {
            #expect(Self.bytes(bytes) { CDecode.equals(string, $0) } == same, "\(string) vs \(bytes)")
        }
        #expect(CDecode.equals("", amqp_bytes_t(len: 0, bytes: nil)))
        #expect(!CDecode.equals("x", amqp_bytes_t(len: 0, bytes: nil)))
    }

    /// A channel's consumers are scanned when few and looked up by hash when many: the same
    /// answers either way.
    @Test(arguments: [1, 3, ChannelState.consumersScanned, ChannelState.consumersScanned + 1, 40])
    func consumerIsFoundByItsTagBytes(count: Int) {
        let channel = ChannelState(id: 1)
        for i in 0..<count {
            let tag = "amq.ctag-consumer-\(i)"
            channel.consumers[tag] = ConsumerState(tag: tag, queue: "q\(i)", exclusive: false, noAck: false, arguments: [:],
                                                   buffer: nil, maxBodyBytes: 1 << 20)
        }
        for i in [0, count / 2, count - 1] {
            let found = Self.bytes("amq.ctag-consumer-\(i)") { channel.consumer(tagged: $0) }
            #expect(found?.queue == "q\(i)")
            #expect(channel.consumer("amq.ctag-consumer-\(i)")?.queue == "q\(i)")
        }
        #expect(Self.bytes("amq.ctag-consumer-\(count)") { channel.consumer(tagged: $0) } == nil)
        #expect(Self.bytes("amq.ctag-consumer-") { channel.consumer(tagged: $0) } == nil)
        #expect(channel.consumer("amq.ctag-other") == nil)
    }

    /// Each of the six boxed properties decodes alone, and none set decodes to none.
    @Test func eachBoxedPropertyDecodesAlone() {
        let arena = CArena(capacity: 1024)
        let singles: [AMQPProperties] = [
            AMQPProperties(contentEncoding: "gzip"), AMQPProperties(correlationId: "c-1"), AMQPProperties(replyTo: "r"),
            AMQPProperties(expiration: "5"), AMQPProperties(type: "t"), AMQPProperties(appId: "aq"),
            AMQPProperties(contentType: "text/plain", deliveryMode: .transient, priority: 0, messageId: "m", timestamp: 0, userId: "u"),
        ]
        for properties in singles { #expect(CDecode.properties(arena.properties(properties)) == properties) }
    }

    /// Deliveries handed over in several bursts (some while the consumer had not taken the last)
    /// come out once each, in order, and the burst array is left empty for reuse.
    @Test func handedOverDeliveriesComeOutOnceInOrder() async throws {
        let buffer = DeliveryBuffer()
        func delivery(_ tag: UInt64) -> AMQPDelivery? {
            AMQPDelivery(body: [UInt8(tag)], properties: AMQPProperties(), exchange: "", routingKey: "q", deliveryTag: tag,
                         isRedelivered: false, consumerTag: "c", messageCount: nil, acker: nil)
        }
        var burst: [AMQPDelivery?] = [delivery(1), delivery(2)]
        buffer.append(&burst)
        #expect(burst.isEmpty)
        burst = [delivery(3)]
        buffer.append(&burst)  // the consumer has not taken 1 and 2 yet
        var iterator = AMQPConsumer.AsyncIterator(buffer: buffer)
        var tags: [UInt64] = []
        for _ in 0..<3 { if let d = try await iterator.next() { tags.append(d.deliveryTag) } }
        burst.append(contentsOf: [delivery(4), delivery(5)])
        buffer.append(&burst)
        buffer.finish()
        while let d = try await iterator.next() { tags.append(d.deliveryTag) }
        #expect(tags == [1, 2, 3, 4, 5])
    }
}
