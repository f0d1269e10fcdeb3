internal import CAQCurl
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Header lines shared by many requests (built once, linked after each request's own lines).
///
/// `@unchecked Sendable`: the C list is built in `init` and never changed afterwards; libcurl only
/// reads it, and it is freed in `deinit` when no request refers to it any more.
public final class SharedHeaders: @unchecked Sendable {
    let list: UnsafeMutablePointer<curl_slist>?
    /// The lines as ``HTTP1Client`` sends them: each followed by CRLF, those without a value
    /// left out.
    let wire: [UInt8]
    /// Which of its own lines ``HTTP1Client`` leaves out for these.
    let overrides: HTTP1Client.Overrides

    /// `lines`, and `Expect:` (no "100-continue" round trip for larger bodies).
    public init(_ lines: [String]) {
        var list: UnsafeMutablePointer<curl_slist>?
        for line in lines + ["Expect:"] { list = curl_slist_append(list, line) }
        self.list = list
        var wire: [UInt8] = []
        var overrides: HTTP1Client.Overrides = []
        for line in lines {
            let bytes = Array(line.utf8)
            // A line with CR, LF or NUL would smuggle headers: never sent (shared lines are the bridge's own).
            guard !bytes.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) else { continue }
            bytes.withUnsafeBufferPointer { line in
                overrides.formUnion(HTTP1Client.Overrides.of(line, 0..<line.count))
                HTTP1Client.appendLine(line, 0..<line.count, to: &wire)
            }
        }
        self.wire = wire
        self.overrides = overrides
    }

    deinit { curl_slist_free_all(self.list) }
}

/// A request's own header lines, written as bytes into one buffer (each line followed by a NUL,
/// as libcurl reads it): a request's lines cost one allocation, not one or more per line.
public struct HeaderLines: Sendable {
    /// Every line's bytes, each followed by a NUL.
    public private(set) var bytes: [UInt8] = []
    public private(set) var count = 0
    /// The first line that holds CR, LF or NUL (its first 40 bytes): ``CurlMulti/start(_:completion:)``
    /// refuses the request (such a line would smuggle headers or whole requests onto a pooled
    /// connection, or be cut short).
    public private(set) var refusedLine: String?

    public init(capacity: Int = 0) { self.bytes.reserveCapacity(capacity) }

    public init(_ lines: [String]) {
        self.init(capacity: lines.reduce(0) { $0 + $1.utf8.count + 1 })
        for line in lines { self.append(line) }
    }

    public mutating func append(_ line: String) { self.append { $0 += line.utf8 } }

    /// Adds one line: `write` appends its bytes (without an end) to the buffer it is given.
    public mutating func append(_ write: (inout [UInt8]) -> Void) {
        let start = self.bytes.count
        write(&self.bytes)
        if self.refusedLine == nil, self.bytes[start...].contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) {
            self.refusedLine = String(decoding: self.bytes[start...].prefix(40), as: UTF8.self)
        }
        self.bytes.append(0)
        self.count += 1
    }

    /// The lines, as text (for tests and logs).
    public var lines: [String] { self.bytes.split(separator: 0, omittingEmptySubsequences: false).dropLast().map { String(decoding: $0, as: UTF8.self) } }

    /// Appends `value` in decimal digits (a number's text of up to 15 bytes is a small string:
    /// no allocation).
    public static func appendDecimal(_ value: Int, to out: inout [UInt8]) { out += String(value).utf8 }
}

/// An HTTP request for ``CurlMulti``.
public struct HTTPRequest: Sendable {
    public var url: String
    public var method: String
    /// The request's own header lines, e.g. `Content-Type: application/json`.
    public var headers: HeaderLines
    /// A slice, so a body cut out of a larger message (a task's payload) is sent without a copy.
    public var body: ArraySlice<UInt8>
    public var timeout: Duration
    /// A larger answer fails the request (`tooLarge`) instead of filling memory.
    public var maxResponseBytes: Int
    /// Lines sent after `headers`, shared between requests.
    public var sharedHeaders: SharedHeaders?

    public init(url: String, method: String = "POST", headers: [String] = [], body: [UInt8] = [],
                timeout: Duration = .seconds(30), maxResponseBytes: Int = 1 << 20, sharedHeaders: SharedHeaders? = nil) {
        self.init(url: url, method: method, headers: HeaderLines(headers), body: body[...], timeout: timeout, maxResponseBytes: maxResponseBytes,
                  sharedHeaders: sharedHeaders)
    }

    public init(url: String, method: String = "POST", headers: HeaderLines, body: ArraySlice<UInt8>,
                timeout: Duration = .seconds(30), maxResponseBytes: Int = 1 << 20, sharedHeaders: SharedHeaders? = nil) {
        self.sharedHeaders = sharedHeaders
        self.url = url
        self.method = method
        self.headers = headers
        self.body = body
        self.timeout = timeout
        self.maxResponseBytes = maxResponseBytes
    }
}

/// The answer headers a task bridge acts on, kept without building a list of every header.
public struct HTTPAnswer: Sendable {
    public var status: Int
    public var body: [UInt8]
    /// `Retry-After`, as sent.
    public var retryAfter: String?
    /// `AsyncQueue-No-Retry` (or `X-AsyncQueue-No-Retry`), as sent.
    public var noRetry: String?

    public init(status: Int, body: [UInt8], retryAfter: String? = nil, noRetry: String? = nil) {
        self.status = status
        self.body = body
        self.retryAfter = retryAfter
        self.noRetry = noRetry
    }
}

/// Many HTTP requests at once over libcurl's multi-socket interface, driven by someone else's
/// event loop: it says which sockets to poll (``pollRequests(into:)``), is told what happened
/// (``handle(_:)``) and finishes transfers in ``runTurn()``. Not thread-safe: one thread owns it
/// (in aq-bridge, the AMQP connection's thread, so a task costs no thread hop).
public final class CurlMulti {
    public typealias Completion = (Result<HTTPAnswer, HTTPError>) -> Void

    final class Transfer {
        let easy: UnsafeMutableRawPointer
        var request: HTTPRequest
        /// This request's own header lines as `curl_slist` nodes, in one block of ours (see
        /// ``CurlMulti/headerBlock(_:extra:shared:)``); the last node points into the shared list.
        var headerBlock: UnsafeMutableRawPointer?
        var response: [UInt8] = []
        var retryAfter: String?
        var noRetry: String?
        var overflow = false
        /// Why the policy refused the address libcurl was about to connect to.
        var refused: String?
        /// The URL's host, for the policy's connect-time check.
        var host = ""
        var policy: AddressPolicy?
        var completion: Completion?

        init(easy: UnsafeMutableRawPointer, request: HTTPRequest) {
            self.easy = easy
            self.request = request
        }
    }

    private let multi: UnsafeMutableRawPointer
    /// Sockets curl wants watched, with the poll events.
    private var sockets: [Int32: Int16] = [:]
    private var timerDeadline: ContinuousClock.Instant?
    private var idleHandles: [UnsafeMutableRawPointer] = []
    private var transfers: [UnsafeMutableRawPointer: Transfer] = [:]
    private var stillRunning: Int32 = 0
    /// Transfers waiting for a free slot (over `maxInFlight`).
    private var waiting: [(HTTPRequest, Completion)] = []
    public let maxInFlight: Int
    /// Sent as `User-Agent` on every request.
    public static let userAgent = "AsyncQueue/1.0"
    public private(set) var startedCount = 0

    public var inFlight: Int { self.transfers.count + self.waiting.count }

    /// Which addresses requests may connect to (nil: any).
    public let policy: AddressPolicy?

    public init(maxInFlight: Int = 1024, maxConnections: Int = 512, maxHostConnections: Int? = nil, policy: AddressPolicy? = nil) {
        self.policy = policy
        _ = CurlGlobal.initialized
        guard let multi = curl_multi_init() else { fatalError("libcurl could not create a multi handle") }
        self.multi = multi
        self.maxInFlight = maxInFlight
        let me = Unmanaged.passUnretained(self).toOpaque()
        _ = aq_curl_multi_setopt_ptr(multi, CURLMOPT_SOCKETDATA, me)
        _ = aq_curl_multi_setopt_ptr(multi, CURLMOPT_TIMERDATA, me)
        _ = aq_curl_multi_setopt_socket_callback(multi) { _, socket, what, clientp, _ in
            guard let clientp else { return 0 }
            let this = Unmanaged<CurlMulti>.fromOpaque(clientp).takeUnretainedValue()
            switch what {
            case Int32(CURL_POLL_REMOVE): this.sockets[socket] = nil
            case Int32(CURL_POLL_IN): this.sockets[socket] = Int16(POLLIN)
            case Int32(CURL_POLL_OUT): this.sockets[socket] = Int16(POLLOUT)
            default: this.sockets[socket] = Int16(POLLIN | POLLOUT)
            }
            return 0
        }
        _ = aq_curl_multi_setopt_timer_callback(multi) { _, timeout, clientp in
            guard let clientp else { return 0 }
            let this = Unmanaged<CurlMulti>.fromOpaque(clientp).takeUnretainedValue()
            this.timerDeadline = timeout < 0 ? nil : ContinuousClock.now + .milliseconds(timeout)
            return 0
        }
        _ = aq_curl_multi_setopt_long(multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, maxConnections)
        _ = aq_curl_multi_setopt_long(multi, CURLMOPT_MAXCONNECTS, maxConnections)
        _ = aq_curl_multi_setopt_long(multi, CURLMOPT_MAX_HOST_CONNECTIONS, maxHostConnections ?? maxConnections)
    }

    deinit {
        for (_, transfer) in self.transfers {
            curl_multi_remove_handle(self.multi, transfer.easy)
            curl_easy_cleanup(transfer.easy)
            Self.freeOwnHeaders(transfer)
        }
        for easy in self.idleHandles { curl_easy_cleanup(easy) }
        curl_multi_cleanup(self.multi)
    }

    /// Starts a request; `completion` runs later, inside ``runTurn()`` or ``handle(_:)``.
    public func start(_ request: HTTPRequest, completion: @escaping Completion) {
        guard self.transfers.count < self.maxInFlight else {
            self.waiting.append((request, completion))
            return
        }
        // Nothing a task sent may add lines to the request: a CR or LF in a header would
        // smuggle headers or whole requests onto a pooled connection.
        if let header = request.headers.refusedLine {
            completion(.failure(HTTPError(kind: .invalidRequest, message: "a header line holds CR, LF or NUL: \(header.debugDescription)")))
            return
        }
        let (host, refusal) = self.hostCheck(request.url)
        if let refusal {
            completion(.failure(refusal))
            return
        }
        let reused = self.idleHandles.popLast()
        let fresh = reused == nil
        guard let easy = reused ?? curl_easy_init() else {
            completion(.failure(HTTPError(kind: .other, message: "libcurl could not create a handle")))
            return
        }
        let transfer = Transfer(easy: easy, request: request)
        transfer.completion = completion
        transfer.host = host
        // No "Expect: 100-continue" round trip for larger bodies (shared lists have it).
        let (block, sent) = Self.headerBlock(request.headers, extra: request.sharedHeaders == nil ? "Expect:" : nil,
                                             shared: request.sharedHeaders?.list)
        transfer.headerBlock = block
        let context = Unmanaged.passRetained(transfer).toOpaque()
        _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_PRIVATE, context)
        _ = request.url.withCString { aq_curl_easy_setopt_ptr(easy, CURLOPT_URL, $0) }
        if fresh {
            _ = aq_curl_easy_setopt_long(easy, CURLOPT_NOSIGNAL, 1)
            _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_PROTOCOLS_STR, "http,https")
            // libcurl 7.88 gives every handle a 64 KiB upload buffer; bodies go by POSTFIELDS.
            _ = aq_curl_easy_setopt_long(easy, CURLOPT_UPLOAD_BUFFERSIZE, 16 * 1024)
            _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_USERAGENT, CurlMulti.userAgent)
            // No proxy from the environment: libcurl would read http_proxy/no_proxy on every
            // request. Set CURLOPT_PROXY per handle if a deployment needs one.
            _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_PROXY, "")
            if self.policy != nil {
                _ = aq_curl_easy_setopt_opensocket(easy) { clientp, _, address in
                    guard let clientp, let address else { return CURL_SOCKET_BAD }
                    let transfer = Unmanaged<Transfer>.fromOpaque(clientp).takeUnretainedValue()
                    let family = address.pointee.family
                    let ip: IPAddress? = withUnsafePointer(to: &address.pointee.addr) { raw -> IPAddress? in
                        if family == AF_INET {
                            return raw.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                                IPAddress(v4: withUnsafeBytes(of: sin.pointee.sin_addr.s_addr) { Array($0) })
                            }
                        }
                        if family == AF_INET6 {
                            return raw.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin6 in
                                IPAddress(v6: withUnsafeBytes(of: sin6.pointee.sin6_addr) { Array($0) })
                            }
                        }
                        return nil
                    }
                    guard let ip else {
                        transfer.refused = "only IPv4 and IPv6 addresses are allowed"
                        return CURL_SOCKET_BAD
                    }
                    if let why = transfer.policy?.refusal(host: transfer.host, address: ip) {
                        transfer.refused = why
                        return CURL_SOCKET_BAD
                    }
                    return socket(family, address.pointee.socktype, address.pointee.protocol)
                }
            }
        }
        if self.policy != nil { _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_OPENSOCKETDATA, context) }
        transfer.policy = self.policy
        _ = aq_curl_easy_setopt_long(easy, CURLOPT_TIMEOUT_MS, Self.milliseconds(request.timeout))
        _ = aq_curl_easy_setopt_long(easy, CURLOPT_CONNECTTIMEOUT_MS, min(Self.milliseconds(request.timeout), 10_000))
        _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_CUSTOMREQUEST, request.method == "POST" ? nil : request.method)
        _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_HTTPHEADER, sent)
        if request.method == "GET" {
            _ = aq_curl_easy_setopt_long(easy, CURLOPT_HTTPGET, 1)
        } else {
            _ = aq_curl_easy_setopt_long(easy, CURLOPT_POSTFIELDSIZE, transfer.request.body.count)
            // The body array lives in the transfer until the request ends.
            transfer.request.body.withUnsafeBytes { raw in
                _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_POSTFIELDS, raw.baseAddress ?? UnsafeRawPointer(bitPattern: 1))
            }
        }
        _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_WRITEDATA, context)
        _ = aq_curl_easy_setopt_data_callback(easy, CURLOPT_WRITEFUNCTION) { data, size, count, context in
            guard let context else { return 0 }
            let transfer = Unmanaged<Transfer>.fromOpaque(context).takeUnretainedValue()
            let length = size * count
            guard let data, length > 0 else { return length }
            if transfer.response.count + length > transfer.request.maxResponseBytes {
                transfer.overflow = true
                return 0  // aborts with CURLE_WRITE_ERROR
            }
            transfer.response.append(contentsOf: UnsafeRawBufferPointer(start: data, count: length))
            return length
        }
        _ = aq_curl_easy_setopt_ptr(easy, CURLOPT_HEADERDATA, context)
        _ = aq_curl_easy_setopt_data_callback(easy, CURLOPT_HEADERFUNCTION) { data, size, count, context in
            let length = size * count
            guard let data, let context, length > 12 else { return length }
            let transfer = Unmanaged<Transfer>.fromOpaque(context).takeUnretainedValue()
            let raw = UnsafeRawBufferPointer(start: data, count: length)
            // Only the two headers the bridge acts on; the others cost one byte comparison.
            switch raw[0] | 0x20 {
            case UInt8(ascii: "r"):
                if let value = CurlMulti.headerValue(raw, name: "retry-after:") { transfer.retryAfter = value }
            case UInt8(ascii: "a"):
                if let value = CurlMulti.headerValue(raw, name: "asyncqueue-no-retry:") { transfer.noRetry = value }
            case UInt8(ascii: "x"):
                if let value = CurlMulti.headerValue(raw, name: "x-asyncqueue-no-retry:") { transfer.noRetry = value }
            default: break
            }
            return length
        }
        self.transfers[context] = transfer
        self.startedCount += 1
        let code = curl_multi_add_handle(self.multi, easy)
        if code != CURLM_OK {
            self.finish(context, result: .failure(HTTPError(kind: .other, message: "libcurl refused the request: \(String(cString: curl_multi_strerror(code)))")))
        }
    }

    /// What the policy says of a host's name, remembered per host (bounded).
    private var hostChecks: [String: HTTPError?] = [:]

    private func hostCheck(_ url: String) -> (host: String, refusal: HTTPError?) {
        // The policy looks at the host only: remembered per host (URLs differ task by task).
        guard let authority = URLText.authority(url) else {
            return ("", self.policy == nil ? nil : HTTPError(kind: .invalidURL, message: "not an http or https URL with a host"))
        }
        guard let policy = self.policy else { return (authority.host, nil) }
        if let known = self.hostChecks[authority.host] { return (authority.host, known) }
        let refusal = policy.refusal(host: authority.host, address: nil).map { HTTPError(kind: .refused, message: $0) }
        if self.hostChecks.count >= 4096 { self.hostChecks.removeAll(keepingCapacity: true) }
        self.hostChecks[authority.host] = refusal
        return (authority.host, refusal)
    }

    /// The trimmed value when the header line starts with `name` (lowercase, with the colon),
    /// compared without regard to case.
    static func headerValue(_ line: UnsafeRawBufferPointer, name: StaticString) -> String? {
        let count = name.utf8CodeUnitCount
        guard line.count > count else { return nil }
        let expected = name.utf8Start
        for i in 0..<count {
            var byte = line[i]
            if byte >= 0x41 && byte <= 0x5A { byte |= 0x20 }
            if byte != expected[i] { return nil }
        }
        var start = count, end = line.count
        while start < end, line[start] == 0x20 || line[start] == 0x09 { start += 1 }
        while end > start, line[end - 1] == 0x0A || line[end - 1] == 0x0D || line[end - 1] == 0x20 { end -= 1 }
        return String(decoding: UnsafeRawBufferPointer(rebasing: line[start..<end]), as: UTF8.self)
    }

    /// Frees the request's own header nodes, never the shared tail.
    static func freeOwnHeaders(_ transfer: Transfer) {
        transfer.headerBlock?.deallocate()
        transfer.headerBlock = nil
    }

    /// `lines` (then `extra`) as a `curl_slist` whose last node points to `shared`: the nodes and
    /// the lines' bytes in one allocation, instead of two per line with `curl_slist_append`
    /// (libcurl only reads the list; it is freed with ``freeOwnHeaders(_:)`` once the transfer
    /// ends). Returns the block (nil when there are no own lines) and the list's head.
    static func headerBlock(_ lines: HeaderLines, extra: StaticString?, shared: UnsafeMutablePointer<curl_slist>?)
        -> (block: UnsafeMutableRawPointer?, list: UnsafeMutablePointer<curl_slist>?)
    {
        let count = lines.count + (extra == nil ? 0 : 1)
        guard count > 0 else { return (nil, shared) }
        let textBytes = lines.bytes.count + (extra.map { $0.utf8CodeUnitCount + 1 } ?? 0)
        let nodeBytes = count * MemoryLayout<curl_slist>.stride
        let block = UnsafeMutableRawPointer.allocate(byteCount: nodeBytes + textBytes, alignment: MemoryLayout<curl_slist>.alignment)
        let nodes = block.bindMemory(to: curl_slist.self, capacity: count)
        let text = (block + nodeBytes).bindMemory(to: CChar.self, capacity: textBytes)
        var end = lines.bytes.withUnsafeBytes { raw -> Int in
            if let base = raw.baseAddress { UnsafeMutableRawPointer(text).copyMemory(from: base, byteCount: raw.count) }
            return raw.count
        }
        if let extra {
            UnsafeMutableRawPointer(text + end).copyMemory(from: extra.utf8Start, byteCount: extra.utf8CodeUnitCount)
            end += extra.utf8CodeUnitCount
            text[end] = 0
            end += 1
        }
        // A node per line, at each line's start (every line ends with a NUL).
        var start = 0
        for index in 0..<count {
            (nodes + index).initialize(to: curl_slist(data: text + start, next: index + 1 < count ? nodes + index + 1 : shared))
            while text[start] != 0 { start += 1 }
            start += 1
        }
        return (block, nodes)
    }

    static func milliseconds(_ d: Duration) -> Int {
        Int(d.components.seconds) * 1000 + Int(d.components.attoseconds / 1_000_000_000_000_000)
    }

    /// Adds the sockets curl is waiting on; returns the longest wait curl allows, in ms.
    public func pollRequests(into fds: inout [pollfd]) -> Int32? {
        for (socket, events) in self.sockets { fds.append(pollfd(fd: socket, events: events, revents: 0)) }
        guard let deadline = self.timerDeadline else { return nil }
        let left = deadline - ContinuousClock.now
        return left <= .zero ? 0 : Int32(clamping: Self.milliseconds(left) + 1)
    }

    /// Tells curl what poll saw on its sockets.
    public func handle(_ fds: ArraySlice<pollfd>) {
        for fd in fds where fd.revents != 0 {
            var mask: Int32 = 0
            if fd.revents & Int16(POLLIN) != 0 { mask |= CURL_CSELECT_IN }
            if fd.revents & Int16(POLLOUT) != 0 { mask |= CURL_CSELECT_OUT }
            if fd.revents & Int16(POLLERR | POLLHUP) != 0 { mask |= CURL_CSELECT_ERR }
            _ = curl_multi_socket_action(self.multi, fd.fd, mask, &self.stillRunning)
        }
    }

    /// Fires curl's timer when due and completes finished transfers. Returns true when it did
    /// something (the caller should not sleep yet).
    @discardableResult
    public func runTurn() -> Bool {
        var didWork = false
        if let deadline = self.timerDeadline, deadline <= ContinuousClock.now {
            self.timerDeadline = nil
            _ = curl_multi_socket_action(self.multi, CURL_SOCKET_TIMEOUT, 0, &self.stillRunning)
            didWork = true
        }
        var left: Int32 = 0
        while let message = curl_multi_info_read(self.multi, &left) {
            guard message.pointee.msg == CURLMSG_DONE, let easy = message.pointee.easy_handle else { continue }
            let code = aq_curl_msg_result(message)
            var privatePointer: UnsafeMutableRawPointer?
            _ = aq_curl_easy_getinfo_ptr(easy, CURLINFO_PRIVATE, &privatePointer)
            guard let context = privatePointer, let transfer = self.transfers[context] else { continue }
            let result: Result<HTTPAnswer, HTTPError>
            if code == CURLE_OK {
                var status = 0
                _ = aq_curl_easy_getinfo_long(easy, CURLINFO_RESPONSE_CODE, &status)
                result = .success(HTTPAnswer(status: status, body: transfer.response, retryAfter: transfer.retryAfter,
                                             noRetry: transfer.noRetry))
            } else if let refused = transfer.refused {
                result = .failure(HTTPError(kind: .refused, message: refused, curlCode: Int32(code.rawValue)))
            } else if transfer.overflow {
                result = .failure(HTTPError(kind: .tooLarge, message: "the answer exceeded \(transfer.request.maxResponseBytes) bytes", curlCode: Int32(code.rawValue)))
            } else {
                let text = String(cString: curl_easy_strerror(code))
                result = .failure(HTTPError(kind: CurlGlobal.kind(of: code), message: text, curlCode: Int32(code.rawValue)))
            }
            self.finish(context, result: result)
            didWork = true
        }
        while self.transfers.count < self.maxInFlight, !self.waiting.isEmpty {
            let (request, completion) = self.waiting.removeFirst()
            self.start(request, completion: completion)
            didWork = true
        }
        return didWork
    }

    private func finish(_ context: UnsafeMutableRawPointer, result: Result<HTTPAnswer, HTTPError>) {
        guard let transfer = self.transfers.removeValue(forKey: context) else { return }
        curl_multi_remove_handle(self.multi, transfer.easy)
        Self.freeOwnHeaders(transfer)
        Unmanaged<Transfer>.fromOpaque(context).release()
        if self.idleHandles.count < 1024 { self.idleHandles.append(transfer.easy) } else { curl_easy_cleanup(transfer.easy) }
        let completion = transfer.completion
        transfer.completion = nil
        completion?(result)
    }

    /// Fails every transfer (used at shutdown).
    public func cancelAll(_ error: HTTPError) {
        let waiting = self.waiting
        self.waiting.removeAll()
        for (_, completion) in waiting { completion(.failure(error)) }
        for context in Array(self.transfers.keys) { self.finish(context, result: .failure(error)) }
    }
}
