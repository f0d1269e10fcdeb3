internal import CAQRabbitMQ

/// How a publish reports back: to an awaiting task, a future, or nobody.
enum PublishCompletion: Sendable {
    case none
    case continuation(CheckedContinuation<AMQPPublishResult, any Error>)
    case future(AMQPPublishConfirm)
    case onThread(ThreadCallback)

    func complete(_ result: Result<AMQPPublishResult, AMQPError>) {
        switch self {
        case .none: break
        case .onThread(let callback): callback.body(result)
        case .continuation(let continuation): continuation.resume(with: result.mapError { $0 })
        case .future(let future): future.complete(result)
        }
    }
}

/// A completion that runs on the connection thread.
///
/// `@unchecked Sendable`: it is created by code running on the connection thread (through
/// ``AMQPThreadContext``), stored in the thread's own state, and invoked only by that thread; it
/// is never touched from elsewhere, so its non-Sendable closure is never shared between threads.
final class ThreadCallback: @unchecked Sendable {
    let body: (Result<AMQPPublishResult, AMQPError>) -> Void
    init(_ body: @escaping (Result<AMQPPublishResult, AMQPError>) -> Void) { self.body = body }
}

/// A publish waiting for its confirm.
struct PendingPublish {
    var completion: PublishCompletion
    var messageId: String?
    var exchange: String
    var routingKey: String
    var returned: AMQPReturnedMessage?
}

/// A consumer as the connection thread knows it.
final class ConsumerState {
    let tag: String
    let queue: String
    let exclusive: Bool
    let noAck: Bool
    let arguments: AMQPTable
    /// Where deliveries go for an async-sequence consumer.
    let buffer: DeliveryBuffer?
    /// Or: called on the connection thread for each delivery (thread-hosted consumers).
    let handler: ((AMQPDelivery) -> Void)?
    /// Called on the connection thread when a thread-hosted consumer ends (nil: normally).
    let onEnd: ((AMQPError?) -> Void)?
    /// Called on the connection thread for a delivery that could not be read (after the client
    /// rejected it to the queue's dead-letter exchange).
    let onUnreadable: ((AMQPUnreadableDelivery) -> Void)?
    /// The largest body this consumer accepts; a larger delivery is unreadable.
    let maxBodyBytes: Int
    /// Deliveries read in the current turn, appended to `buffer` in one go.
    var ready: [AMQPDelivery?] = []

    init(tag: String, queue: String, exclusive: Bool, noAck: Bool, arguments: AMQPTable, buffer: DeliveryBuffer?,
         maxBodyBytes: Int, handler: ((AMQPDelivery) -> Void)? = nil, onUnreadable: ((AMQPUnreadableDelivery) -> Void)? = nil,
         onEnd: ((AMQPError?) -> Void)? = nil) {
        self.tag = tag
        self.queue = queue
        self.exclusive = exclusive
        self.noAck = noAck
        self.arguments = arguments
        self.buffer = buffer
        self.maxBodyBytes = maxBodyBytes
        self.handler = handler
        self.onUnreadable = onUnreadable
        self.onEnd = onEnd
    }

    func end(_ error: AMQPError?) {
        self.buffer?.finish(throwing: error)
        self.onEnd?(error)
    }
}

/// Everything the connection thread keeps about one channel, so it can be reopened as it was.
final class ChannelState {
    let id: UInt16
    var isOpen = false
    /// Bumped whenever the channel is reopened: delivery tags from an older epoch are dead.
    var epoch: UInt64 = 0
    var confirmMode = false
    /// Since when every confirm on this channel has been a nack (nil after an ack). RabbitMQ
    /// 3.10 nacks every publish of a channel that first reached a quorum queue while the queue
    /// elected a new leader (its old leader's node had just died) — for as long as the channel
    /// lives, whatever the new leader does. The driver reopens such a channel.
    var nackedSince: ContinuousClock.Instant?
    var recycleRequested = false
    /// In transaction mode (`tx.select`): publishes and acks take effect at `tx.commit`.
    var transactional = false
    /// Why the open transaction cannot commit: a publish of it never reached the broker, or the
    /// channel was reopened (the broker's close took the transaction with it).
    var transactionFailure: AMQPError?
    /// The transaction's loss was already thrown to the caller (by the commit that met the close).
    var transactionLossReported = false
    /// Messages the broker returned (`mandatory`) since the last commit, in transaction mode.
    var returnedInTransaction: [AMQPReturnedMessage] = []
    var prefetch: (count: UInt16, global: Bool)?
    var tracker = ConfirmTracker<PendingPublish>()
    var consumers: [String: ConsumerState] = [:]

    /// The consumer a delivery's `consumer_tag` names, found without making a String of the tag
    /// (an allocation per delivery: tags are 31 bytes) or hashing it: a channel has one consumer,
    /// or a few.
    func consumer(tagged bytes: amqp_bytes_t) -> ConsumerState? {
        guard self.consumers.count <= Self.consumersScanned else { return self.consumers[CDecode.string(bytes)] }
        for consumer in self.consumers.values where CDecode.equals(consumer.tag, bytes) { return consumer }
        return nil
    }

    /// The consumer tagged `tag`. With the tag a consumer's own string (``consumer(tagged:)``),
    /// the comparison is a pointer comparison.
    func consumer(_ tag: String) -> ConsumerState? {
        guard self.consumers.count <= Self.consumersScanned else { return self.consumers[tag] }
        for consumer in self.consumers.values where consumer.tag == tag { return consumer }
        return nil
    }

    /// Up to this many consumers on a channel are scanned rather than looked up by hash.
    static var consumersScanned: Int { 8 }
    /// A server error that arrived asynchronously with no pending publish to report it;
    /// the next operation on the channel throws it.
    var pendingError: AMQPError?
    /// Acks queued in this turn of the thread, sent together by ``takeAckBatch()``.
    var pendingAcks: [UInt64] = []
    /// Every delivery tag up to this one is settled (acked, nacked, rejected or sent with noAck).
    var settledThrough: UInt64 = 0
    /// Settled tags above `settledThrough`.
    var settledAbove = Set<UInt64>()
    /// Acked tags not sent yet: they completed while an older delivery was still in progress.
    /// Held (up to ``heldAckLimit``, for at most ``heldAckTime``) so that the ack of the older
    /// one settles them all with one `multiple` frame — one frame, and one settlement command in
    /// a quorum queue, instead of one per delivery.
    var heldAcks: [UInt64] = []
    var heldSince: ContinuousClock.Instant?

    /// How long an ack may be held back waiting for the older deliveries.
    static let heldAckTime: Duration = .milliseconds(20)
    /// How many acks may be held back: a quarter of the prefetch (held deliveries count
    /// against it), 64 without one.
    var heldAckLimit: Int {
        guard let count = self.prefetch?.count, count > 0 else { return 64 }  // (0: no limit)
        return max(1, Int(count) / 4)
    }

    init(id: UInt16) { self.id = id }

    /// Forgets delivery bookkeeping: the channel was reopened and tags start at 1 again.
    func resetDeliveries() {
        self.pendingAcks.removeAll()
        self.heldAcks.removeAll()
        self.heldSince = nil
        self.settledThrough = 0
        self.settledAbove.removeAll()
    }

    func markSettled(_ tag: UInt64) {
        if tag == self.settledThrough + 1 {
            self.settledThrough = tag
            while self.settledAbove.remove(self.settledThrough + 1) != nil { self.settledThrough += 1 }
        } else if tag > self.settledThrough {
            self.settledAbove.insert(tag)
        }
    }

    func markSettled(through tag: UInt64) {
        guard tag > self.settledThrough else { return }
        self.settledThrough = tag
        self.settledAbove = self.settledAbove.filter { $0 > tag }
        while self.settledAbove.remove(self.settledThrough + 1) != nil { self.settledThrough += 1 }
    }

    /// Turns the queued acks into frames to send: one `multiple` ack for the run of tags that
    /// settles everything up to it, single acks for the rest. The broker sees the same outcome
    /// as one ack per delivery, for fewer frames (the broker's CPU is the scarce resource).
    ///
    /// Acks above the settled run are held back (see ``heldAcks``) unless `releaseHeld`, the
    /// channel is transactional (acks belong to the commit), more than ``heldAckLimit`` wait, or
    /// the oldest has waited ``heldAckTime``.
    func takeAckBatch(releaseHeld: Bool = false, now: ContinuousClock.Instant = .now) -> (multipleThrough: UInt64?, singles: [UInt64]) {
        guard !self.pendingAcks.isEmpty || !self.heldAcks.isEmpty else { return (nil, []) }
        var tags = self.pendingAcks.sorted()
        self.pendingAcks.removeAll(keepingCapacity: true)
        tags = tags.reduce(into: [UInt64]()) { if $0.last != $1 { $0.append($1) } }
        let before = self.settledThrough
        for tag in tags { self.markSettled(tag) }
        // (A tag at or below `before` was settled already: acking it again would close the channel.)
        tags = tags.filter { $0 > before }
        // Held tags were never sent: they join this batch, wherever the settled run now ends.
        if !self.heldAcks.isEmpty {
            tags = (tags + self.heldAcks).sorted()
            self.heldAcks.removeAll(keepingCapacity: true)
        }
        // The multiple-ack names the highest tag of this batch inside the settled run: the broker
        // refuses a multiple-ack whose own tag is not outstanding (RabbitMQ 3.10 collect_acks), and
        // every outstanding tag at or below it is in this batch.
        let covered = tags.filter { $0 <= self.settledThrough }
        var singles = tags.filter { $0 > self.settledThrough }
        let since = self.heldSince ?? now
        self.heldSince = nil
        if !singles.isEmpty, !releaseHeld, !self.transactional, singles.count <= self.heldAckLimit, now - since < Self.heldAckTime {
            self.heldAcks = singles
            self.heldSince = since
            singles = []
        }
        if covered.count > 1, let through = covered.last {
            return (through, singles)
        }
        return (nil, covered + singles)
    }

    /// When the held acks must go out at the latest (nil: none held).
    var heldDeadline: ContinuousClock.Instant? { self.heldSince.map { $0 + Self.heldAckTime } }
}

/// The topology declared through a connection, replayed after it reconnects.
struct TopologyRecorder {
    struct Exchange: Equatable {
        var name: String, type: String, durable: Bool, autoDelete: Bool, isInternal: Bool, arguments: AMQPTable
    }
    struct Queue: Equatable {
        var name: String, durable: Bool, exclusive: Bool, autoDelete: Bool, arguments: AMQPTable
    }
    struct Binding: Equatable {
        var toExchange: Bool, destination: String, source: String, routingKey: String, arguments: AMQPTable
    }

    private(set) var exchanges: [Exchange] = []
    private(set) var queues: [Queue] = []
    private(set) var bindings: [Binding] = []

    mutating func record(_ exchange: Exchange) {
        self.exchanges.removeAll { $0.name == exchange.name }
        self.exchanges.append(exchange)
    }
    mutating func record(_ queue: Queue) {
        self.queues.removeAll { $0.name == queue.name }
        self.queues.append(queue)
    }
    mutating func record(_ binding: Binding) {
        if !self.bindings.contains(binding) { self.bindings.append(binding) }
    }
    mutating func forgetExchange(_ name: String) {
        self.exchanges.removeAll { $0.name == name }
        self.bindings.removeAll { $0.source == name || ($0.toExchange && $0.destination == name) }
    }
    mutating func forgetQueue(_ name: String) {
        self.queues.removeAll { $0.name == name }
        self.bindings.removeAll { !$0.toExchange && $0.destination == name }
    }
    mutating func forget(_ binding: Binding) {
        self.bindings.removeAll { $0 == binding }
    }
}
