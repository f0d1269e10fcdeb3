import AMQPClient
import AQHTTP
import AQTopology
import Foundation
import Testing
@testable import AQBridge

/// The pure rules behind "one message, one answer or one client never costs another task
/// anything": admission, address policy, bounded outside numbers, UTF-8, log lines, copies.
@Suite struct AdmissionTests {
    typealias Machine = Admission<String, String>
    static let t0 = ContinuousClock.now

    static func machine(perQueue: [Int] = [4, 4], perHost: Int = 2, total: Int = 100, maxWait: Duration = .seconds(10)) -> Machine {
        Machine(limits: .init(perQueue: perQueue, perHost: perHost, total: total, maxWait: maxWait))
    }

    @Test func aHostAtItsCapMakesOnlyItsOwnRequestsWait() {
        var m = Self.machine()
        #expect(m.submit("a1", queue: 0, host: "A", parkable: true, now: Self.t0) == .start)
        #expect(m.submit("a2", queue: 0, host: "A", parkable: true, now: Self.t0) == .start)
        #expect(m.submit("a3", queue: 0, host: "A", parkable: true, now: Self.t0) == .wait)
        #expect(m.submit("b1", queue: 0, host: "B", parkable: true, now: Self.t0) == .start, "another host in the same queue goes on")
        #expect(m.submit("c1", queue: 1, host: "C", parkable: true, now: Self.t0) == .start, "another queue goes on")
        #expect(m.inFlight(host: "A") == 2)
        #expect(m.waiting(host: "A") == 1)
    }

    @Test func aWebhookGoesBeforeTheCallbacksWaitingInItsLine() {
        var m = Self.machine(perQueue: [100], perHost: 1, maxWait: .seconds(10))
        #expect(m.submit("cb1", queue: 0, host: "A", parkable: true, now: Self.t0) == .start)
        for id in ["cb2", "cb3"] { #expect(m.submit(id, queue: 0, host: "A", parkable: true, now: Self.t0) == .wait) }
        #expect(m.submit("hook1", queue: 0, host: "A", parkable: true, urgent: true, now: Self.t0) == .wait)
        #expect(m.submit("hook2", queue: 0, host: "A", parkable: true, urgent: true, now: Self.t0) == .wait)
        var order: [String] = []
        for _ in 0..<5 { order += m.finished(queue: 0, host: "A", latency: .milliseconds(5), now: Self.t0) }
        #expect(order == ["hook1", "hook2", "cb2", "cb3"], "webhooks first, each kind in arrival order")
        #expect(m.waiting(host: "A") == 0)
    }

    @Test func aLineParksItsCallbacksBeforeItsWebhooks() {
        var m = Self.machine(perQueue: [100], perHost: 1, maxWait: .seconds(1))
        #expect(m.submit("cb1", queue: 0, host: "H", parkable: true, now: Self.t0) == .start)
        #expect(m.submit("cb2", queue: 0, host: "H", parkable: true, now: Self.t0) == .wait)
        #expect(m.submit("hook1", queue: 0, host: "H", parkable: true, urgent: true, now: Self.t0) == .wait)
        // Silent for 0.6 s: one request fits within max_wait, the other is parked: the callback,
        // though the webhook came last.
        #expect(m.overdue(now: Self.t0 + .milliseconds(600)) == ["cb2"])
        #expect(m.waiting(host: "H") == 1)
    }

    @Test func aWebhooksExpectedWaitCountsOnlyTheWebhooksAheadOfIt() {
        var m = Self.machine(perQueue: [100], perHost: 1, maxWait: .seconds(1))
        #expect(m.submit("cb1", queue: 0, host: "H", parkable: true, now: Self.t0) == .start)
        #expect(m.submit("hook1", queue: 0, host: "H", parkable: true, urgent: true, now: Self.t0) == .wait)
        for id in ["cb2", "cb3"] { #expect(m.submit(id, queue: 0, host: "H", parkable: true, now: Self.t0) == .wait) }
        // Silent for 0.4 s: second in line (behind hook1) is 0.8 s; fifth is 2 s.
        let now = Self.t0 + .milliseconds(400)
        #expect(m.submit("hook2", queue: 0, host: "H", parkable: true, urgent: true, now: now) == .wait)
        #expect(m.submit("cb4", queue: 0, host: "H", parkable: true, now: now) == .park)
    }

    @Test func aQueueAtItsConcurrencyNeverTakesAnotherQueuesSlots() {
        var m = Self.machine(perQueue: [2, 2], perHost: 10)
        #expect(m.submit("q0-1", queue: 0, host: "A", parkable: false, now: Self.t0) == .start)
        #expect(m.submit("q0-2", queue: 0, host: "B", parkable: false, now: Self.t0) == .start)
        #expect(m.submit("q0-3", queue: 0, host: "C", parkable: false, now: Self.t0) == .wait)
        #expect(m.submit("q1-1", queue: 1, host: "A", parkable: false, now: Self.t0) == .start)
        #expect(m.finished(queue: 0, host: "A", latency: .milliseconds(5), now: Self.t0) == ["q0-3"], "the queue's own slot goes to its own waiting request")
        #expect(m.inFlight(queue: 0) == 2)
        #expect(m.inFlight(queue: 1) == 1)
    }

    @Test func aFastBusyHostKeepsItsLongLine() {
        var m = Self.machine(perQueue: [1000], perHost: 2, maxWait: .seconds(10))
        var now = Self.t0
        for id in ["1", "2"] { #expect(m.submit(id, queue: 0, host: "A", parkable: true, now: now) == .start) }
        now += .milliseconds(10)
        _ = m.finished(queue: 0, host: "A", latency: .milliseconds(10), now: now)  // answers in 10 ms
        #expect(m.submit("3", queue: 0, host: "A", parkable: true, now: now) == .start)
        for n in 4..<500 { #expect(m.submit("\(n)", queue: 0, host: "A", parkable: true, now: now) == .wait) }
        #expect(m.overdue(now: now).isEmpty, "500 waiting at 10 ms each is 2.5 s: well within max_wait")
    }

    @Test func aHostThatStopsAnsweringLosesItsLineToTheBroker() {
        var m = Self.machine(perQueue: [100], perHost: 2, maxWait: .seconds(2))
        for id in ["1", "2"] { #expect(m.submit(id, queue: 0, host: "H", parkable: true, now: Self.t0) == .start) }
        for id in ["3", "4", "5", "6"] { #expect(m.submit(id, queue: 0, host: "H", parkable: true, now: Self.t0) == .wait) }
        #expect(m.submit("webhook", queue: 0, host: "H", parkable: false, now: Self.t0) == .wait)
        #expect(m.overdue(now: Self.t0 + .milliseconds(500)).isEmpty, "silent for half a second: not yet")
        // Silent for 1.5 s: one round (2 requests) fits in 2 s, the rest does not.
        let parked = m.overdue(now: Self.t0 + .milliseconds(1500))
        #expect(parked == ["6", "5", "4"], "parkable ones from the back; the webhook waits its turn")
        #expect(m.waiting(host: "H") == 2)
        #expect(m.submit("7", queue: 0, host: "H", parkable: true, now: Self.t0 + .seconds(3)) == .park)
        #expect(m.submit("other", queue: 0, host: "B", parkable: true, now: Self.t0 + .seconds(3)) == .start)
        #expect(m.finished(queue: 0, host: "H", latency: nil, now: Self.t0 + .seconds(4)) == ["3"])
    }

    @Test func freedSlotsServeTheWaitingLinesFairlyAndInOrder() {
        var m = Self.machine(perQueue: [1, 1], perHost: 10, total: 10)
        #expect(m.submit("x1", queue: 0, host: "A", parkable: false, now: Self.t0) == .start)
        #expect(m.submit("x2", queue: 0, host: "A", parkable: false, now: Self.t0) == .wait)
        #expect(m.submit("x3", queue: 0, host: "B", parkable: false, now: Self.t0) == .wait)
        #expect(m.submit("x4", queue: 0, host: "A", parkable: false, now: Self.t0) == .wait)
        #expect(m.finished(queue: 0, host: "A", latency: nil, now: Self.t0) == ["x2"])
        #expect(m.finished(queue: 0, host: "A", latency: nil, now: Self.t0) == ["x3"], "round robin between the (queue, host) lines")
        #expect(m.finished(queue: 0, host: "B", latency: nil, now: Self.t0) == ["x4"])
        #expect(m.finished(queue: 0, host: "A", latency: nil, now: Self.t0) == [])
        #expect(m.waiting == 0)
        #expect(m.inFlight == 0)
    }

    @Test func theTotalCapsEverything() {
        var m = Self.machine(perQueue: [10, 10], perHost: 10, total: 2)
        #expect(m.submit("1", queue: 0, host: "A", parkable: false, now: Self.t0) == .start)
        #expect(m.submit("2", queue: 1, host: "B", parkable: false, now: Self.t0) == .start)
        #expect(m.submit("3", queue: 1, host: "C", parkable: false, now: Self.t0) == .wait)
        #expect(m.finished(queue: 0, host: "A", latency: nil, now: Self.t0) == ["3"])
        #expect(m.drainWaiting().isEmpty)
    }
}

@Suite struct AddressPolicyTests {
    static func refused(_ policy: AddressPolicy, _ host: String, _ address: String? = nil) -> Bool {
        policy.refusal(host: host, address: address.flatMap(IPAddress.init)) != nil
    }

    @Test func linkLocalAndMetadataAreDeniedByDefaultLoopbackIsNot() {
        let policy = AddressPolicy()
        #expect(Self.refused(policy, "169.254.169.254"))
        #expect(Self.refused(policy, "metadata.example", "169.254.169.254"), "a name is checked by the address it resolves to")
        #expect(Self.refused(policy, "[fe80::1]"))
        #expect(Self.refused(policy, "x", "::ffff:169.254.169.254"), "IPv4-mapped IPv6 counts as IPv4")
        #expect(Self.refused(policy, "x", "fd00:ec2::254"))
        #expect(Self.refused(policy, "0.0.0.0"))
        #expect(!Self.refused(policy, "127.0.0.1"))
        #expect(!Self.refused(policy, "localhost", "127.0.0.1"))
        #expect(!Self.refused(policy, "api.example", "10.1.2.3"))
    }

    @Test func operatorsDenyAndAllowByRangeOrName() throws {
        let deny = AddressPolicy(deny: try ["127.0.0.0/8", "::1", "*.internal", "169.254.0.0/16"].map(AddressPolicy.parse))
        #expect(Self.refused(deny, "localhost", "127.0.0.1"))
        #expect(Self.refused(deny, "2130706433", "127.0.0.1"), "a decimal host resolves to loopback and is refused at connect")
        #expect(Self.refused(deny, "0x7f.1", "127.0.0.1"))
        #expect(Self.refused(deny, "[::1]"))
        #expect(Self.refused(deny, "db.internal"))
        #expect(!Self.refused(deny, "internal.example", "10.0.0.1"))
        let allow = AddressPolicy(allow: try ["10.0.0.0/8", "api.partner.example"].map(AddressPolicy.parse))
        #expect(!Self.refused(allow, "svc", "10.2.3.4"))
        #expect(!Self.refused(allow, "api.partner.example", "203.0.113.9"), "an allowed name may resolve anywhere not denied")
        #expect(Self.refused(allow, "other.example", "203.0.113.9"))
        #expect(Self.refused(allow, "svc", "169.254.1.1"), "deny rules still win")
        #expect(throws: AddressPolicy.InvalidRule.self) { _ = try AddressPolicy.parse("10.0.0.0/33") }
        #expect(throws: AddressPolicy.InvalidRule.self) { _ = try AddressPolicy.parse("not a host!") }
    }

    @Test func urlAuthoritiesAndRedaction() {
        #expect(URLText.authority("http://User:Pw@Example.COM:8080/x?y")?.origin == "http://example.com:8080")
        #expect(URLText.authority("https://[::1]/")?.origin == "https://[::1]:443")
        #expect(URLText.authority("http://a.example./")?.host == "a.example")
        #expect(URLText.authority("ftp://x/") == nil)
        #expect(URLText.authority("http://host:99999/") == nil)
        #expect(URLText.authority("http://svc.corp%2Einternal/") == nil, "libcurl would decode it to another name than the policy saw")
        #expect(URLText.authority("http://bücher.example/") == nil, "IDN is written as punycode")
        #expect(URLText.authority("HTTPS://[FE80::1]:8443?q")?.origin == "https://[fe80::1]:8443")
        #expect(URLText.authority("http://a:b@c@host.example#f")?.origin == "http://host.example:80", "credentials end at the last @")
        for bad in ["http://", "http://[]/", "http://[::1/", "http://[::g]/", "http://host:0/", "http://host:/", "http://host:80x/", "http://[::1]x/"] {
            #expect(URLText.authority(bad) == nil, "\(bad)")
        }
        #expect(TaskParser.urlProblem("http://svc.corp%2Einternal/x")?.contains("not plain ASCII") == true)
        #expect(TaskParser.urlProblem("http://xn--bcher-kva.example/x") == nil)
        #expect(URLText.redacted("ftp://bob:hunter2@files.example/x") == "ftp://***@files.example/x")
        #expect(!URLText.redacted("http://bob:hun/ter@2@files.example/x").contains("ter"), "a password with / and @ is hidden whole")
        #expect(AMQPConfiguration.redact("amqp://u:p@ss@rabbit:5672/%2F") == "amqp://u:***@rabbit:5672/%2F")
        #expect(AMQPConfiguration.redact("amqp://u:secret@rabbit/v?heartbeat=5") == "amqp://u:***@rabbit/v?heartbeat=5")
    }
}

@Suite struct OutsideInputTests {
    @Test func retryAfterOfAnySizeNeverTraps() {
        #expect(RetryPolicy.parseRetryAfter("9223372036854775807") == RetryPolicy.maxRetryAfter)
        #expect(RetryPolicy.parseRetryAfter("99999999999999999999999999") == RetryPolicy.maxRetryAfter)
        #expect(RetryPolicy.parseRetryAfter("120") == .seconds(120))
        #expect(RetryPolicy.parseRetryAfter("Fri, 31 Dec 9999 23:59:59 GMT") == RetryPolicy.maxRetryAfter)
        #expect(RetryPolicy.parseRetryAfter("-5") == nil)
        let tiers: [TimeSpan] = [.seconds(1), .seconds(5), .minutes(10)]
        #expect(RetryPolicy.tier(forRetry: 1, retryAfter: .seconds(Int64.max), tiers: tiers) == .minutes(10))
        #expect(RetryPolicy.tier(forRetry: Int.max, retryAfter: nil, tiers: tiers, jitter: false) == .minutes(10))
    }

    @Test func jsonTextMustBeUTF8() {
        func valid(_ bytes: [UInt8]) -> Bool { JSONScan.isValid(bytes) }
        #expect(valid(Array(#"{"name":"Zoë 🚀"}"#.utf8)))
        #expect(!valid([0x22, 0xFF, 0x22]), "a byte that starts no UTF-8 sequence")
        #expect(!valid([0x22, 0xC0, 0xAF, 0x22]), "an overlong form")
        #expect(!valid([0x22, 0xED, 0xA0, 0x80, 0x22]), "an encoded surrogate")
        #expect(!valid([0x22, 0xF4, 0x90, 0x80, 0x80, 0x22]), "past U+10FFFF")
        #expect(!valid([0x22, 0xE2, 0x82, 0x22]), "a cut sequence")
        guard case .failure(let malformed) = TaskParser.parse([0x7B, 0x22, 0x63, 0xFF, 0x22, 0x3A, 0x31, 0x7D], messageId: "t", defaults: TaskDefaults())
        else {
            Issue.record("a task that is not UTF-8 was accepted")
            return
        }
        #expect(malformed.reason.contains("invalid UTF-8"))
        // A callback's answer that is not UTF-8 becomes a JSON string, never raw bytes.
        let result = BridgeEngine.resultJSON([0x6F, 0x6B, 0xFF, 0xFE])
        #expect(JSONScan.isValid(result))
        #expect(String(validating: result, as: UTF8.self) != nil)
    }

    @Test func notBeforeIsAtMostThirtyDaysAhead() {
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        let far = #"{"callbackUrl":"http://a/","notBefore":"9999-12-31T23:59:59Z"}"#
        guard case .failure(let malformed) = TaskParser.parse(Array(far.utf8), messageId: "t", defaults: TaskDefaults(), now: now) else {
            Issue.record("a notBefore in year 9999 was accepted")
            return
        }
        #expect(malformed.reason.contains("more than 30 days ahead"))
        let near = #"{"callbackUrl":"http://a/","notBefore":1800086400}"#
        #expect((try? TaskParser.parse(Array(near.utf8), messageId: "t", defaults: TaskDefaults(), now: now).get())?.due == .at(unixMilliseconds: 1_800_086_400_000))
        #expect(RFC3339.unixMilliseconds("2026-12-01T12:00:00.250+01:00") == 1_796_122_800_250)
        #expect(RFC3339.unixMilliseconds("2026-13-01T12:00:00Z") == nil)
    }

    @Test func taskIdsFitEveryHeaderAndMessageIdDerivedFromThem() {
        #expect(TaskParser.safeId(String(repeating: "a", count: 200)) != nil)
        #expect(TaskParser.safeId(String(repeating: "a", count: 201)) == nil, "room for ':result' in a 255-byte message_id")
        #expect(TaskParser.safeId("a\r\nX-Evil: 1") == nil)
        #expect(TaskParser.safeId("a\u{2028}b") == nil)
        #expect(TaskParser.safeId("") == nil)
    }

    @Test func logLinesCannotBeForged() {
        let forged = LogfmtHandler.quote("x\rts=2026 level=critical msg=\"pwned\"\u{2028}y\u{85}z")
        #expect(!forged.contains("\r"))
        #expect(!forged.contains("\n"))
        #expect(!forged.unicodeScalars.contains { $0.value == 0x2028 || $0.value == 0x85 })
        #expect(forged.hasPrefix("\"") && forged.hasSuffix("\""))
        #expect(forged.contains("\\r"))
        #expect(LogfmtHandler.quote("plain") == "plain")
        #expect(LogfmtHandler.quote("a\\b") == "\"a\\\\b\"")
    }

    @Test func copiesLeaveOutThePublishersRoutingAndBookkeeping() {
        for key in ["CC", "bcc", "x-death", "X-First-Death-Queue", "aq-kind", "aq-attempt", "retry-tier"] {
            #expect(BridgeEngine.isReservedHeader(key), "\(key)")
        }
        for key in ["traceparent", "tenant", "x"] { #expect(!BridgeEngine.isReservedHeader(key), "\(key)") }
    }

    @Test func aHeaderLineWithCRLFNeverReachesTheWire() {
        let http = CurlMulti()
        var outcome: Result<HTTPAnswer, HTTPError>?
        http.start(HTTPRequest(url: "http://127.0.0.1:1/x", headers: ["AsyncQueue-Task-Id: a\r\nX-Evil: 1"])) { outcome = $0 }
        guard case .failure(let error)? = outcome else {
            Issue.record("the request was started")
            return
        }
        #expect(error.kind == .invalidRequest)
        let refused = CurlMulti(policy: AddressPolicy())
        var refusal: Result<HTTPAnswer, HTTPError>?
        refused.start(HTTPRequest(url: "http://169.254.169.254/latest/meta-data/")) { refusal = $0 }
        guard case .failure(let denied)? = refusal else {
            Issue.record("a request to the metadata address was started")
            return
        }
        #expect(denied.kind == .refused)
        #expect(RetryPolicy.classify(.failure(denied), timeout: .seconds(1)) == .permanent(reason: "the URL is not allowed: \(denied.message)", status: nil))
    }
}
