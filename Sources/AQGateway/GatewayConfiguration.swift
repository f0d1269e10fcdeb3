import AQBridge
import Foundation
import Yams

/// A bearer token the gateway accepts: stored as the SHA-256 of the token (`aq-gateway
/// hash-token` prints it), never the token itself, with a name for logs and metrics and the work
/// queues it may publish to (`*`: all).
public struct GatewayToken: Sendable, Equatable {
    public var name: String
    /// SHA-256 of the token, 32 bytes.
    public var hash: [UInt8]
    public var queues: Set<String>

    public init(name: String, hash: [UInt8], queues: Set<String>) {
        self.name = name
        self.hash = hash
        self.queues = queues
    }

    public func allows(queue: String) -> Bool { self.queues.contains("*") || self.queues.contains(queue) }

    /// `name:sha256hex:queue|queue` (queues default to all) — the form of `AQ_GATEWAY_TOKENS`.
    public static func parse(_ text: String) throws -> GatewayToken {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 3, !parts[0].isEmpty, !parts[2].isEmpty else {
            throw GatewayConfiguration.Invalid(description: "a token is name:sha256-hex:queue|queue (or * for every queue), not '\(text.prefix(80))'")
        }
        guard let hash = Self.hex(parts[1]), hash.count == 32 else {
            throw GatewayConfiguration.Invalid(description: "token '\(parts[0])': the hash must be 64 hex digits (aq-gateway hash-token prints it)")
        }
        let queues = Set(parts[2].split(separator: "|").map(String.init))
        guard !queues.isEmpty else { throw GatewayConfiguration.Invalid(description: "token '\(parts[0])': name its work queues (or *)") }
        return GatewayToken(name: parts[0], hash: hash, queues: queues)
    }

    static func hex(_ text: String) -> [UInt8]? {
        let digits = Array(text.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
            default: return nil
            }
        }
        var i = 0
        while i < digits.count {
            guard let high = value(digits[i]), let low = value(digits[i + 1]) else { return nil }
            out.append(high << 4 | low)
            i += 2
        }
        return out
    }
}

/// Everything aq-gateway can be told. Sources, later ones winning: defaults, the configuration
/// file (`--config`, YAML), the environment (`AQ_…`), flags — as aq-bridge.
public struct GatewayConfiguration: Sendable {
    /// Where the HTTP API listens (`AQ_GATEWAY_LISTEN`); port 0 picks a free one.
    public var listen = "127.0.0.1:8080"
    /// The broker (`AQ_AMQP_URL`).
    public var amqpURL = "amqp://guest:guest@127.0.0.1:5672/%2F"
    /// The management API (the dashboard's queue numbers): one URL or a list; nil: port 15672 of
    /// every AMQP address.
    public var managementURL: String?
    /// Topology files or directories (`AQ_TOPOLOGY`): the work queues and exchanges.
    public var topology: [String] = ["topology"]
    /// The accepted tokens (`AQ_GATEWAY_TOKENS`: `name:sha256hex:queue|queue` or `…:*`, comma- or
    /// space-separated). None: every API request is refused (401).
    public var tokens: [GatewayToken] = []
    /// The largest request body; a bigger one is refused with 413 before it is read whole.
    public var maxBodyBytes = 1 << 20
    /// How long an `Idempotency-Key` is remembered, and how many at most.
    public var idempotencyWindow: Duration = .seconds(24 * 3600)
    public var idempotencyKeys = 100_000
    /// Event loop threads for HTTP (`AQ_GATEWAY_THREADS`); 0: one per core.
    public var threads = 0
    public var logLevel = "info"

    public init() {}

    public struct Invalid: Error, CustomStringConvertible {
        public var description: String
        public init(description: String) { self.description = description }
    }

    public mutating func apply(file path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else { throw Invalid(description: "cannot read the configuration file \(path)") }
        try self.apply(yaml: String(decoding: data, as: UTF8.self), source: path)
    }

    /// Keys: listen, amqp_url, management_url, topology, tokens (a list of {name, sha256, queues}),
    /// max_body_bytes, idempotency_window, idempotency_keys, threads, log_level.
    public mutating func apply(yaml text: String, source: String) throws {
        let loaded: Any?
        do { loaded = try Yams.load(yaml: text) } catch { throw Invalid(description: "\(source): not YAML: \(error)") }
        guard let root = loaded as? [String: Any] else {
            if loaded == nil { return }
            throw Invalid(description: "\(source): expected a mapping of keys")
        }
        var values = root
        func string(_ key: String) throws -> String? {
            guard let value = values.removeValue(forKey: key) else { return nil }
            if let text = value as? String { return text }
            if let number = value as? Int { return String(number) }
            throw Invalid(description: "\(source): \(key) must be a string")
        }
        func int(_ key: String, _ range: ClosedRange<Int>) throws -> Int? {
            guard let value = values.removeValue(forKey: key) else { return nil }
            guard let number = value as? Int, range.contains(number) else { throw Invalid(description: "\(source): \(key) must be an integer in \(range)") }
            return number
        }
        func duration(_ key: String) throws -> Duration? {
            guard let text = try string(key) else { return nil }
            guard let value = BridgeConfiguration.parseDuration(text) else { throw Invalid(description: "\(source): \(key) must be a duration like 30s, 5m or 1d, not '\(text)'") }
            return value
        }
        if let v = try string("listen") { self.listen = v }
        if let v = try string("amqp_url") { self.amqpURL = v }
        if let v = try string("management_url") { self.managementURL = v }
        if let v = values.removeValue(forKey: "topology") {
            if let list = v as? [String] { self.topology = list } else if let one = v as? String { self.topology = [one] } else {
                throw Invalid(description: "\(source): topology must be a path or a list of paths")
            }
        }
        if let v = values.removeValue(forKey: "tokens") {
            guard let list = v as? [[String: Any]] else { throw Invalid(description: "\(source): tokens must be a list of {name, sha256, queues}") }
            self.tokens = try list.enumerated().map { index, entry in
                guard let name = entry["name"] as? String, !name.isEmpty, let hex = entry["sha256"] as? String,
                      let hash = GatewayToken.hex(hex), hash.count == 32 else {
                    throw Invalid(description: "\(source): tokens[\(index)] needs a name and a sha256 of 64 hex digits (aq-gateway hash-token prints it)")
                }
                guard let queues = (entry["queues"] as? [String]) ?? (entry["queues"] as? String).map({ [$0] }), !queues.isEmpty else {
                    throw Invalid(description: "\(source): tokens[\(index)] needs its queues (a list of work queues, or [\"*\"] for every queue)")
                }
                let unknown = Set(entry.keys).subtracting(["name", "sha256", "queues"])
                if let key = unknown.sorted().first { throw Invalid(description: "\(source): tokens[\(index)]: unknown key \(key)") }
                return GatewayToken(name: name, hash: hash, queues: Set(queues))
            }
        }
        if let v = try int("max_body_bytes", 1...(64 << 20)) { self.maxBodyBytes = v }
        if let v = try duration("idempotency_window") { self.idempotencyWindow = v }
        if let v = try int("idempotency_keys", 0...10_000_000) { self.idempotencyKeys = v }
        if let v = try int("threads", 0...256) { self.threads = v }
        if let v = try string("log_level") { self.logLevel = v }
        if let key = values.keys.sorted().first { throw Invalid(description: "\(source): unknown key \(key)") }
    }

    public mutating func apply(environment: [String: String]) throws {
        func list(_ value: String) -> [String] {
            value.split(whereSeparator: { $0 == "," || $0 == " " || $0 == "\n" }).map(String.init).filter { !$0.isEmpty }
        }
        if let v = environment["AQ_GATEWAY_LISTEN"], !v.isEmpty { self.listen = v }
        if let v = environment["AQ_AMQP_URL"], !v.isEmpty { self.amqpURL = v }
        if let v = environment["AQ_MANAGEMENT_URL"], !v.isEmpty { self.managementURL = v }
        if let v = environment["AQ_TOPOLOGY"], !v.isEmpty { self.topology = list(v) }
        if let v = environment["AQ_GATEWAY_TOKENS"], !v.isEmpty { self.tokens = try list(v).map(GatewayToken.parse) }
        if let v = environment["AQ_LOG_LEVEL"], !v.isEmpty { self.logLevel = v }
        if let v = environment["AQ_GATEWAY_THREADS"], !v.isEmpty {
            guard let n = Int(v), (0...256).contains(n) else { throw Invalid(description: "AQ_GATEWAY_THREADS must be 0 to 256") }
            self.threads = n
        }
    }

    /// `host:port` of `listen`.
    public func listenAddress() throws -> (host: String, port: Int) {
        guard let colon = self.listen.lastIndex(of: ":"), let port = Int(self.listen[self.listen.index(after: colon)...]), (0...65535).contains(port) else {
            throw Invalid(description: "listen must be host:port, not '\(self.listen)'")
        }
        return (String(self.listen[..<colon]), port)
    }
}
