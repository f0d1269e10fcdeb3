/// What must be true of a publish before rabbitmq-c sends it. Pure.
///
/// rabbitmq-c 0.11 sends `basic.publish` before it encodes the content header, writes a short
/// string's length into one byte without checking it, and fails a header table too large for its
/// frame buffer only after the method frame is on the wire. Each of those used to become a lost
/// connection (and every unrelated publish in flight an "outcome unknown"); checked here first,
/// they fail that one publish with a sentence saying what is wrong.
enum WireCheck {
    /// The longest AMQP short string (a one-byte length).
    static let maxShortString = 255
    /// A frame's header (7 bytes) and end marker (1 byte).
    static let frameOverhead = 8

    /// Why this publish cannot be sent as it is, or nil.
    static func publish(exchange: String, routingKey: String, properties: AMQPProperties, frameMax: Int) -> String? {
        if let problem = self.shortString(exchange, "the exchange name") { return problem }
        if let problem = self.shortString(routingKey, "the routing key") { return problem }
        // Field by field (no array of them: this runs for every publish).
        let p = properties
        if let problem = self.shortString(p.contentType, "content_type") ?? self.shortString(p.contentEncoding, "content_encoding")
            ?? self.shortString(p.correlationId, "correlation_id") ?? self.shortString(p.replyTo, "reply_to")
            ?? self.shortString(p.expiration, "expiration") ?? self.shortString(p.messageId, "message_id")
            ?? self.shortString(p.type, "type") ?? self.shortString(p.userId, "user_id") ?? self.shortString(p.appId, "app_id") {
            return problem
        }
        if let headers = properties.headers, let problem = self.keys(headers, path: "headers") { return problem }
        let size = self.headerFramePayloadSize(properties)
        let room = frameMax - Self.frameOverhead
        if size > room {
            return "its properties encode to \(size) bytes and do not fit one content header frame (\(room) bytes with frame_max \(frameMax)); send fewer or smaller headers"
        }
        return nil
    }

    static func shortString(_ value: String?, _ what: StaticString) -> String? {
        guard let value, value.utf8.count > Self.maxShortString else { return nil }
        return self.shortString(value, "\(what)")
    }

    static func shortString(_ value: String, _ what: String) -> String? {
        let count = value.utf8.count
        guard count <= Self.maxShortString else {
            return "\(what) is \(count) bytes; AMQP allows at most \(Self.maxShortString)"
        }
        return nil
    }

    /// Every key at every depth must be a short string.
    static func keys(_ table: AMQPTable, path: String) -> String? {
        for entry in table {
            let count = entry.key.utf8.count
            if count > Self.maxShortString {
                return "a key in \(path) is \(count) bytes ('\(entry.key.prefix(32))…'); AMQP allows at most \(Self.maxShortString)"
            }
            if let problem = self.keys(entry.value, path: "\(path).\(entry.key.prefix(32))") { return problem }
        }
        return nil
    }

    private static func keys(_ value: AMQPFieldValue, path: String) -> String? {
        switch value {
        case .table(let table): return self.keys(table, path: path)
        case .array(let values):
            for value in values { if let problem = self.keys(value, path: path) { return problem } }
            return nil
        default: return nil
        }
    }

    /// The size of the content header frame's payload: class, weight, body size, flags, then the
    /// properties that are set.
    static func headerFramePayloadSize(_ p: AMQPProperties) -> Int {
        func short(_ value: String?) -> Int { value.map { 1 + $0.utf8.count } ?? 0 }
        var size = 2 + 2 + 8 + 2
        size += short(p.contentType) + short(p.contentEncoding) + short(p.correlationId) + short(p.replyTo) + short(p.expiration)
        size += short(p.messageId) + short(p.type) + short(p.userId) + short(p.appId)
        if let headers = p.headers { size += self.tableSize(headers) }
        if p.deliveryMode != nil { size += 1 }
        if p.priority != nil { size += 1 }
        if p.timestamp != nil { size += 8 }
        return size
    }

    /// An encoded field table: its 4-byte length, then per entry a short-string key and a value.
    static func tableSize(_ table: AMQPTable) -> Int {
        var size = 4
        for entry in table { size += 1 + entry.key.utf8.count + self.fieldSize(entry.value) }
        return size
    }

    /// An encoded field value, type byte included.
    static func fieldSize(_ value: AMQPFieldValue) -> Int {
        switch value {
        case .bool, .int8, .uint8: return 2
        case .int16, .uint16: return 3
        case .int32, .uint32, .float: return 5
        case .int64, .uint64, .double, .timestamp: return 9
        case .decimal: return 6
        case .string(let s): return 5 + s.utf8.count
        case .bytes(let b): return 5 + b.count
        case .array(let values): return 5 + values.reduce(0) { $0 + self.fieldSize($1) }
        case .table(let t): return 1 + self.tableSize(t)
        case .void: return 1
        }
    }
}
