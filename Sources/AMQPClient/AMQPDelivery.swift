/// A message the broker delivered to a consumer or returned from `basic.get`.
public struct AMQPDelivery: Sendable {
    public let body: [UInt8]
    public let properties: AMQPProperties
    public let exchange: String
    public let routingKey: String
    /// Channel-scoped tag used by ``ack(multiple:)``.
    public let deliveryTag: UInt64
    /// The broker may have delivered this message before (to this or another consumer).
    public let isRedelivered: Bool
    public let consumerTag: String?
    /// For `basic.get`: how many messages are left in the queue.
    public var messageCount: UInt32? { self.got?.messageCount }
    /// For `basic.get`: why the message could not be read (its properties over the client's
    /// ``AMQPContentLimits``, its body over the size cap), with `body` empty and, when the
    /// properties were the problem, `properties` empty. Settle it yourself (ack, or reject to
    /// dead-letter it). Consumers never see such deliveries: the client rejects them.
    public var contentProblem: String? { self.got?.contentProblem }
    /// What only `basic.get` has, apart: 8 bytes in every consumer's delivery instead of 24.
    private let got: Got?
    let acker: DeliveryAcker?

    final class Got: Sendable {
        let messageCount: UInt32?
        let contentProblem: String?
        init(messageCount: UInt32?, contentProblem: String?) {
            self.messageCount = messageCount
            self.contentProblem = contentProblem
        }
    }

    init(body: [UInt8], properties: AMQPProperties, exchange: String, routingKey: String, deliveryTag: UInt64,
         isRedelivered: Bool, consumerTag: String?, messageCount: UInt32?, contentProblem: String? = nil, acker: DeliveryAcker?) {
        self.init(body: body, properties: properties, exchange: exchange, routingKey: routingKey, deliveryTag: deliveryTag,
                  isRedelivered: isRedelivered, consumerTag: consumerTag,
                  got: messageCount == nil && contentProblem == nil ? nil : Got(messageCount: messageCount, contentProblem: contentProblem),
                  acker: acker)
    }

    private init(body: [UInt8], properties: AMQPProperties, exchange: String, routingKey: String, deliveryTag: UInt64,
                 isRedelivered: Bool, consumerTag: String?, got: Got?, acker: DeliveryAcker?) {
        self.body = body
        self.properties = properties
        self.exchange = exchange
        self.routingKey = routingKey
        self.deliveryTag = deliveryTag
        self.isRedelivered = isRedelivered
        self.consumerTag = consumerTag
        self.got = got
        self.acker = acker
    }

    /// The body decoded as UTF-8.
    public var bodyString: String { String(decoding: self.body, as: UTF8.self) }

    /// The same delivery (still acknowledgeable) without its body, so a holder can let the body's
    /// memory go once it has no more use for it.
    public func withoutBody() -> AMQPDelivery { self.with(body: []) }

    /// The same delivery (still acknowledgeable) holding `body` instead: for a holder that turned
    /// the message into another one it now stands for (acknowledging settles the original).
    public func with(body: [UInt8]) -> AMQPDelivery {
        AMQPDelivery(body: body, properties: self.properties, exchange: self.exchange, routingKey: self.routingKey,
                     deliveryTag: self.deliveryTag, isRedelivered: self.isRedelivered, consumerTag: self.consumerTag,
                     got: self.got, acker: self.acker)
    }

    /// Acknowledges the delivery (and, with `multiple`, every earlier one on its channel).
    ///
    /// Acknowledgements are asynchronous in AMQP: this returns once the ack is queued for the
    /// connection thread. If the channel or connection was lost since the delivery, the ack is
    /// dropped: the broker has already put the message back and will deliver it again.
    /// - Throws: ``AMQPError`` if the connection is closed for good or the delivery was consumed
    ///   with `noAck`.
    public func ack(multiple: Bool = false) throws {
        try self.send(multiple: multiple, kind: .ack)
    }

    /// Negatively acknowledges: `requeue` puts it back, otherwise it is dead-lettered or dropped.
    public func nack(multiple: Bool = false, requeue: Bool = true) throws {
        try self.send(multiple: multiple, kind: .nack(requeue: requeue))
    }

    /// Rejects one delivery: `requeue` puts it back, otherwise it is dead-lettered or dropped.
    public func reject(requeue: Bool = true) throws {
        try self.send(multiple: false, kind: .reject(requeue: requeue))
    }

    private func send(multiple: Bool, kind: ConnectionDriver.AckKind) throws {
        guard let acker = self.acker else {
            throw AMQPError.invalidArgument("this delivery was consumed with noAck; there is nothing to acknowledge")
        }
        let (channel, epoch, tag) = (acker.channel, acker.epoch, self.deliveryTag)
        let submitted = acker.shared.mailbox.submit { driver in
            driver.acknowledge(channel, epoch: epoch, tag: tag, multiple: multiple, kind: kind)
        }
        if !submitted { throw acker.shared.closedError() }
    }
}

/// Where a delivery's acknowledgement goes: its connection, channel and channel epoch.
struct DeliveryAcker: Sendable {
    let shared: ConnectionShared
    let channel: UInt16
    let epoch: UInt64
}

/// A consumer's deliveries, in order. Iterate it; the sequence ends with an error if the broker
/// cancels the consumer (its queue was deleted) and ends normally after ``cancel()``, after the
/// connection is closed, or when the iterating task is cancelled (which also cancels the consumer).
public struct AMQPConsumer: AsyncSequence, Sendable {
    public typealias Element = AMQPDelivery
    public let tag: String
    public let queue: String
    let channel: AMQPChannel
    let buffer: DeliveryBuffer

    /// Iterates one consumer. Deliveries come in batches taken under one lock; a single task
    /// should iterate a consumer.
    public struct AsyncIterator: AsyncIteratorProtocol {
        let buffer: DeliveryBuffer
        /// The batch taken; each delivery is moved out (`take()`), not copied.
        var batch: [AMQPDelivery?] = []
        var index = 0

        public mutating func next() async throws -> AMQPDelivery? {
            while true {
                while self.index < self.batch.count {
                    defer { self.index += 1 }
                    if let delivery = self.batch[self.index].take() { return delivery }
                }
                self.batch.removeAll(keepingCapacity: true)
                self.index = 0
                guard try await self.buffer.take(into: &self.batch) else { return nil }
            }
        }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(buffer: self.buffer) }

    /// Cancels the consumer (`basic.cancel`); the sequence then ends. Deliveries already received
    /// can still be acknowledged.
    public func cancel() async throws {
        let (id, tag) = (self.channel.id, self.tag)
        try await self.channel.connection.shared.perform { driver throws(AMQPError) in try driver.cancelConsumer(id, tag: tag) }
    }
}

/// A delivery the client could not read and rejected (`requeue: false`, so the queue's
/// dead-letter exchange gets it whole), reported to thread-hosted consumers.
public struct AMQPUnreadableDelivery: Sendable {
    /// The properties, when they were readable (the body was the problem).
    public let properties: AMQPProperties?
    /// Why it could not be read.
    public let problem: String
    /// The body size its header frame announced.
    public let bodySize: UInt64
    public let exchange: String
    public let routingKey: String
    public let deliveryTag: UInt64
    public let isRedelivered: Bool
}

/// A message the broker could not route and returned (`basic.return`, for `mandatory` publishes).
public struct AMQPReturnedMessage: Sendable, Hashable {
    /// Usually 312 (`NO_ROUTE`).
    public let replyCode: UInt16
    public let replyText: String
    public let exchange: String
    public let routingKey: String
    public let properties: AMQPProperties
    public let body: [UInt8]
}

/// What became of a publish.
public enum AMQPPublishResult: Sendable, Hashable {
    /// The broker confirmed it: it is in every queue it routed to (on disk if persistent).
    case confirmed
    /// The broker confirmed it but could not route it anywhere and returned it (`mandatory`).
    case returned(AMQPReturnedMessage)
    /// Sent on a channel without confirms: nothing is known beyond the socket write.
    case sent
}

/// Information from `queue.declare-ok`.
public struct AMQPQueueInfo: Sendable, Hashable {
    public let name: String
    public let messageCount: UInt32
    public let consumerCount: UInt32
}
