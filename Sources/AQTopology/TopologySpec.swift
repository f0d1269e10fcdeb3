/// The AsyncQueue topology at the level of the patterns, as written in `topology/*.yaml`.
///
/// ``expand()`` turns it into concrete exchanges, queues, bindings and policies:
///
/// Every quorum queue's policy sets `queue-leader-locator: balanced`: on a cluster, `apply` (which
/// puts the policies before it declares the queues) spreads their leaders over the nodes.
///
/// - the task exchange (`aq.tasks`, direct): the routing key names the work queue;
/// - work queues `<prefix><name>` (quorum, at-least-once dead-lettering to the DLX); their
///   delivery limit and length are a policy per queue, so operators can change them in place;
/// - an alternate exchange and queue for tasks whose routing key names no work queue;
/// - retry tiers: queues `<retry prefix><tier>` with a fixed TTL each, bound to the `aq.retry`
///   headers exchange on `retry-tier`, dead-lettering through the default exchange back to the
///   queue the message came from (the bridge republishes with the origin queue as routing key);
/// - the dead-letter exchange and queue;
/// - fan-in: the exchange per-batch reply queues bind to, and the policy they get;
/// - chains: a topic exchange where `<work queue>.<chain id>.<step>` routes a step to its queue.
public struct TopologySpec: Sendable, Equatable {
    public struct WorkQueue: Sendable, Equatable {
        /// The routing key applications use (`default`, `reports`).
        public var name: String
        /// Poison-message guard: deliveries before the broker dead-letters the message.
        public var deliveryLimit: Int = 10
        public var maxLength: Int?
        /// Default per-attempt timeout for tasks that do not set one.
        public var taskTimeout: TimeSpan = .seconds(30)
        /// Default retries for tasks that do not set them.
        public var retries: Int = 3
        /// HTTP requests (callbacks and webhooks) one bridge runs at once for this queue: a slow
        /// or hanging host behind one queue never takes another queue's slots.
        public var concurrency: Int = 64
        public var origin: SourceLocation?

        public init(name: String, origin: SourceLocation? = nil) {
            self.name = name
            self.origin = origin
        }

        public static func == (a: Self, b: Self) -> Bool {
            a.name == b.name && a.deliveryLimit == b.deliveryLimit && a.maxLength == b.maxLength
                && a.taskTimeout == b.taskTimeout && a.retries == b.retries && a.concurrency == b.concurrency
        }
    }

    public var taskExchange = "aq.tasks"
    public var workQueuePrefix = "aq.work."
    public var unroutedExchange = "aq.unrouted"
    public var unroutedQueue = "aq.unrouted"
    public var workQueues: [WorkQueue] = []

    public var retryExchange = "aq.retry"
    public var retryQueuePrefix = "aq.retry."
    public var retryTiers: [TimeSpan] = [.seconds(1), .seconds(5), .seconds(30), .minutes(2), .minutes(10)]

    public var deadLetterExchange = "aq.dlx"
    public var deadLetterQueue = "aq.dead"
    /// How long dead-lettered tasks are kept (a policy `message-ttl`); nil keeps them forever.
    public var deadLetterExpiry: TimeSpan? = .days(14)
    public var deadLetterMaxLength: Int?

    public var batchExchange = "aq.batches"
    public var batchQueuePrefix = "aq.batch."
    /// The longest a batch may run before its deadline fires.
    public var batchLifetime: TimeSpan = .minutes(20)
    /// A reply queue unused this long is deleted by the broker; it must outlive any bridge outage.
    public var batchQueueExpiry: TimeSpan = .days(7)

    public var chainExchange = "aq.chain"
    /// Where aq-bridge publishes lifecycle events (topic: `<event>.<work queue>`).
    public var eventsExchange = "aq.events"

    /// The broker's `consumer_timeout` (RabbitMQ 3.10's default is 30 minutes), for checks.
    public var consumerTimeout: TimeSpan = .minutes(30)

    /// Objects written out in full in the files' `objects:` sections.
    public var extra = Topology()

    public init() {}

    // MARK: Names the bridge and clients use

    public func queueName(forWorkQueue name: String) -> String { self.workQueuePrefix + name }
    public func workQueue(named name: String) -> WorkQueue? { self.workQueues.first { $0.name == name } }
    public func retryQueueName(for tier: TimeSpan) -> String { self.retryQueuePrefix + tier.description }
    /// The `retry-tier` header value that routes a message to a tier.
    public func retryTierHeader(for tier: TimeSpan) -> String { tier.description }
    public func batchQueueName(forBatch id: String) -> String { self.batchQueuePrefix + id }
    /// A batch's reply queue: it exists while the batch is open.
    public func batchReplyQueueName(forBatch id: String) -> String { self.batchQueueName(forBatch: id) + ".replies" }

    /// Arguments for a per-batch reply queue (declared at run time): classic, durable,
    /// single-active-consumer. Its expiry comes from the `<batch prefix>` policy.
    public var batchQueueArguments: [String: JSONValue] {
        ["x-queue-type": "classic", "x-single-active-consumer": true]
    }

    /// Picks the retry tier for the n-th retry (1-based): tiers in order, the last one repeating.
    public func retryTier(forRetry n: Int) -> TimeSpan? {
        guard !self.retryTiers.isEmpty else { return nil }
        return self.retryTiers[min(max(n, 1), self.retryTiers.count) - 1]
    }

    // MARK: Expansion

    /// The concrete objects, in declaration order (exchanges, queues, bindings, policies).
    public func expand() -> Topology {
        var t = Topology()
        func regex(_ name: String) -> String { "^" + NSRegularExpressionEscape.escape(name) + "$" }

        // Tasks.
        t.exchanges.append(.init(name: self.taskExchange, type: "direct"))
        t.exchanges.append(.init(name: self.unroutedExchange, type: "fanout"))
        t.queues.append(.init(name: self.unroutedQueue, arguments: ["x-queue-type": "quorum"]))
        t.bindings.append(.init(source: self.unroutedExchange, destination: self.unroutedQueue))
        t.policies.append(.init(name: "aq.tasks.unrouted", pattern: regex(self.taskExchange), applyTo: "exchanges", priority: 10,
                                definition: ["alternate-exchange": .string(self.unroutedExchange)]))
        // What the bridge rejects there (a message it cannot read) goes to the dead letters too.
        t.policies.append(.init(name: "aq.unrouted", pattern: regex(self.unroutedQueue), applyTo: "queues", priority: 10,
                                definition: ["dead-letter-exchange": .string(self.deadLetterExchange), "dead-letter-strategy": "at-least-once",
                                             "overflow": "reject-publish", "queue-leader-locator": "balanced"]))
        t.exchanges.append(.init(name: self.chainExchange, type: "topic"))
        t.exchanges.append(.init(name: self.eventsExchange, type: "topic"))
        for queue in self.workQueues {
            let name = self.queueName(forWorkQueue: queue.name)
            t.queues.append(.init(name: name, arguments: ["x-queue-type": "quorum"], origin: queue.origin))
            t.bindings.append(.init(source: self.taskExchange, destination: name, routingKey: queue.name, origin: queue.origin))
            // Exactly <queue>.<chain id>.<step>: with `#`, queue `orders` would also take the steps
            // of queue `orders.eu`.
            t.bindings.append(.init(source: self.chainExchange, destination: name, routingKey: queue.name + ".*.*", origin: queue.origin))
            var definition: [String: JSONValue] = [
                "delivery-limit": .int(Int64(queue.deliveryLimit)),
                "dead-letter-exchange": .string(self.deadLetterExchange),
                "dead-letter-strategy": "at-least-once",
                "overflow": "reject-publish",
                "queue-leader-locator": "balanced",
            ]
            if let max = queue.maxLength { definition["max-length"] = .int(Int64(max)) }
            t.policies.append(.init(name: "aq.work.\(queue.name)", pattern: regex(name), applyTo: "queues", priority: 10,
                                    definition: definition, origin: queue.origin))
        }

        // Retry tiers: fixed TTL per queue, back to the origin queue through the default exchange.
        t.exchanges.append(.init(name: self.retryExchange, type: "headers"))
        for tier in self.retryTiers {
            let name = self.retryQueueName(for: tier)
            t.queues.append(.init(name: name, arguments: [
                "x-queue-type": "quorum",
                "x-message-ttl": .int(tier.milliseconds),
                "x-dead-letter-exchange": "",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            ]))
            t.bindings.append(.init(source: self.retryExchange, destination: name,
                                    arguments: ["x-match": "all", "retry-tier": .string(self.retryTierHeader(for: tier))]))
        }
        if !self.retryTiers.isEmpty {
            t.policies.append(.init(name: "aq.retry", pattern: "^" + NSRegularExpressionEscape.escape(self.retryQueuePrefix), applyTo: "queues",
                                    priority: 10, definition: ["queue-leader-locator": "balanced"]))
        }

        // Dead letters.
        t.exchanges.append(.init(name: self.deadLetterExchange, type: "fanout"))
        t.queues.append(.init(name: self.deadLetterQueue, arguments: ["x-queue-type": "quorum"]))
        t.bindings.append(.init(source: self.deadLetterExchange, destination: self.deadLetterQueue))
        var dlq: [String: JSONValue] = ["queue-leader-locator": "balanced"]
        if let expiry = self.deadLetterExpiry { dlq["message-ttl"] = .int(expiry.milliseconds) }
        if let max = self.deadLetterMaxLength { dlq["max-length"] = .int(Int64(max)) }
        t.policies.append(.init(name: "aq.dead", pattern: regex(self.deadLetterQueue), applyTo: "queues", priority: 10, definition: dlq))

        // Fan-in: per-batch reply queues are declared at run time and bind to this exchange.
        t.exchanges.append(.init(name: self.batchExchange, type: "direct"))
        t.policies.append(.init(name: "aq.batches", pattern: "^" + NSRegularExpressionEscape.escape(self.batchQueuePrefix),
                                applyTo: "queues", priority: 10,
                                definition: ["expires": .int(self.batchQueueExpiry.milliseconds)]))

        t.exchanges += self.extra.exchanges
        t.queues += self.extra.queues
        t.bindings += self.extra.bindings
        t.policies += self.extra.policies
        return t
    }
}

/// Regular-expression escaping for policy patterns (RabbitMQ uses PCRE-style patterns).
enum NSRegularExpressionEscape {
    static func escape(_ text: String) -> String {
        var out = ""
        for ch in text {
            if "\\^$.|?*+()[]{}".contains(ch) { out.append("\\") }
            out.append(ch)
        }
        return out
    }
}
