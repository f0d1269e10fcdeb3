import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A small HTTP/1.1 server on one thread, for aq-bridge's health and metrics endpoints, the tests'
/// callback and webhook receivers, and the examples. Keep-alive, `Content-Length` bodies, one
/// request at a time per connection; answers may be given later and from any thread.
public final class HTTPServer: Sendable {
    public struct Request: Sendable {
        public var method: String
        /// The path without the query string.
        public var path: String
        public var query: String?
        public var headers: [(name: String, value: String)]
        public var body: [UInt8]

        public func header(_ name: String) -> String? {
            self.headers.first { $0.name.caseInsensitiveCompare(name) == .orderedSame }?.value
        }
        public var bodyString: String { String(decoding: self.body, as: UTF8.self) }
    }

    public struct Response: Sendable {
        public var status: Int
        public var headers: [(name: String, value: String)]
        public var body: [UInt8]

        public init(status: Int = 200, headers: [(name: String, value: String)] = [], body: [UInt8] = []) {
            self.status = status
            self.headers = headers
            self.body = body
        }

        public static func json(_ text: String, status: Int = 200, headers: [(name: String, value: String)] = []) -> Response {
            Response(status: status, headers: [("Content-Type", "application/json")] + headers, body: Array(text.utf8))
        }

        public static func text(_ text: String, status: Int = 200, contentType: String = "text/plain; charset=utf-8") -> Response {
            Response(status: status, headers: [("Content-Type", contentType)], body: Array(text.utf8))
        }
    }

    /// Answers one request, once; from any thread, now or later. An unanswered request keeps
    /// its connection busy (that is how the tests make a server that never answers).
    public final class Responder: Sendable {
        let server: HTTPServer
        let connection: Int
        let answered = Atomic<Bool>(false)

        init(server: HTTPServer, connection: Int) {
            self.server = server
            self.connection = connection
        }

        public func respond(_ response: Response) {
            guard !self.answered.exchange(true, ordering: .relaxed) else { return }
            self.server.enqueue(self.connection, response)
        }
    }

    public typealias Handler = @Sendable (Request, Responder) -> Void

    public let port: Int
    private let listener: Int32
    private let wakeRead: Int32
    /// The pipe's write end, nil once the server's thread has closed it: an answer given after
    /// shutdown (a handler's delayed reply) must not write into a closed descriptor — a pipe
    /// whose reader is gone raises SIGPIPE, and a reused number is someone else's file.
    private let wakeWrite: Mutex<Int32?>
    private let outbox = Mutex<[(Int, Response)]>([])
    private let stopped = Atomic<Bool>(false)
    private let finished = Mutex<Bool>(false)
    private let handler: Handler

    public struct StartError: Error, CustomStringConvertible { public var description: String }

    /// What one client may cost the server: connections, buffered bytes, time.
    public struct Limits: Sendable {
        /// Connections open at once; past it, the one idle the longest is closed for a new one.
        public var maxConnections = 256
        /// A connection with nothing to do (between keep-alive requests) is closed after this.
        public var idleTimeout: Duration = .seconds(30)
        /// A request must arrive whole within this, once its first byte did (slow clients).
        public var requestTimeout: Duration = .seconds(10)
        /// Answers buffered for one connection; past it, the server reads no more of its
        /// requests until the client reads (a client pipelining without reading).
        public var maxBufferedBytes = 256 << 10
        public init() {}
    }

    /// Listens on `host:port` (port 0 picks a free one; see ``port``).
    public init(host: String = "127.0.0.1", port: Int = 0, maxBodyBytes: Int = 16 << 20, limits: Limits = Limits(),
                handler: @escaping Handler) throws {
        guard (0...65535).contains(port) else { throw StartError(description: "port \(port) is out of range") }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw StartError(description: "socket: \(String(cString: strerror(errno)))") }
        var yes: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
            close(fd)
            throw StartError(description: "'\(host)' is not an IPv4 address")
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 1024) == 0 else {
            let why = String(cString: strerror(errno))
            close(fd)
            throw StartError(description: "cannot listen on \(host):\(port): \(why)")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var pipeFDs: [Int32] = [0, 0]
        _ = pipe(&pipeFDs)
        for p in pipeFDs { _ = fcntl(p, F_SETFL, fcntl(p, F_GETFL) | O_NONBLOCK) }
        self.listener = fd
        self.port = Int(UInt16(bigEndian: address.sin_port))
        self.wakeRead = pipeFDs[0]
        self.wakeWrite = Mutex(pipeFDs[1])
        self.handler = handler
        let thread = Thread { [self] in self.run(maxBodyBytes: maxBodyBytes, limits: limits) }
        thread.name = "aq-http-\(self.port)"
        thread.start()
    }

    /// Stops accepting, closes every connection and the listener.
    public func shutdown() {
        guard !self.stopped.exchange(true, ordering: .relaxed) else { return }
        self.wake()
        // Wait for the thread to close the descriptors (bounded).
        for _ in 0..<200 where !self.finished.withLock({ $0 }) { usleep(5000) }
    }

    private func wake() {
        self.wakeWrite.withLock { fd in
            guard let fd else { return }
            var byte: UInt8 = 1
            _ = write(fd, &byte, 1)
        }
    }

    private func enqueue(_ connection: Int, _ response: Response) {
        self.outbox.withLock { $0.append((connection, response)) }
        self.wake()
    }

    private final class Connection {
        let fd: Int32
        var input: [UInt8] = []
        var output: [UInt8] = []
        var busy = false
        var closeAfterWrite = false
        /// The last time it made progress (bytes in or out, an answer).
        var lastActivity: ContinuousClock.Instant
        /// When the request being received began to arrive (nil: none is partly there).
        var requestStarted: ContinuousClock.Instant?
        /// `input` holds no complete request (until more bytes arrive).
        var needMore = true
        init(fd: Int32, now: ContinuousClock.Instant) {
            self.fd = fd
            self.lastActivity = now
        }
        var isIdle: Bool { !self.busy && self.output.isEmpty && self.input.isEmpty }
    }

    /// Connections, buffered bytes and open descriptors, for tests and health checks.
    public struct Usage: Sendable {
        public var connections: Int
        public var bufferedBytes: Int
    }

    private let usage = Mutex(Usage(connections: 0, bufferedBytes: 0))
    public var currentUsage: Usage { self.usage.withLock { $0 } }

    private func run(maxBodyBytes: Int, limits: Limits) {
        var connections: [Int: Connection] = [:]
        var nextID = 0
        var fds: [pollfd] = []
        var ids: [Int] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        /// After EMFILE/ENFILE the listener is left alone for a moment instead of spinning on it.
        var acceptPausedUntil: ContinuousClock.Instant?
        defer {
            for (_, c) in connections { close(c.fd) }
            close(self.listener)
            // The write end first, under its lock: no wake can reach the pipe after this.
            self.wakeWrite.withLock { fd in
                if let fd { close(fd) }
                fd = nil
            }
            close(self.wakeRead)
            self.finished.withLock { $0 = true }
        }
        func drop(_ id: Int) {
            guard let c = connections.removeValue(forKey: id) else { return }
            close(c.fd)
        }
        /// Closes the connection idle the longest (to make room), if any is idle.
        @discardableResult
        func evictIdlest() -> Bool {
            // Idle the longest; among equals, the oldest connection.
            guard let (id, _) = connections.filter({ $0.value.isIdle }).min(by: {
                ($0.value.lastActivity, $0.key) < ($1.value.lastActivity, $1.key)
            }) else { return false }
            drop(id)
            return true
        }
        while !self.stopped.load(ordering: .relaxed) {
            let now = ContinuousClock.now
            fds.removeAll(keepingCapacity: true)
            ids.removeAll(keepingCapacity: true)
            let listening = acceptPausedUntil.map { now >= $0 } ?? true
            if listening { acceptPausedUntil = nil }
            fds.append(pollfd(fd: listening ? self.listener : -1, events: Int16(POLLIN), revents: 0))
            fds.append(pollfd(fd: self.wakeRead, events: Int16(POLLIN), revents: 0))
            for (id, c) in connections {
                var events = Int16(0)
                // Read only while there is room: a client that does not read its answers (or
                // floods requests) stops being read until it does.
                if !c.busy, c.output.count < limits.maxBufferedBytes, c.input.count <= maxBodyBytes + 65536 { events |= Int16(POLLIN) }
                if !c.output.isEmpty { events |= Int16(POLLOUT) }
                fds.append(pollfd(fd: c.fd, events: events, revents: 0))
                ids.append(id)
            }
            // A pipelined request already read waits for no new byte.
            let ready = connections.values.contains { !$0.busy && !$0.needMore && $0.output.count < limits.maxBufferedBytes }
            _ = poll(&fds, nfds_t(fds.count), ready ? 0 : listening ? 1000 : 100)
            let turn = ContinuousClock.now
            if fds[1].revents != 0 { while read(self.wakeRead, &buffer, buffer.count) > 0 {} }
            // Answers from handlers.
            for (id, response) in self.outbox.withLock({ box -> [(Int, Response)] in defer { box.removeAll() }; return box }) {
                guard let c = connections[id] else { continue }
                c.output += Self.serialize(response, close: c.closeAfterWrite)
                c.busy = false
                c.lastActivity = turn
            }
            for (index, id) in ids.enumerated() {
                guard let c = connections[id] else { continue }
                let revents = fds[index + 2].revents
                var dead = revents & Int16(POLLERR | POLLNVAL) != 0
                if !dead, revents & Int16(POLLIN | POLLHUP) != 0, !c.busy, c.output.count < limits.maxBufferedBytes {
                    let n = read(c.fd, &buffer, buffer.count)
                    if n > 0 {
                        c.input.append(contentsOf: buffer[0..<n])
                        c.needMore = false
                        c.lastActivity = turn
                        if c.requestStarted == nil { c.requestStarted = turn }
                    } else if n == 0 || (errno != EAGAIN && errno != EINTR) {
                        dead = true
                    }
                }
                if !dead, !c.busy, !c.needMore, c.output.count < limits.maxBufferedBytes {
                    guard let request = Self.parse(&c.input, maxBodyBytes: maxBodyBytes) else {
                        c.needMore = true
                        if !dead, !c.output.isEmpty { self.flush(c, turn: turn, dead: &dead) }
                        if !dead, let started = c.requestStarted, turn - started > limits.requestTimeout { dead = true }
                        if dead { drop(id) }
                        continue
                    }
                    c.requestStarted = c.input.isEmpty ? nil : turn
                    c.needMore = c.input.isEmpty
                    switch request {
                    case .success(let (req, keepAlive)):
                        c.busy = true
                        c.closeAfterWrite = !keepAlive
                        self.handler(req, Responder(server: self, connection: id))
                    case .failure(let bad):
                        c.output += Self.serialize(Response.text("bad request\n", status: bad.status), close: true)
                        c.closeAfterWrite = true
                        c.input.removeAll()
                    }
                }
                if !dead, !c.output.isEmpty { self.flush(c, turn: turn, dead: &dead) }
                // Slow or silent clients: a request that takes too long to arrive, a connection
                // with nothing to do, an answer the client does not read.
                if !dead, !c.busy {
                    if let started = c.requestStarted, turn - started > limits.requestTimeout { dead = true }
                    if turn - c.lastActivity > limits.idleTimeout { dead = true }
                }
                if dead { drop(id) }
            }
            if listening, fds[0].revents != 0 {
                while true {
                    let client = accept(self.listener, nil, nil)
                    guard client >= 0 else {
                        if errno == EMFILE || errno == ENFILE {
                            // Out of descriptors: make room if an idle connection can go, and
                            // stop polling the listener for a moment either way (no spinning).
                            evictIdlest()
                            acceptPausedUntil = turn + .milliseconds(100)
                        }
                        break
                    }
                    // At the cap, the connection idle the longest makes room; if none is idle,
                    // the newcomer is turned away.
                    if connections.count >= limits.maxConnections, !evictIdlest() {
                        close(client)
                        continue
                    }
                    _ = fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK)
                    _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                    var yes: Int32 = 1
                    _ = setsockopt(client, Int32(IPPROTO_TCP), TCP_NODELAY, &yes, socklen_t(MemoryLayout<Int32>.size))
                    connections[nextID] = Connection(fd: client, now: turn)
                    nextID += 1
                }
            }
            let buffered = connections.values.reduce(0) { $0 + $1.output.count + $1.input.count }
            self.usage.withLock { $0 = Usage(connections: connections.count, bufferedBytes: buffered) }
        }
    }

    private func flush(_ c: Connection, turn: ContinuousClock.Instant, dead: inout Bool) {
        let n = c.output.withUnsafeBytes { send(c.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if n > 0 {
            c.output.removeFirst(n)
            c.lastActivity = turn
        } else if errno != EAGAIN && errno != EINTR {
            dead = true
        }
        if c.output.isEmpty && c.closeAfterWrite && !c.busy { dead = true }
    }

    /// Takes one complete request off the front of `input`, if there is one.
    static func parse(_ input: inout [UInt8], maxBodyBytes: Int) -> Result<(Request, Bool), BadRequest>? {
        guard input.count >= 4 else { return nil }
        var headerEnd: Int?
        var i = 0
        while i + 3 < input.count {
            if input[i] == 13 && input[i + 1] == 10 && input[i + 2] == 13 && input[i + 3] == 10 { headerEnd = i; break }
            i += 1
        }
        guard let end = headerEnd else { return input.count > 65536 ? .failure(BadRequest(status: 431)) : nil }
        let head = String(decoding: input[0..<end], as: UTF8.self)
        var lines = head.components(separatedBy: "\r\n")
        let requestLine = lines.removeFirst().split(separator: " ")
        guard requestLine.count == 3 else { return .failure(BadRequest(status: 400)) }
        var headers: [(name: String, value: String)] = []
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { return .failure(BadRequest(status: 400)) }
            headers.append((String(line[..<colon]), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)))
        }
        func header(_ name: String) -> String? { headers.first { $0.name.caseInsensitiveCompare(name) == .orderedSame }?.value }
        if header("Transfer-Encoding") != nil { return .failure(BadRequest(status: 411)) }
        let length = Int(header("Content-Length") ?? "0") ?? -1
        guard length >= 0, length <= maxBodyBytes else { return .failure(BadRequest(status: length < 0 ? 400 : 413)) }
        guard input.count >= end + 4 + length else { return nil }
        let body = Array(input[(end + 4)..<(end + 4 + length)])
        input.removeFirst(end + 4 + length)
        let target = String(requestLine[1])
        let parts = target.split(separator: "?", maxSplits: 1)
        let version = String(requestLine[2])
        let connection = header("Connection")?.lowercased()
        let keepAlive = version == "HTTP/1.1" ? connection != "close" : connection == "keep-alive"
        return .success((Request(method: String(requestLine[0]), path: String(parts.first ?? ""),
                                 query: parts.count > 1 ? String(parts[1]) : nil, headers: headers, body: body), keepAlive))
    }

    struct BadRequest: Error { var status: Int }

    static func serialize(_ response: Response, close: Bool) -> [UInt8] {
        var head = "HTTP/1.1 \(response.status) \(Self.reason(response.status))\r\n"
        for (name, value) in response.headers { head += "\(name): \(value)\r\n" }
        head += "Content-Length: \(response.body.count)\r\n"
        if close { head += "Connection: close\r\n" }
        head += "\r\n"
        return Array(head.utf8) + response.body
    }

    static func reason(_ status: Int) -> String {
        switch status {
        case 200: return "OK"
        case 201: return "Created"
        case 202: return "Accepted"
        case 204: return "No Content"
        case 400: return "Bad Request"
        case 404: return "Not Found"
        case 411: return "Length Required"
        case 413: return "Payload Too Large"
        case 429: return "Too Many Requests"
        case 500: return "Internal Server Error"
        case 503: return "Service Unavailable"
        default: return "Status"
        }
    }
}
