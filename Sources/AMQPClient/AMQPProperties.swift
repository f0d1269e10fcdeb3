/// The basic-class properties of a message: what `basic.publish` sends and a delivery carries.
public struct AMQPProperties: Sendable, Hashable {
    /// Whether the broker writes the message to disk (`delivery_mode` 2) or not (1).
    public enum DeliveryMode: UInt8, Sendable, Hashable {
        case transient = 1
        case persistent = 2
    }

    public var contentType: String?
    public var headers: AMQPTable?
    public var deliveryMode: DeliveryMode?
    public var priority: UInt8?
    public var messageId: String?
    /// Seconds since the Unix epoch.
    public var timestamp: UInt64?
    public var userId: String?
    /// The six properties most messages leave unset, held apart: a message without any of them
    /// carries 8 bytes for all six instead of 96 (a bridge holds thousands of deliveries at once).
    /// Nil whenever all six are.
    private var rare: Rare?

    public var contentEncoding: String? {
        get { self.rare?.fields.contentEncoding }
        set { self.updateRare { $0.contentEncoding = newValue } }
    }
    public var correlationId: String? {
        get { self.rare?.fields.correlationId }
        set { self.updateRare { $0.correlationId = newValue } }
    }
    public var replyTo: String? {
        get { self.rare?.fields.replyTo }
        set { self.updateRare { $0.replyTo = newValue } }
    }
    /// Per-message TTL in milliseconds, as a decimal string (AMQP's own encoding).
    public var expiration: String? {
        get { self.rare?.fields.expiration }
        set { self.updateRare { $0.expiration = newValue } }
    }
    public var type: String? {
        get { self.rare?.fields.type }
        set { self.updateRare { $0.type = newValue } }
    }
    public var appId: String? {
        get { self.rare?.fields.appId }
        set { self.updateRare { $0.appId = newValue } }
    }

    struct RareFields: Sendable, Hashable {
        var contentEncoding: String?
        var correlationId: String?
        var replyTo: String?
        var expiration: String?
        var type: String?
        var appId: String?

        /// All six unset. (Spelled out: `== RareFields()` builds, compares and destroys a second
        /// value field by field, on every message decoded and every one published.)
        var isEmpty: Bool {
            self.contentEncoding == nil && self.correlationId == nil && self.replyTo == nil && self.expiration == nil
                && self.type == nil && self.appId == nil
        }
    }

    /// Immutable: a change makes a new one, so copies of the properties never share a mutation.
    final class Rare: Sendable, Hashable {
        let fields: RareFields
        init(_ fields: RareFields) { self.fields = fields }
        static func == (a: Rare, b: Rare) -> Bool { a === b || a.fields == b.fields }
        func hash(into hasher: inout Hasher) { hasher.combine(self.fields) }
    }

    mutating func updateRare(_ change: (inout RareFields) -> Void) {
        var fields = self.rare?.fields ?? RareFields()
        change(&fields)
        self.setRare(fields)
    }

    /// Sets the six at once (one allocation when any is set): for decoding.
    mutating func setRare(_ fields: RareFields) {
        self.rare = fields.isEmpty ? nil : Rare(fields)
    }

    /// All fields at once, the six rare ones boxed when any is set (the public init, and decoding).
    init(contentType: String?, headers: AMQPTable?, deliveryMode: DeliveryMode?, priority: UInt8?, messageId: String?,
         timestamp: UInt64?, userId: String?, rare: RareFields?) {
        self.contentType = contentType
        self.headers = headers
        self.deliveryMode = deliveryMode
        self.priority = priority
        self.messageId = messageId
        self.timestamp = timestamp
        self.userId = userId
        if let rare { self.setRare(rare) }
    }

    public init(
        contentType: String? = nil, contentEncoding: String? = nil, headers: AMQPTable? = nil,
        deliveryMode: DeliveryMode? = nil, priority: UInt8? = nil, correlationId: String? = nil,
        replyTo: String? = nil, expiration: String? = nil, messageId: String? = nil,
        timestamp: UInt64? = nil, type: String? = nil, userId: String? = nil, appId: String? = nil
    ) {
        self.init(contentType: contentType, headers: headers, deliveryMode: deliveryMode, priority: priority, messageId: messageId,
                  timestamp: timestamp, userId: userId,
                  rare: RareFields(contentEncoding: contentEncoding, correlationId: correlationId, replyTo: replyTo,
                                   expiration: expiration, type: type, appId: appId))
    }

    /// True when `deliveryMode` is `.persistent`.
    public var isPersistent: Bool {
        get { self.deliveryMode == .persistent }
        set { self.deliveryMode = newValue ? .persistent : .transient }
    }
}
