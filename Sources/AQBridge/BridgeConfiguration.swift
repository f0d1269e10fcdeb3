import AMQPClient
import AQHTTP
import AQTopology
import Foundation

/// Everything aq-bridge can be told. Sources, later ones winning: defaults, the configuration
/// file (`--config`, YAML), the environment (`AQ_…`), flags.
public struct BridgeConfiguration: Sendable {
    /// The broker (`AQ_AMQP_URL`).
    public var amqpURL = "amqp://guest:guest@127.0.0.1:5672/%2F"
    /// Topology files or directories (`AQ_TOPOLOGY`, comma-separated).
    public var topology: [String] = ["topology"]
    /// Work queues to serve, by name (`default`) or queue name (`aq.work.default`); empty = all
    /// (`AQ_QUEUES` or `AQ_QUEUE`, comma-separated).
    public var queues: [String] = []
    /// Deliveries in flight per queue (the consumer prefetch) (`AQ_PREFETCH`). 512: a chain step
    /// holds its delivery through two broker round trips (the next step's confirm, then the ack
    /// settled in the quorum queue), and 256 left the window short for them (measured: chain
    /// steps +19%, README "Benchmarks").
    public var prefetch = 512
    /// Standard Webhooks secrets, `whsec_…`; the first signs first (`AQ_SIGNING_SECRETS`,
    /// space- or comma-separated). Empty: requests are not signed.
    public var signingSecrets: [String] = []
    public var maxPayloadBytes = 1 << 20
    public var maxResponseBytes = 1 << 20
    /// The longest a task may ask for as its per-attempt `timeout`; keep it under the broker's
    /// consumer_timeout (30 min by default).
    public var maxTaskTimeout: Duration = .seconds(20 * 60)
    public var webhookTimeout: Duration = .seconds(30)
    /// Attempts at delivering one webhook before it is dead-lettered.
    public var webhookAttempts = 8
    /// One retry in four waits one tier longer, so failures spread out (`retry_jitter`).
    public var retryJitter = true
    /// Lifecycle events published to the topology's events exchange (`events`).
    public var events: LifecycleEvents = .failures
    /// HTTP requests in flight at once, all work queues together (each queue also has its own
    /// `concurrency` in the topology, 64 by default); more wait their turn in memory.
    public var httpConnections = 256
    /// HTTP requests in flight to one host (`scheme://host:port`), all queues together: a host
    /// that hangs holds at most this many slots, and tasks bound elsewhere keep moving.
    public var maxPerHost = 32
    /// What sends the HTTP requests (`http_client`): `auto`, the built-in HTTP/1.1 client for
    /// plain `http://` and libcurl for the rest, or `libcurl` for every request.
    public var httpClient: HTTPClient.Engine = .automatic
    /// An `AQ_HTTP_CLIENT` that names no client (refused by ``validate()``).
    var invalidHTTPClient: String?
    /// Bytes of task bodies (and callback answers waiting for their webhook) held in memory at
    /// once; past it, new deliveries are parked in the broker for a while instead of held here.
    public var maxInFlightBytes = 64 << 20
    /// The longest a task may expect to wait in memory for its callback host (its place in the
    /// host's line times the host's answer time); past it, it is parked in the broker instead.
    public var maxHostWait: Duration = .seconds(10)
    /// Addresses callbacks and webhooks may connect to (empty: any not denied).
    public var callbackAllow: [String] = []
    /// Addresses they may not: link-local (cloud metadata), multicast and such by default
    /// (`AddressPolicy.defaultDeny`); an empty list denies nothing.
    public var callbackDeny: [String] = AddressPolicy.defaultDeny.map(\.description)
    /// AMQP users whose messages may carry the bridge's own bookkeeping headers (`aq-…`); the
    /// broker vouches for a message's `user_id`. Empty: the bridge's own user only.
    public var trustedPublishers: [String] = []
    /// Prefixes a task's `reply_to` queue name must start with: server-named queues, direct
    /// reply-to, and `reply.`/`aq.reply.` by default; `*` allows any queue the bridge may write to.
    public var replyToAllow: [String] = ["amq.gen-", "amq.rabbitmq.reply-to", "reply.", "aq.reply."]
    /// Health, readiness and metrics (`AQ_LISTEN`); empty disables.
    public var listen = "127.0.0.1:9464"
    /// How long SIGTERM waits for in-flight tasks before handing them back to the broker.
    public var shutdownGrace: Duration = .seconds(30)
    public var logLevel = "info"

    public init() {}

    public struct Invalid: Error, CustomStringConvertible {
        public var description: String
    }

    /// Applies a YAML or JSON configuration file.
    public mutating func apply(file path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw Invalid(description: "cannot read the configuration file \(path)")
        }
        try self.apply(yaml: String(decoding: data, as: UTF8.self), source: path)
    }

    public mutating func apply(environment: [String: String]) throws {
        func list(_ value: String) -> [String] {
            value.split(whereSeparator: { $0 == "," || $0 == " " }).map(String.init).filter { !$0.isEmpty }
        }
        if let v = environment["AQ_AMQP_URL"], !v.isEmpty { self.amqpURL = v }
        if let v = environment["AQ_TOPOLOGY"], !v.isEmpty { self.topology = list(v) }
        if let v = environment["AQ_QUEUES"] ?? environment["AQ_QUEUE"], !v.isEmpty { self.queues = list(v) }
        if let v = environment["AQ_PREFETCH"], !v.isEmpty {
            guard let n = Int(v) else { throw Invalid(description: "AQ_PREFETCH must be an integer, not '\(v)'") }
            self.prefetch = n
        }
        if let v = environment["AQ_SIGNING_SECRETS"], !v.isEmpty { self.signingSecrets = list(v) }
        if let v = environment["AQ_LISTEN"] { self.listen = v }
        if let v = environment["AQ_CALLBACK_ALLOW"] { self.callbackAllow = list(v) }
        if let v = environment["AQ_CALLBACK_DENY"] { self.callbackDeny = list(v) }
        if let v = environment["AQ_TRUSTED_PUBLISHERS"] { self.trustedPublishers = list(v) }
        if let v = environment["AQ_REPLY_TO_ALLOW"] { self.replyToAllow = list(v) }
        if let v = environment["AQ_LOG_LEVEL"], !v.isEmpty { self.logLevel = v }
        if let v = environment["AQ_EVENTS"], let events = LifecycleEvents(rawValue: v) { self.events = events }
        if let v = environment["AQ_HTTP_CLIENT"], !v.isEmpty {
            if let engine = HTTPClient.Engine(rawValue: v) { self.httpClient = engine } else { self.invalidHTTPClient = v }
        }
    }

    /// Keys: the property names in snake_case (amqp_url, topology, queues, prefetch,
    /// signing_secrets, max_payload_bytes, max_response_bytes, max_task_timeout,
    /// webhook_timeout, webhook_attempts, http_connections, max_per_host, max_inflight_bytes, max_host_wait,
    /// callback_allow, callback_deny, trusted_publishers, reply_to_allow, listen, shutdown_grace, retry_jitter,
    /// log_level, events, http_client).
    public mutating func apply(yaml text: String, source: String) throws {
        var values: [String: String] = [:]
        var lists: [String: [String]] = [:]
        var currentList: String?
        for (index, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = rawLine.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
            if line.trimmingCharacters(in: .whitespaces).isEmpty { continue }
            if line.hasPrefix(" ") || line.hasPrefix("-") {
                let item = line.trimmingCharacters(in: .whitespaces)
                guard item.hasPrefix("- "), let key = currentList else {
                    throw Invalid(description: "\(source):\(index + 1): expected 'key: value' or a '- item' under a list key")
                }
                lists[key, default: []].append(Self.unquote(String(item.dropFirst(2))))
                continue
            }
            guard let colon = line.firstIndex(of: ":") else {
                throw Invalid(description: "\(source):\(index + 1): expected 'key: value'")
            }
            let key = String(line[..<colon]).trimmingCharacters(in: .whitespaces)
            let value = String(line[line.index(after: colon)...]).trimmingCharacters(in: .whitespaces)
            if value.isEmpty { currentList = key; lists[key] = lists[key] ?? [] } else {
                currentList = nil
                if value.hasPrefix("[") && value.hasSuffix("]") {
                    lists[key] = value.dropFirst().dropLast().split(separator: ",").map { Self.unquote($0.trimmingCharacters(in: .whitespaces)) }
                } else {
                    values[key] = Self.unquote(value)
                }
            }
        }
        func int(_ key: String, _ range: ClosedRange<Int>) throws -> Int? {
            guard let v = values.removeValue(forKey: key) else { return nil }
            guard let n = Int(v), range.contains(n) else { throw Invalid(description: "\(source): \(key) must be an integer in \(range), not '\(v)'") }
            return n
        }
        func duration(_ key: String) throws -> Duration? {
            guard let v = values.removeValue(forKey: key) else { return nil }
            guard let seconds = Self.parseDuration(v) else { throw Invalid(description: "\(source): \(key) must be a duration like 30s, 5m or 1d, not '\(v)'") }
            return seconds
        }
        if let v = values.removeValue(forKey: "amqp_url") { self.amqpURL = v }
        if let v = lists.removeValue(forKey: "topology") ?? values.removeValue(forKey: "topology").map({ [$0] }) { self.topology = v }
        if let v = lists.removeValue(forKey: "queues") ?? values.removeValue(forKey: "queues").map({ [$0] }) { self.queues = v }
        if let v = lists.removeValue(forKey: "signing_secrets") { self.signingSecrets = v }
        if let v = try int("prefetch", 1...65535) { self.prefetch = v }
        if let v = try int("max_payload_bytes", 1...(1 << 30)) { self.maxPayloadBytes = v }
        if let v = try int("max_response_bytes", 1...(1 << 30)) { self.maxResponseBytes = v }
        if let v = try int("webhook_attempts", 1...100) { self.webhookAttempts = v }
        if let v = try int("http_connections", 1...65535) { self.httpConnections = v }
        if let v = try int("max_per_host", 1...65535) { self.maxPerHost = v }
        if let v = try int("max_inflight_bytes", 1...(1 << 40)) { self.maxInFlightBytes = v }
        if let v = lists.removeValue(forKey: "callback_allow") { self.callbackAllow = v }
        if let v = lists.removeValue(forKey: "callback_deny") { self.callbackDeny = v }
        if let v = lists.removeValue(forKey: "trusted_publishers") { self.trustedPublishers = v }
        if let v = lists.removeValue(forKey: "reply_to_allow") { self.replyToAllow = v }
        if let v = try duration("max_task_timeout") { self.maxTaskTimeout = v }
        if let v = try duration("webhook_timeout") { self.webhookTimeout = v }
        if let v = try duration("shutdown_grace") { self.shutdownGrace = v }
        if let v = try duration("max_host_wait") { self.maxHostWait = v }
        if let v = values.removeValue(forKey: "listen") { self.listen = v }
        if let v = values.removeValue(forKey: "retry_jitter") {
            guard v == "true" || v == "false" else { throw Invalid(description: "\(source): retry_jitter must be true or false") }
            self.retryJitter = v == "true"
        }
        if let v = values.removeValue(forKey: "log_level") { self.logLevel = v }
        if let v = values.removeValue(forKey: "events") {
            guard let events = LifecycleEvents(rawValue: v) else { throw Invalid(description: "\(source): events must be off, failures or all") }
            self.events = events
        }
        if let v = values.removeValue(forKey: "http_client") {
            guard let engine = HTTPClient.Engine(rawValue: v) else { throw Invalid(description: "\(source): http_client must be auto or libcurl, not '\(v)'") }
            self.httpClient = engine
        }
        let unknown = Array(values.keys) + Array(lists.keys)
        if !unknown.isEmpty {
            throw Invalid(description: "\(source): unknown key(s) \(unknown.sorted().joined(separator: ", "))")
        }
    }

    static func unquote(_ text: String) -> String {
        if text.count >= 2, (text.hasPrefix("\"") && text.hasSuffix("\"")) || (text.hasPrefix("'") && text.hasSuffix("'")) {
            return String(text.dropFirst().dropLast())
        }
        return text
    }

    /// A duration as the topology files write them (`500ms`, `30s`, `20m`, `1h`, `7d`); a bare
    /// number is seconds. At most 10,000,000 seconds.
    public static func parseDuration(_ text: String) -> Duration? {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let span = trimmed.allSatisfy({ $0.isASCII && $0.isNumber }) ? TimeSpan(trimmed + "s") : TimeSpan(trimmed)
        guard let span, span.milliseconds <= 10_000_000_000 else { return nil }
        return span.duration
    }

    /// Checks every setting, wherever it came from (file, environment, flags): the same rules
    /// for each source.
    public func validate() throws {
        func range(_ name: String, _ value: Int, _ allowed: ClosedRange<Int>) throws {
            guard allowed.contains(value) else { throw Invalid(description: "\(name) must be in \(allowed.lowerBound)...\(allowed.upperBound), not \(value)") }
        }
        try range("prefetch", self.prefetch, 1...65535)
        try range("max_payload_bytes", self.maxPayloadBytes, 1...(1 << 30))
        try range("max_response_bytes", self.maxResponseBytes, 1...(1 << 30))
        try range("webhook_attempts", self.webhookAttempts, 1...100)
        try range("http_connections", self.httpConnections, 1...65535)
        try range("max_per_host", self.maxPerHost, 1...65535)
        if let v = self.invalidHTTPClient { throw Invalid(description: "AQ_HTTP_CLIENT must be auto or libcurl, not '\(v)'") }
        try range("max_inflight_bytes", self.maxInFlightBytes, 1...(1 << 40))
        for (name, value) in [("max_task_timeout", self.maxTaskTimeout), ("webhook_timeout", self.webhookTimeout), ("shutdown_grace", self.shutdownGrace),
                              ("max_host_wait", self.maxHostWait)] {
            guard value > .zero, value <= .seconds(10_000_000) else { throw Invalid(description: "\(name) must be a positive duration of at most 10,000,000 s") }
        }
        _ = try self.addressPolicy()
    }

    /// The callback address rules as a policy.
    public func addressPolicy() throws -> AddressPolicy {
        do {
            return AddressPolicy(allow: try self.callbackAllow.map(AddressPolicy.parse), deny: try self.callbackDeny.map(AddressPolicy.parse))
        } catch {
            throw Invalid(description: "callback_allow/callback_deny: \(error)")
        }
    }

    /// The configuration as a log line would show it: secrets and passwords replaced.
    public var redactedDescription: String {
        let url = AMQPConfiguration.redact(self.amqpURL)
        return "amqp_url=\(url) queues=\(self.queues.isEmpty ? "all" : self.queues.joined(separator: ",")) prefetch=\(self.prefetch) signing_secrets=\(self.signingSecrets.count) listen=\(self.listen.isEmpty ? "off" : self.listen) max_per_host=\(self.maxPerHost) http_connections=\(self.httpConnections) http_client=\(self.httpClient.rawValue)"
    }
}

/// Which lifecycle events the bridge publishes (`events`, `AQ_EVENTS`).
public enum LifecycleEvents: String, Sendable {
    /// None.
    case off
    /// What went wrong or ended: retries, failures, dead letters, webhooks given up, batch and
    /// chain ends. Nothing on the happy path of a plain task.
    case failures
    /// Everything: also every task received and completed, every webhook delivered, every
    /// chain step.
    case all
}
