import AMQPClient
import Foundation

// What `aq dlq` knows about the dead letters in `aq.dead`: what each one was, why it is there,
// and where a replay sends it. Pure: the command reads the queue and executes the plans.

/// A dead letter, read from its headers (the bridge's `aq-…` ones, else the broker's `x-death`)
/// and, for a chain step, its body.
public struct DeadLetter: Sendable {
    public enum Kind: String, Sendable {
        /// A task (or a task the broker dead-lettered: delivery limit, expiry).
        case task
        /// A webhook that could not be delivered (the callback had run).
        case webhook
        /// A step of a chain, its whole context in the body.
        case chainStep = "chain-step"
        /// A child of a batch.
        case batchChild = "batch-child"
        /// A task's outcome that its `reply_to` queue did not take.
        case reply
    }

    public var kind: Kind
    public var taskId: String?
    /// The work queue it ran on (nil when unknown).
    public var queue: String?
    public var reason: String
    public var error: String?
    public var status: Int?
    public var attempts: Int?
    public var deadLetteredAt: Date?
    public var chainId: String?
    public var chainStep: Int?
    public var batchId: String?
    public var batchIndex: Int?
    public var bodyBytes: Int

    /// Whether AsyncQueue's own headers on it (`aq-kind`, `aq-webhook-url`, `aq-reply-to`,
    /// `aq-batch…`, `aq-queue`) were written by a trusted user — the broker checks `user_id`
    /// against the publisher's login. A publisher's own message that the broker dead-lettered
    /// (expired, say) keeps whatever headers it carried: they are not believed.
    public var trusted: Bool
    /// The broker dead-lettered it (delivery limit, expiry): it has `x-death`.
    public var deadLetteredByBroker: Bool

    /// `trustedUsers`: the logins whose `aq-…` headers are believed (the bridge's).
    public init(_ delivery: AMQPDelivery, spec: TopologySpec, trustedUsers: Set<String>) {
        let all = delivery.properties.headers ?? AMQPTable()
        self.trusted = delivery.properties.userId.map { trustedUsers.contains($0) } ?? false
        let headers = self.trusted ? all : AMQPTable(all.filter { !$0.key.hasPrefix("aq-") })
        let death = Self.lastDeath(all)
        self.deadLetteredByBroker = death != nil
        self.reason = headers["aq-reason"]?.stringValue ?? death?["reason"]?.stringValue ?? all["x-first-death-reason"]?.stringValue ?? "unknown"
        self.error = headers["aq-error"]?.stringValue
        self.status = headers["aq-last-status"]?.intValue.map { Int(clamping: $0) }
        self.attempts = (headers["aq-attempts"]?.intValue ?? death?["count"]?.intValue).map { Int(clamping: $0) }
        let seconds = headers["aq-dead-lettered-at"]?.intValue ?? death?["time"]?.intValue
        self.deadLetteredAt = seconds.map { Date(timeIntervalSince1970: TimeInterval($0)) }
        self.taskId = headers["aq-task-id"]?.stringValue ?? delivery.properties.messageId
        if let queue = headers["aq-queue"]?.stringValue {
            self.queue = queue
        } else if let queue = death?["queue"]?.stringValue ?? all["x-first-death-queue"]?.stringValue {
            self.queue = queue.hasPrefix(spec.workQueuePrefix) ? String(queue.dropFirst(spec.workQueuePrefix.count)) : queue
        }
        self.bodyBytes = delivery.body.count
        self.batchId = headers["aq-batch"]?.stringValue
        self.batchIndex = headers["aq-batch-index"]?.intValue.map { Int(clamping: $0) }
        switch headers["aq-kind"]?.stringValue {
        case "webhook"?: self.kind = .webhook
        case "reply"?: self.kind = .reply
        default:
            if self.reason == "reply-undeliverable" && self.trusted {
                self.kind = .reply
            } else if self.batchId != nil {
                self.kind = .batchChild
            } else if let (chain, step) = Self.chainStep(delivery.body, messageId: delivery.properties.messageId) {
                self.kind = .chainStep
                self.chainId = chain
                self.chainStep = step
            } else {
                self.kind = .task
            }
        }
    }

    /// The broker's record of the last time it dead-lettered the message (`x-death` lists the
    /// most recent first).
    static func lastDeath(_ headers: AMQPTable) -> AMQPTable? {
        guard case .array(let deaths)? = headers["x-death"], case .table(let last)? = deaths.first else { return nil }
        return last
    }

    /// The chain id and step of a chain step message (`{"chain": {...}, ..., "step": n}`).
    static let chainKey = Array("\"chain\"".utf8)

    static func chainStep(_ body: [UInt8], messageId: String?) -> (String, Int)? {
        // Most letters are tasks: only a body naming "chain" is parsed.
        guard body.first == UInt8(ascii: "{"), body.count < 64 << 20, body.firstRange(of: Self.chainKey) != nil,
              let object = try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any],
              let chain = object["chain"] as? [String: Any], let step = object["step"] as? Int
        else { return nil }
        if let id = chain["id"] as? String { return (id, step) }
        if let messageId, let colon = messageId.lastIndex(of: ":") { return (String(messageId[..<colon]), step) }
        return nil
    }
}

/// Which dead letters a command takes.
public struct DeadLetterFilter: Sendable {
    public var reasons: Set<String> = []
    public var queues: Set<String> = []
    /// Task ids: exact, or a prefix when it ends with `*`.
    public var tasks: [String] = []
    public var since: Date?

    public init(reasons: Set<String> = [], queues: Set<String> = [], tasks: [String] = [], since: Date? = nil) {
        self.reasons = reasons
        self.queues = queues
        self.tasks = tasks
        self.since = since
    }

    public func matches(_ letter: DeadLetter) -> Bool {
        if !self.reasons.isEmpty, !self.reasons.contains(letter.reason) { return false }
        if !self.queues.isEmpty, !self.queues.contains(letter.queue ?? "") { return false }
        if !self.tasks.isEmpty {
            let id = letter.taskId ?? ""
            let hit = self.tasks.contains { pattern in
                pattern.hasSuffix("*") ? id.hasPrefix(pattern.dropLast()) : id == pattern
            }
            if !hit { return false }
        }
        if let since = self.since {
            guard let at = letter.deadLetteredAt, at >= since else { return false }
        }
        return true
    }

    /// `30m`, `2h`, `7d`, `90s` before `now`, or an ISO 8601 date.
    public static func parseSince(_ text: String, now: Date = Date()) -> Date? {
        if let date = ISO8601DateFormatter().date(from: text) { return date }
        guard let unit = text.last, let value = Double(text.dropLast()), value >= 0 else { return nil }
        let seconds: Double
        switch unit {
        case "s": seconds = value
        case "m": seconds = value * 60
        case "h": seconds = value * 3600
        case "d": seconds = value * 86_400
        default: return nil
        }
        return now.addingTimeInterval(-seconds)
    }
}

/// What replaying a dead letter does.
public enum ReplayPlan: Sendable {
    /// Publish this (mandatory, confirmed), then remove the dead letter.
    case publish(exchange: String, routingKey: String, properties: AMQPProperties, body: [UInt8])
    /// Leave it where it is, for this reason.
    case skip(String)

    /// Where `letter` (read from `delivery`) goes back to.
    public static func make(_ letter: DeadLetter, _ delivery: AMQPDelivery, spec: TopologySpec) -> ReplayPlan {
        let original = delivery.properties
        switch letter.reason {
        case "malformed":
            return .skip("malformed: it would be refused again; publish a corrected message")
        case "unrouted":
            return .skip("unrouted: it named no work queue; publish it to one")
        case "rejected" where original.headers?["aq-reason"] == nil:
            return .skip("rejected unread by the bridge (too big, or unreadable headers): it would be again")
        default:
            break
        }
        if letter.kind == .reply {
            guard let replyTo = original.headers?["aq-reply-to"]?.stringValue else { return .skip("a reply without aq-reply-to") }
            if replyTo.hasPrefix("amq.gen-") || replyTo.hasPrefix("amq.rabbitmq.reply-to") {
                return .skip("a reply to a temporary queue (\(replyTo.prefix(40))), gone with its client")
            }
            var properties = Self.fresh(original)
            properties.headers = Self.publisherHeaders(original)
            return .publish(exchange: "", routingKey: replyTo, properties: properties, body: delivery.body)
        }
        guard let queue = letter.queue, spec.workQueues.contains(where: { $0.name == queue }) else {
            return .skip("its work queue '\(letter.queue ?? "?")' is not in the topology files")
        }
        var properties = Self.fresh(original)
        var headers = Self.publisherHeaders(original)
        switch letter.kind {
        case .chainStep:
            guard let chain = letter.chainId, let step = letter.chainStep else { return .skip("a chain step without its chain id") }
            guard !chain.contains(where: { $0 == "." || $0 == "*" || $0 == "#" }) else {
                return .skip("a chain id with '.', '*' or '#' (not one the bridge made): it cannot be routed")
            }
            properties.messageId = "\(chain):\(step)"
            properties.headers = headers
            return .publish(exchange: spec.chainExchange, routingKey: "\(queue).\(chain).\(step)", properties: properties, body: delivery.body)
        case .webhook:
            // The webhook alone, attempts afresh: the callback does not run again.
            for key in ["aq-kind", "aq-webhook-url", "aq-task-id", "aq-webhook-id"] {
                if let value = original.headers?[key] { headers[key] = value }
            }
            headers["aq-attempt"] = .int32(1)
        case .batchChild:
            // Back into its batch, which must still be open (the caller checks that its reply
            // queue exists). The bridge dead-letters a child once its batch counted the failure:
            // the copy re-joins (`aq-batch-rejoin`), and its outcome replaces that failure. A
            // child the broker dead-lettered (delivery limit, expiry) was never counted: it goes
            // back as the child it was.
            let counted = !(letter.deadLetteredByBroker && original.headers?["aq-reason"] == nil)
            if counted, original.headers?["aq-batch-join"]?.stringValue == "all" {
                // A fail-fast batch ended at this failure: there is nothing to re-join.
                return .skip("a child of a fail-fast batch (join: all), which ended at its failure: publish the task by hand to run it alone")
            }
            for key in ["aq-batch", "aq-batch-index", "aq-batch-join"] {
                if let value = original.headers?[key] { headers[key] = value }
            }
            if counted { headers["aq-batch-rejoin"] = .bool(true) }
        case .task, .reply:
            break
        }
        properties.headers = headers
        return .publish(exchange: "", routingKey: spec.queueName(forWorkQueue: queue), properties: properties, body: delivery.body)
    }

    /// The original's own properties, for a fresh message: no user id (the replayer's login is
    /// checked), no expiration or priority, persistent.
    static func fresh(_ original: AMQPProperties) -> AMQPProperties {
        AMQPProperties(contentType: original.contentType ?? "application/json", contentEncoding: original.contentEncoding,
                       deliveryMode: .persistent, correlationId: original.correlationId, replyTo: original.replyTo,
                       messageId: original.messageId, timestamp: UInt64(Date().timeIntervalSince1970), type: original.type,
                       appId: original.appId)
    }

    /// The publisher's own headers: not the broker's (`x-…`) or AsyncQueue's (`aq-…`, `retry-tier`).
    static func publisherHeaders(_ original: AMQPProperties) -> AMQPTable {
        var headers = AMQPTable()
        for entry in original.headers ?? AMQPTable() where !entry.key.hasPrefix("x-") && !entry.key.hasPrefix("aq-") && entry.key != "retry-tier" {
            headers[entry.key] = entry.value
        }
        return headers
    }
}
