internal import CAQRabbitMQ
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Owns the C memory that one rabbitmq-c call borrows: strings, tables, arrays.
///
/// rabbitmq-c only borrows the `amqp_bytes_t`, tables and properties passed in, for the length of
/// the call, so everything built here is freed when the arena goes away. Use it inside
/// `withExtendedLifetime` (or keep it referenced after the call) so it outlives the call.
///
/// An arena made with a `capacity` bump-allocates from one chunk and can be ``reset()`` and
/// reused, so the publish path costs no `malloc` per message; larger requests fall back to malloc.
final class CArena {
    private var blocks: [UnsafeMutableRawPointer] = []
    private let chunk: UnsafeMutableRawPointer?
    private let chunkSize: Int
    private var used = 0

    init(capacity: Int = 0) {
        self.chunkSize = capacity
        self.chunk = capacity > 0 ? malloc(capacity) : nil
    }

    deinit {
        for block in self.blocks { free(block) }
        free(self.chunk)
    }

    /// Frees everything handed out so far; the chunk is kept for reuse.
    func reset() {
        for block in self.blocks { free(block) }
        self.blocks.removeAll(keepingCapacity: true)
        self.used = 0
    }

    private func allocate(_ size: Int) -> UnsafeMutableRawPointer {
        let aligned = (max(size, 1) + 15) & ~15
        if let chunk = self.chunk, self.used + aligned <= self.chunkSize {
            let pointer = chunk + self.used
            self.used += aligned
            return pointer
        }
        // malloc(0) may return NULL; always ask for at least one byte.
        guard let pointer = malloc(aligned) else { fatalError("out of memory") }
        self.blocks.append(pointer)
        return pointer
    }

    func bytes(_ string: String) -> amqp_bytes_t {
        var string = string
        return string.withUTF8 { utf8 in self.bytes(UnsafeRawBufferPointer(utf8)) }
    }

    func bytes(_ buffer: UnsafeRawBufferPointer) -> amqp_bytes_t {
        let pointer = self.allocate(buffer.count)
        if let base = buffer.baseAddress, buffer.count > 0 { pointer.copyMemory(from: base, byteCount: buffer.count) }
        return amqp_bytes_t(len: buffer.count, bytes: pointer)
    }

    func bytes(_ array: [UInt8]) -> amqp_bytes_t {
        array.withUnsafeBytes { self.bytes($0) }
    }

    /// A NUL-terminated copy, for the C functions that take `const char *`.
    func cString(_ string: String) -> UnsafePointer<CChar> {
        let utf8 = Array(string.utf8)
        let pointer = self.allocate(utf8.count + 1).bindMemory(to: CChar.self, capacity: utf8.count + 1)
        utf8.withUnsafeBytes { raw in
            if let base = raw.baseAddress, !raw.isEmpty {
                UnsafeMutableRawPointer(pointer).copyMemory(from: base, byteCount: raw.count)
            }
        }
        pointer[utf8.count] = 0
        return UnsafePointer(pointer)
    }

    func table(_ table: AMQPTable) -> amqp_table_t {
        guard !table.isEmpty else { return amqp_table_t(num_entries: 0, entries: nil) }
        let entries = self.allocate(MemoryLayout<amqp_table_entry_t>.stride * table.count)
            .bindMemory(to: amqp_table_entry_t.self, capacity: table.count)
        for (index, entry) in table.entries.enumerated() {
            entries.advanced(by: index).initialize(
                to: amqp_table_entry_t(key: self.bytes(entry.key), value: self.fieldValue(entry.value))
            )
        }
        return amqp_table_t(num_entries: Int32(table.count), entries: entries)
    }

    func fieldValue(_ value: AMQPFieldValue) -> amqp_field_value_t {
        var field = amqp_field_value_t()
        func kind(_ k: amqp_field_value_kind_t) -> UInt8 { UInt8(truncatingIfNeeded: k.rawValue) }
        switch value {
        case .bool(let v):
            field.kind = kind(AMQP_FIELD_KIND_BOOLEAN)
            field.value.boolean = v ? 1 : 0
        case .int8(let v):
            field.kind = kind(AMQP_FIELD_KIND_I8)
            field.value.i8 = v
        case .uint8(let v):
            field.kind = kind(AMQP_FIELD_KIND_U8)
            field.value.u8 = v
        case .int16(let v):
            field.kind = kind(AMQP_FIELD_KIND_I16)
            field.value.i16 = v
        case .uint16(let v):
            field.kind = kind(AMQP_FIELD_KIND_U16)
            field.value.u16 = v
        case .int32(let v):
            field.kind = kind(AMQP_FIELD_KIND_I32)
            field.value.i32 = v
        case .uint32(let v):
            field.kind = kind(AMQP_FIELD_KIND_U32)
            field.value.u32 = v
        case .int64(let v):
            field.kind = kind(AMQP_FIELD_KIND_I64)
            field.value.i64 = v
        case .uint64(let v):
            field.kind = kind(AMQP_FIELD_KIND_U64)
            field.value.u64 = v
        case .float(let v):
            field.kind = kind(AMQP_FIELD_KIND_F32)
            field.value.f32 = v
        case .double(let v):
            field.kind = kind(AMQP_FIELD_KIND_F64)
            field.value.f64 = v
        case .decimal(let scale, let v):
            field.kind = kind(AMQP_FIELD_KIND_DECIMAL)
            field.value.decimal = amqp_decimal_t(decimals: scale, value: v)
        case .string(let v):
            field.kind = kind(AMQP_FIELD_KIND_UTF8)
            field.value.bytes = self.bytes(v)
        case .bytes(let v):
            field.kind = kind(AMQP_FIELD_KIND_BYTES)
            field.value.bytes = self.bytes(v)
        case .array(let values):
            field.kind = kind(AMQP_FIELD_KIND_ARRAY)
            if values.isEmpty {
                field.value.array = amqp_array_t(num_entries: 0, entries: nil)
            } else {
                let entries = self.allocate(MemoryLayout<amqp_field_value_t>.stride * values.count)
                    .bindMemory(to: amqp_field_value_t.self, capacity: values.count)
                for (index, element) in values.enumerated() {
                    entries.advanced(by: index).initialize(to: self.fieldValue(element))
                }
                field.value.array = amqp_array_t(num_entries: Int32(values.count), entries: entries)
            }
        case .table(let t):
            field.kind = kind(AMQP_FIELD_KIND_TABLE)
            field.value.table = self.table(t)
        case .timestamp(let v):
            field.kind = kind(AMQP_FIELD_KIND_TIMESTAMP)
            field.value.u64 = v
        case .void:
            field.kind = kind(AMQP_FIELD_KIND_VOID)
        }
        return field
    }

    func properties(_ p: AMQPProperties) -> amqp_basic_properties_t {
        var c = amqp_basic_properties_t()
        var flags: UInt32 = 0
        if let v = p.contentType {
            flags |= UInt32(AMQP_BASIC_CONTENT_TYPE_FLAG)
            c.content_type = self.bytes(v)
        }
        if let v = p.contentEncoding {
            flags |= UInt32(AMQP_BASIC_CONTENT_ENCODING_FLAG)
            c.content_encoding = self.bytes(v)
        }
        if let v = p.headers {
            flags |= UInt32(AMQP_BASIC_HEADERS_FLAG)
            c.headers = self.table(v)
        }
        if let v = p.deliveryMode {
            flags |= UInt32(AMQP_BASIC_DELIVERY_MODE_FLAG)
            c.delivery_mode = v.rawValue
        }
        if let v = p.priority {
            flags |= UInt32(AMQP_BASIC_PRIORITY_FLAG)
            c.priority = v
        }
        if let v = p.correlationId {
            flags |= UInt32(AMQP_BASIC_CORRELATION_ID_FLAG)
            c.correlation_id = self.bytes(v)
        }
        if let v = p.replyTo {
            flags |= UInt32(AMQP_BASIC_REPLY_TO_FLAG)
            c.reply_to = self.bytes(v)
        }
        if let v = p.expiration {
            flags |= UInt32(AMQP_BASIC_EXPIRATION_FLAG)
            c.expiration = self.bytes(v)
        }
        if let v = p.messageId {
            flags |= UInt32(AMQP_BASIC_MESSAGE_ID_FLAG)
            c.message_id = self.bytes(v)
        }
        if let v = p.timestamp {
            flags |= UInt32(AMQP_BASIC_TIMESTAMP_FLAG)
            c.timestamp = v
        }
        if let v = p.type {
            flags |= UInt32(AMQP_BASIC_TYPE_FLAG)
            c.type = self.bytes(v)
        }
        if let v = p.userId {
            flags |= UInt32(AMQP_BASIC_USER_ID_FLAG)
            c.user_id = self.bytes(v)
        }
        if let v = p.appId {
            flags |= UInt32(AMQP_BASIC_APP_ID_FLAG)
            c.app_id = self.bytes(v)
        }
        c._flags = flags
        return c
    }
}

// MARK: - Reading C values into Swift (always copies: rabbitmq-c's pools are recycled)

enum CDecode {
    static func string(_ bytes: amqp_bytes_t) -> String {
        guard bytes.len > 0, let base = bytes.bytes else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: base, count: bytes.len), as: UTF8.self)
    }

    static func array(_ bytes: amqp_bytes_t) -> [UInt8] {
        guard bytes.len > 0, let base = bytes.bytes else { return [] }
        return Array(UnsafeRawBufferPointer(start: base, count: bytes.len))
    }

    static func table(_ table: amqp_table_t) -> AMQPTable {
        guard table.num_entries > 0, let entries = table.entries else { return AMQPTable() }
        var result: [AMQPTable.Entry] = []
        result.reserveCapacity(Int(table.num_entries))
        for index in 0..<Int(table.num_entries) {
            let entry = entries[index]
            result.append(AMQPTable.Entry(key: self.string(entry.key), value: self.fieldValue(entry.value)))
        }
        return AMQPTable(decoded: result)
    }

    /// Checks a message's properties against the limits before anything is copied: the fields
    /// of every table and array are counted (nested ones included) and nesting is bounded, so a
    /// hostile header costs bounded time and stack. Recursion stops at `maxHeaderDepth`.
    static func check(_ c: amqp_basic_properties_t, limits: AMQPContentLimits) -> ContentProblem? {
        guard c._flags & UInt32(AMQP_BASIC_HEADERS_FLAG) != 0 else { return nil }
        var fields = 0
        return self.check(c.headers, depth: 1, limits: limits, fields: &fields)
    }

    private static func check(_ table: amqp_table_t, depth: Int, limits: AMQPContentLimits, fields: inout Int) -> ContentProblem? {
        guard depth <= limits.maxHeaderDepth else {
            return ContentProblem(description: "its headers nest tables deeper than \(limits.maxHeaderDepth) levels")
        }
        guard table.num_entries > 0, let entries = table.entries else { return nil }
        fields += Int(table.num_entries)
        if fields > limits.maxHeaderFields {
            return ContentProblem(description: "its headers hold more than \(limits.maxHeaderFields) fields")
        }
        for index in 0..<Int(table.num_entries) {
            if let problem = self.check(entries[index].value, depth: depth, limits: limits, fields: &fields) { return problem }
        }
        return nil
    }

    private static func check(_ value: amqp_field_value_t, depth: Int, limits: AMQPContentLimits, fields: inout Int) -> ContentProblem? {
        switch UInt32(value.kind) {
        case AMQP_FIELD_KIND_TABLE.rawValue:
            return self.check(value.value.table, depth: depth + 1, limits: limits, fields: &fields)
        case AMQP_FIELD_KIND_ARRAY.rawValue:
            guard depth + 1 <= limits.maxHeaderDepth else {
                return ContentProblem(description: "its headers nest tables deeper than \(limits.maxHeaderDepth) levels")
            }
            let array = value.value.array
            guard array.num_entries > 0, let entries = array.entries else { return nil }
            fields += Int(array.num_entries)
            if fields > limits.maxHeaderFields {
                return ContentProblem(description: "its headers hold more than \(limits.maxHeaderFields) fields")
            }
            for index in 0..<Int(array.num_entries) {
                if let problem = self.check(entries[index], depth: depth + 1, limits: limits, fields: &fields) { return problem }
            }
            return nil
        default:
            return nil
        }
    }

    static func fieldValue(_ field: amqp_field_value_t) -> AMQPFieldValue {
        switch UInt32(field.kind) {
        case AMQP_FIELD_KIND_BOOLEAN.rawValue: return .bool(field.value.boolean != 0)
        case AMQP_FIELD_KIND_I8.rawValue: return .int8(field.value.i8)
        case AMQP_FIELD_KIND_U8.rawValue: return .uint8(field.value.u8)
        case AMQP_FIELD_KIND_I16.rawValue: return .int16(field.value.i16)
        case AMQP_FIELD_KIND_U16.rawValue: return .uint16(field.value.u16)
        case AMQP_FIELD_KIND_I32.rawValue: return .int32(field.value.i32)
        case AMQP_FIELD_KIND_U32.rawValue: return .uint32(field.value.u32)
        case AMQP_FIELD_KIND_I64.rawValue: return .int64(field.value.i64)
        case AMQP_FIELD_KIND_U64.rawValue: return .uint64(field.value.u64)
        case AMQP_FIELD_KIND_F32.rawValue: return .float(field.value.f32)
        case AMQP_FIELD_KIND_F64.rawValue: return .double(field.value.f64)
        case AMQP_FIELD_KIND_DECIMAL.rawValue:
            return .decimal(scale: field.value.decimal.decimals, value: field.value.decimal.value)
        case AMQP_FIELD_KIND_UTF8.rawValue: return .string(self.string(field.value.bytes))
        case AMQP_FIELD_KIND_BYTES.rawValue: return .bytes(self.array(field.value.bytes))
        case AMQP_FIELD_KIND_ARRAY.rawValue:
            let array = field.value.array
            guard array.num_entries > 0, let entries = array.entries else { return .array([]) }
            return .array((0..<Int(array.num_entries)).map { self.fieldValue(entries[$0]) })
        case AMQP_FIELD_KIND_TABLE.rawValue: return .table(self.table(field.value.table))
        case AMQP_FIELD_KIND_TIMESTAMP.rawValue: return .timestamp(field.value.u64)
        default: return .void
        }
    }

    /// The common content types come back as the same string literal for every message:
    /// "application/json" is one byte over what a String holds inline, and would otherwise cost
    /// an allocation for each message held.
    static let commonContentTypes: [String] = ["application/json", "application/json; charset=utf-8", "application/octet-stream"]

    static func contentType(_ bytes: amqp_bytes_t) -> String {
        guard bytes.len > 0, let base = bytes.bytes else { return "" }
        for common in Self.commonContentTypes where self.equals(common, bytes) { return common }
        return String(decoding: UnsafeRawBufferPointer(start: base, count: bytes.len), as: UTF8.self)
    }

    /// Whether `string`'s UTF-8 is `bytes`, compared with `memcmp` (the generic
    /// `elementsEqual` over a UTF8View took ~2% of a consumer's CPU on this path).
    static func equals(_ string: String, _ bytes: amqp_bytes_t) -> Bool {
        let utf8 = string.utf8
        guard utf8.count == bytes.len else { return false }
        guard bytes.len > 0, let base = bytes.bytes else { return true }
        let raw = UnsafeRawBufferPointer(start: base, count: bytes.len)
        let same = utf8.withContiguousStorageIfAvailable { stored in
            stored.baseAddress.map { memcmp($0, base, bytes.len) == 0 } ?? false
        }
        return same ?? utf8.elementsEqual(raw)
    }

    static func properties(_ c: amqp_basic_properties_t) -> AMQPProperties {
        let flags = c._flags
        guard flags != 0 else { return AMQPProperties() }
        func has(_ flag: Int32) -> Bool { flags & UInt32(flag) != 0 }
        var rare: AMQPProperties.RareFields?
        if flags & Self.rareFlags != 0 {
            rare = AMQPProperties.RareFields(
                contentEncoding: has(AMQP_BASIC_CONTENT_ENCODING_FLAG) ? self.string(c.content_encoding) : nil,
                correlationId: has(AMQP_BASIC_CORRELATION_ID_FLAG) ? self.string(c.correlation_id) : nil,
                replyTo: has(AMQP_BASIC_REPLY_TO_FLAG) ? self.string(c.reply_to) : nil,
                expiration: has(AMQP_BASIC_EXPIRATION_FLAG) ? self.string(c.expiration) : nil,
                type: has(AMQP_BASIC_TYPE_FLAG) ? self.string(c.type) : nil,
                appId: has(AMQP_BASIC_APP_ID_FLAG) ? self.string(c.app_id) : nil)
        }
        // Built at once: setting the fields one by one on a value made first copied it twice.
        return AMQPProperties(
            contentType: has(AMQP_BASIC_CONTENT_TYPE_FLAG) ? self.contentType(c.content_type) : nil,
            headers: has(AMQP_BASIC_HEADERS_FLAG) ? self.table(c.headers) : nil,
            deliveryMode: has(AMQP_BASIC_DELIVERY_MODE_FLAG) ? AMQPProperties.DeliveryMode(rawValue: c.delivery_mode) : nil,
            priority: has(AMQP_BASIC_PRIORITY_FLAG) ? c.priority : nil,
            messageId: has(AMQP_BASIC_MESSAGE_ID_FLAG) ? self.string(c.message_id) : nil,
            timestamp: has(AMQP_BASIC_TIMESTAMP_FLAG) ? c.timestamp : nil,
            userId: has(AMQP_BASIC_USER_ID_FLAG) ? self.string(c.user_id) : nil,
            rare: rare)
    }

    /// The flags of the properties `AMQPProperties` keeps in its box.
    static var rareFlags: UInt32 { UInt32(AMQP_BASIC_CONTENT_ENCODING_FLAG | AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG
                                             | AMQP_BASIC_EXPIRATION_FLAG | AMQP_BASIC_TYPE_FLAG | AMQP_BASIC_APP_ID_FLAG) }
}
