import AMQPClient
import AQBridge
import AQHTTP
import AQTestSupport
import AsyncQueue
import Foundation
import Synchronization
import Testing

@Suite(.serialized, .timeLimit(.minutes(3))) struct BridgeEndToEndTests {
    @Test func fireAndForgetPostsThePayloadExactlyAndAcks() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let id = try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/send-welcome-email"))","payload":{"userId":42,"email":"ada@example.com","note":"a } and \"quotes\""}}"#)
        let calls = try await receiver.wait("/send-welcome-email", count: 1)
        let request = calls[0].request
        #expect(request.method == "POST")
        #expect(request.bodyString == #"{"userId":42,"email":"ada@example.com","note":"a } and \"quotes\""}"#)
        #expect(request.header("Content-Type") == "application/json")
        #expect(request.header("webhook-id") == id)
        #expect(request.header("AsyncQueue-Task-Id") == id)
        #expect(request.header("AsyncQueue-Attempt") == "1")
        try await bridge.waitIdle()
        #expect(try await bridge.depth("aq.work.default") == 0)
        #expect(try await bridge.depth("aq.dead") == 0)
        #expect(bridge.service.metrics.value(.tasksCompleted) == 1)
        await bridge.stop()
    }

    @Test func requestReplyDeliversTheCallbacksJSONAsResult() async throws {
        let receiver = try Receiver()
        receiver.on("/generate-report") { request, _ in
            let jobId = (request.json?["jobId"] as? String) ?? "?"
            return .json(#"{"jobId":"\#(jobId)","reportUrl":"https://files.example/\#(jobId).pdf"}"#)
        }
        let bridge = try await BridgeHarness.start()
        let aq = try await AsyncQueue(connection: bridge.connection)
        let id = try await aq.tasks.create(
            callbackUrl: receiver.url("/generate-report"), payload: ["jobId": "job-7", "params": ["year": 2026]],
            webhookUrl: receiver.url("/on-report-ready"), retries: 2, timeout: 120)
        let hooks = try await receiver.wait("/on-report-ready", count: 1)
        let body = try #require(hooks[0].request.json)
        #expect(body["taskId"] as? String == id)
        #expect(body["status"] as? String == "completed")
        #expect(body["attempts"] as? Int == 1)
        let result = try #require(body["result"] as? [String: Any])
        #expect(result["jobId"] as? String == "job-7")
        #expect(result["reportUrl"] as? String == "https://files.example/job-7.pdf")
        #expect(hooks[0].request.header("webhook-id") == "\(id):result")
        try await bridge.waitIdle()
        #expect(receiver.requests("/on-report-ready").count == 1, "never a webhook per attempt")
        await bridge.stop()
    }

    @Test func retriesThatSucceedAtTheThirdAttempt() async throws {
        let receiver = try Receiver()
        receiver.on("/flaky") { _, nth in nth < 3 ? .text("busy", status: 503) : .json(#"{"done":true}"#) }
        let bridge = try await BridgeHarness.start()
        let id = try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/flaky"))","payload":{"n":1},"webhookUrl":"\#(receiver.url("/hook"))","retries":3}"#)
        let hook = try await receiver.wait("/hook", count: 1)
        let calls = receiver.requests("/flaky")
        #expect(calls.count == 3)
        #expect(calls.map { $0.request.header("AsyncQueue-Attempt") } == ["1", "2", "3"])
        #expect(Set(calls.map { $0.request.header("webhook-id") }) == [id], "the idempotency key stays the same")
        // Backoff through the tiers: 1s, then 3s.
        #expect(calls[1].at - calls[0].at >= .milliseconds(900))
        #expect(calls[2].at - calls[1].at >= .milliseconds(2900))
        let body = try #require(hook[0].request.json)
        #expect(body["status"] as? String == "completed")
        #expect(body["attempts"] as? Int == 3)
        #expect((body["result"] as? [String: Any])?["done"] as? Bool == true)
        try await bridge.waitIdle()
        #expect(bridge.service.metrics.value(.tasksRetried) == 2)
        await bridge.stop()
    }

    @Test func retriesExhaustedDeadLettersThenTellsTheWebhook() async throws {
        let receiver = try Receiver()
        receiver.on("/down") { _, _ in .text("down for maintenance", status: 500) }
        let bridge = try await BridgeHarness.start()
        let id = try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/down"))","payload":{},"webhookUrl":"\#(receiver.url("/on-task-failed"))","retries":1}"#)
        let hook = try await receiver.wait("/on-task-failed", count: 1)
        #expect(receiver.requests("/down").count == 2)
        let body = try #require(hook[0].request.json)
        #expect(body["taskId"] as? String == id)
        #expect(body["status"] as? String == "failed")
        #expect(body["attempts"] as? Int == 2)
        let error = try #require(body["error"] as? [String: Any])
        #expect(error["status"] as? Int == 500)
        #expect(error["body"] as? String == "down for maintenance")
        #expect(error["reason"] as? String == "retries-exhausted")
        #expect(error["message"] as? String == "HTTP 500")
        try await bridge.waitIdle()
        let dead = try await bridge.deadLetters()
        #expect(dead.count == 1)
        let headers = try #require(dead.first?.properties.headers)
        #expect(headers["aq-reason"]?.stringValue == "retries-exhausted")
        #expect(headers["aq-attempts"]?.intValue == 2)
        #expect(headers["aq-last-status"]?.intValue == 500)
        #expect(headers["aq-task-id"]?.stringValue == id)
        #expect(dead.first?.properties.messageId == id)
        await bridge.stop()
    }

    @Test func fireAndForgetFailureWithoutWebhookOnlyDeadLetters() async throws {
        let receiver = try Receiver()
        receiver.on("/gone") { _, _ in .text("no", status: 410) }
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/gone"))","payload":1,"retries":5}"#)
        try await bridge.waitDepth("aq.dead", 1)
        #expect(receiver.requests("/gone").count == 1, "410 is not retried")
        let dead = try await bridge.deadLetters()
        #expect(dead.first?.properties.headers?["aq-reason"]?.stringValue == "not-retryable")
        await bridge.stop()
    }

    @Test func retryAfterIsHonoured() async throws {
        let receiver = try Receiver()
        receiver.on("/limited") { _, nth in nth == 1 ? HTTPServer.Response(status: 429, headers: [("Retry-After", "3")]) : .json("{}") }
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/limited"))","payload":{},"retries":2}"#)
        let calls = try await receiver.wait("/limited", count: 2)
        // Without Retry-After the first retry waits in the 1s tier; with "3" it waits in the 3s tier.
        #expect(calls[1].at - calls[0].at >= .milliseconds(2900))
        await bridge.stop()
    }

    @Test func nonRetryableAnswersAndTheNoRetryHeaderFailAtOnce() async throws {
        let receiver = try Receiver()
        receiver.on("/bad") { _, _ in .json(#"{"error":"invalid"}"#, status: 422) }
        receiver.on("/stop") { _, _ in HTTPServer.Response(status: 503, headers: [("AsyncQueue-No-Retry", "true")]) }
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/bad"))","payload":{},"webhookUrl":"\#(receiver.url("/hook"))","retries":3}"#)
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/stop"))","payload":{},"retries":3}"#)
        let hook = try await receiver.wait("/hook", count: 1)
        #expect((hook[0].request.json?["error"] as? [String: Any])?["status"] as? Int == 422)
        try await bridge.waitDepth("aq.dead", 2)
        #expect(receiver.requests("/bad").count == 1)
        #expect(receiver.requests("/stop").count == 1)
        await bridge.stop()
    }

    @Test func aCallbackThatNeverAnswersTimesOut() async throws {
        let receiver = try Receiver()
        receiver.on("/slow") { _, _ in nil }  // never answers
        let bridge = try await BridgeHarness.start()
        let start = ContinuousClock.now
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/slow"))","payload":{},"webhookUrl":"\#(receiver.url("/hook"))","retries":0,"timeout":1}"#)
        let hook = try await receiver.wait("/hook", count: 1)
        #expect(ContinuousClock.now - start >= .milliseconds(900))
        let error = try #require(hook[0].request.json?["error"] as? [String: Any])
        #expect((error["message"] as? String)?.contains("no answer within 1s") == true)
        #expect(error["status"] is NSNull)
        await bridge.stop()
    }

    @Test func aWebhookThatFailsTwiceIsRetriedWithoutRunningTheCallbackAgain() async throws {
        let receiver = try Receiver()
        receiver.on("/work") { _, _ in .json(#"{"v":1}"#) }
        receiver.on("/hook") { _, nth in nth <= 2 ? .text("no", status: 502) : .json("{}") }
        let bridge = try await BridgeHarness.start()
        let id = try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/work"))","payload":{},"webhookUrl":"\#(receiver.url("/hook"))"}"#)
        let hooks = try await receiver.wait("/hook", count: 3)
        #expect(receiver.requests("/work").count == 1)
        #expect(Set(hooks.map { $0.request.bodyString }).count == 1, "the same body each time")
        #expect(Set(hooks.map { $0.request.header("webhook-id") }) == ["\(id):result"])
        #expect(hooks.map { $0.request.header("AsyncQueue-Attempt") } == ["1", "2", "3"])
        try await bridge.waitIdle()
        #expect(receiver.requests("/hook").count == 3)
        #expect(try await bridge.depth("aq.dead") == 0)
        await bridge.stop()
    }

    @Test func aWebhookThatNeverAcceptsIsDeadLetteredWithItsBody() async throws {
        let receiver = try Receiver()
        receiver.on("/hook") { _, _ in .text("no", status: 503) }
        let bridge = try await BridgeHarness.start { $0.webhookAttempts = 2 }
        let id = try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/work"))","payload":{},"webhookUrl":"\#(receiver.url("/hook"))"}"#)
        try await bridge.waitDepth("aq.dead", 1)
        #expect(receiver.requests("/hook").count == 2)
        #expect(receiver.requests("/work").count == 1)
        let dead = try #require(try await bridge.deadLetters().first)
        let headers = try #require(dead.properties.headers)
        #expect(headers["aq-reason"]?.stringValue == "webhook-failed")
        #expect(headers["aq-task-id"]?.stringValue == id)
        #expect(headers["aq-attempts"]?.intValue == 2)
        #expect(headers["aq-last-status"]?.intValue == 503)
        #expect(headers["aq-webhook-url"]?.stringValue == receiver.url("/hook"))
        #expect(dead.properties.messageId == "\(id):result")
        let body = try #require(try JSONSerialization.jsonObject(with: Data(dead.body)) as? [String: Any])
        #expect(body["status"] as? String == "completed", "the webhook's body is kept for a replay")
        await bridge.stop()
    }

    @Test func malformedTasksAreDeadLetteredWithTheReasonAndTheBridgeCarriesOn() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start { $0.maxPayloadBytes = 2000 }
        let cases: [(String, String)] = [
            ("not json at all", "not a JSON object"),
            ("[1,2,3]", "expected a JSON object"),
            (#"{"payload":{}}"#, "callbackUrl is missing"),
            (#"{"callbackUrl":"ftp://files.example/x","payload":{}}"#, "must be an http or https URL"),
            (#"{"callbackUrl":42,"payload":{}}"#, "callbackUrl must be a string"),
            (#"{"callbackUrl":"http://127.0.0.1:1/x","retries":"3"}"#, "retries must be a whole number"),
            (#"{"callbackUrl":"http://127.0.0.1:1/x","timeout":-5}"#, "timeout must be a positive number"),
            (#"{"callbackUrl":"http://127.0.0.1:1/x","webhookUrl":"not a url"}"#, "webhookUrl must be an http or https URL"),
            (#"{"callbackUrl":"http://127.0.0.1:1/x","payload":{"unterminated":}"#, "not a JSON object"),
        ]
        for (body, _) in cases { try await bridge.publish(body) }
        // Over max_payload_bytes: never read into memory; rejected to the dead letters whole.
        let oversized = #"{"callbackUrl":"http://127.0.0.1:1/x","payload":""# + String(repeating: "x", count: 3000) + #""}"#
        try await bridge.publish(oversized)
        // A good task after the bad ones still works.
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/ok"))","payload":{}}"#)
        _ = try await receiver.wait("/ok", count: 1)
        try await bridge.waitDepth("aq.dead", UInt32(cases.count + 1))
        let dead = try await bridge.deadLetters()
        #expect(dead.count == cases.count + 1)
        let rejected = dead.first { $0.body == Array(oversized.utf8) }
        #expect(rejected?.properties.headers?["x-first-death-reason"]?.stringValue == "rejected", "the broker dead-lettered the unread task")
        #expect(bridge.service.metrics.value(.tasksUnreadable) == 1)
        for (index, (body, reason)) in cases.enumerated() {
            let letter = dead.first { $0.body == Array(body.utf8) }
            #expect(letter?.properties.headers?["aq-reason"]?.stringValue == "malformed", "case \(index)")
            #expect(letter?.properties.headers?["aq-error"]?.stringValue?.contains(reason) == true,
                    "case \(index): \(letter?.properties.headers?["aq-error"]?.stringValue ?? "nothing")")
        }
        #expect(bridge.service.metrics.value(.tasksMalformed) == cases.count)
        await bridge.stop()
    }

    @Test func unreachableHostsDNSFailuresAndHugeAnswersEndInADocumentedFailure() async throws {
        let receiver = try Receiver()
        receiver.on("/huge") { _, _ in .text(String(repeating: "x", count: 200_000)) }
        let bridge = try await BridgeHarness.start { $0.maxResponseBytes = 100_000 }
        try await bridge.publish(#"{"callbackUrl":"http://127.0.0.1:1/refused","payload":{},"webhookUrl":"\#(receiver.url("/h1"))","retries":1}"#)
        try await bridge.publish(#"{"callbackUrl":"http://no-such-host.invalid/x","payload":{},"webhookUrl":"\#(receiver.url("/h2"))","retries":0}"#)
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/huge"))","payload":{},"webhookUrl":"\#(receiver.url("/h3"))","retries":3}"#)
        let refused = try await receiver.wait("/h1", count: 1)[0].request.json?["error"] as? [String: Any]
        #expect((refused?["message"] as? String)?.contains("could not connect") == true)
        let dns = try await receiver.wait("/h2", count: 1)[0].request.json?["error"] as? [String: Any]
        #expect((dns?["message"] as? String)?.contains("DNS") == true)
        let huge = try await receiver.wait("/h3", count: 1)[0].request.json?["error"] as? [String: Any]
        #expect((huge?["message"] as? String)?.contains("exceeded 100000 bytes") == true)
        #expect(receiver.requests("/huge").count == 1, "a huge answer is not retried")
        // TLS spoken to a plain HTTP server: no handshake completes; a documented, retryable failure.
        try await bridge.publish(#"{"callbackUrl":"https://127.0.0.1:\#(receiver.port)/tls","payload":{},"webhookUrl":"\#(receiver.url("/h4"))","retries":0,"timeout":2}"#)
        let tls = try await receiver.wait("/h4", count: 1)[0].request.json?["error"] as? [String: Any]
        #expect(tls?["status"] is NSNull)
        #expect(tls?["retryable"] as? Bool == true, "\(tls ?? [:])")
        // A server that accepts and closes at once (connection reset / empty reply).
        let closer = try ClosingListener()
        try await bridge.publish(#"{"callbackUrl":"http://127.0.0.1:\#(closer.port)/x","payload":{},"webhookUrl":"\#(receiver.url("/h5"))","retries":1}"#)
        let reset = try await receiver.wait("/h5", count: 1)[0].request.json?["error"] as? [String: Any]
        #expect(reset?["retryable"] as? Bool == true, "\(reset ?? [:])")
        #expect(closer.accepted.load(ordering: .relaxed) >= 2, "tried twice")
        try await bridge.waitIdle()
        let reasons = try await bridge.deadLetters().compactMap { $0.properties.headers?["aq-reason"]?.stringValue }.sorted()
        #expect(reasons == ["not-retryable", "retries-exhausted", "retries-exhausted", "retries-exhausted", "retries-exhausted"])
        await bridge.stop()
    }

    @Test func healthReadinessAndMetrics() async throws {
        let bridge = try await BridgeHarness.start()
        let port = try #require(bridge.service.healthPort)
        #expect(try await BlockingHTTP.request(method: "GET", url: "http://127.0.0.1:\(port)/healthz").status == 200)
        #expect(try await BlockingHTTP.request(method: "GET", url: "http://127.0.0.1:\(port)/readyz").status == 200)
        let metrics = try await BlockingHTTP.request(method: "GET", url: "http://127.0.0.1:\(port)/metrics").bodyString
        #expect(metrics.contains("# TYPE aq_bridge_tasks_completed_total counter"))
        #expect(metrics.contains("aq_bridge_amqp_connected 1"))
        await bridge.stop()
    }
}

/// Accepts TCP connections on 127.0.0.1 and closes each at once.
final class ClosingListener: Sendable {
    let port: Int
    let accepted = Atomic<Int>(0)
    private let fd: Int32

    init() throws {
        (self.fd, self.port) = try TestEnvironment.listenOnLoopback()
        let thread = Thread { [self] in
            while true {
                let client = accept(self.fd, nil, nil)
                guard client >= 0 else { return }
                self.accepted.add(1, ordering: .relaxed)
                var linger = Glibc.linger(l_onoff: 1, l_linger: 0)  // RST, not FIN
                _ = setsockopt(client, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
                close(client)
            }
        }
        thread.start()
    }

    deinit { shutdown(self.fd, Int32(SHUT_RDWR)); close(self.fd) }
}

@Suite(.serialized, .timeLimit(.minutes(2))) struct BridgeRecoveryTests {
    @Test func theBridgeReconnectsByItselfAndCarriesOn() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/before"))","payload":{}}"#)
        _ = try await receiver.wait("/before", count: 1)
        // Close the bridge's connection from the broker side.
        let listing = try TestEnvironment.rabbitmqctl("-q", "list_connections", "pid", "vhost", "client_properties")
        let line = try #require(listing.split(separator: "\n").first { $0.contains("\t\(bridge.vhost)\t") && $0.contains("aq-bridge") })
        try TestEnvironment.rabbitmqctl("close_connection", String(line.split(separator: "\t")[0]), "test: broker restart")
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/after"))","payload":{},"webhookUrl":"\#(receiver.url("/hook"))"}"#)
        _ = try await receiver.wait("/after", count: 1)
        _ = try await receiver.wait("/hook", count: 1)
        try await bridge.waitIdle()
        #expect(try await bridge.depth("aq.work.default") == 0)
        await bridge.stop()
    }
}

