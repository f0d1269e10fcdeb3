import AQHTTP
import AQTestSupport
import Foundation
import Synchronization
import Testing

/// The built-in HTTP/1.1 client (through ``HTTPClient``, as the bridge uses it) against real
/// servers on 127.0.0.1: the project's own server, and a scripted one that answers as careless
/// and hostile servers do.
@Suite(.serialized, .timeLimit(.minutes(2))) struct HTTP1ClientTests {
    /// A TCP server on 127.0.0.1 that reads each request (head and `Content-Length` body) and
    /// lets `script` answer it: (connection number from 1, request number on it from 1, the
    /// request's bytes) → what to do.
    final class ScriptedServer: Sendable {
        enum Action: Sendable {
            /// Send these bytes; then close the connection, or wait for its next request.
            case send([UInt8], close: Bool)
            /// Send these pieces with a pause between them, then close or go on.
            case trickle([[UInt8]], pause: Duration, close: Bool)
            /// Close without answering.
            case close
            /// Keep the connection open and never answer.
            case hang
        }

        let fd: Int32
        let port: Int
        let connections = Atomic<Int>(0)
        let requests = Mutex<[(connection: Int, bytes: [UInt8])]>([])
        let script: @Sendable (Int, Int, [UInt8]) -> Action

        init(_ script: @escaping @Sendable (_ connection: Int, _ request: Int, _ bytes: [UInt8]) -> Action) throws {
            _ = TestEnvironment.ignoresSIGPIPE
            (self.fd, self.port) = try TestEnvironment.listenOnLoopback()
            self.script = script
            let thread = Thread { [self] in self.acceptLoop() }
            thread.start()
        }

        func url(_ path: String) -> String { "http://127.0.0.1:\(self.port)\(path)" }

        func stop() {
            shutdown(self.fd, Int32(SHUT_RDWR))
            close(self.fd)
        }

        private func acceptLoop() {
            while true {
                let client = accept(self.fd, nil, nil)
                guard client >= 0 else { return }
                let number = self.connections.add(1, ordering: .relaxed).newValue
                let thread = Thread { [self] in self.serve(client, number) }
                thread.start()
            }
        }

        private func serve(_ client: Int32, _ number: Int) {
            defer { close(client) }
            var buffer: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            var requestNumber = 0
            while true {
                // One request: its head, then its Content-Length body.
                var headEnd: Int?
                var need = Int.max
                while true {
                    if headEnd == nil, let range = buffer.firstRange(of: Array("\r\n\r\n".utf8)) {
                        headEnd = range.upperBound
                        let head = String(decoding: buffer[..<range.upperBound], as: UTF8.self).lowercased()
                        var length = 0
                        if let line = head.split(separator: "\r\n").first(where: { $0.hasPrefix("content-length:") }) {
                            length = Int(line.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces)) ?? 0
                        }
                        need = range.upperBound + length
                    }
                    if buffer.count >= need { break }
                    let n = recv(client, &chunk, chunk.count, 0)
                    guard n > 0 else { return }
                    buffer += chunk[0..<n]
                }
                let request = Array(buffer[..<need])
                buffer.removeFirst(need)
                requestNumber += 1
                self.requests.withLock { $0.append((number, request)) }
                switch self.script(number, requestNumber, request) {
                case .send(let bytes, let close):
                    _ = bytes.withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    if close { return }
                case .trickle(let pieces, let pause, let close):
                    for piece in pieces {
                        _ = piece.withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                        Thread.sleep(forTimeInterval: Double(pause.components.attoseconds) / 1e18 + Double(pause.components.seconds))
                    }
                    if close { return }
                case .close:
                    return
                case .hang:
                    while recv(client, &chunk, chunk.count, 0) > 0 {}
                    return
                }
            }
        }
    }

    static func ok(_ body: String, extra: String = "") -> [UInt8] {
        Array("HTTP/1.1 200 OK\r\nContent-Length: \(body.utf8.count)\r\n\(extra)\r\n\(body)".utf8)
    }

    final class Outcome {
        var result: Result<HTTPAnswer, HTTPError>?
        var answer: HTTPAnswer? { try? self.result?.get() }
        var error: HTTPError? {
            if case .failure(let error)? = self.result { return error }
            return nil
        }
    }

    /// Runs the client's loop as aq-bridge's connection thread does until every outcome is in.
    static func drive(_ client: HTTPClient, _ outcomes: [Outcome], limit: Duration = .seconds(20)) {
        let deadline = ContinuousClock.now + limit
        var fds: [pollfd] = []
        while outcomes.contains(where: { $0.result == nil }), ContinuousClock.now < deadline {
            fds.removeAll(keepingCapacity: true)
            let wait = client.pollRequests(into: &fds) ?? 20
            _ = poll(&fds, nfds_t(fds.count), min(wait, 20))
            client.handle(fds[...])
            client.runTurn()
        }
    }

    static func request(_ client: HTTPClient, _ url: String, body: String = "{}", timeout: Duration = .seconds(10), maxResponseBytes: Int = 1 << 20,
                        headers: [String] = []) -> Outcome {
        let outcome = Outcome()
        client.start(HTTPRequest(url: url, headers: headers, body: Array(body.utf8), timeout: timeout, maxResponseBytes: maxResponseBytes)) { outcome.result = $0 }
        return outcome
    }

    @Test func requestsGoOnOneKeptAliveConnectionWithTheLinesAsSent() throws {
        let server = try Receiver()
        for n in 0..<5 {
            server.on("/cb/\(n)") { request, _ in .json(#"{"echo":\#(request.bodyString),"path":"\#(request.path)","query":"\#(request.query ?? "")"}"#) }
        }
        let client = HTTPClient()
        var lines = HeaderLines()
        lines.append("AsyncQueue-Task-Id: t-1")
        lines.append("Expect:")
        let shared = SharedHeaders(["Content-Type: application/json", "AsyncQueue-Queue: default"])
        var outcomes: [Outcome] = []
        for n in 0..<5 {
            let outcome = Outcome()
            client.start(HTTPRequest(url: server.url("/cb/\(n)?x=\(n)#frag"), headers: lines, body: Array("{\"n\":\(n)}".utf8)[...],
                                     sharedHeaders: shared)) { outcome.result = $0 }
            Self.drive(client, [outcome])
            outcomes.append(outcome)
        }
        for (n, outcome) in outcomes.enumerated() {
            let answer = try #require(outcome.answer, "\(String(describing: outcome.error))")
            #expect(answer.status == 200)
            #expect(String(decoding: answer.body, as: UTF8.self) == #"{"echo":{"n":\#(n)},"path":"/cb/\#(n)","query":"x=\#(n)"}"#)
        }
        #expect(client.builtinConnectionsOpened == 1, "one connection for five requests")
        #expect(client.started.builtin == 5 && client.started.libcurl == 0)
        #expect((0..<5).map { server.requests("/cb/\($0)").count } == [1, 1, 1, 1, 1])
        let first = try #require(server.requests("/cb/0").first?.request)
        #expect(first.header("Host") == "127.0.0.1:\(server.port)")
        #expect(first.header("User-Agent") == "AsyncQueue/1.0")
        #expect(first.header("AsyncQueue-Task-Id") == "t-1")
        #expect(first.header("Content-Type") == "application/json")
        #expect(first.header("AsyncQueue-Queue") == "default")
        #expect(first.header("Expect") == nil, "an empty line means no such header")
    }

    @Test func aKeptAliveConnectionTheServerClosedIsReplacedAndTheRequestSentOnce() throws {
        // The first connection answers once and closes (a keep-alive timeout racing the next
        // request); the second answers whatever it gets.
        let server = try ScriptedServer { connection, _, _ in
            connection == 1 ? .send(Self.ok("first"), close: true) : .send(Self.ok("second"), close: false)
        }
        defer { server.stop() }
        let client = HTTPClient()
        let one = Self.request(client, server.url("/a"))
        Self.drive(client, [one])
        #expect(one.answer?.body == Array("first".utf8))
        // Give the close time to arrive, so the reuse meets a dead connection.
        Thread.sleep(forTimeInterval: 0.05)
        let two = Self.request(client, server.url("/b"))
        Self.drive(client, [two])
        #expect(two.answer?.body == Array("second".utf8), "\(String(describing: two.error))")
        #expect(server.connections.load(ordering: .relaxed) == 2)
        #expect(server.requests.withLock { $0.count } == 2, "each request reached the server once")
    }

    @Test func bytesAServerSendsAfterItsAnswerAreNeverTakenForTheNextRequestsAnswer() throws {
        // The first answer is followed, a moment later, by a second one nobody asked for (a
        // framework writing twice, a late proxy error): it must not become the next task's answer.
        let server = try ScriptedServer { connection, request, _ in
            if connection == 1 && request == 1 {
                return .trickle([Self.ok("first"), Self.ok("forged")], pause: .milliseconds(20), close: false)
            }
            return .send(Self.ok("real"), close: false)
        }
        defer { server.stop() }
        let client = HTTPClient()
        let one = Self.request(client, server.url("/a"))
        Self.drive(client, [one])
        #expect(one.answer?.body == Array("first".utf8))
        Thread.sleep(forTimeInterval: 0.1)  // the unasked-for answer is in the socket by now
        let two = Self.request(client, server.url("/b"))
        Self.drive(client, [two])
        #expect(two.answer?.body == Array("real".utf8), "\(String(describing: two.answer.map { String(decoding: $0.body, as: UTF8.self) }))")
        #expect(server.connections.load(ordering: .relaxed) == 2, "the tainted connection was not used again")
    }

    @Test func aFreshConnectionClosedWithoutAnAnswerIsAFailureNotARetry() throws {
        let server = try ScriptedServer { _, _, _ in .close }
        defer { server.stop() }
        let client = HTTPClient()
        let outcome = Self.request(client, server.url("/x"))
        Self.drive(client, [outcome])
        #expect(outcome.error?.kind == .other)
        #expect(outcome.error?.message.contains("without answering") == true, "\(String(describing: outcome.error))")
        #expect(server.requests.withLock { $0.count } == 1, "not sent twice")
    }

    @Test func aServerThatNeverAnswersTimesOut() throws {
        let server = try ScriptedServer { _, _, _ in .hang }
        defer { server.stop() }
        let client = HTTPClient()
        let started = ContinuousClock.now
        let outcome = Self.request(client, server.url("/hang"), timeout: .milliseconds(300))
        Self.drive(client, [outcome])
        let elapsed = ContinuousClock.now - started
        #expect(outcome.error?.kind == .timeout)
        #expect(elapsed >= .milliseconds(300) && elapsed < .seconds(3), "\(elapsed)")
    }

    @Test func answersOverTheLimitHugeHeadsAndGarbageFailAndTheNextRequestIsUnharmed() throws {
        let server = try ScriptedServer { _, _, request in
            let text = String(decoding: request, as: UTF8.self)
            if text.hasPrefix("POST /big ") { return .send(Self.ok(String(repeating: "x", count: 5000)), close: false) }
            if text.hasPrefix("POST /huge-head ") {
                return .send(Array("HTTP/1.1 200 OK\r\n".utf8) + Array(String(repeating: "X-Pad: 0123456789012345678901234567890123456789\r\n", count: 3000).utf8), close: false)
            }
            if text.hasPrefix("POST /garbage ") { return .send(Array("SSH-2.0-OpenSSH\r\n\r\n".utf8), close: false) }
            if text.hasPrefix("POST /two-lengths ") { return .send(Array("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc".utf8), close: false) }
            return .send(Self.ok("fine"), close: false)
        }
        defer { server.stop() }
        let client = HTTPClient()
        let big = Self.request(client, server.url("/big"), maxResponseBytes: 4096)
        let head = Self.request(client, server.url("/huge-head"))
        let garbage = Self.request(client, server.url("/garbage"))
        let lengths = Self.request(client, server.url("/two-lengths"))
        Self.drive(client, [big, head, garbage, lengths])
        #expect(big.error?.kind == .tooLarge)
        #expect(head.error?.message.contains("exceeds") == true, "\(String(describing: head.error))")
        #expect(garbage.error?.message.contains("not HTTP/1.x") == true, "\(String(describing: garbage.error))")
        #expect(lengths.error?.message.contains("Content-Length") == true, "\(String(describing: lengths.error))")
        let after = Self.request(client, server.url("/fine"))
        Self.drive(client, [after])
        #expect(after.answer?.body == Array("fine".utf8))
    }

    @Test func slowChunkedInterimAndUntilCloseAnswersAreReadWhole() throws {
        let server = try ScriptedServer { _, _, request in
            let text = String(decoding: request, as: UTF8.self)
            if text.hasPrefix("POST /chunked ") {
                let whole = Array("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nT: 1\r\n\r\n".utf8)
                return .trickle(stride(from: 0, to: whole.count, by: 7).map { Array(whole[$0..<min(whole.count, $0 + 7)]) }, pause: .milliseconds(2), close: false)
            }
            if text.hasPrefix("POST /old ") { return .send(Array("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end".utf8), close: true) }
            return .send(Self.ok("next"), close: false)
        }
        defer { server.stop() }
        let client = HTTPClient()
        let chunked = Self.request(client, server.url("/chunked"))
        let old = Self.request(client, server.url("/old"))
        Self.drive(client, [chunked, old])
        let answer = try #require(chunked.answer, "\(String(describing: chunked.error))")
        #expect(answer.status == 201)
        #expect(String(decoding: answer.body, as: UTF8.self) == "hello world")
        #expect(answer.retryAfter == "7")
        #expect(old.answer.map { String(decoding: $0.body, as: UTF8.self) } == "until the end", "\(String(describing: old.error))")
        // The chunked answer's connection was kept: the next request goes on it.
        let before = server.connections.load(ordering: .relaxed)
        let next = Self.request(client, server.url("/next"))
        Self.drive(client, [next])
        #expect(next.answer?.body == Array("next".utf8))
        #expect(server.connections.load(ordering: .relaxed) == before)
    }

    @Test func namesAreResolvedRefusedAddressesNeverConnectedAndFailuresSaySo() throws {
        let server = try ScriptedServer { _, _, _ in .send(Self.ok("named"), close: false) }
        defer { server.stop() }
        let client = HTTPClient()
        let named = Self.request(client, "http://localhost:\(server.port)/x")
        let unknown = Self.request(client, "http://no-such-host.invalid/x")
        let refusedPort = try TestEnvironment.listenOnLoopback()
        close(refusedPort.fd)  // nothing listens there now
        let refused = Self.request(client, "http://127.0.0.1:\(refusedPort.port)/x")
        Self.drive(client, [named, unknown, refused])
        #expect(named.answer?.body == Array("named".utf8), "\(String(describing: named.error))")
        #expect(unknown.error?.kind == .couldNotResolve, "\(String(describing: unknown.error))")
        #expect(refused.error?.kind == .couldNotConnect, "\(String(describing: refused.error))")

        // A name whose addresses the policy denies: refused after DNS, nothing connected.
        let policy = AddressPolicy(deny: [try AddressPolicy.parse("127.0.0.0/8"), try AddressPolicy.parse("::1")])
        let guarded = HTTPClient(policy: policy)
        let connectionsBefore = server.connections.load(ordering: .relaxed)
        let denied = Self.request(guarded, "http://localhost:\(server.port)/x")
        let literal = Self.request(guarded, "http://127.0.0.1:\(server.port)/x")
        Self.drive(guarded, [denied, literal])
        #expect(denied.error?.kind == .refused, "\(String(describing: denied.error))")
        #expect(literal.error?.kind == .refused, "\(String(describing: literal.error))")
        #expect(server.connections.load(ordering: .relaxed) == connectionsBefore, "nothing was connected to")
    }

    @Test func manyRequestsShareABoundedPoolOfConnections() throws {
        let server = try ScriptedServer { _, _, request in
            .send(Self.ok(String(decoding: request.suffix(8), as: UTF8.self)), close: false)
        }
        defer { server.stop() }
        let client = HTTPClient(maxConnections: 4)
        let outcomes = (0..<200).map { n in Self.request(client, server.url("/n"), body: String(format: "%08d", n)) }
        Self.drive(client, outcomes)
        for (n, outcome) in outcomes.enumerated() {
            #expect(outcome.answer?.body == Array(String(format: "%08d", n).utf8), "request \(n): \(String(describing: outcome.error))")
        }
        #expect(server.connections.load(ordering: .relaxed) <= 4)
        #expect(server.requests.withLock { $0.count } == 200)
    }

    @Test func whatTheBuiltInClientDoesNotTakeGoesThroughLibcurl() throws {
        let server = try Receiver()
        server.on("/x") { request, _ in .json(#"{"auth":"\#(request.header("Authorization") ?? "")"}"#) }
        let client = HTTPClient()
        let withCredentials = Self.request(client, "http://user:pw@127.0.0.1:\(server.port)/x")
        Self.drive(client, [withCredentials])
        #expect(client.started.libcurl == 1 && client.started.builtin == 0)
        #expect(withCredentials.answer.map { String(decoding: $0.body, as: UTF8.self) } == #"{"auth":"Basic dXNlcjpwdw=="}"#)
        let everything = HTTPClient(engine: .libcurl)
        let plain = Self.request(everything, "http://127.0.0.1:\(server.port)/x")
        Self.drive(everything, [plain])
        #expect(plain.answer?.status == 200)
        #expect(everything.started.libcurl == 1 && everything.started.builtin == 0)
    }
}
