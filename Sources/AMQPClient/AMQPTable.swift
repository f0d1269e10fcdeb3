/// A value in an AMQP field table: queue arguments, message headers, client properties.
///
/// Every field type RabbitMQ arguments use is here. Integer literals become `.int64` (the
/// AMQP `l` type, which RabbitMQ accepts wherever it expects an integer).
public enum AMQPFieldValue: Sendable, Hashable {
    case bool(Bool)
    case int8(Int8)
    case uint8(UInt8)
    case int16(Int16)
    case uint16(UInt16)
    case int32(Int32)
    case uint32(UInt32)
    case int64(Int64)
    case uint64(UInt64)
    case float(Float)
    case double(Double)
    /// An AMQP decimal: `value / 10^scale`.
    case decimal(scale: UInt8, value: UInt32)
    /// A long string (type `S`), UTF-8.
    case string(String)
    /// A byte array (type `x`).
    case bytes([UInt8])
    case array([AMQPFieldValue])
    case table(AMQPTable)
    /// Seconds since the Unix epoch.
    case timestamp(UInt64)
    case void

    /// The value as a string, if it is one.
    public var stringValue: String? {
        switch self {
        case .string(let s): return s
        case .bytes(let b): return String(decoding: b, as: UTF8.self)
        default: return nil
        }
    }

    /// The value as an integer, if it is any integer type that fits.
    public var intValue: Int64? {
        switch self {
        case .int8(let v): return Int64(v)
        case .uint8(let v): return Int64(v)
        case .int16(let v): return Int64(v)
        case .uint16(let v): return Int64(v)
        case .int32(let v): return Int64(v)
        case .uint32(let v): return Int64(v)
        case .int64(let v): return v
        case .uint64(let v): return Int64(exactly: v)
        case .timestamp(let v): return Int64(exactly: v)
        default: return nil
        }
    }

    /// The value as a Bool, if it is one.
    public var boolValue: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }
}

extension AMQPFieldValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByFloatLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int64(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(arrayLiteral elements: AMQPFieldValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, AMQPFieldValue)...) {
        self = .table(AMQPTable(elements.map { AMQPTable.Entry(key: $0.0, value: $0.1) }))
    }
}

/// An ordered AMQP field table. Keys are unique; setting an existing key replaces its value.
public struct AMQPTable: Sendable, Hashable, ExpressibleByDictionaryLiteral, Sequence {
    public struct Entry: Sendable, Hashable {
        public var key: String
        public var value: AMQPFieldValue
        public init(key: String, value: AMQPFieldValue) {
            self.key = key
            self.value = value
        }
    }

    public private(set) var entries: [Entry]

    public init() { self.entries = [] }

    public init(_ entries: [Entry]) {
        self.entries = []
        self.entries.reserveCapacity(entries.count)
        for entry in entries { self[entry.key] = entry.value }
    }

    public init(dictionaryLiteral elements: (String, AMQPFieldValue)...) {
        self.init(elements.map { Entry(key: $0.0, value: $0.1) })
    }

    /// A table as read off the wire, in linear time: a key that appears twice keeps its first
    /// position and its last value, as ``init(_:)`` does (which is quadratic for large tables).
    init(decoded entries: [Entry]) {
        self.entries = []
        guard entries.count > 16 else {
            self.entries.reserveCapacity(entries.count)
            for entry in entries { self[entry.key] = entry.value }
            return
        }
        var position: [String: Int] = [:]
        position.reserveCapacity(entries.count)
        var unique: [Entry] = []
        unique.reserveCapacity(entries.count)
        for entry in entries {
            if let index = position[entry.key] {
                unique[index].value = entry.value
            } else {
                position[entry.key] = unique.count
                unique.append(entry)
            }
        }
        self.entries = unique
    }

    public var isEmpty: Bool { self.entries.isEmpty }
    public var count: Int { self.entries.count }
    public var keys: [String] { self.entries.map(\.key) }

    public subscript(key: String) -> AMQPFieldValue? {
        get { self.entries.first(where: { $0.key == key })?.value }
        set {
            if let index = self.entries.firstIndex(where: { $0.key == key }) {
                if let newValue { self.entries[index].value = newValue } else { self.entries.remove(at: index) }
            } else if let newValue {
                self.entries.append(Entry(key: key, value: newValue))
            }
        }
    }

    public func makeIterator() -> IndexingIterator<[Entry]> { self.entries.makeIterator() }

    /// Tables compare equal when they hold the same keys and values, in any order.
    public static func == (lhs: AMQPTable, rhs: AMQPTable) -> Bool {
        guard lhs.entries.count == rhs.entries.count else { return false }
        return lhs.entries.allSatisfy { rhs[$0.key] == $0.value }
    }

    public func hash(into hasher: inout Hasher) {
        for entry in self.entries.sorted(by: { $0.key < $1.key }) {
            hasher.combine(entry.key)
            hasher.combine(entry.value)
        }
    }
}
