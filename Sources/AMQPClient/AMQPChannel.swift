/// Exchange types RabbitMQ supports out of the box.
public struct AMQPExchangeType: RawRepresentable, Hashable, Sendable, ExpressibleByStringLiteral {
    public var rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public init(stringLiteral value: String) { self.rawValue = value }
    public static let direct = AMQPExchangeType(rawValue: "direct")
    public static let fanout = AMQPExchangeType(rawValue: "fanout")
    public static let topic = AMQPExchangeType(rawValue: "topic")
    public static let headers = AMQPExchangeType(rawValue: "headers")
}

/// A channel on an ``AMQPConnection``: declare topology, publish, consume.
///
/// A handle: copies refer to the same channel. The connection thread reopens the channel when the
/// broker closes it for an error (the error is thrown by the operation that caused it, or else
/// by the next operation on the channel) and when the connection recovers.
public struct AMQPChannel: Sendable {
    public let connection: AMQPConnection
    /// The AMQP channel number.
    public let id: UInt16

    init(connection: AMQPConnection, id: UInt16) {
        self.connection = connection
        self.id = id
    }

    private var shared: ConnectionShared { self.connection.shared }

    private func run<T: Sendable>(_ body: @escaping @Sendable (ConnectionDriver, UInt16) throws(AMQPError) -> T) async throws -> T {
        let id = self.id
        return try await self.shared.perform { driver throws(AMQPError) in try body(driver, id) }
    }

    // MARK: Channel settings

    /// Puts the channel in confirm mode (`confirm.select`): every publish is then confirmed.
    public func enableConfirms() async throws {
        try await self.run { driver, id throws(AMQPError) in try driver.enableConfirms(id) }
    }

    /// Puts the channel in transaction mode (`tx.select`): its publishes and acks then take effect
    /// together at ``commit()``, or not at all if the connection or channel goes first. Not with
    /// confirm mode. RabbitMQ applies a commit atomically for one client; a broker that fails in
    /// the middle of one may apply part of it.
    public func enableTransactions() async throws {
        try await self.run { driver, id throws(AMQPError) in try driver.selectTransactions(id) }
    }

    /// Commits the channel's transaction (`tx.commit`): every publish and ack since the last
    /// commit, with the publishes in their queues (on disk if persistent) once it returns.
    /// - Returns: the `mandatory` publishes no queue took (they were not enqueued; the acks
    ///   committed with them were applied).
    @discardableResult
    public func commit() async throws -> [AMQPReturnedMessage] {
        try await self.run { driver, id throws(AMQPError) in try driver.commit(id) }
    }

    /// Limits unacknowledged deliveries per consumer (`basic.qos`; `global` = per channel).
    public func setPrefetch(_ count: UInt16, global: Bool = false) async throws {
        try await self.run { driver, id throws(AMQPError) in try driver.setPrefetch(id, count: count, global: global) }
    }

    /// Closes the channel. Its consumers end; its unconfirmed publishes fail (outcome unknown).
    public func close() async throws {
        try await self.run { driver, id throws(AMQPError) in try driver.closeChannel(id) }
    }

    // MARK: Exchanges

    /// Declares an exchange (`exchange.declare`). With `passive`, only checks that it exists.
    public func declareExchange(
        _ name: String, type: AMQPExchangeType, durable: Bool = true, autoDelete: Bool = false,
        internal: Bool = false, passive: Bool = false, arguments: AMQPTable = [:]
    ) async throws {
        let exchange = TopologyRecorder.Exchange(name: name, type: type.rawValue, durable: durable, autoDelete: autoDelete,
                                                 isInternal: `internal`, arguments: arguments)
        try await self.run { driver, id throws(AMQPError) in try driver.declareExchange(id, exchange, passive: passive) }
    }

    /// Deletes an exchange (`exchange.delete`).
    public func deleteExchange(_ name: String, ifUnused: Bool = false) async throws {
        try await self.run { driver, id throws(AMQPError) in try driver.deleteExchange(id, name: name, ifUnused: ifUnused) }
    }

    /// Binds exchange `destination` to `source` (`exchange.bind`).
    public func bindExchange(_ destination: String, to source: String, routingKey: String = "", arguments: AMQPTable = [:]) async throws {
        let binding = TopologyRecorder.Binding(toExchange: true, destination: destination, source: source, routingKey: routingKey, arguments: arguments)
        try await self.run { driver, id throws(AMQPError) in try driver.bind(id, binding, unbind: false) }
    }

    /// Removes an exchange-to-exchange binding (`exchange.unbind`).
    public func unbindExchange(_ destination: String, from source: String, routingKey: String = "", arguments: AMQPTable = [:]) async throws {
        let binding = TopologyRecorder.Binding(toExchange: true, destination: destination, source: source, routingKey: routingKey, arguments: arguments)
        try await self.run { driver, id throws(AMQPError) in try driver.bind(id, binding, unbind: true) }
    }

    // MARK: Queues

    /// Declares a queue (`queue.declare`). With `passive`, only checks that it exists.
    /// An empty name asks the broker to name it; the name is in the result.
    @discardableResult
    public func declareQueue(
        _ name: String, durable: Bool = true, exclusive: Bool = false, autoDelete: Bool = false,
        passive: Bool = false, arguments: AMQPTable = [:]
    ) async throws -> AMQPQueueInfo {
        let queue = TopologyRecorder.Queue(name: name, durable: durable, exclusive: exclusive, autoDelete: autoDelete, arguments: arguments)
        return try await self.run { driver, id throws(AMQPError) in try driver.declareQueue(id, queue, passive: passive) }
    }

    /// Deletes a queue (`queue.delete`) and returns how many messages it held.
    @discardableResult
    public func deleteQueue(_ name: String, ifUnused: Bool = false, ifEmpty: Bool = false) async throws -> UInt32 {
        try await self.run { driver, id throws(AMQPError) in try driver.deleteQueue(id, name: name, ifUnused: ifUnused, ifEmpty: ifEmpty) }
    }

    /// Removes every ready message from a queue (`queue.purge`) and returns how many.
    @discardableResult
    public func purgeQueue(_ name: String) async throws -> UInt32 {
        try await self.run { driver, id throws(AMQPError) in try driver.purgeQueue(id, name: name) }
    }

    /// Binds a queue to an exchange (`queue.bind`).
    public func bindQueue(_ queue: String, to exchange: String, routingKey: String = "", arguments: AMQPTable = [:]) async throws {
        let binding = TopologyRecorder.Binding(toExchange: false, destination: queue, source: exchange, routingKey: routingKey, arguments: arguments)
        try await self.run { driver, id throws(AMQPError) in try driver.bind(id, binding, unbind: false) }
    }

    /// Removes a queue binding (`queue.unbind`).
    public func unbindQueue(_ queue: String, from exchange: String, routingKey: String = "", arguments: AMQPTable = [:]) async throws {
        let binding = TopologyRecorder.Binding(toExchange: false, destination: queue, source: exchange, routingKey: routingKey, arguments: arguments)
        try await self.run { driver, id throws(AMQPError) in try driver.bind(id, binding, unbind: true) }
    }

    // MARK: Publishing

    /// Publishes a message and, on a channel in confirm mode, waits for the broker's confirm.
    ///
    /// - Parameters:
    ///   - exchange: `""` is the default exchange, which routes by queue name.
    ///   - mandatory: ask the broker to return the message if no queue takes it; the result is
    ///     then `.returned`.
    /// - Throws: ``AMQPError``: `publishNacked`, a channel error such as a missing exchange
    ///   (`channelClosedByServer`, 404), or a lost connection (``AMQPError/isOutcomeUnknown``).
    @discardableResult
    public func publish(
        _ body: [UInt8], exchange: String = "", routingKey: String, properties: AMQPProperties = AMQPProperties(),
        mandatory: Bool = false
    ) async throws -> AMQPPublishResult {
        let id = self.id
        let shared = self.shared
        return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<AMQPPublishResult, any Error>) in
            let submitted = shared.mailbox.submit { driver in
                driver.publish(id, exchange: exchange, routingKey: routingKey, mandatory: mandatory, properties: properties,
                               body: body, completion: .continuation(continuation))
            }
            if !submitted { continuation.resume(throwing: shared.closedError()) }
        }
    }

    /// Publishes a UTF-8 string.
    @discardableResult
    public func publish(
        _ body: String, exchange: String = "", routingKey: String, properties: AMQPProperties = AMQPProperties(),
        mandatory: Bool = false
    ) async throws -> AMQPPublishResult {
        try await self.publish(Array(body.utf8), exchange: exchange, routingKey: routingKey, properties: properties, mandatory: mandatory)
    }

    /// Publishes without waiting: returns at once with a handle whose
    /// ``AMQPPublishConfirm/result()`` awaits the broker's confirm. Use it to keep many
    /// publishes in flight; the order of `beginPublish` calls is the order on the wire.
    public func beginPublish(
        _ body: [UInt8], exchange: String = "", routingKey: String, properties: AMQPProperties = AMQPProperties(),
        mandatory: Bool = false
    ) -> AMQPPublishConfirm {
        let id = self.id
        let confirm = AMQPPublishConfirm()
        let submitted = self.shared.mailbox.submit { driver in
            driver.publish(id, exchange: exchange, routingKey: routingKey, mandatory: mandatory, properties: properties,
                           body: body, completion: .future(confirm))
        }
        if !submitted { confirm.complete(.failure(self.shared.closedError())) }
        return confirm
    }

    // MARK: Consuming

    /// Starts a consumer (`basic.consume`) and returns its deliveries as an async sequence.
    ///
    /// Set a prefetch with ``setPrefetch(_:global:)`` first: it bounds how many unacknowledged
    /// deliveries the broker sends, and so the buffer. Ack each delivery with
    /// ``AMQPDelivery/ack(multiple:)`` (unless `noAck`). The consumer survives channel errors and
    /// connection recovery; it ends with ``AMQPError/Code/consumerCancelled`` if the broker cancels
    /// it (its queue was deleted).
    ///
    /// A delivery the client cannot read — its body over `maxBodyBytes` (default: the
    /// connection's ``AMQPContentLimits/maxBodyBytes``), its headers over the connection's
    /// ``AMQPContentLimits`` — is rejected alone without requeue (the queue's dead-letter exchange
    /// gets it whole) and never reaches the sequence; the connection carries on.
    public func consume(
        _ queue: String, tag: String? = nil, exclusive: Bool = false, noAck: Bool = false, arguments: AMQPTable = [:],
        maxBodyBytes: Int? = nil
    ) async throws -> AMQPConsumer {
        let buffer = DeliveryBuffer()
        let shared = self.shared
        let id = self.id
        let tag = try await shared.perform { driver throws(AMQPError) -> String in
            let tag = tag ?? driver.makeConsumerTag()
            let consumer = ConsumerState(tag: tag, queue: queue, exclusive: exclusive, noAck: noAck, arguments: arguments,
                                         buffer: buffer, maxBodyBytes: maxBodyBytes ?? driver.configuration.contentLimits.maxBodyBytes)
            try driver.consume(id, consumer)
            return tag
        }
        buffer.onCancel.withLock { handler in
            // The consuming task was cancelled: cancel the consumer so the broker stops sending.
            handler = {
                shared.mailbox.submit { driver in
                    do throws(AMQPError) { try driver.cancelConsumer(id, tag: tag) } catch {}
                }
            }
        }
        return AMQPConsumer(tag: tag, queue: queue, channel: self, buffer: buffer)
    }

    /// Fetches one message (`basic.get`), or nil when the queue is empty.
    public func get(_ queue: String, noAck: Bool = false) async throws -> AMQPDelivery? {
        try await self.run { driver, id throws(AMQPError) in try driver.get(id, queue: queue, noAck: noAck) }
    }
}
