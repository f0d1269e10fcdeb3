import Foundation

/// Where and how to connect: host, credentials, virtual host, heartbeat, TLS, recovery.
///
/// Build one from a URL with ``init(url:)``:
/// `amqp://user:password@host:5672/vhost?heartbeat=30&connection_name=my-app`.
/// The virtual host is the URL path, percent-decoded (`%2F` is `/`); an absent path means `/`.
public struct AMQPConfiguration: Sendable {
    /// TLS settings for `amqps://`. rabbitmq-c 0.11 has no default CA store, so a CA file is needed.
    public struct TLS: Sendable, Hashable {
        /// PEM file with the certificate authorities that sign the broker's certificate.
        public var caFile: String?
        /// PEM client certificate and its key, for brokers that ask for one.
        public var certificateFile: String?
        public var keyFile: String?
        /// Check the broker's certificate chain (default true).
        public var verifyPeer: Bool
        /// Check that the certificate names the host (default true).
        public var verifyHostname: Bool

        public init(
            caFile: String? = nil, certificateFile: String? = nil, keyFile: String? = nil,
            verifyPeer: Bool = true, verifyHostname: Bool = true
        ) {
            self.caFile = caFile
            self.certificateFile = certificateFile
            self.keyFile = keyFile
            self.verifyPeer = verifyPeer
            self.verifyHostname = verifyHostname
        }
    }

    /// How the connection comes back after it broke.
    public struct Recovery: Sendable, Hashable {
        /// Reconnect automatically, re-declare the topology declared through the connection, and
        /// resume consumers. When false, a broken connection ends every consumer with an error.
        public var enabled: Bool
        /// First wait before reconnecting; it doubles up to `maximumDelay`, with ±20% jitter.
        public var initialDelay: Duration
        public var maximumDelay: Duration

        public init(enabled: Bool = true, initialDelay: Duration = .milliseconds(100), maximumDelay: Duration = .seconds(5)) {
            self.enabled = enabled
            self.initialDelay = initialDelay
            self.maximumDelay = maximumDelay
        }

        /// The wait before reconnect attempt `attempt` (1-based), without jitter.
        public func delay(forAttempt attempt: Int) -> Duration {
            var delay = self.initialDelay
            var step = 1
            while step < attempt, delay < self.maximumDelay {
                delay *= 2
                step += 1
            }
            return min(delay, self.maximumDelay)
        }
    }

    /// One broker address: a cluster node, for instance.
    public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
        public var host: String
        public var port: Int

        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }

        public var description: String { self.host.contains(":") ? "[\(self.host)]:\(self.port)" : "\(self.host):\(self.port)" }
    }

    public var host: String
    public var port: Int
    /// More addresses of the same broker (the other nodes of a cluster). The client connects to
    /// the first that answers, starting at ``host``; after a loss it tries the next one first,
    /// so a dead node costs one attempt, not a wait.
    public var alternateEndpoints: [Endpoint] = []

    /// ``host``/``port`` first, then ``alternateEndpoints``.
    public var endpoints: [Endpoint] { [Endpoint(host: self.host, port: self.port)] + self.alternateEndpoints }
    public var user: String
    public var password: String
    public var virtualHost: String
    /// Heartbeat interval in seconds; 0 disables heartbeats (not recommended). The broker may
    /// lower it. Default 30.
    public var heartbeat: Int
    public var frameMax: Int
    public var channelMax: Int
    /// Shown by the broker's management tools and `rabbitmqctl list_connections client_properties`.
    public var connectionName: String?
    /// Time allowed to open the TCP connection and log in.
    public var connectTimeout: Duration
    /// Time allowed for one broker round trip (declare, bind, close) before the connection is
    /// considered dead.
    public var rpcTimeout: Duration
    /// TLS settings; non-nil means `amqps`.
    public var tls: TLS?
    public var recovery: Recovery
    /// How much of a message the client reads before it calls it unreadable (and, for a
    /// consumer, rejects it alone): header fields, nesting, body size.
    public var contentLimits = AMQPContentLimits()

    public init(
        host: String = "127.0.0.1", port: Int? = nil, user: String = "guest", password: String = "guest",
        virtualHost: String = "/", heartbeat: Int = 30, connectionName: String? = nil, tls: TLS? = nil,
        recovery: Recovery = Recovery()
    ) {
        self.host = host
        self.port = port ?? (tls == nil ? 5672 : 5671)
        self.user = user
        self.password = password
        self.virtualHost = virtualHost
        self.heartbeat = heartbeat
        self.frameMax = 131_072
        self.channelMax = 2047
        self.connectionName = connectionName
        self.connectTimeout = .seconds(10)
        self.rpcTimeout = .seconds(30)
        self.tls = tls
        self.recovery = recovery
    }

    /// Parses an `amqp://` or `amqps://` URL.
    ///
    /// Query parameters: `heartbeat` (seconds), `connection_timeout` (milliseconds),
    /// `channel_max`, `frame_max`, `connection_name`, and for TLS `cacertfile`, `certfile`,
    /// `keyfile`, `verify` (`verify_peer` or `verify_none`), `verify_hostname` (`true`/`false`).
    ///
    /// A list of URLs — separated by spaces or commas, as in
    /// `AQ_AMQP_URL="amqp://u:p@node1:5672/%2F amqp://u:p@node2:5672/%2F"` — names the nodes of
    /// one cluster: the first gives every setting, the others their host and port (each must
    /// name the same scheme, user, password and virtual host, or give none of them).
    ///
    /// - Throws: ``AMQPError/Code/invalidURL`` naming what is wrong.
    public init(url: String) throws {
        let urls = Self.splitList(url)
        guard urls.count > 1 else {
            try self.init(single: urls.first ?? url)
            return
        }
        try self.init(single: urls[0])
        var seen: Set<Endpoint> = [Endpoint(host: self.host, port: self.port)]
        for other in urls.dropFirst() {
            let parsed = try AMQPConfiguration(single: other)
            let components = URLComponents(string: other)
            let namesCredentials = components?.user != nil
            let namesVhost = !(components?.percentEncodedPath.isEmpty ?? true)
            guard (parsed.tls == nil) == (self.tls == nil),
                  !namesCredentials || (parsed.user == self.user && parsed.password == self.password),
                  !namesVhost || parsed.virtualHost == self.virtualHost else {
                throw AMQPError(code: .invalidURL, message: "invalid AMQP URL list: '\(Self.redact(other))' names another scheme, user, password or virtual host than '\(Self.redact(urls[0]))'; a list names the nodes of one broker")
            }
            let endpoint = Endpoint(host: parsed.host, port: parsed.port)
            if seen.insert(endpoint).inserted { self.alternateEndpoints.append(endpoint) }
        }
    }

    /// Splits a list of URLs at whitespace, and at commas that start another `amqp(s)://` URL (a
    /// comma inside a password stays).
    static func splitList(_ text: String) -> [String] {
        let pieces = self.splitPieces(text)
        // Only a list when every piece is a URL: `amqp://u:my pass@h` is one (bad) URL whose
        // password must stay hidden whole, not two pieces.
        let isURL = { (piece: String) in piece.lowercased().hasPrefix("amqp://") || piece.lowercased().hasPrefix("amqps://") }
        return pieces.allSatisfy(isURL) ? pieces : [text]
    }

    private static func splitPieces(_ text: String) -> [String] {
        var out: [String] = []
        for word in text.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }) {
            var rest = Substring(word)
            while let comma = rest.range(of: ",amqp://", options: .caseInsensitive) ?? rest.range(of: ",amqps://", options: .caseInsensitive) {
                let piece = rest[..<comma.lowerBound]
                if !piece.isEmpty { out.append(String(piece)) }
                rest = rest[rest.index(after: comma.lowerBound)...]
            }
            let trimmed = rest.hasSuffix(",") ? rest.dropLast() : rest
            if !trimmed.isEmpty { out.append(String(trimmed)) }
        }
        return out
    }

    private init(single url: String) throws {
        func invalid(_ why: String) -> AMQPError {
            AMQPError(code: .invalidURL, message: "invalid AMQP URL '\(Self.redact(url))': \(why)")
        }
        guard let components = URLComponents(string: url) else { throw invalid("it is not a URL") }
        let scheme = components.scheme?.lowercased()
        guard scheme == "amqp" || scheme == "amqps" else {
            throw invalid("the scheme must be amqp or amqps, not '\(components.scheme ?? "")'")
        }
        var host = components.host ?? ""
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if host.isEmpty { host = "127.0.0.1" }
        self.init(host: host, tls: scheme == "amqps" ? TLS() : nil)
        if let port = components.port {
            guard (1...65535).contains(port) else { throw invalid("port \(port) is out of range") }
            self.port = port
        }
        if let user = components.user { self.user = user }
        if let password = components.password { self.password = password }
        let path = components.percentEncodedPath
        if path.isEmpty || path == "/" {
            self.virtualHost = "/"
        } else {
            let raw = String(path.dropFirst())
            guard !raw.contains("/") else {
                throw invalid("the virtual host must be one path segment; write '/' as %2F")
            }
            guard let vhost = raw.removingPercentEncoding else { throw invalid("bad percent-encoding in the virtual host") }
            self.virtualHost = vhost
        }
        for item in components.queryItems ?? [] {
            let value = item.value ?? ""
            func int(_ range: ClosedRange<Int>) throws -> Int {
                guard let v = Int(value), range.contains(v) else {
                    throw invalid("\(item.name) must be an integer in \(range.lowerBound)...\(range.upperBound), not '\(value)'")
                }
                return v
            }
            switch item.name {
            case "heartbeat": self.heartbeat = try int(0...65535)
            case "connection_timeout": self.connectTimeout = .milliseconds(try int(1...3_600_000))
            case "channel_max": self.channelMax = try int(1...65535)
            case "frame_max": self.frameMax = try int(4096...1_048_576)
            case "connection_name": self.connectionName = value
            case "cacertfile", "certfile", "keyfile", "verify", "verify_hostname", "server_name_indication":
                guard self.tls != nil else { throw invalid("\(item.name) needs the amqps scheme") }
                switch item.name {
                case "cacertfile": self.tls?.caFile = value
                case "certfile": self.tls?.certificateFile = value
                case "keyfile": self.tls?.keyFile = value
                case "verify":
                    guard value == "verify_peer" || value == "verify_none" else {
                        throw invalid("verify must be verify_peer or verify_none, not '\(value)'")
                    }
                    self.tls?.verifyPeer = value == "verify_peer"
                case "verify_hostname":
                    guard value == "true" || value == "false" else { throw invalid("verify_hostname must be true or false") }
                    self.tls?.verifyHostname = value == "true"
                default: break  // server_name_indication: rabbitmq-c always sends the host name.
                }
            default:
                throw invalid("unknown query parameter '\(item.name)'")
            }
        }
    }

    /// The URL with its password replaced by `***`, safe to log.
    public var redactedURL: String {
        let scheme = self.tls == nil ? "amqp" : "amqps"
        let vhost = self.virtualHost.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? self.virtualHost
        return self.endpoints.map { "\(scheme)://\(self.user):***@\($0)/\(vhost)" }.joined(separator: " ")
    }

    /// Replaces the password in a URL string with `***`.
    ///
    /// The credentials end at the *last* `@` before the query, so a password that itself holds
    /// `@` (or `/`) is hidden whole.
    public static func redact(_ url: String) -> String {
        let list = Self.splitList(url)
        if list.count > 1 { return list.map(Self.redact).joined(separator: " ") }
        guard let schemeEnd = url.range(of: "://") else { return url }
        let rest = url[schemeEnd.upperBound...]
        let searchEnd = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) ?? rest.endIndex
        guard let at = rest[..<searchEnd].lastIndex(of: "@") else { return url }
        let userInfo = rest[..<at]
        guard let colon = userInfo.firstIndex(of: ":") else { return url }
        return url.replacingCharacters(in: url.index(after: colon)..<at, with: "***")
    }
}
