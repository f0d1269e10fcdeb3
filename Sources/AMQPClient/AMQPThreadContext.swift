#if canImport(Glibc)
import Glibc
#endif

/// Work that lives on a connection's own thread, beside rabbitmq-c: the thread polls the
/// extension's file descriptors together with the AMQP socket, and calls it every turn.
///
/// aq-bridge runs its libcurl transfers this way, so a task goes from delivery to HTTP request
/// to acknowledgement without a thread hop or a lock. Everything here runs on the connection
/// thread; never block in it (that would stop heartbeats).
public protocol AMQPConnectionExtension: AnyObject {
    /// Appends the descriptors to wait on; returns the longest wait allowed in ms (nil: any).
    func pollRequests(into fds: inout [pollfd]) -> Int32?
    /// What `poll` saw on the descriptors this extension asked for, in the same order.
    func handle(_ fds: ArraySlice<pollfd>)
    /// Called every turn of the loop. Return true when it did work (the thread then does not sleep).
    func runTurn() -> Bool
    /// The connection closed for good.
    func connectionClosed()
}

/// The connection thread's own API, for ``AMQPConnectionExtension``s and code run with
/// ``AMQPConnection/withThreadContext(_:)``. Valid on the connection thread only: it is neither
/// `Sendable` nor to be stored elsewhere.
public final class AMQPThreadContext {
    unowned let driver: ConnectionDriver

    init(driver: ConnectionDriver) { self.driver = driver }

    public var isConnected: Bool { self.driver.isConnected }
    public var isBlocked: Bool { self.driver.blocked }
    public var extensions: [any AMQPConnectionExtension] { self.driver.extensions }

    /// Adds an extension to the thread's loop.
    public func install(_ extension: any AMQPConnectionExtension) {
        self.driver.extensions.append(`extension`)
    }

    public func openChannel() throws(AMQPError) -> UInt16 { try self.driver.openChannel() }
    public func enableConfirms(channel: UInt16) throws(AMQPError) { try self.driver.enableConfirms(channel) }
    public func setPrefetch(channel: UInt16, count: UInt16) throws(AMQPError) {
        try self.driver.setPrefetch(channel, count: count, global: false)
    }

    /// Starts a consumer whose deliveries are handed to `handler` on this thread as they are read.
    /// It survives channel errors and recovery like any consumer; `onEnd` runs when it ends
    /// (with the error when the broker cancelled it). A delivery that cannot be read (body over
    /// `maxBodyBytes`, headers over the connection's ``AMQPContentLimits``) is rejected without
    /// requeue and reported to `onUnreadable` instead.
    public func consume(
        channel: UInt16, queue: String, tag: String? = nil, arguments: AMQPTable = [:], maxBodyBytes: Int? = nil,
        handler: @escaping (AMQPDelivery) -> Void, onUnreadable: ((AMQPUnreadableDelivery) -> Void)? = nil,
        onEnd: @escaping (AMQPError?) -> Void
    ) throws(AMQPError) -> String {
        let tag = tag ?? self.driver.makeConsumerTag()
        let consumer = ConsumerState(tag: tag, queue: queue, exclusive: false, noAck: false, arguments: arguments,
                                     buffer: nil, maxBodyBytes: maxBodyBytes ?? self.driver.configuration.contentLimits.maxBodyBytes,
                                     handler: handler, onUnreadable: onUnreadable, onEnd: onEnd)
        try self.driver.consume(channel, consumer)
        return tag
    }

    /// Declares a queue (`queue.declare`), or with `passive` checks that it exists. Unlike
    /// ``AMQPChannel/declareQueue(_:durable:exclusive:autoDelete:passive:arguments:)`` it is not
    /// recorded for recovery: for queues made at run time that another process may delete. A
    /// channel error (a passive declare of a missing queue: 404) closes and reopens the channel.
    @discardableResult
    public func declareQueue(channel: UInt16, name: String, durable: Bool = true, passive: Bool = false,
                             arguments: AMQPTable = [:]) throws(AMQPError) -> AMQPQueueInfo {
        let (conn, _) = try self.driver.requireChannel(channel)
        let queue = TopologyRecorder.Queue(name: name, durable: durable, exclusive: false, autoDelete: false, arguments: arguments)
        return try self.driver.rawDeclareQueue(conn, channel, queue, passive: passive)
    }

    /// Whether exchange `name` exists (a passive `exchange.declare`). A missing one is a channel
    /// error (404): the channel is closed and reopened.
    public func exchangeExists(channel: UInt16, name: String) throws(AMQPError) -> Bool {
        let (conn, _) = try self.driver.requireChannel(channel)
        let exchange = TopologyRecorder.Exchange(name: name, type: "topic", durable: true, autoDelete: false, isInternal: false, arguments: [:])
        do throws(AMQPError) {
            try self.driver.rawDeclareExchange(conn, channel, exchange, passive: true)
            return true
        } catch where error.replyCode == .notFound {
            return false
        }
    }

    /// Deletes a queue and returns how many messages it held.
    @discardableResult
    public func deleteQueue(channel: UInt16, name: String) throws(AMQPError) -> UInt32 {
        try self.driver.deleteQueue(channel, name: name, ifUnused: false, ifEmpty: false)
    }

    /// Binds a queue to an exchange, not recorded for recovery (see ``declareQueue(channel:name:durable:passive:arguments:)``).
    public func bindQueue(channel: UInt16, queue: String, exchange: String, routingKey: String) throws(AMQPError) {
        let (conn, _) = try self.driver.requireChannel(channel)
        try self.driver.rawBind(conn, channel, TopologyRecorder.Binding(toExchange: false, destination: queue, source: exchange,
                                                                        routingKey: routingKey, arguments: [:]), unbind: false)
    }

    /// Fetches one message (`basic.get`), or nil when the queue is empty.
    public func get(channel: UInt16, queue: String) throws(AMQPError) -> AMQPDelivery? {
        try self.driver.get(channel, queue: queue, noAck: false)
    }

    public func cancelConsumer(channel: UInt16, tag: String) throws(AMQPError) {
        try self.driver.cancelConsumer(channel, tag: tag)
    }

    /// Acknowledges at the end of this turn (acks of one turn are coalesced).
    public func ack(_ delivery: AMQPDelivery, multiple: Bool = false) {
        guard let acker = delivery.acker else { return }
        self.driver.acknowledge(acker.channel, epoch: acker.epoch, tag: delivery.deliveryTag, multiple: multiple, kind: .ack)
    }

    public func nack(_ delivery: AMQPDelivery, requeue: Bool) {
        guard let acker = delivery.acker else { return }
        self.driver.acknowledge(acker.channel, epoch: acker.epoch, tag: delivery.deliveryTag, multiple: false, kind: .nack(requeue: requeue))
    }

    /// True if acknowledging the delivery can still reach the broker (its channel was not reopened).
    public func isCurrent(_ delivery: AMQPDelivery) -> Bool {
        guard let acker = delivery.acker, let channel = self.driver.channels[acker.channel] else { return false }
        return self.driver.isConnected && channel.isOpen && channel.epoch == acker.epoch
    }

    /// Publishes; `completion` runs on this thread with the broker's confirm (or the failure).
    public func publish(
        channel: UInt16, exchange: String, routingKey: String, properties: AMQPProperties, body: [UInt8],
        mandatory: Bool = false, completion: @escaping (Result<AMQPPublishResult, AMQPError>) -> Void
    ) {
        self.driver.publish(channel, exchange: exchange, routingKey: routingKey, mandatory: mandatory, properties: properties,
                            body: body, completion: .onThread(ThreadCallback(completion)))
    }
}

extension AMQPConnection {
    /// Runs `body` on the connection thread with its ``AMQPThreadContext``.
    public func withThreadContext<T: Sendable>(_ body: @escaping @Sendable (AMQPThreadContext) throws -> T) async throws -> T {
        try await self.shared.perform { driver throws(AMQPError) -> Result<T, any Error> in
            Result { try body(driver.context) }
        }.get()
    }
}
