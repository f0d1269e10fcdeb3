#if canImport(Glibc)
import Glibc
#endif

/// The bridge's HTTP requests, driven by its poll loop: plain `http://` URLs through
/// ``HTTP1Client``, everything else (HTTPS, credentials in the URL, paths libcurl rewrites)
/// through libcurl (``CurlMulti``); or everything through libcurl (``Engine/libcurl``). Not
/// thread-safe: one thread owns it.
public final class HTTPClient {
    public typealias Completion = (Result<HTTPAnswer, HTTPError>) -> Void

    public enum Engine: String, Sendable, CaseIterable {
        /// Plain http through the built-in client, the rest through libcurl.
        case automatic = "auto"
        /// Every request through libcurl.
        case libcurl
    }

    public let engine: Engine
    private let plain: HTTP1Client
    private let maxInFlight: Int
    private let maxConnections: Int
    private let maxHostConnections: Int?
    private let policy: AddressPolicy?
    /// Created at its first request (an https URL, or every request under ``Engine/libcurl``).
    private var curl: CurlMulti?
    /// How many of the descriptors asked for are libcurl's (they come first).
    private var curlPolled = 0

    public init(engine: Engine = .automatic, maxInFlight: Int = 1024, maxConnections: Int = 512, maxHostConnections: Int? = nil,
                policy: AddressPolicy? = nil) {
        self.engine = engine
        self.maxInFlight = maxInFlight
        self.maxConnections = maxConnections
        self.maxHostConnections = maxHostConnections
        self.policy = policy
        self.plain = HTTP1Client(maxConnections: maxConnections, policy: policy)
    }

    private var curlMulti: CurlMulti {
        if let curl = self.curl { return curl }
        let curl = CurlMulti(maxInFlight: self.maxInFlight, maxConnections: self.maxConnections,
                             maxHostConnections: self.maxHostConnections, policy: self.policy)
        self.curl = curl
        return curl
    }

    public var inFlight: Int { self.plain.inFlight + (self.curl?.inFlight ?? 0) }

    /// Requests started so far, by the built-in client and by libcurl (tests, metrics).
    public var started: (builtin: Int, libcurl: Int) { (self.plain.startedCount, self.curl?.startedCount ?? 0) }

    /// Connections the built-in client opened so far (tests: kept-alive connections are reused).
    public var builtinConnectionsOpened: Int { self.plain.connectionsOpened }

    /// Starts a request; `completion` runs later, inside ``handle(_:)`` or ``runTurn()``, or now
    /// when the request is refused before anything is sent.
    public func start(_ request: HTTPRequest, completion: @escaping Completion) {
        if self.engine == .automatic, let target = HTTP1Client.target(request.url) {
            self.plain.start(request, target: target, completion: completion)
        } else {
            self.curlMulti.start(request, completion: completion)
        }
    }

    public func pollRequests(into fds: inout [pollfd]) -> Int32? {
        let before = fds.count
        var timeout: Int32? = self.curl?.pollRequests(into: &fds)
        self.curlPolled = fds.count - before
        if let limit = self.plain.pollRequests(into: &fds) { timeout = min(timeout ?? limit, limit) }
        return timeout
    }

    public func handle(_ fds: ArraySlice<pollfd>) {
        let split = fds.startIndex + min(self.curlPolled, fds.count)
        if let curl = self.curl, split > fds.startIndex { curl.handle(fds[fds.startIndex..<split]) }
        self.plain.handle(fds[split...])
    }

    @discardableResult
    public func runTurn() -> Bool {
        let curlWorked = self.curl?.runTurn() ?? false
        let plainWorked = self.plain.runTurn()
        return curlWorked || plainWorked
    }

    public func cancelAll(_ error: HTTPError) {
        self.curl?.cancelAll(error)
        self.plain.cancelAll(error)
    }
}
