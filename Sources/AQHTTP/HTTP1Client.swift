import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in nanoseconds.
@inline(__always) func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Plain `http://` requests over HTTP/1.1 with kept-alive connections, driven by someone else's
/// poll loop like ``CurlMulti`` (``pollRequests(into:)``, ``handle(_:)``, ``runTurn()``), on one
/// thread. It exists because libcurl 7.88 writes every byte of a request's header lines through
/// its printf machinery, one function call chain per byte: for the ten lines a task's callback
/// and webhook carry (ids, attempt, queue, Standard Webhooks signature), that was the largest
/// single cost of a task in aq-bridge (measured with callgrind: about 40,000 instructions per
/// task of libcurl's 139,000). Here a request's head is one copy into the connection's buffer and
/// one `sendmsg` with the body.
///
/// What it does, as libcurl did for these requests: resolves names off the thread (answers kept a
/// minute) and checks each address against the ``AddressPolicy`` before connecting to it; tries
/// a name's addresses in turn within the connect timeout (the request's, at most 10 s); keeps
/// connections alive per host and port (at most `maxConnections` open in all, the least recently
/// used idle one closed to make room); sends a request on a kept-alive connection again on a
/// fresh one, once, when the server closed it before answering anything (a server's keep-alive
/// timeout racing the request); reads `Content-Length`, chunked and until-close bodies, skips 1xx
/// answers, refuses an answer over the request's `maxResponseBytes` and a head over 100 KiB; a
/// request's timeout covers all of it. URLs with credentials, or with a path libcurl would
/// rewrite (dot segments, bytes outside RFC 3986), and HTTPS are not taken: see ``target(_:)``.
public final class HTTP1Client {
    public typealias Completion = (Result<HTTPAnswer, HTTPError>) -> Void

    /// Where a plain-http URL connects to, and the parts of it the request's head repeats.
    public struct Target: Sendable, Equatable {
        /// Lowercased; without brackets (IPv6) or a trailing dot.
        var host: String
        var port: Int
        /// The host is an IPv6 literal (it goes in brackets in `Host`).
        var isIPv6: Bool { self.host.utf8.contains(UInt8(ascii: ":")) }
        /// The request target in the URL's bytes: path and query, without the fragment.
        var path: Range<Int>
        /// The URL has no path: the target starts with a `/` of its own.
        var needsSlash: Bool
    }

    /// The target of a URL this client takes, or nil: not `http://`, credentials in it, or a path
    /// with dot segments or bytes outside RFC 3986 (those go through libcurl, which rewrites them).
    public static func target(_ url: String) -> Target? {
        var url = url
        return url.withUTF8 { bytes -> Target? in
            guard bytes.count >= 8, bytes.count <= 8192, let parts = URLText.authorityParts(bytes), !parts.https else { return nil }
            let authorityStart = 7
            var authorityEnd = authorityStart
            while authorityEnd < bytes.count, bytes[authorityEnd] != UInt8(ascii: "/"), bytes[authorityEnd] != UInt8(ascii: "?"),
                  bytes[authorityEnd] != UInt8(ascii: "#") {
                if bytes[authorityEnd] == UInt8(ascii: "@") { return nil }
                authorityEnd += 1
            }
            var pathEnd = authorityEnd
            var queryStart: Int?
            while pathEnd < bytes.count, bytes[pathEnd] != UInt8(ascii: "#") {
                let b = bytes[pathEnd]
                guard Self.allowedInTarget[Int(b)] else { return nil }
                if b == UInt8(ascii: "%") {
                    guard pathEnd + 2 < bytes.count, HTTP1Response.BodyReader.hexDigit(bytes[pathEnd + 1]) != nil,
                          HTTP1Response.BodyReader.hexDigit(bytes[pathEnd + 2]) != nil else { return nil }
                }
                if b == UInt8(ascii: "?"), queryStart == nil { queryStart = pathEnd }
                pathEnd += 1
            }
            // Dot segments ("/./", "/../", a path ending in "/." or "/..") are removed by libcurl.
            let segmentsEnd = queryStart ?? pathEnd
            var i = authorityEnd
            while i < segmentsEnd {
                if bytes[i] == UInt8(ascii: "/"), i + 1 < segmentsEnd, bytes[i + 1] == UInt8(ascii: ".") {
                    var j = i + 2
                    if j < segmentsEnd, bytes[j] == UInt8(ascii: ".") { j += 1 }
                    if j == segmentsEnd || bytes[j] == UInt8(ascii: "/") { return nil }
                }
                i += 1
            }
            var host = String(decoding: UnsafeBufferPointer(rebasing: bytes[parts.host]), as: UTF8.self)
            if host.utf8.contains(where: { $0 >= 0x41 && $0 <= 0x5A }) { host = host.lowercased() }
            return Target(host: host, port: parts.port, path: authorityEnd..<pathEnd,
                          needsSlash: authorityEnd == pathEnd || bytes[authorityEnd] != UInt8(ascii: "/"))
        }
    }

    /// Unreserved, sub-delims, ':', '@', '/', '?' and '%' (RFC 3986's path and query).
    private static let allowedInTarget: [Bool] = (0..<256).map { b in
        switch b {
        case 0x41...0x5A, 0x61...0x7A, 0x30...0x39: return true
        default: return "-._~!$&'()*+,;=:@/?%".utf8.contains(UInt8(b))
        }
    }

    struct Origin: Hashable {
        var host: String
        var port: Int
    }

    final class Exchange {
        let request: HTTPRequest
        let target: Target
        let origin: Origin
        let completion: Completion
        let started: UInt64
        let deadline: UInt64
        var connection: Connection?
        var response: [UInt8] = []
        var status = 0
        var retryAfter: String?
        var noRetry: String?
        /// Bytes of an answer arrived on its current connection.
        var receivedAny = false
        /// Sent again on a fresh connection once already.
        var retried = false
        var liveIndex = -1
        var done = false

        init(request: HTTPRequest, target: Target, origin: Origin, completion: @escaping Completion, now: UInt64) {
            self.request = request
            self.target = target
            self.origin = origin
            self.completion = completion
            self.started = now
            // At most a year (a caller's longer timeout must not overflow the arithmetic).
            let seconds = min(max(request.timeout.components.seconds, 0), 365 * 86_400)
            let nanoseconds = seconds * 1_000_000_000 + max(0, request.timeout.components.attoseconds) / 1_000_000_000
            self.deadline = now &+ UInt64(max(1_000_000, nanoseconds))
        }
    }

    final class Connection {
        enum State { case connecting, active, idle, closed }
        var fd: Int32 = -1
        let origin: Origin
        var state = State.connecting
        var exchange: Exchange?
        /// The request's head, and how much of it and of the body is on the wire.
        var out: [UInt8] = []
        var outSent = 0
        var bodySent = 0
        var sending = false
        /// Bytes of a head not whole yet, and how far they were searched for its end.
        var inbox: [UInt8] = []
        var searched = 0
        var head: HTTP1Response.Head?
        var reader: HTTP1Response.BodyReader?
        /// Another request may follow on it.
        var reusable = true
        /// The current exchange is not its first.
        var reused = false
        var idleSince: UInt64 = 0
        var busyIndex = -1
        // While connecting: the addresses to try, the one tried now, when it and all must be done.
        var addresses: [SocketAddress] = []
        var addressIndex = 0
        var attemptDeadline: UInt64 = 0
        var connectDeadline: UInt64 = 0
        var lastError = ""

        init(origin: Origin) { self.origin = origin }
    }

    public let maxConnections: Int
    public let policy: AddressPolicy?
    private let resolver = HostResolver()
    private var idle: [Origin: [Connection]] = [:]
    private var idleCount = 0
    /// Connections connecting or carrying an exchange.
    private var busy: [Connection] = []
    private var openCount = 0
    /// Exchanges not yet completed.
    private var live: [Exchange] = []
    /// Exchanges waiting for a connection (all `maxConnections` are carrying one).
    private var waitingForSlot: [Exchange] = []
    private var waitingHead = 0
    /// Exchanges waiting for their host's addresses.
    private var resolving: [String: [Exchange]] = [:]
    /// No exchange or connection attempt is due before this.
    private var nextDeadline = UInt64.max
    private var lastSweep: UInt64 = 0
    /// What ``pollRequests(into:)`` asked about, in order (nil: the resolver's descriptor).
    private var polled: [Connection?] = []
    private var completions: [(Exchange, Result<HTTPAnswer, HTTPError>)] = []
    private var completing = false
    private var serving = false
    /// What `recv` reads into (one thread: one buffer).
    private let scratch: UnsafeMutableRawBufferPointer
    public private(set) var startedCount = 0
    /// Connections opened so far (tests: kept-alive connections are reused).
    public private(set) var connectionsOpened = 0

    /// How long an idle connection is kept (libcurl's default maximum age for reuse).
    static let maxIdleNanoseconds: UInt64 = 118_000_000_000
    /// The longest connect, whatever the request's timeout (libcurl's setting in ``CurlMulti``).
    static let maxConnectNanoseconds: UInt64 = 10_000_000_000

    public var inFlight: Int { self.live.count }
    public var openConnections: Int { self.openCount }

    public init(maxConnections: Int = 512, policy: AddressPolicy? = nil) {
        self.maxConnections = max(1, maxConnections)
        self.policy = policy
        self.scratch = .allocate(byteCount: 64 * 1024, alignment: 16)
    }

    deinit {
        for connection in self.busy where connection.fd >= 0 { close(connection.fd) }
        for (_, list) in self.idle { for connection in list where connection.fd >= 0 { close(connection.fd) } }
        self.scratch.deallocate()
    }

    // MARK: Starting

    /// Starts a request to `target` (from ``target(_:)`` of its URL); `completion` runs later,
    /// inside ``handle(_:)`` or ``runTurn()``, or now when the request is refused before anything
    /// is sent (its policy, its header lines).
    public func start(_ request: HTTPRequest, target: Target, completion: @escaping Completion) {
        if let header = request.headers.refusedLine {
            return completion(.failure(HTTPError(kind: .invalidRequest, message: "a header line holds CR, LF or NUL: \(header.debugDescription)")))
        }
        if let refusal = self.hostRefusal(target.host) { return completion(.failure(refusal)) }
        let now = monotonicNanoseconds()
        let exchange = Exchange(request: request, target: target, origin: Origin(host: target.host, port: target.port), completion: completion, now: now)
        exchange.liveIndex = self.live.count
        self.live.append(exchange)
        self.startedCount += 1
        if exchange.deadline < self.nextDeadline { self.nextDeadline = exchange.deadline }
        self.dispatch(exchange, now: now)
        self.flushCompletions()
    }

    /// What the policy says of a host's name, remembered per host (bounded).
    private var hostChecks: [String: HTTPError?] = [:]

    private func hostRefusal(_ host: String) -> HTTPError? {
        guard let policy = self.policy else { return nil }
        if let known = self.hostChecks[host] { return known }
        let refusal = policy.refusal(host: host, address: nil).map { HTTPError(kind: .refused, message: $0) }
        if self.hostChecks.count >= 4096 { self.hostChecks.removeAll(keepingCapacity: true) }
        self.hostChecks[host] = refusal
        return refusal
    }

    /// Puts the exchange on a kept-alive connection to its origin, or opens one.
    private func dispatch(_ exchange: Exchange, now: UInt64) {
        // A request sent again (its kept-alive connection closed under it) goes on a new one.
        if !exchange.retried {
            while let connection = self.takeIdle(exchange.origin) {
                // Checked every time: bytes a server sent after its answer (a second answer, a
                // stray CRLF) must never be read as the next request's answer.
                if !Self.isAlive(connection.fd) {
                    self.closeConnection(connection)
                    continue
                }
                connection.reused = true
                return self.attach(exchange, connection)
            }
        }
        if self.openCount >= self.maxConnections {
            guard let victim = self.oldestIdle() else {
                self.waitingForSlot.append(exchange)
                return
            }
            self.closeConnection(victim)
        }
        if let literal = SocketAddress(literal: exchange.origin.host, port: exchange.origin.port) {
            return self.connect(exchange, [literal], now: now)
        }
        guard self.resolver.isUsable else {
            return self.fail(exchange, HTTPError(kind: .couldNotResolve, message: "could not resolve host \(exchange.origin.host): no pipe for the resolver's answers"))
        }
        guard let addresses = self.resolver.lookup(exchange.origin.host, now: now) else {
            self.resolving[exchange.origin.host, default: []].append(exchange)
            return
        }
        self.connect(exchange, addresses.map { $0.with(port: exchange.origin.port) }, now: now)
    }

    /// Whether an idle connection's server has not closed it (nor sent anything unasked).
    static func isAlive(_ fd: Int32) -> Bool {
        var byte: UInt8 = 0
        let n = recv(fd, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
        return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)
    }

    private func takeIdle(_ origin: Origin) -> Connection? {
        guard let index = self.idle.index(forKey: origin) else { return nil }
        guard let connection = self.idle.values[index].popLast() else { return nil }
        if self.idle.values[index].isEmpty { self.idle.remove(at: index) }
        self.idleCount -= 1
        return connection
    }

    private func oldestIdle() -> Connection? {
        var oldest: Connection?
        for (_, list) in self.idle {
            // Each list is in the order its connections went idle.
            if let first = list.first, first.idleSince < (oldest?.idleSince ?? .max) { oldest = first }
        }
        return oldest
    }

    private func connect(_ exchange: Exchange, _ addresses: [SocketAddress], now: UInt64) {
        var allowed = addresses
        var refusal: String?
        if let policy = self.policy {
            allowed = addresses.filter { address in
                guard let why = policy.refusal(host: exchange.origin.host, address: address.ip) else { return true }
                if refusal == nil { refusal = why }
                return false
            }
        }
        guard !allowed.isEmpty else {
            return self.fail(exchange, HTTPError(kind: .refused, message: refusal ?? "no address to connect to"))
        }
        let connection = Connection(origin: exchange.origin)
        connection.addresses = allowed
        connection.connectDeadline = min(exchange.deadline, now &+ Self.maxConnectNanoseconds)
        connection.exchange = exchange
        exchange.connection = connection
        self.openCount += 1
        self.connectionsOpened += 1
        self.addBusy(connection)
        self.attempt(connection, now: now)
    }

    /// Connects to the next address; on the last one fails the exchange.
    private func attempt(_ connection: Connection, now: UInt64) {
        while connection.addressIndex < connection.addresses.count {
            var address = connection.addresses[connection.addressIndex]
            let fd = socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else {
                connection.lastError = "\(address.text): \(String(cString: strerror(errno)))"
                connection.addressIndex += 1
                continue
            }
            var one: Int32 = 1
            _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            let status = withUnsafePointer(to: &address.storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, address.length) }
            }
            connection.fd = fd
            if status == 0 { return self.connected(connection) }
            if errno == EINPROGRESS {
                connection.state = .connecting
                // With addresses left, this one gets half the time that is left, and at most
                // 300 ms when the next is of the other family (an unreachable IPv6 address must not
                // cost each new connection seconds; libcurl starts the other family after 200 ms).
                let left = connection.connectDeadline > now ? connection.connectDeadline - now : 0
                if connection.addressIndex + 1 < connection.addresses.count {
                    let otherFamily = connection.addresses[connection.addressIndex + 1].family != address.family
                    connection.attemptDeadline = now &+ (otherFamily ? min(left / 2, 300_000_000) : left / 2)
                } else {
                    connection.attemptDeadline = connection.connectDeadline
                }
                if connection.attemptDeadline < self.nextDeadline { self.nextDeadline = connection.attemptDeadline }
                return
            }
            connection.lastError = "\(address.text): \(String(cString: strerror(errno)))"
            close(fd)
            connection.fd = -1
            connection.addressIndex += 1
        }
        guard let exchange = connection.exchange else { return self.closeConnection(connection) }
        self.closeConnection(connection)
        self.fail(exchange, HTTPError(kind: .couldNotConnect, message: "could not connect to \(connection.lastError)"))
    }

    /// The socket of a connect in progress became writable (or failed).
    private func finishConnect(_ connection: Connection, now: UInt64) {
        var error: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(connection.fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0 { error = errno }
        if error == 0 { return self.connected(connection) }
        self.nextAddress(connection, String(cString: strerror(error)), now: now)
    }

    private func nextAddress(_ connection: Connection, _ why: String, now: UInt64) {
        if connection.addressIndex < connection.addresses.count {
            connection.lastError = "\(connection.addresses[connection.addressIndex].text): \(why)"
        }
        close(connection.fd)
        connection.fd = -1
        connection.addressIndex += 1
        self.attempt(connection, now: now)
    }

    private func connected(_ connection: Connection) {
        connection.state = .active
        connection.addresses = []
        self.begin(connection)
    }

    private func attach(_ exchange: Exchange, _ connection: Connection) {
        connection.exchange = exchange
        exchange.connection = connection
        connection.state = .active
        self.addBusy(connection)
        self.begin(connection)
    }

    private func addBusy(_ connection: Connection) {
        connection.busyIndex = self.busy.count
        self.busy.append(connection)
    }

    private func removeBusy(_ connection: Connection) {
        let index = connection.busyIndex
        guard index >= 0, index < self.busy.count, self.busy[index] === connection else { return }
        let last = self.busy.removeLast()
        if index < self.busy.count {
            self.busy[index] = last
            last.busyIndex = index
        }
        connection.busyIndex = -1
    }

    // MARK: Sending

    /// Writes the request's head and sends it with the body.
    private func begin(_ connection: Connection) {
        guard let exchange = connection.exchange else { return }
        connection.inbox.removeAll(keepingCapacity: true)
        connection.searched = 0
        connection.head = nil
        connection.reader = nil
        connection.outSent = 0
        connection.bodySent = 0
        connection.sending = true
        exchange.receivedAny = false
        Self.writeHead(into: &connection.out, exchange.request, exchange.target)
        self.send(connection)
    }

    /// The `Host` header's value: the host (IPv6 in brackets), and the port unless it is 80 (as
    /// libcurl writes it).
    static func appendHostHeader(_ target: Target, to out: inout [UInt8]) {
        if target.isIPv6 { out.append(UInt8(ascii: "[")) }
        out += target.host.utf8
        if target.isIPv6 { out.append(UInt8(ascii: "]")) }
        if target.port != 80 {
            out.append(UInt8(ascii: ":"))
            out += String(target.port).utf8
        }
    }

    /// Which of the lines the client writes itself a request's lines give instead (libcurl's
    /// rule: a caller's `Host`, `User-Agent`, `Accept` or `Content-Length` replaces its own).
    struct Overrides: OptionSet {
        let rawValue: UInt8
        static let host = Overrides(rawValue: 1), userAgent = Overrides(rawValue: 2), accept = Overrides(rawValue: 4), contentLength = Overrides(rawValue: 8)

        /// The line's name, if it is one of those.
        static func of(_ line: UnsafeBufferPointer<UInt8>, _ range: Range<Int>) -> Overrides {
            guard let first = range.first else { return [] }
            // One byte decides for nearly every line.
            switch line[first] | 0x20 {
            case UInt8(ascii: "h"), UInt8(ascii: "u"), UInt8(ascii: "a"), UInt8(ascii: "c"): break
            default: return []
            }
            let name = UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: line[range.lowerBound..<HTTP1Client.nameEnd(line, range)]))
            let all = 0..<name.count
            if HTTP1Response.nameIs(name, all, "host") { return .host }
            if HTTP1Response.nameIs(name, all, "user-agent") { return .userAgent }
            if HTTP1Response.nameIs(name, all, "accept") { return .accept }
            if HTTP1Response.nameIs(name, all, "content-length") { return .contentLength }
            return []
        }
    }

    /// `METHOD target HTTP/1.1`, `Host`, `User-Agent`, `Accept`, the request's own lines, the
    /// shared lines, `Content-Length`, and the empty line. As libcurl does: a line whose value is
    /// empty is left out (`Expect:` in a list means "no Expect header"), `Name;` is sent as a
    /// header without a value, and a given `Host`, `User-Agent`, `Accept` or `Content-Length`
    /// replaces the client's own.
    static func writeHead(into out: inout [UInt8], _ request: HTTPRequest, _ target: Target) {
        out.removeAll(keepingCapacity: true)
        out.reserveCapacity(160 + request.headers.bytes.count + (request.sharedHeaders?.wire.count ?? 0) + target.path.count)
        var overrides: Overrides = []
        request.headers.bytes.withUnsafeBufferPointer { lines in
            Self.forEachLine(lines) { overrides.formUnion(Overrides.of(lines, $0)) }
        }
        if let shared = request.sharedHeaders { overrides.formUnion(shared.overrides) }
        out += request.method.utf8
        out.append(0x20)
        var url = request.url
        url.withUTF8 { bytes in
            if target.needsSlash { out.append(UInt8(ascii: "/")) }
            out += UnsafeBufferPointer(rebasing: bytes[target.path])
        }
        out += " HTTP/1.1\r\n".utf8
        if !overrides.contains(.host) {
            out += "Host: ".utf8
            Self.appendHostHeader(target, to: &out)
            out += "\r\n".utf8
        }
        if !overrides.contains(.userAgent) {
            out += "User-Agent: ".utf8
            out += CurlMulti.userAgent.utf8
            out += "\r\n".utf8
        }
        if !overrides.contains(.accept) { out += "Accept: */*\r\n".utf8 }
        request.headers.bytes.withUnsafeBufferPointer { lines in
            Self.forEachLine(lines) { range in Self.appendLine(lines, range, to: &out) }
        }
        if let shared = request.sharedHeaders { out += shared.wire }
        if !overrides.contains(.contentLength), request.method != "GET" && request.method != "HEAD" || !request.body.isEmpty {
            out += "Content-Length: ".utf8
            out += String(request.body.count).utf8
            out += "\r\n".utf8
        }
        out += "\r\n".utf8
    }

    /// Each NUL-ended line of a ``HeaderLines`` buffer.
    static func forEachLine(_ lines: UnsafeBufferPointer<UInt8>, _ body: (Range<Int>) -> Void) {
        var start = 0
        while start < lines.count {
            var end = start
            while end < lines.count, lines[end] != 0 { end += 1 }
            body(start..<end)
            start = end + 1
        }
    }

    /// A header line as sent: none when its value is empty, `Name:` for `Name;`.
    static func appendLine(_ line: UnsafeBufferPointer<UInt8>, _ range: Range<Int>, to out: inout [UInt8]) {
        guard !Self.valueIsEmpty(line, range) else {
            // `Name;` (no colon before the semicolon, nothing after it): a header without a value.
            let i = Self.nameEnd(line, range)
            if i < range.upperBound, line[i] == UInt8(ascii: ";"), i > range.lowerBound, Self.valueIsEmpty(line, (i + 1)..<range.upperBound, afterName: false) {
                out += UnsafeBufferPointer(rebasing: line[range.lowerBound..<i])
                out += ":\r\n".utf8
            }
            return
        }
        out += UnsafeBufferPointer(rebasing: line[range])
        out += "\r\n".utf8
    }

    /// Where a header line's name ends: at its first `:` or `;` (or the line's end).
    static func nameEnd(_ line: UnsafeBufferPointer<UInt8>, _ range: Range<Int>) -> Int {
        var i = range.lowerBound
        while i < range.upperBound, line[i] != UInt8(ascii: ":"), line[i] != UInt8(ascii: ";") { i += 1 }
        return i
    }

    /// `Name:` with nothing but blanks after the colon (or no colon at all).
    /// With `afterName` false: whether `range` holds nothing but blanks.
    static func valueIsEmpty(_ line: UnsafeBufferPointer<UInt8>, _ range: Range<Int>, afterName: Bool = true) -> Bool {
        var i = range.lowerBound
        if afterName {
            while i < range.upperBound, line[i] != UInt8(ascii: ":") { i += 1 }
            guard i < range.upperBound else { return true }
            i += 1
        }
        while i < range.upperBound {
            if line[i] != 0x20 && line[i] != 0x09 { return false }
            i += 1
        }
        return true
    }

    /// Sends what is left of the head and the body, until done or the socket is full.
    private func send(_ connection: Connection) {
        guard let exchange = connection.exchange, connection.sending else { return }
        while true {
            let sent: Int = connection.out.withUnsafeBytes { head in
                exchange.request.body.withUnsafeBytes { body in
                    var vectors = (
                        iovec(iov_base: UnsafeMutableRawPointer(mutating: head.baseAddress.map { $0 + connection.outSent }), iov_len: head.count - connection.outSent),
                        iovec(iov_base: UnsafeMutableRawPointer(mutating: body.baseAddress.map { $0 + connection.bodySent }), iov_len: body.count - connection.bodySent))
                    return withUnsafeMutablePointer(to: &vectors) { pair in
                        pair.withMemoryRebound(to: iovec.self, capacity: 2) { iov in
                            var message = msghdr()
                            message.msg_iov = connection.outSent < head.count ? iov : iov + 1
                            message.msg_iovlen = connection.outSent < head.count ? 2 : 1
                            return Glibc.sendmsg(connection.fd, &message, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
                        }
                    }
                }
            }
            if sent < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { return }
                return self.broken(connection, "could not send the request: \(String(cString: strerror(errno)))")
            }
            var left = sent
            let headLeft = connection.out.count - connection.outSent
            let fromHead = min(left, headLeft)
            connection.outSent += fromHead
            left -= fromHead
            connection.bodySent += left
            if connection.outSent == connection.out.count && connection.bodySent == exchange.request.body.count {
                connection.sending = false
                return
            }
        }
    }

    // MARK: Receiving

    private func receive(_ connection: Connection, now: UInt64) {
        guard let exchange = connection.exchange else { return }
        for _ in 0..<16 {
            let n = recv(connection.fd, self.scratch.baseAddress, self.scratch.count, Int32(MSG_DONTWAIT))
            if n > 0 {
                exchange.receivedAny = true
                guard self.feed(connection, UnsafeRawBufferPointer(rebasing: self.scratch[0..<n]), now: now) else { return }
                if n < self.scratch.count { return }
                continue
            }
            if n == 0 { return self.endOfStream(connection) }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { return }
            return self.broken(connection, "the connection failed: \(String(cString: strerror(errno)))")
        }
    }

    /// Reads bytes of the answer; false when the exchange ended (the connection released).
    private func feed(_ connection: Connection, _ input: UnsafeRawBufferPointer, now: UInt64) -> Bool {
        guard let exchange = connection.exchange else { return false }
        var bytes = input
        while connection.reader == nil {
            let end: Int
            if connection.inbox.isEmpty {
                guard let found = HTTP1Response.headEnd(bytes) else {
                    guard bytes.count <= HTTP1Response.maxHeadBytes else { return self.unreadable(connection, "the answer's head exceeds \(HTTP1Response.maxHeadBytes) bytes") }
                    connection.inbox.append(contentsOf: bytes)
                    connection.searched = bytes.count
                    return true
                }
                end = found
            } else {
                // A head that came in pieces: read it from the inbox, then go on with the rest.
                guard connection.inbox.count + bytes.count <= HTTP1Response.maxHeadBytes + 64 * 1024 else {
                    return self.unreadable(connection, "the answer's head exceeds \(HTTP1Response.maxHeadBytes) bytes")
                }
                connection.inbox.append(contentsOf: bytes)
                guard let found = connection.inbox.withUnsafeBytes({ HTTP1Response.headEnd($0, from: connection.searched) }) else {
                    guard connection.inbox.count <= HTTP1Response.maxHeadBytes else { return self.unreadable(connection, "the answer's head exceeds \(HTTP1Response.maxHeadBytes) bytes") }
                    connection.searched = connection.inbox.count
                    return true
                }
                guard found <= HTTP1Response.maxHeadBytes else { return self.unreadable(connection, "the answer's head exceeds \(HTTP1Response.maxHeadBytes) bytes") }
                let rest = Array(connection.inbox[found...])
                connection.inbox.removeSubrange(found...)
                let pieces = connection.inbox
                connection.inbox.removeAll(keepingCapacity: true)
                connection.searched = 0
                guard pieces.withUnsafeBytes({ self.takeHead(connection, exchange, $0) }) else { return false }
                return rest.withUnsafeBytes { self.feed(connection, $0, now: now) }
            }
            guard end <= HTTP1Response.maxHeadBytes else { return self.unreadable(connection, "the answer's head exceeds \(HTTP1Response.maxHeadBytes) bytes") }
            guard self.takeHead(connection, exchange, UnsafeRawBufferPointer(rebasing: bytes[0..<end])) else { return false }
            bytes = UnsafeRawBufferPointer(rebasing: bytes[end...])
        }
        guard var reader = connection.reader else { return true }
        let step = reader.consume(bytes, into: &exchange.response)
        connection.reader = reader
        switch step {
        case .more:
            return true
        case .done(let consumed):
            // Bytes after the answer belong to no request: the connection cannot be trusted again.
            if consumed < bytes.count { connection.reusable = false }
            self.succeed(connection)
            return false
        case .tooLarge:
            self.closeConnection(connection)
            self.fail(exchange, HTTPError(kind: .tooLarge, message: "the answer exceeded \(exchange.request.maxResponseBytes) bytes"))
            return false
        case .failure(let failure):
            return self.unreadable(connection, failure.description)
        }
    }

    /// Takes a whole head; false when the exchange ended on it.
    private func takeHead(_ connection: Connection, _ exchange: Exchange, _ bytes: UnsafeRawBufferPointer) -> Bool {
        switch HTTP1Response.parseHead(bytes, method: exchange.request.method == "HEAD" ? .head : .other) {
        case .failure(let failure):
            return self.unreadable(connection, failure.description)
        case .success(let head):
            if head.status < 200 {
                // An interim answer (100 Continue, 103 Early Hints): the real one follows.
                guard head.status != 101 else { return self.unreadable(connection, "the server switched protocols (HTTP 101)") }
                return true
            }
            exchange.status = head.status
            exchange.retryAfter = head.retryAfter
            exchange.noRetry = head.noRetry
            if head.close { connection.reusable = false }
            // Room for what the server says is coming, but not for more than 64 KiB on its word.
            if case .length(let n) = head.framing { exchange.response.reserveCapacity(min(n, exchange.request.maxResponseBytes, 64 * 1024)) }
            connection.head = head
            // A body-less answer's reader is done at once: `feed` completes it.
            connection.reader = HTTP1Response.BodyReader(head.framing, limit: exchange.request.maxResponseBytes)
            return true
        }
    }

    private func unreadable(_ connection: Connection, _ why: String) -> Bool {
        guard let exchange = connection.exchange else { return false }
        self.closeConnection(connection)
        self.fail(exchange, HTTPError(kind: .other, message: "the answer could not be read: \(why)"))
        return false
    }

    private func endOfStream(_ connection: Connection) {
        guard let exchange = connection.exchange else { return }
        if var reader = connection.reader {
            let failure = reader.endOfStream()
            connection.reader = reader
            connection.reusable = false
            guard let failure else { return self.succeed(connection) }
            self.closeConnection(connection)
            return self.fail(exchange, HTTPError(kind: .other, message: failure.description))
        }
        self.broken(connection, exchange.receivedAny ? "the server closed the connection in the middle of the answer's head"
                                                     : "the server closed the connection without answering")
    }

    /// The connection failed: the request goes again on a fresh connection when it was a
    /// kept-alive one and nothing of an answer came; else the exchange fails.
    private func broken(_ connection: Connection, _ why: String) {
        guard let exchange = connection.exchange else { return self.closeConnection(connection) }
        self.closeConnection(connection)
        if connection.reused && !exchange.receivedAny && !exchange.retried {
            exchange.retried = true
            exchange.connection = nil
            exchange.response.removeAll()
            return self.dispatch(exchange, now: monotonicNanoseconds())
        }
        self.fail(exchange, HTTPError(kind: .other, message: why))
    }

    private func succeed(_ connection: Connection) {
        guard let exchange = connection.exchange else { return }
        let answer = HTTPAnswer(status: exchange.status, body: exchange.response, retryAfter: exchange.retryAfter, noRetry: exchange.noRetry)
        exchange.response = []
        if connection.reusable && !connection.sending {
            self.release(connection)
        } else {
            self.closeConnection(connection)
        }
        self.complete(exchange, .success(answer))
    }

    /// Keeps the connection for the next request to its origin.
    private func release(_ connection: Connection) {
        connection.exchange = nil
        self.removeBusy(connection)
        connection.state = .idle
        connection.idleSince = monotonicNanoseconds()
        connection.inbox.removeAll(keepingCapacity: false)
        if connection.out.capacity > 16 * 1024 { connection.out = [] }
        self.idle[connection.origin, default: []].append(connection)
        self.idleCount += 1
        self.serveWaiting()
    }

    private func closeConnection(_ connection: Connection) {
        switch connection.state {
        case .closed: return
        case .idle:
            if let index = self.idle.index(forKey: connection.origin), let position = self.idle.values[index].firstIndex(where: { $0 === connection }) {
                self.idle.values[index].remove(at: position)
                if self.idle.values[index].isEmpty { self.idle.remove(at: index) }
                self.idleCount -= 1
            }
        case .connecting, .active:
            self.removeBusy(connection)
        }
        connection.state = .closed
        if connection.fd >= 0 { close(connection.fd) }
        connection.fd = -1
        connection.exchange?.connection = nil
        connection.exchange = nil
        self.openCount -= 1
        self.serveWaiting()
    }

    /// Exchanges that waited for a connection go now, as far as there is room.
    private func serveWaiting() {
        guard !self.serving, self.waitingHead < self.waitingForSlot.count else { return }
        self.serving = true
        defer { self.serving = false }
        let now = monotonicNanoseconds()
        while self.waitingHead < self.waitingForSlot.count {
            let exchange = self.waitingForSlot[self.waitingHead]
            if exchange.done {
                self.waitingHead += 1
                continue
            }
            guard self.openCount < self.maxConnections || self.idle[exchange.origin] != nil || self.idleCount > 0 else { break }
            self.waitingHead += 1
            self.dispatch(exchange, now: now)
        }
        if self.waitingHead == self.waitingForSlot.count {
            self.waitingForSlot.removeAll(keepingCapacity: true)
            self.waitingHead = 0
        } else if self.waitingHead > 64, self.waitingHead * 2 > self.waitingForSlot.count {
            // Under lasting saturation the line never empties: let the served ones go.
            self.waitingForSlot.removeFirst(self.waitingHead)
            self.waitingHead = 0
        }
    }

    // MARK: Ending exchanges

    private func fail(_ exchange: Exchange, _ error: HTTPError) {
        if let connection = exchange.connection { self.closeConnection(connection) }
        self.complete(exchange, .failure(error))
    }

    private func complete(_ exchange: Exchange, _ result: Result<HTTPAnswer, HTTPError>) {
        guard !exchange.done else { return }
        exchange.done = true
        exchange.connection = nil
        let index = exchange.liveIndex
        if index >= 0, index < self.live.count, self.live[index] === exchange {
            let last = self.live.removeLast()
            if index < self.live.count {
                self.live[index] = last
                last.liveIndex = index
            }
        }
        exchange.liveIndex = -1
        self.completions.append((exchange, result))
    }

    /// Runs the completions of ended exchanges (they may start requests of their own).
    private func flushCompletions() {
        guard !self.completing else { return }
        self.completing = true
        defer { self.completing = false }
        var index = 0
        while index < self.completions.count {
            let (exchange, result) = self.completions[index]
            index += 1
            exchange.completion(result)
        }
        self.completions.removeAll(keepingCapacity: true)
    }

    // MARK: The poll loop

    /// Adds the descriptors to poll; returns the longest wait allowed, in ms (nil: any).
    public func pollRequests(into fds: inout [pollfd]) -> Int32? {
        self.polled.removeAll(keepingCapacity: true)
        if self.resolver.isWaiting {
            fds.append(pollfd(fd: self.resolver.wakeFD, events: Int16(POLLIN), revents: 0))
            self.polled.append(nil)
        }
        for connection in self.busy {
            let events: Int16
            switch connection.state {
            case .connecting: events = Int16(POLLOUT)
            default: events = connection.sending ? Int16(POLLIN | POLLOUT) : Int16(POLLIN)
            }
            fds.append(pollfd(fd: connection.fd, events: events, revents: 0))
            self.polled.append(connection)
        }
        guard self.nextDeadline != .max else { return self.idleCount > 0 ? 1000 : nil }
        let now = monotonicNanoseconds()
        guard self.nextDeadline > now else { return 0 }
        return Int32(clamping: (self.nextDeadline - now + 999_999) / 1_000_000)
    }

    /// Acts on what poll saw, in the order ``pollRequests(into:)`` asked.
    public func handle(_ fds: ArraySlice<pollfd>) {
        let now = monotonicNanoseconds()
        for (fd, connection) in zip(fds, self.polled) where fd.revents != 0 {
            guard let connection else {
                self.takeAnswers(now: now)
                continue
            }
            guard connection.fd == fd.fd, connection.exchange != nil else { continue }
            switch connection.state {
            case .connecting:
                self.finishConnect(connection, now: now)
            case .active:
                let exchange = connection.exchange
                if fd.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 { self.receive(connection, now: now) }
                if connection.state == .active, connection.exchange === exchange, connection.sending, fd.revents & Int16(POLLOUT) != 0 {
                    self.send(connection)
                }
            case .idle, .closed:
                break
            }
        }
        self.flushCompletions()
    }

    private func takeAnswers(now: UInt64) {
        for (host, answer) in self.resolver.takeAnswers(now: now) {
            guard let waiting = self.resolving.removeValue(forKey: host) else { continue }
            for exchange in waiting where !exchange.done {
                switch answer {
                case .addresses: self.dispatch(exchange, now: now)
                case .failure(let why): self.fail(exchange, HTTPError(kind: .couldNotResolve, message: why))
                }
            }
        }
    }

    /// Ends exchanges and connection attempts whose time is up; closes connections idle too long.
    /// Returns true when it did something.
    @discardableResult
    public func runTurn() -> Bool {
        let now = monotonicNanoseconds()
        var didWork = !self.completions.isEmpty
        if now >= self.nextDeadline {
            didWork = true
            for exchange in self.live where exchange.deadline <= now { self.timedOut(exchange, now: now) }
            for connection in self.busy where connection.state == .connecting && connection.attemptDeadline <= now {
                if connection.attemptDeadline >= connection.connectDeadline, let exchange = connection.exchange {
                    // The connect timeout (the request's, at most 10 s) is spent: as libcurl, a timeout.
                    let tried = connection.addressIndex < connection.addresses.count ? connection.addresses[connection.addressIndex].text : exchange.origin.host
                    self.closeConnection(connection)
                    self.fail(exchange, HTTPError(kind: .timeout, message: "could not connect to \(tried) within \((now &- exchange.started) / 1_000_000) ms"))
                } else {
                    self.nextAddress(connection, "timed out", now: now)
                }
            }
            var next = UInt64.max
            for exchange in self.live { next = min(next, exchange.deadline) }
            for connection in self.busy where connection.state == .connecting { next = min(next, connection.attemptDeadline) }
            self.nextDeadline = next
        }
        if self.idleCount > 0, now &- self.lastSweep >= 1_000_000_000 {
            self.lastSweep = now
            var old: [Connection] = []
            for (_, list) in self.idle { for connection in list where now &- connection.idleSince >= Self.maxIdleNanoseconds { old.append(connection) } }
            for connection in old { self.closeConnection(connection) }
        }
        self.flushCompletions()
        return didWork
    }

    private func timedOut(_ exchange: Exchange, now: UInt64) {
        if let connection = exchange.connection { self.closeConnection(connection) }
        if var waiting = self.resolving[exchange.origin.host] {
            waiting.removeAll { $0 === exchange }
            self.resolving[exchange.origin.host] = waiting.isEmpty ? nil : waiting
            if waiting.isEmpty { self.resolver.abandon(exchange.origin.host) }
        }
        let elapsed = (now &- exchange.started) / 1_000_000
        self.complete(exchange, .failure(HTTPError(kind: .timeout, message: "no answer within \(elapsed) ms (\(exchange.receivedAny ? "part of an answer came" : "nothing came"))")))
    }

    /// Fails every exchange and closes every connection (at shutdown).
    public func cancelAll(_ error: HTTPError) {
        for exchange in self.live { self.complete(exchange, .failure(error)) }
        for connection in self.busy { self.closeConnection(connection) }
        let idle = self.idle.values.flatMap { $0 }
        for connection in idle { self.closeConnection(connection) }
        self.resolving.removeAll()
        self.waitingForSlot.removeAll()
        self.waitingHead = 0
        self.flushCompletions()
    }
}
