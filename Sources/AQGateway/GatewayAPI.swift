import AMQPClient
import AQBridge
import AQTopology
import Foundation
import Logging
import Synchronization

/// JSON error bodies: `{"error": code, "message": text, "field": name}`.
enum GatewayError {
    static func body(_ code: String, _ message: String, field: String? = nil) -> String {
        var out = "{\"error\":\(JSONScan.quote(code)),\"message\":\(JSONScan.quote(message))"
        if let field { out += ",\"field\":\(JSONScan.quote(field))" }
        return out + "}"
    }

    static func reply(_ status: Int, _ code: String, _ message: String, field: String? = nil) -> GatewayReply {
        GatewayReply(status: status, body: self.body(code, message, field: field))
    }

    static let unauthorized = reply(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer <token>)")

    /// The field a parser's reason names, when it starts with one (`callbackUrl must be …`).
    static func field(in reason: String) -> String? {
        let known = ["callbackUrl", "payload", "webhookUrl", "failureWebhookUrl", "retries", "timeout", "taskId", "delay", "notBefore",
                     "traceparent", "batch", "batchPart", "tasks", "chain", "steps"]
        let head = reason.prefix { $0.isLetter || $0 == "." || $0 == "[" || $0 == "]" || $0.isNumber }
        guard let first = head.split(separator: ".").first.map(String.init)?.split(separator: "[").first.map(String.init),
              known.contains(first) else { return nil }
        return String(head)
    }
}

/// Counters for /metrics.
final class GatewayMetrics: Sendable {
    private struct Key: Hashable {
        var route: String
        var status: Int
    }

    private let counts = Mutex<[Key: Int]>([:])

    func count(_ route: String, _ status: Int) {
        self.counts.withLock { $0[Key(route: route, status: status), default: 0] += 1 }
    }

    func prometheus(ready: Bool) -> String {
        var out = "# HELP aq_gateway_requests_total API requests by route and status.\n# TYPE aq_gateway_requests_total counter\n"
        let counts = self.counts.withLock { $0 }.sorted { ($0.key.route, $0.key.status) < ($1.key.route, $1.key.status) }
        for (key, value) in counts {
            out += "aq_gateway_requests_total{route=\"\(key.route)\",status=\"\(key.status)\"} \(value)\n"
        }
        out += "# HELP aq_gateway_broker_connected 1 when the gateway's AMQP connection is up.\n# TYPE aq_gateway_broker_connected gauge\n"
        out += "aq_gateway_broker_connected \(ready ? 1 : 0)\n"
        return out
    }
}

/// The API's rules, apart from HTTP: who may publish what, what is valid, what the answer is.
/// A `202` is only given once the broker confirmed the message.
final class GatewayAPI: Sendable {
    enum Kind: String, Sendable {
        case tasks, batches, chains
    }

    let spec: TopologySpec
    let defaults: [String: TaskDefaults]
    let verifier: TokenVerifier
    let broker: BrokerLink
    let idempotency: IdempotencyCache
    let metrics = GatewayMetrics()
    let logger: Logger

    init(spec: TopologySpec, configuration: GatewayConfiguration, broker: BrokerLink, logger: Logger) {
        self.spec = spec
        var defaults: [String: TaskDefaults] = [:]
        for queue in spec.workQueues {
            defaults[queue.name] = TaskDefaults(retries: queue.retries, timeout: queue.taskTimeout.duration, maxPayloadBytes: configuration.maxBodyBytes)
        }
        self.defaults = defaults
        self.verifier = TokenVerifier(configuration.tokens)
        self.broker = broker
        self.idempotency = IdempotencyCache(window: configuration.idempotencyWindow, capacity: configuration.idempotencyKeys)
        self.logger = logger
    }

    struct Request: Sendable {
        var authorization: String?
        var queue: String?
        var idempotencyKey: String?
        var traceparent: String?
        var body: [UInt8]
    }

    /// The token a request's `Authorization` names; nil: answer ``GatewayError/unauthorized``.
    func token(for authorization: String?) -> GatewayToken? {
        self.verifier.verify(authorization: authorization)
    }

    /// For a request whose token was checked already (before its body was read).
    func create(_ kind: Kind, _ request: Request, token: GatewayToken) async -> GatewayReply {
        let queue = request.queue ?? "default"
        guard let defaults = self.defaults[queue] else {
            return GatewayError.reply(422, "unknown_queue", "'\(queue.prefix(100))' is not a work queue", field: "queue")
        }
        guard token.allows(queue: queue) else {
            return GatewayError.reply(403, "forbidden", "token '\(token.name)' may not publish to work queue '\(queue)'", field: "queue")
        }
        if let key = request.idempotencyKey {
            guard !key.isEmpty, key.utf8.count <= BatchParser.maxIdBytes, key.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f }) else {
                return GatewayError.reply(400, "invalid_idempotency_key", "Idempotency-Key must be 1 to \(BatchParser.maxIdBytes) visible ASCII characters", field: "Idempotency-Key")
            }
            // The key is the task's (batch's, chain's) id; remembered per token, kind and queue.
            // Not the traceparent: a retry may carry a fresh one and is still the same request.
            let fingerprint = TokenVerifier.sha256(Array("\(kind.rawValue)\u{0}\(queue)\u{0}".utf8) + request.body)
            return await self.idempotency.reply(key: "\(token.name)\u{0}\(kind.rawValue)\u{0}\(queue)\u{0}\(key)", fingerprint: fingerprint) {
                await self.validateAndPublish(kind, request, token: token, queue: queue, defaults: defaults, id: key)
            }
        }
        return await self.validateAndPublish(kind, request, token: token, queue: queue, defaults: defaults, id: nil)
    }

    private func validateAndPublish(_ kind: Kind, _ request: Request, token: GatewayToken, queue: String, defaults: TaskDefaults,
                                    id: String?) async -> GatewayReply {
        let body = request.body
        let isWorkQueue = { (name: String) in self.defaults[name] != nil }
        /// Every work queue a message names must be one the token may use, not only `?queue=`.
        func forbidden(_ named: [String?], _ field: String) -> GatewayReply? {
            guard let other = named.compactMap({ $0 }).first(where: { !token.allows(queue: $0) }) else { return nil }
            return GatewayError.reply(403, "forbidden", "token '\(token.name)' may not use work queue '\(other.prefix(100))'", field: field)
        }
        func refused(_ reason: String, _ code: String) -> GatewayReply {
            if reason.hasPrefix("the body is not a JSON object") {
                return GatewayError.reply(400, "invalid_json", reason)
            }
            return GatewayError.reply(422, code, reason, field: GatewayError.field(in: reason))
        }
        let messageId: String
        let answer: String
        switch kind {
        case .tasks:
            // The key, else the body's taskId, else a new id (the parser's order).
            switch TaskParser.parse(body, messageId: id, defaults: defaults, makeId: GeneratedIds.next) {
            case .failure(let malformed) where malformed.isBatch:
                return GatewayError.reply(422, "wrong_endpoint", "a batch message: POST it to /v1/batches", field: "batch")
            case .failure(let malformed) where malformed.isChain:
                return GatewayError.reply(422, "wrong_endpoint", "a chain message: POST it to /v1/chains", field: "chain")
            case .failure(let malformed):
                return refused(malformed.reason, "invalid_task")
            case .success(let task):
                messageId = task.id
                answer = "{\"taskId\":\(JSONScan.quote(task.id)),\"queue\":\(JSONScan.quote(queue))}"
            }
        case .batches:
            switch BatchParser.parse(body, messageId: id ?? GeneratedIds.next(), queue: queue, defaults: defaults, isWorkQueue: isWorkQueue) {
            case .failure(let malformed):
                return refused(malformed.reason, "invalid_batch")
            case .success(let message):
                // Over HTTP a batch comes whole (up to 10,000 children): a part names a batch by
                // its id alone, which another client could do for a batch not its own.
                if case .part = message.kind {
                    return GatewayError.reply(422, "invalid_batch", "batchPart is not taken over HTTP: send up to \(BatchParser.maxChildrenPerMessage) children in one batch", field: "batchPart")
                }
                if let refused = forbidden(message.children.map(\.queue), "tasks") { return refused }
                messageId = message.batchId
                answer = "{\"batchId\":\(JSONScan.quote(message.batchId)),\"queue\":\(JSONScan.quote(queue)),\"children\":\(message.children.count)}"
            }
        case .chains:
            // A create only: a step message (step, history, results) is the bridge's own.
            if let top = try? JSONScan.members(body), let key = ["step", "history", "results"].first(where: { top[$0] != nil }) {
                return GatewayError.reply(422, "invalid_chain", "\(key) is the bridge's: create a chain with chain, payload and steps", field: key)
            }
            switch ChainParser.parse(body, messageId: id ?? GeneratedIds.next(), defaults: defaults, isWorkQueue: isWorkQueue) {
            case .failure(let malformed):
                return refused(malformed.reason, "invalid_chain")
            case .success(let message):
                var named = [message.queue] + message.queues
                for batch in message.batches.compactMap({ $0 }) { named += batch.children.map(\.queue) }
                if let refused = forbidden(named, "steps") { return refused }
                messageId = message.id
                answer = "{\"chainId\":\(JSONScan.quote(message.id)),\"queue\":\(JSONScan.quote(queue))}"
            }
        }
        // The token's name as the tenant, vouched for by our user_id: a bridge that trusts this
        // login takes a batch's re-creates only from the token that created it.
        var headers: AMQPTable = ["aq-tenant": .string(token.name)]
        if let traceparent = request.traceparent, TaskParser.validTraceparent(traceparent) != nil { headers["traceparent"] = .string(traceparent) }
        let properties = AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent,
                                        messageId: messageId, timestamp: UInt64(Date().timeIntervalSince1970), userId: self.broker.user,
                                        appId: "aq-gateway")
        do {
            let result = try await self.broker.publish(body, exchange: self.spec.taskExchange, routingKey: queue, properties: properties)
            switch result {
            case .confirmed:
                return GatewayReply(status: 202, body: answer)
            case .returned(let returned):
                return GatewayError.reply(503, "not_routed", "the broker routed the message to no queue (\(returned.replyText)); is the topology applied?")
            case .sent:
                return GatewayError.reply(503, "broker_unavailable", "the message was sent without a confirm: it may not be queued; retry")
            }
        } catch {
            self.logger.warning("publish failed", metadata: ["error": "\(error)", "id": "\(messageId)"])
            return GatewayError.reply(503, "broker_unavailable", "the broker did not confirm the message: it is not queued; retry (\(error))")
        }
    }
}

extension GatewayAPI {
    /// Whether a batch's reply queue exists (it does while the batch is open).
    func batchIsOpen(_ id: String) async -> Bool {
        await self.broker.queueExists(self.spec.batchReplyQueueName(forBatch: id))
    }
}
