import AMQPClient
import AQBridge
import AQHTTP
import AQTestSupport
import AQTopology
import Foundation
import Synchronization
import Testing

/// The bridge against careless and hostile publishers, callbacks and neighbours: each case was a
/// crash, a loop, a task run many times, a forged result or a neighbour's task slowed or lost.
@Suite(.serialized, .timeLimit(.minutes(3))) struct HostilePeersTests {
    @Test func aRetryAfterLargerThanAnyClockDoesNotCrashTheBridge() async throws {
        let receiver = try Receiver()
        receiver.on("/rate-limited") { _, nth in
            nth == 1 ? HTTPServer.Response(status: 429, headers: [("Retry-After", "9223372036854775807")]) : .json(#"{"ok":1}"#)
        }
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/rate-limited"))","payload":{},"webhookUrl":"\#(receiver.url("/hook"))"}"#)
        let hooks = try await receiver.wait("/hook", count: 1)
        #expect(hooks[0].request.json?["status"] as? String == "completed")
        let calls = receiver.requests("/rate-limited")
        #expect(calls.count == 2)
        #expect(calls[1].at - calls[0].at >= .milliseconds(2900), "the longest tier (3 s) for a wait longer than any tier")
        await bridge.stop()
    }

    @Test func aPublishersUserIdCCAndExpirationNeverReachTheBridgesCopies() async throws {
        let receiver = try Receiver()
        receiver.on("/flaky") { _, nth in nth < 3 ? .text("busy", status: 503) : .json(#"{"done":true}"#) }
        receiver.on("/refuses") { _, _ in .text("no", status: 422) }
        let bridge = try await BridgeHarness.start()
        let app = try await bridge.appConnection()
        func publish(_ body: String, id: String) async throws {
            // user_id is the app's own login (the broker checks it); CC names a queue, which a
            // retry copy would reach when its tier dead-letters it through the default exchange;
            // expiration would make a copy vanish.
            try await app.channel.publish(Array(body.utf8), exchange: "aq.tasks", routingKey: "default", properties: AMQPProperties(
                contentType: "application/json", headers: ["CC": .array(["aq.work.reports"]), "tenant": "acme"], deliveryMode: .persistent,
                expiration: "3000", messageId: id, userId: app.user))
        }
        // Neighbours published alongside, by the bridge's own user.
        for n in 0..<20 { try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/neighbour"))","payload":{"n":\#(n)}}"#) }
        try await publish(#"{"callbackUrl":"\#(receiver.url("/flaky"))","payload":{},"retries":3}"#, id: "flaky-1")
        try await publish(#"{"callbackUrl":"\#(receiver.url("/refuses"))","payload":{}}"#, id: "refused-1")
        _ = try await receiver.wait("/neighbour", count: 20)
        let flaky = try await receiver.wait("/flaky", count: 3)
        try await bridge.waitIdle()
        #expect(flaky.map { $0.request.header("AsyncQueue-Attempt") } == ["1", "2", "3"], "each attempt ran once")
        #expect(receiver.requests("/neighbour").count == 20, "no neighbour ran twice")
        #expect(receiver.requests("/refuses").count == 1)
        #expect(try await bridge.depth("aq.work.reports") == 0, "CC did not copy the task into another queue")
        // The dead letter stays (no expiration) and is the bridge's, not the app's.
        let dead = try await bridge.deadLetters()
        #expect(dead.count == 1)
        #expect(dead.first?.properties.expiration == nil)
        #expect(dead.first?.properties.userId == "guest")
        #expect(dead.first?.properties.headers?["CC"] == nil)
        #expect(dead.first?.properties.headers?["tenant"] == .string("acme"), "the publisher's own headers are kept")
        #expect(bridge.service.metrics.value(.tasksRequeued) == 0)
        await bridge.stop()
    }

    @Test func bookkeepingHeadersFromAPublisherAreNotBelieved() async throws {
        let receiver = try Receiver()
        receiver.on("/busy") { _, _ in .text("busy", status: 503) }
        let bridge = try await BridgeHarness.start()
        let app = try await bridge.appConnection()
        // A forged webhook job: a body of the forger's choosing, to be signed and sent anywhere,
        // with a task id that would smuggle a header line.
        for userId in [app.user, nil] {
            try await app.channel.publish(Array(#"{"taskId":"victim","status":"completed","result":{"forged":true}}"#.utf8),
                                          exchange: "aq.tasks", routingKey: "default", properties: AMQPProperties(
                contentType: "application/json",
                headers: ["aq-kind": "webhook", "aq-webhook-url": .string(receiver.url("/forged")), "aq-task-id": "x\r\nX-Evil: 1",
                          "aq-attempt": 1],
                deliveryMode: .persistent, messageId: "forged", userId: userId))
        }
        // A forged attempt number: the task still gets its retries.
        try await app.channel.publish(Array(#"{"callbackUrl":"\#(receiver.url("/busy"))","payload":{},"retries":2}"#.utf8),
                                      exchange: "aq.tasks", routingKey: "default", properties: AMQPProperties(
            contentType: "application/json", headers: ["aq-attempt": 99], deliveryMode: .persistent, messageId: "t-99", userId: app.user))
        let attempts = try await receiver.wait("/busy", count: 3)
        #expect(attempts.map { $0.request.header("AsyncQueue-Attempt") } == ["1", "2", "3"])
        try await bridge.waitIdle()
        #expect(receiver.requests("/forged").isEmpty, "nothing was sent for the forged webhook jobs")
        let dead = try await bridge.deadLetters()
        let reasons = dead.map { $0.properties.headers?["aq-reason"]?.stringValue ?? "?" }
        #expect(reasons.sorted() == ["malformed", "malformed", "retries-exhausted"], "\(reasons)")
        await bridge.stop()
    }

    @Test func tasksThatAreNotUTF8AreDeadLetteredAndAnswersThatAreNotAreQuoted() async throws {
        let receiver = try Receiver()
        receiver.on("/latin1") { _, _ in HTTPServer.Response(status: 200, headers: [("Content-Type", "text/plain")], body: [0x63, 0x61, 0x66, 0xE9]) }
        let bridge = try await BridgeHarness.start()
        var body = Array(#"{"callbackUrl":"\#(receiver.url("/never"))","payload":{"name":"caf"#.utf8)
        body += [0xE9, 0x22, 0x7D, 0x7D]  // "café" in Latin-1: not UTF-8
        try await bridge.channel.publish(body, exchange: "aq.tasks", routingKey: "default",
                                         properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: "latin1-task"))
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/latin1"))","payload":{},"webhookUrl":"\#(receiver.url("/hook"))"}"#)
        let hook = try await receiver.wait("/hook", count: 1)
        #expect(String(validating: hook[0].request.body, as: UTF8.self) != nil, "the webhook body is UTF-8")
        #expect((hook[0].request.json?["result"] as? String)?.hasPrefix("caf") == true)
        try await bridge.waitIdle()
        #expect(receiver.requests("/never").isEmpty)
        let dead = try await bridge.deadLetters()
        #expect(dead.first?.properties.headers?["aq-error"]?.stringValue?.contains("invalid UTF-8") == true)
        await bridge.stop()
    }

    @Test func aHangingHostDoesNotHoldTasksBoundElsewhere() async throws {
        let hanging = try Receiver(), healthy = try Receiver()
        hanging.on("/hang") { _, _ in nil }  // never answers
        let topology = """
            work_queues:
              default: {delivery_limit: 20, task_timeout: 60s, retries: 1, concurrency: 8}
              reports: {delivery_limit: 20, task_timeout: 60s, retries: 1, concurrency: 2}
            retry:
              tiers: [1s, 3s, 5s]
            """
        let bridge = try await BridgeHarness.start(topology: topology) { $0.maxPerHost = 3; $0.maxHostWait = .seconds(1) }
        for n in 0..<12 { try await bridge.publish(#"{"callbackUrl":"\#(hanging.url("/hang"))","payload":{"n":\#(n)}}"#) }
        _ = try await hanging.wait("/hang", count: 3)
        // The same queue, another host; another queue, another host: both go on while the
        // hanging host holds its three slots and its line.
        for n in 0..<10 {
            try await bridge.publish(#"{"callbackUrl":"\#(healthy.url("/same-queue"))","payload":{"n":\#(n)}}"#)
            try await bridge.publish(#"{"callbackUrl":"\#(healthy.url("/other-queue"))","payload":{"n":\#(n)}}"#, queue: "reports")
        }
        _ = try await healthy.wait("/same-queue", count: 10)
        _ = try await healthy.wait("/other-queue", count: 10)
        #expect(hanging.requests("/hang").count == 3, "never more than max_per_host at once")
        try await waitForMetric(bridge, .tasksParked, atLeast: 1)
        await bridge.stop()
    }

    @Test func signaturesAreMadeWhenTheRequestIsSentNotWhenItIsQueued() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/slow", by: .seconds(3))
        let secret = "whsec_" + Data("0123456789abcdef0123".utf8).base64EncodedString()
        let bridge = try await BridgeHarness.start { $0.maxPerHost = 1; $0.signingSecrets = [secret] }
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/slow"))","payload":{"first":true}}"#)
        _ = try await receiver.wait("/slow", count: 1)
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/slow"))","payload":{"second":true}}"#)
        let calls = try await receiver.wait("/slow", count: 2, timeout: .seconds(20))
        let second = calls[1]
        let arrived = Date().timeIntervalSince1970 - Double((ContinuousClock.now - second.at).components.seconds)
        let signedAt = Double(second.request.header("webhook-timestamp") ?? "0") ?? 0
        #expect(abs(arrived - signedAt) <= 1.5, "signed \(arrived - signedAt) s before it was sent")
        await bridge.stop()
    }

    @Test func callbackAddressesArePolicedWhereTheBridgeConnects() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start { $0.callbackDeny = ["127.0.0.0/8", "::1", "169.254.0.0/16"] }
        let port = receiver.port
        let urls = [
            "http://localhost:\(port)/x", "http://2130706433:\(port)/x", "http://0x7f.1:\(port)/x", "http://[::1]:\(port)/x",
            "http://169.254.169.254/latest/meta-data/",
        ]
        for url in urls { try await bridge.publish(#"{"callbackUrl":"\#(url)","payload":{}}"#) }
        try await bridge.waitDepth("aq.dead", UInt32(urls.count))
        #expect(receiver.requests("/x").isEmpty, "no refused address was ever connected to")
        for letter in try await bridge.deadLetters() {
            let headers = letter.properties.headers
            #expect(headers?["aq-reason"]?.stringValue == "not-retryable")
            #expect(headers?["aq-error"]?.stringValue?.contains("not allowed") == true, "\(headers?["aq-error"]?.stringValue ?? "")")
        }
        await bridge.stop()
    }

    @Test func theDefaultPolicyRefusesTheMetadataAddressButNotLoopback() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"callbackUrl":"http://169.254.169.254/latest/meta-data/","payload":{}}"#)
        try await bridge.publish(#"{"callbackUrl":"http://localhost:\#(receiver.port)/fine","payload":{}}"#)
        _ = try await receiver.wait("/fine", count: 1)
        try await bridge.waitDepth("aq.dead", 1)
        #expect(try await bridge.deadLetters().first?.properties.headers?["aq-error"]?.stringValue?.contains("169.254.169.254") == true)
        await bridge.stop()
    }

    @Test func memoryStaysWithinTheBudgetWhateverTheTasksWeigh() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/heavy", by: .milliseconds(200))
        let budget = 2 << 20, size = 500_000
        let bridge = try await BridgeHarness.start { $0.maxInFlightBytes = budget; $0.prefetch = 64 }
        let payload = String(repeating: "x", count: size)
        for n in 0..<16 {
            try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/heavy"))","payload":{"n":\#(n),"blob":"\#(payload)"}}"#)
        }
        _ = try await receiver.wait("/heavy", count: 16, timeout: .seconds(60))
        try await bridge.waitIdle()
        let peak = bridge.service.metrics.peakInFlightBytes.load(ordering: .relaxed)
        #expect(peak <= budget + size + 1000, "held \(peak) bytes at once with a budget of \(budget)")
        #expect(bridge.service.metrics.value(.tasksParked) > 0, "past the budget, tasks wait in the broker")
        #expect(bridge.service.metrics.value(.tasksCompleted) == 16)
        await bridge.stop()
    }
}

/// Waits until a counter reaches a value.
func waitForMetric(_ bridge: BridgeHarness, _ counter: BridgeMetrics.Counter, atLeast value: Int, timeout: Duration = .seconds(30)) async throws {
    let deadline = ContinuousClock.now + timeout
    while bridge.service.metrics.value(counter) < value {
        guard ContinuousClock.now < deadline else {
            Issue.record("\(counter.rawValue) never reached \(value) (it is \(bridge.service.metrics.value(counter)))")
            throw HarnessError(description: "timeout")
        }
        try await Task.sleep(for: .milliseconds(20))
    }
}
