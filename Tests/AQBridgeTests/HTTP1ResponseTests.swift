import Foundation
import Testing
@testable import AQHTTP

/// The built-in HTTP/1.1 client's pure parts: reading a response's head and body, and which URLs
/// it takes. Every framing case is also fed split at every byte, as a slow or hostile server
/// sends it.
@Suite struct HTTP1ResponseTests {
    typealias R = HTTP1Response

    static func head(_ text: String, method: R.HTTPMethodKind = .other) -> Result<R.Head, R.Failure> {
        Array(text.utf8).withUnsafeBytes { R.parseHead($0, method: method) }
    }

    /// The whole response as the client reads it: the head, then the body (fed in `pieces`-byte
    /// pieces); nil body when it does not end.
    static func read(_ bytes: [UInt8], limit: Int = 1 << 20, pieces: Int? = nil, closeAtEnd: Bool = false) -> (head: R.Head, body: [UInt8]?, step: R.BodyReader.Step?)? {
        guard let end = bytes.withUnsafeBytes({ R.headEnd($0) }) else { return nil }
        guard case .success(let head) = bytes[..<end].withUnsafeBytes({ R.parseHead($0) }) else { return nil }
        var reader = R.BodyReader(head.framing, limit: limit)
        var body: [UInt8] = []
        var index = end
        var last: R.BodyReader.Step?
        let size = pieces ?? max(1, bytes.count - end)
        repeat {
            let piece = Array(bytes[index..<min(bytes.count, index + size)])
            let step = piece.withUnsafeBytes { reader.consume($0, into: &body) }
            last = step
            switch step {
            case .more: index += piece.count
            case .done(let consumed): return (head, body, .done(consumed: index - end + consumed))
            case .tooLarge, .failure: return (head, nil, step)
            }
        } while index < bytes.count
        if closeAtEnd {
            if let failure = reader.endOfStream() { return (head, nil, .failure(failure)) }
            return (head, body, .done(consumed: bytes.count - end))
        }
        return (head, nil, last)
    }

    @Test func theHeadSaysStatusFramingAndTheHeadersTheBridgeActsOn() throws {
        let head = try Self.head("HTTP/1.1 503 Busy\r\nContent-Length: 4\r\nretry-after: 30 \r\nAsyncQueue-No-Retry: true\r\nX-Other: 1\r\n\r\n").get()
        #expect(head.status == 503)
        #expect(head.framing == .length(4))
        #expect(head.retryAfter == "30")
        #expect(head.noRetry == "true")
        #expect(!head.close)
        #expect(try Self.head("HTTP/1.1 200\nx-asyncqueue-no-retry:1\ncontent-length:0\n\n").get().noRetry == "1", "bare LF, no reason phrase")
        #expect(try Self.head("HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n").get().close)
    }

    @Test func framingFollowsRFC9112() throws {
        #expect(try Self.head("HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n").get().framing == .none)
        #expect(try Self.head("HTTP/1.1 304 Not Modified\r\n\r\n").get().framing == .none)
        #expect(try Self.head("HTTP/1.1 100 Continue\r\n\r\n").get().framing == .none)
        #expect(try Self.head("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", method: .head).get().framing == .none)
        let both = try Self.head("HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n").get()
        #expect(both.framing == .chunked, "Transfer-Encoding wins")
        #expect(both.close, "a server that sends both is not trusted with another request")
        let gzip = try Self.head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").get()
        #expect(gzip.framing == .untilClose && gzip.close, "chunked only counts as the last coding")
        let none = try Self.head("HTTP/1.1 200 OK\r\n\r\n").get()
        #expect(none.framing == .untilClose && none.close)
        #expect(try Self.head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").get().close, "HTTP/1.0 closes")
        #expect(try !Self.head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n").get().close)
        #expect(try Self.head("HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 1\r\n\r\n").get().close, "close wins")
        #expect(try Self.head("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n").get().framing == .length(7), "a list of equal lengths")
    }

    @Test func aHeadThatCannotBeTrustedIsRefused() {
        for text in ["SSH-2.0-OpenSSH_9.2\r\n\r\n", "HTTP/2 200\r\n\r\n", "HTTP/1.1 20\r\n\r\n", "HTTP/1.1 2000 OK\r\n\r\n", "HTTP/1.1 099 x\r\n\r\n",
                     "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                     "HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
                     "HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999999\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n", ""] {
            guard case .failure = Self.head(text) else {
                Issue.record("accepted: \(text.debugDescription)")
                continue
            }
        }
    }

    @Test func theHeadEndIsFoundWhereverTheBytesAreCut() {
        let text = Array("HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody".utf8)
        let expected = text.count - 4
        #expect(text.withUnsafeBytes { R.headEnd($0) } == expected)
        // Searching again from where a partial search stopped finds the same end.
        for cut in 0...text.count {
            let found = text.withUnsafeBytes { whole -> Int? in
                R.headEnd(UnsafeRawBufferPointer(rebasing: whole[0..<cut])) ?? R.headEnd(whole, from: cut)
            }
            #expect(found == expected, "cut at \(cut)")
        }
        #expect(Array("HTTP/1.1 200 OK\n\nx".utf8).withUnsafeBytes { R.headEnd($0) } == 17)
        #expect(Array("HTTP/1.1 200 OK\r\nA: b\r\n".utf8).withUnsafeBytes { R.headEnd($0) } == nil)
    }

    static let chunked = Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=\"x\"\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n".utf8)

    @Test func bodiesReadTheSameHoweverTheyArrive() throws {
        let length = Array("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world".utf8)
        let untilClose = Array("HTTP/1.0 200 OK\r\n\r\nto the end".utf8)
        for pieces in [nil, 1, 2, 3, 7] {
            let a = try #require(Self.read(length, pieces: pieces))
            #expect(a.body.map { String(decoding: $0, as: UTF8.self) } == "hello world", "length, pieces \(pieces ?? 0)")
            let b = try #require(Self.read(Self.chunked, pieces: pieces))
            #expect(b.body.map { String(decoding: $0, as: UTF8.self) } == "Wikipedia in\r\n\r\nchunks.", "chunked, pieces \(pieces ?? 0)")
            #expect(b.step == .done(consumed: Self.chunked.count - 47))
            let c = try #require(Self.read(untilClose, pieces: pieces, closeAtEnd: true))
            #expect(c.body.map { String(decoding: $0, as: UTF8.self) } == "to the end")
        }
        // What comes after the answer is not part of it.
        let extra = try #require(Self.read(length + Array("HTTP/1.1 200 OK".utf8)))
        #expect(extra.step == .done(consumed: 11))
    }

    @Test func aBodyOverTheLimitOrBadlyFramedFails() throws {
        let length = Array("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world".utf8)
        #expect(try #require(Self.read(length, limit: 10)).step == .tooLarge)
        #expect(try #require(Self.read(Self.chunked, limit: 10, pieces: 3)).step == .tooLarge)
        #expect(try #require(Self.read(Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".utf8) + Array(String(repeating: "f", count: 20).utf8) + [13, 10])).step
                .map { if case .failure = $0 { true } else { false } } == true, "a chunk size past 2^60")
        for body in ["zz\r\n", "\r\n", "3\r\nabcd\r\n", ";x\r\n", "3\r\nabc" + String(repeating: "x", count: 5)] {
            let bytes = Array(("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body).utf8)
            let step = try #require(Self.read(bytes)).step
            guard case .failure? = step else {
                Issue.record("accepted chunked body \(body.debugDescription): \(String(describing: step))")
                continue
            }
        }
        let endless = Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;".utf8) + [UInt8](repeating: 0x61, count: 9000)
        guard case .failure? = try #require(Self.read(endless)).step else {
            Issue.record("a chunk-size line without end was read on")
            return
        }
        // A close in the middle of an answer with a length is not its end.
        let cut = try #require(Self.read(Array("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello".utf8), closeAtEnd: true))
        guard case .failure? = cut.step else {
            Issue.record("a cut answer was taken as whole")
            return
        }
    }

    @Test func onlyPlainHTTPURLsThatNeedNoRewritingAreTaken() throws {
        func target(_ url: String) -> (host: String, port: Int, hostHeader: String, path: String)? {
            guard let t = HTTP1Client.target(url) else { return nil }
            let bytes = Array(url.utf8)
            var hostHeader: [UInt8] = []
            HTTP1Client.appendHostHeader(t, to: &hostHeader)
            return (t.host, t.port, String(decoding: hostHeader, as: UTF8.self),
                    (t.needsSlash ? "/" : "") + String(decoding: bytes[t.path], as: UTF8.self))
        }
        let a = try #require(target("http://127.0.0.1:8080/cb/1?x=1&y=%20#frag"))
        #expect(a.host == "127.0.0.1" && a.port == 8080 && a.hostHeader == "127.0.0.1:8080" && a.path == "/cb/1?x=1&y=%20")
        let b = try #require(target("HTTP://Example.COM"))
        #expect(b.host == "example.com" && b.port == 80 && b.hostHeader == "example.com" && b.path == "/")
        #expect(try #require(target("http://h:80?q")).path == "/?q")
        #expect(try #require(target("http://h:80/")).hostHeader == "h", "the default port is left out of Host, as libcurl does")
        #expect(try #require(target("http://h:0080/")).hostHeader == "h")
        #expect(try #require(target("http://h:08080/")).hostHeader == "h:8080")
        let v6 = try #require(target("http://[::1]:9000/x"))
        #expect(v6.host == "::1" && v6.hostHeader == "[::1]:9000")
        #expect(try #require(target("http://h/a/.b/..c/...")).path == "/a/.b/..c/...", "dots that are not segments")
        for url in ["https://h/", "http://user:pw@h/", "http://h/a/../b", "http://h/./b", "http://h/a/..", "http://h/a/.?x", "http://h/%zz",
                    "http://h/{x}", "http://h/a|b", "http://h/caf\u{e9}", "http://h/\"", "ftp://h/", "http://:80/", "http://h:0/"] {
            #expect(target(url) == nil, "\(url) goes through libcurl")
        }
    }

    @Test func theRequestHeadCarriesTheLinesAsLibcurlSentThem() throws {
        var lines = HeaderLines()
        lines.append("AsyncQueue-Task-Id: t-1")
        lines.append("Accept-Language:")
        lines.append("webhook-id: t-1")
        let shared = SharedHeaders(["Content-Type: application/json", "AsyncQueue-Queue: default"])
        let request = HTTPRequest(url: "http://127.0.0.1:8080/cb/1?x=1#f", headers: lines, body: Array("{\"a\":1}".utf8)[...], sharedHeaders: shared)
        var out: [UInt8] = []
        HTTP1Client.writeHead(into: &out, request, try #require(HTTP1Client.target(request.url)))
        #expect(String(decoding: out, as: UTF8.self) == """
            POST /cb/1?x=1 HTTP/1.1\r
            Host: 127.0.0.1:8080\r
            User-Agent: AsyncQueue/1.0\r
            Accept: */*\r
            AsyncQueue-Task-Id: t-1\r
            webhook-id: t-1\r
            Content-Type: application/json\r
            AsyncQueue-Queue: default\r
            Content-Length: 7\r
            \r

            """)
        // A caller's Host, User-Agent or Accept replaces the client's own (an empty one removes
        // it), and `Name;` is a header without a value, as libcurl had it.
        var own = HeaderLines()
        own.append("host: other.example")
        own.append("Accept:")
        own.append("X-Empty;")
        let overriding = HTTPRequest(url: "http://[::1]:8080", headers: own, body: [][...], sharedHeaders: SharedHeaders(["User-Agent: mine/2"]))
        HTTP1Client.writeHead(into: &out, overriding, try #require(HTTP1Client.target(overriding.url)))
        #expect(String(decoding: out, as: UTF8.self) == "POST / HTTP/1.1\r\nhost: other.example\r\nX-Empty:\r\nUser-Agent: mine/2\r\nContent-Length: 0\r\n\r\n")
    }
}
