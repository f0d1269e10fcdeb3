/// A message whose header and body frames are still arriving on a channel, after its
/// `basic.deliver`, `basic.return` or `basic.get-ok`.
///
/// The connection thread reads content frames itself, one at a time inside its frame loop,
/// instead of calling rabbitmq-c's `amqp_read_message`: that call clones the properties and
/// fails on what its own decoder accepted (an empty header name, at any depth), which used to
/// look like a lost connection; and it blocks until the whole body is there. Frames are fed in
/// the order they arrive; a message that cannot be read (properties over the limits, a body over
/// the size cap) is still read to its end, without keeping its body, and then settled alone.
///
/// Pure: no C, no I/O. The driver decodes the header frame's properties and feeds the results.
struct IncomingContent {
    enum Origin {
        case deliver(consumerTag: String, deliveryTag: UInt64, redelivered: Bool, exchange: String, routingKey: String)
        case returned(replyCode: UInt16, replyText: String, exchange: String, routingKey: String)
        case getOk(deliveryTag: UInt64, redelivered: Bool, exchange: String, routingKey: String, messageCount: UInt32)
    }

    /// What feeding a frame came to.
    enum Step: Equatable {
        /// More frames are needed.
        case needMore
        /// The message is complete (see ``properties``, ``body`` and ``problem``).
        case complete
        /// The frames broke the protocol (a body frame before the header, more bytes than
        /// announced): the connection cannot be trusted any more.
        case protocolError(String)
    }

    let origin: Origin
    /// The largest body kept; a larger one makes the message unreadable.
    let maxBodyBytes: Int
    private(set) var properties: AMQPProperties?
    private(set) var body: [UInt8] = []
    /// Why the message cannot be handed over as it is (nil: it can).
    private(set) var problem: String?
    /// The size the header frame announced (nil until it arrived).
    private(set) var bodySize: UInt64?
    private var received: UInt64 = 0

    init(origin: Origin, maxBodyBytes: Int) {
        self.origin = origin
        self.maxBodyBytes = maxBodyBytes
    }

    var hasHeader: Bool { self.bodySize != nil }

    /// The header frame: the properties as decoded (or why they could not be), and the size.
    mutating func header(properties: Result<AMQPProperties, ContentProblem>, bodySize: UInt64) -> Step {
        guard self.bodySize == nil else { return .protocolError("a second content header frame for one message") }
        self.bodySize = bodySize
        switch properties {
        case .success(let p): self.properties = p
        case .failure(let why): self.problem = why.description
        }
        if bodySize > UInt64(self.maxBodyBytes) {
            self.problem = self.problem ?? "its body of \(bodySize) bytes is over the limit of \(self.maxBodyBytes) bytes"
        } else if self.problem == nil {
            self.body.reserveCapacity(Int(bodySize))
        }
        return bodySize == 0 ? .complete : .needMore
    }

    /// A body frame's fragment.
    mutating func body(_ fragment: UnsafeRawBufferPointer) -> Step {
        guard let size = self.bodySize else { return .protocolError("a content body frame before its header frame") }
        self.received += UInt64(fragment.count)
        guard self.received <= size else {
            return .protocolError("content body frames carry \(self.received) bytes, more than the \(size) announced")
        }
        if self.problem == nil { self.body.append(contentsOf: fragment) }
        return self.received == size ? .complete : .needMore
    }
}

/// Why a message's content could not be read.
struct ContentProblem: Error, Equatable, CustomStringConvertible {
    var description: String
}

/// How much of a header table the client reads before it calls a message unreadable: a
/// publisher's headers must not cost the connection's thread unbounded time or stack.
public struct AMQPContentLimits: Sendable, Hashable {
    /// Fields in all of a message's tables and arrays together (nested ones included).
    public var maxHeaderFields: Int
    /// Tables and arrays nested in one another.
    public var maxHeaderDepth: Int
    /// The largest message body read; a larger message is unreadable (consumers can lower it).
    public var maxBodyBytes: Int

    public init(maxHeaderFields: Int = 10_000, maxHeaderDepth: Int = 32, maxBodyBytes: Int = 128 << 20) {
        self.maxHeaderFields = maxHeaderFields
        self.maxHeaderDepth = maxHeaderDepth
        self.maxBodyBytes = maxBodyBytes
    }
}
