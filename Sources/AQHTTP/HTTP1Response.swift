/// Reading an HTTP/1.x response off the wire, as ``HTTP1Client`` does: the head (status line and
/// the few headers a task bridge acts on) and the body's framing (`Content-Length`, chunked, or
/// until the server closes). Pure: bytes in, facts out; no I/O, no clock.
///
/// Strict where a mistake would mix one answer with the next on a kept-alive connection (framing:
/// `Content-Length`, `Transfer-Encoding`), lenient where it costs nothing (a reason phrase, a header
/// line that is not `name: value`, a bare LF for CRLF, as libcurl is).
enum HTTP1Response {
    /// The most bytes a head may have, status line and headers together (libcurl's limit).
    static let maxHeadBytes = 100 * 1024

    struct Head: Equatable {
        var status: Int
        /// `HTTP/1.<minor>`.
        var minor: Int
        var framing: Framing
        /// The server closes the connection after this answer (`Connection: close`, HTTP/1.0
        /// without `keep-alive`, a body that ends at the close, or framing that cannot be trusted).
        var close: Bool
        var retryAfter: String?
        var noRetry: String?
    }

    enum Framing: Equatable {
        /// No body (1xx, 204, 304, an answer to HEAD).
        case none
        case length(Int)
        case chunked
        /// The body ends when the server closes the connection.
        case untilClose
    }

    struct Failure: Error, Equatable, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    /// Where the head ends in `bytes` (the index after its empty line), or nil when it is not
    /// all there yet. `from` is where to start looking: bytes before it were searched already.
    static func headEnd(_ bytes: UnsafeRawBufferPointer, from: Int = 0) -> Int? {
        var index = max(0, from - 3)
        let count = bytes.count
        while index < count {
            // An empty line: LF LF, or LF CR LF.
            if bytes[index] == 0x0A {
                if index + 1 < count, bytes[index + 1] == 0x0A { return index + 2 }
                if index + 2 < count, bytes[index + 1] == 0x0D, bytes[index + 2] == 0x0A { return index + 3 }
            }
            index += 1
        }
        return nil
    }

    /// Reads a whole head (as found by ``headEnd(_:from:)``). `method` is the request's: an
    /// answer to HEAD has no body whatever it says.
    static func parseHead(_ bytes: UnsafeRawBufferPointer, method: HTTPMethodKind = .other) -> Result<Head, Failure> {
        var lines = LineReader(bytes: bytes)
        guard let statusLine = lines.next() else { return .failure(Failure("the answer has no status line")) }
        // "HTTP/1.x SSS[ reason]"
        guard statusLine.count >= 12, Self.startsWith(bytes, statusLine.lowerBound, "HTTP/1."),
              let minorDigit = Self.digit(bytes[statusLine.lowerBound + 7]), bytes[statusLine.lowerBound + 8] == 0x20
        else {
            return .failure(Failure("the answer is not HTTP/1.x: \(Self.printable(bytes, statusLine, limit: 40))"))
        }
        var status = 0
        for offset in 9..<12 {
            guard let d = Self.digit(bytes[statusLine.lowerBound + offset]) else {
                return .failure(Failure("the status line has no 3-digit status: \(Self.printable(bytes, statusLine, limit: 40))"))
            }
            status = status * 10 + d
        }
        guard status >= 100, statusLine.count == 12 || bytes[statusLine.lowerBound + 12] == 0x20 else {
            return .failure(Failure("the status line has no 3-digit status: \(Self.printable(bytes, statusLine, limit: 40))"))
        }
        var head = Head(status: status, minor: minorDigit, framing: .untilClose, close: minorDigit == 0, retryAfter: nil, noRetry: nil)
        var contentLength: Int?
        var chunked = false
        var transferEncoding = false
        var keepAlive = false
        var closeListed = false
        while let line = lines.next() {
            guard !line.isEmpty else { break }
            // A folded line (obs-fold) continues the previous header: none of ours is read from one.
            if bytes[line.lowerBound] == 0x20 || bytes[line.lowerBound] == 0x09 { continue }
            guard let colon = Self.firstIndex(of: 0x3A, in: bytes, line) else { continue }
            let name = line.lowerBound..<colon
            var valueStart = colon + 1, valueEnd = line.upperBound
            while valueStart < valueEnd, bytes[valueStart] == 0x20 || bytes[valueStart] == 0x09 { valueStart += 1 }
            while valueEnd > valueStart, bytes[valueEnd - 1] == 0x20 || bytes[valueEnd - 1] == 0x09 { valueEnd -= 1 }
            let value = valueStart..<valueEnd
            switch name.count {
            case 10 where Self.nameIs(bytes, name, "connection"):
                if Self.listContains(bytes, value, "close") { head.close = true; closeListed = true }
                if Self.listContains(bytes, value, "keep-alive") { keepAlive = true }
            case 11 where Self.nameIs(bytes, name, "retry-after"):
                head.retryAfter = Self.text(bytes, value)
            case 14 where Self.nameIs(bytes, name, "content-length"):
                guard let length = Self.contentLength(bytes, value) else {
                    return .failure(Failure("the answer's Content-Length is not a number: \(Self.printable(bytes, value, limit: 40))"))
                }
                if let known = contentLength, known != length {
                    return .failure(Failure("the answer has two different Content-Length headers"))
                }
                contentLength = length
            case 17 where Self.nameIs(bytes, name, "transfer-encoding"):
                transferEncoding = true
                // Chunked counts only as the last coding (RFC 9112 6.3).
                chunked = Self.lastListItemIs(bytes, value, "chunked")
            case 19 where Self.nameIs(bytes, name, "asyncqueue-no-retry"):
                head.noRetry = Self.text(bytes, value)
            case 21 where Self.nameIs(bytes, name, "x-asyncqueue-no-retry"):
                head.noRetry = Self.text(bytes, value)
            default: break
            }
        }
        if head.minor == 0 && keepAlive && !closeListed { head.close = false }
        if status < 200 || status == 204 || status == 304 || method == .head {
            head.framing = .none
        } else if transferEncoding {
            // Transfer-Encoding overrides Content-Length; a server that sends both may be
            // confused about where its answer ends, so the connection is not used again.
            head.framing = chunked ? .chunked : .untilClose
            if contentLength != nil || !chunked { head.close = true }
        } else if let contentLength {
            head.framing = .length(contentLength)
        } else {
            head.framing = .untilClose
            head.close = true
        }
        return .success(head)
    }

    /// The request method, as far as the answer's framing cares.
    enum HTTPMethodKind { case head, other }

    // MARK: Body

    /// Reads a body as it arrives, by its framing, into a byte array of at most `limit` bytes.
    struct BodyReader {
        enum Step: Equatable {
            /// Every byte given was read; more is needed.
            case more
            /// The body ended; the bytes after `consumed` belong to no answer.
            case done(consumed: Int)
            /// The body is longer than the limit.
            case tooLarge
            case failure(Failure)
        }

        private enum State {
            case length(remaining: Int)
            case untilClose
            /// A chunk-size line, its digits so far (`-1`: none yet), in its extension after them.
            case chunkSize(value: Int, digits: Int, inExtension: Bool, lineBytes: Int)
            case chunkData(remaining: Int)
            /// The CRLF after a chunk's data: `sawCR` when its CR came.
            case chunkDataEnd(sawCR: Bool)
            /// The trailer section: bytes of the current line, and of the trailers in all.
            case trailers(lineBytes: Int, totalBytes: Int)
            case done
        }

        private var state: State
        let limit: Int

        init(_ framing: Framing, limit: Int) {
            self.limit = limit
            switch framing {
            case .none: self.state = .done
            case .length(let n): self.state = n == 0 ? .done : .length(remaining: n)
            case .chunked: self.state = .chunkSize(value: 0, digits: 0, inExtension: false, lineBytes: 0)
            case .untilClose: self.state = .untilClose
            }
        }

        var isDone: Bool { if case .done = self.state { return true } else { return false } }

        /// The longest a chunk-size line (with its extensions) or a trailer line may be.
        static let maxLineBytes = 8 * 1024
        /// The most bytes of trailers.
        static let maxTrailerBytes = 64 * 1024

        /// Reads what `bytes` holds of the body, appending its data to `body`.
        mutating func consume(_ bytes: UnsafeRawBufferPointer, into body: inout [UInt8]) -> Step {
            var index = 0
            let count = bytes.count
            while true {
                switch self.state {
                case .done:
                    return .done(consumed: index)
                case .length(let remaining):
                    let take = min(remaining, count - index)
                    guard body.count + take <= self.limit else { return .tooLarge }
                    if take > 0 { body.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[index..<(index + take)])) }
                    index += take
                    if take == remaining { self.state = .done } else {
                        self.state = .length(remaining: remaining - take)
                        return .more
                    }
                case .untilClose:
                    let take = count - index
                    guard body.count + take <= self.limit else { return .tooLarge }
                    if take > 0 { body.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[index..<count])) }
                    return .more
                case .chunkData(let remaining):
                    let take = min(remaining, count - index)
                    guard body.count + take <= self.limit else { return .tooLarge }
                    if take > 0 { body.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[index..<(index + take)])) }
                    index += take
                    if take == remaining { self.state = .chunkDataEnd(sawCR: false) } else {
                        self.state = .chunkData(remaining: remaining - take)
                        return .more
                    }
                case .chunkSize(var value, var digits, var inExtension, var lineBytes):
                    while index < count {
                        let byte = bytes[index]
                        index += 1
                        lineBytes += 1
                        guard lineBytes <= Self.maxLineBytes else { return .failure(Failure("a chunk-size line is longer than \(Self.maxLineBytes) bytes")) }
                        if byte == 0x0A {
                            guard digits > 0 else { return .failure(Failure("a chunk has no size")) }
                            self.state = value == 0 ? .trailers(lineBytes: 0, totalBytes: 0) : .chunkData(remaining: value)
                            break
                        }
                        if inExtension || byte == 0x0D { continue }
                        if let hex = Self.hexDigit(byte) {
                            // Over 2^60 bytes: no chunk of an answer we would keep is that long.
                            guard digits < 15 else { return .failure(Failure("a chunk size is too large")) }
                            value = value << 4 | hex
                            digits += 1
                        } else if byte == 0x3B || byte == 0x20 || byte == 0x09 {
                            guard digits > 0 else { return .failure(Failure("a chunk has no size")) }
                            inExtension = true
                        } else {
                            return .failure(Failure("a chunk size is not hexadecimal"))
                        }
                    }
                    if case .chunkSize = self.state {
                        self.state = .chunkSize(value: value, digits: digits, inExtension: inExtension, lineBytes: lineBytes)
                        return .more
                    }
                case .chunkDataEnd(let sawCR):
                    guard index < count else { return .more }
                    let byte = bytes[index]
                    index += 1
                    if byte == 0x0A {
                        self.state = .chunkSize(value: 0, digits: 0, inExtension: false, lineBytes: 0)
                    } else if byte == 0x0D && !sawCR {
                        self.state = .chunkDataEnd(sawCR: true)
                    } else {
                        return .failure(Failure("a chunk is longer than its size"))
                    }
                case .trailers(var lineBytes, var totalBytes):
                    while index < count {
                        let byte = bytes[index]
                        index += 1
                        totalBytes += 1
                        guard totalBytes <= Self.maxTrailerBytes else { return .failure(Failure("the trailers exceed \(Self.maxTrailerBytes) bytes")) }
                        if byte == 0x0A {
                            if lineBytes == 0 {
                                self.state = .done
                                break
                            }
                            lineBytes = 0
                        } else if byte != 0x0D || lineBytes > 0 {
                            lineBytes += 1
                        }
                    }
                    if case .trailers = self.state {
                        self.state = .trailers(lineBytes: lineBytes, totalBytes: totalBytes)
                        return .more
                    }
                }
            }
        }

        /// The server closed the connection: the body is whole only when it ends at the close.
        mutating func endOfStream() -> Failure? {
            switch self.state {
            case .done: return nil
            case .untilClose:
                self.state = .done
                return nil
            case .length(let remaining): return Failure("the server closed the connection with \(remaining) bytes of the answer still to come")
            default: return Failure("the server closed the connection in the middle of a chunked answer")
            }
        }

        @inline(__always) static func hexDigit(_ b: UInt8) -> Int? {
            switch b {
            case 0x30...0x39: return Int(b - 0x30)
            case 0x41...0x46: return Int(b - 0x41 + 10)
            case 0x61...0x66: return Int(b - 0x61 + 10)
            default: return nil
            }
        }
    }

    // MARK: Bytes

    /// The lines of a head: each without its LF and without a CR before it.
    struct LineReader {
        let bytes: UnsafeRawBufferPointer
        var index = 0
        mutating func next() -> Range<Int>? {
            guard self.index < self.bytes.count else { return nil }
            let start = self.index
            while self.index < self.bytes.count, self.bytes[self.index] != 0x0A { self.index += 1 }
            var end = self.index
            if self.index < self.bytes.count { self.index += 1 }  // past the LF
            if end > start, self.bytes[end - 1] == 0x0D { end -= 1 }
            return start..<end
        }
    }

    @inline(__always) static func digit(_ b: UInt8) -> Int? { b >= 0x30 && b <= 0x39 ? Int(b - 0x30) : nil }

    static func startsWith(_ bytes: UnsafeRawBufferPointer, _ at: Int, _ prefix: StaticString) -> Bool {
        let n = prefix.utf8CodeUnitCount
        guard at + n <= bytes.count else { return false }
        for i in 0..<n where bytes[at + i] != prefix.utf8Start[i] { return false }
        return true
    }

    static func firstIndex(of byte: UInt8, in bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Int? {
        var i = range.lowerBound
        while i < range.upperBound {
            if bytes[i] == byte { return i }
            i += 1
        }
        return nil
    }

    /// Whether the header name in `range` is `lower` (lowercase), compared without regard to case.
    static func nameIs(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ lower: StaticString) -> Bool {
        guard range.count == lower.utf8CodeUnitCount else { return false }
        var i = 0
        for index in range {
            var b = bytes[index]
            if b >= 0x41 && b <= 0x5A { b |= 0x20 }
            if b != lower.utf8Start[i] { return false }
            i += 1
        }
        return true
    }

    /// Whether a comma-separated list holds `token` (lowercase), compared without regard to case.
    static func listContains(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ token: StaticString) -> Bool {
        var start = range.lowerBound
        while start < range.upperBound {
            var end = start
            while end < range.upperBound, bytes[end] != 0x2C { end += 1 }
            var s = start, e = end
            while s < e, bytes[s] == 0x20 || bytes[s] == 0x09 { s += 1 }
            while e > s, bytes[e - 1] == 0x20 || bytes[e - 1] == 0x09 { e -= 1 }
            if Self.nameIs(bytes, s..<e, token) { return true }
            start = end + 1
        }
        return false
    }

    /// Whether the last item of a comma-separated list is `token` (lowercase).
    static func lastListItemIs(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ token: StaticString) -> Bool {
        var start = range.lowerBound
        var i = range.upperBound
        while i > range.lowerBound {
            i -= 1
            if bytes[i] == 0x2C { start = i + 1; break }
        }
        var s = start, e = range.upperBound
        while s < e, bytes[s] == 0x20 || bytes[s] == 0x09 { s += 1 }
        while e > s, bytes[e - 1] == 0x20 || bytes[e - 1] == 0x09 { e -= 1 }
        // A coding may carry parameters ("chunked;x=1" is not valid, but cut them anyway).
        var semicolon = s
        while semicolon < e, bytes[semicolon] != 0x3B { semicolon += 1 }
        while semicolon > s, bytes[semicolon - 1] == 0x20 || bytes[semicolon - 1] == 0x09 { semicolon -= 1 }
        return Self.nameIs(bytes, s..<semicolon, token)
    }

    /// A `Content-Length` value: digits only (a list of equal values, as some servers send, is
    /// taken), at most 15 of them.
    static func contentLength(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Int? {
        var result: Int?
        var value = 0, digits = 0
        var index = range.lowerBound
        func endItem() -> Bool {
            guard digits > 0 else { return false }
            if let known = result, known != value { return false }
            result = value
            value = 0
            digits = 0
            return true
        }
        while index < range.upperBound {
            let b = bytes[index]
            if let d = Self.digit(b) {
                guard digits < 15 else { return nil }
                value = value * 10 + d
                digits += 1
            } else if b == 0x2C {
                guard endItem() else { return nil }
            } else if b == 0x20 || b == 0x09 {
                // between items only
                if digits > 0 {
                    var next = index
                    while next < range.upperBound, bytes[next] == 0x20 || bytes[next] == 0x09 { next += 1 }
                    guard next == range.upperBound || bytes[next] == 0x2C else { return nil }
                }
            } else {
                return nil
            }
            index += 1
        }
        guard endItem() else { return nil }
        return result
    }

    static func text(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: bytes[range]), as: UTF8.self)
    }

    /// The bytes as text for an error message: control characters and non-ASCII as `?`.
    static func printable(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, limit: Int) -> String {
        let cut = range.lowerBound..<min(range.upperBound, range.lowerBound + limit)
        let text = String(decoding: bytes[cut].map { $0 >= 0x20 && $0 < 0x7F ? $0 : UInt8(ascii: "?") }, as: UTF8.self)
        return "'" + text + (cut.count < range.count ? "…'" : "'")
    }
}
