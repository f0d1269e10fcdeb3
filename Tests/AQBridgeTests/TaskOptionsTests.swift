import AMQPClient
import AQBridge
import AQHTTP
import AQTestSupport
import AsyncQueue
import Foundation
import Synchronization
import Testing

/// The task options users ask for first — failure-only webhooks, delays, replies over AMQP — and
/// the failures that used to happen in silence.
@Suite(.serialized, .timeLimit(.minutes(3))) struct TaskOptionsTests {
    @Test func aFailureWebhookHearsOnlyAboutFailures() async throws {
        let receiver = try Receiver()
        receiver.on("/refuses") { _, _ in .text("no such mailbox", status: 422) }
        let bridge = try await BridgeHarness.start()
        let aq = try await AsyncQueue(connection: bridge.connection)
        // Seed step 1: fire-and-forget, told only of permanent failures.
        let fine = try await aq.tasks.create(callbackUrl: receiver.url("/ok"), payload: ["n": 1], failureWebhookUrl: receiver.url("/on-task-failed"), retries: 3)
        let failing = try await aq.tasks.create(callbackUrl: receiver.url("/refuses"), payload: ["n": 2], failureWebhookUrl: receiver.url("/on-task-failed"), retries: 3)
        // Both: successes to one endpoint, failures to the other.
        let both = try await aq.tasks.create(callbackUrl: receiver.url("/ok"), payload: ["n": 3], webhookUrl: receiver.url("/done"),
                                             failureWebhookUrl: receiver.url("/failed"))
        let bothFailing = try await aq.tasks.create(callbackUrl: receiver.url("/refuses"), payload: ["n": 4], webhookUrl: receiver.url("/done"),
                                                    failureWebhookUrl: receiver.url("/failed"))
        let told = try await receiver.wait("/on-task-failed", count: 1)
        _ = try await receiver.wait("/done", count: 1)
        _ = try await receiver.wait("/failed", count: 1)
        try await bridge.waitIdle()
        _ = fine
        #expect(receiver.requests("/on-task-failed").count == 1, "the success stayed silent")
        #expect(told[0].request.json?["taskId"] as? String == failing)
        #expect(told[0].request.json?["status"] as? String == "failed")
        #expect(receiver.requests("/done").map { $0.request.json?["taskId"] as? String } == [both])
        #expect(receiver.requests("/failed").map { $0.request.json?["taskId"] as? String } == [bothFailing])
        await bridge.stop()
    }

    @Test func aDelayedCallbackDoesNotRunBeforeItIsDue() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let published = ContinuousClock.now
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/later"))","payload":{},"delay":2.5}"#)
        let notBefore = Date(timeIntervalSince1970: Date().addingTimeInterval(3).timeIntervalSince1970.rounded(.up))
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/at"))","payload":{},"notBefore":"\#(Self.rfc3339(notBefore))"}"#)
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/now"))","payload":{}}"#)
        let now = try await receiver.wait("/now", count: 1)
        #expect(now[0].at - published < .seconds(2), "a task without a delay is not held")
        let later = try await receiver.wait("/later", count: 1)
        #expect(later[0].at - published >= .milliseconds(2500))
        let at = try await receiver.wait("/at", count: 1)
        let arrived = Date().addingTimeInterval(-(ContinuousClock.now - at[0].at).seconds)
        #expect(arrived.timeIntervalSince(notBefore) >= -0.05, "ran \(notBefore.timeIntervalSince(arrived)) s before notBefore")
        #expect(bridge.service.metrics.value(.tasksDelayed) >= 2)
        #expect(later[0].request.header("AsyncQueue-Attempt") == "1", "waiting is not an attempt")
        await bridge.stop()
    }

    @Test func aDelayedTaskParkedForMemoryKeepsItsDelayFromItsFirstArrival() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/heavy", by: .seconds(4))
        let bridge = try await BridgeHarness.start { $0.maxInFlightBytes = 100_000 }
        let blob = String(repeating: "x", count: 200_000)
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/heavy"))","payload":{"blob":"\#(blob)"}}"#)
        _ = try await receiver.wait("/heavy", count: 1)  // recorded on arrival: it runs
        // Over the budget: parked unread, with no AMQP timestamp of its own to count from.
        let published = ContinuousClock.now
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/later"))","payload":{},"delay":3}"#)
        let later = try await receiver.wait("/later", count: 1, timeout: .seconds(30))
        #expect(bridge.service.metrics.value(.tasksParked) >= 1)
        #expect(later[0].at - published >= .seconds(3), "not before its delay")
        // Parked twice in the 3 s tier while the heavy task runs, it is due when it comes back
        // (about 6 s); a delay counted again from its return would run it at 9 s or later.
        #expect(later[0].at - published < .seconds(8), "ran \(later[0].at - published) after it was published")
        await bridge.stop()
    }

    @Test func aDelayIsHeldInTheBrokerAcrossABridgeRestart() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let published = ContinuousClock.now
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/later"))","payload":{},"delay":4}"#)
        try await waitForMetric(bridge, .tasksDelayed, atLeast: 1)
        bridge.service.stop()
        _ = try? await bridge.runTask.value
        let second = try await bridge.anotherBridge()
        let later = try await receiver.wait("/later", count: 1)
        #expect(later[0].at - published >= .seconds(4))
        #expect(receiver.requests("/later").count == 1)
        second.service.stop()
        _ = try? await second.task.value
        await bridge.stop()
    }

    @Test func theOutcomeIsPublishedToReplyTo() async throws {
        let receiver = try Receiver()
        receiver.on("/work") { _, _ in .json(#"{"answer":42}"#) }
        let bridge = try await BridgeHarness.start()
        let replies = try await bridge.connection.openChannel()
        let replyQueue = try await replies.declareQueue("", durable: false, exclusive: true).name
        let aq = try await AsyncQueue(connection: bridge.connection)
        let id = try await aq.tasks.create(callbackUrl: receiver.url("/work"), payload: ["q": 1], replyTo: replyQueue, correlationId: "corr-7")
        var iterator = try await replies.consume(replyQueue, noAck: true).makeAsyncIterator()
        let reply = try #require(try await iterator.next())
        #expect(reply.properties.correlationId == "corr-7")
        #expect(reply.properties.messageId == "\(id):result")
        #expect(reply.properties.userId == "guest", "the broker vouches that the bridge sent it")
        let body = try #require(try JSONSerialization.jsonObject(with: Data(reply.body)) as? [String: Any])
        #expect(body["taskId"] as? String == id)
        #expect(body["status"] as? String == "completed")
        #expect((body["result"] as? [String: Any])?["answer"] as? Int == 42)
        await bridge.stop()
    }

    @Test func aReplyToQueueThatDoesNotExistIsADeadLetterNotALoss() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let aq = try await AsyncQueue(connection: bridge.connection)
        let id = try await aq.tasks.create(callbackUrl: receiver.url("/ok"), payload: ["q": 1], webhookUrl: receiver.url("/hook"),
                                           replyTo: "reply.no-such-queue", correlationId: "c1")
        _ = try await receiver.wait("/hook", count: 1)
        try await bridge.waitIdle()
        let dead = try #require(try await bridge.deadLetters().first)
        #expect(dead.properties.headers?["aq-reason"]?.stringValue == "reply-undeliverable")
        #expect(dead.properties.headers?["aq-reply-to"]?.stringValue == "reply.no-such-queue")
        #expect(dead.properties.correlationId == "c1")
        #expect((try JSONSerialization.jsonObject(with: Data(dead.body)) as? [String: Any])?["taskId"] as? String == id)
        #expect(bridge.service.metrics.value(.repliesFailed) == 1)
        await bridge.stop()
    }

    @Test func aMalformedTaskStillTellsItsPublisher() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let replies = try await bridge.connection.openChannel()
        let replyQueue = try await replies.declareQueue("", durable: false, exclusive: true).name
        let id = try await bridge.publish(#"{"payload":{"x":1},"webhookUrl":"\#(receiver.url("/hook"))","retries":"many"}"#)
        try await bridge.channel.publish(Array(#"{"callbackUrl":"not a url","failureWebhookUrl":"\#(receiver.url("/failed"))"}"#.utf8),
                                         exchange: "aq.tasks", routingKey: "default",
                                         properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent,
                                                                    correlationId: "c-9", replyTo: replyQueue))
        let hook = try await receiver.wait("/hook", count: 1)
        let body = try #require(hook[0].request.json)
        #expect(body["taskId"] as? String == id)
        #expect(body["status"] as? String == "failed")
        let error = try #require(body["error"] as? [String: Any])
        #expect(error["reason"] as? String == "malformed")
        #expect(error["message"] as? String == "callbackUrl is missing")
        let failed = try await receiver.wait("/failed", count: 1)
        #expect(((failed[0].request.json?["error"] as? [String: Any])?["message"] as? String)?.contains("callbackUrl must be an http") == true)
        #expect((failed[0].request.json?["taskId"] as? String)?.hasPrefix("body-") == true, "a stable id for a message without one")
        var iterator = try await replies.consume(replyQueue, noAck: true).makeAsyncIterator()
        let reply = try #require(try await iterator.next())
        #expect(reply.properties.correlationId == "c-9")
        #expect(reply.bodyString.contains(#""reason":"malformed""#))
        try await bridge.waitIdle()
        #expect(try await bridge.deadLetters().count == 2, "and each is dead-lettered")
        await bridge.stop()
    }

    @Test func aTaskForNoWorkQueueIsDeadLetteredAndReported() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/never"))","payload":{},"webhookUrl":"\#(receiver.url("/hook"))"}"#, queue: "reprots")
        let hook = try await receiver.wait("/hook", count: 1)
        let error = try #require(hook[0].request.json?["error"] as? [String: Any])
        #expect(error["reason"] as? String == "unrouted")
        #expect((error["message"] as? String)?.contains("no work queue named 'reprots'") == true)
        try await bridge.waitIdle()
        #expect(try await bridge.depth("aq.unrouted") == 0, "nothing waits unnoticed")
        let dead = try #require(try await bridge.deadLetters().first)
        #expect(dead.properties.headers?["aq-reason"]?.stringValue == "unrouted")
        #expect(receiver.requests("/never").isEmpty)
        #expect(bridge.service.metrics.value(.tasksUnrouted) == 1)
        await bridge.stop()
    }

    @Test func theSwiftClientRefusesAQueueThatIsNotAWorkQueue() async throws {
        let bridge = try await BridgeHarness.start()
        let aq = try await AsyncQueue(connection: bridge.connection)
        do {
            _ = try await aq.tasks.create(callbackUrl: "http://127.0.0.1:1/x", payload: ["a": 1], queue: "reprots")
            Issue.record("a task for a queue that does not exist was published")
        } catch let error as AMQPError {
            #expect(error.code == .invalidArgument)
            #expect(error.message.contains("'reprots' is not a work queue"))
        }
        _ = try await aq.tasks.create(callbackUrl: "http://127.0.0.1:1/x", payload: ["a": 1], retries: 0, queue: "reports")
        #expect(try await bridge.depth("aq.unrouted") == 0)
        await bridge.stop()
    }

    static func rfc3339(_ date: Date) -> String {
        var seconds = time_t(date.timeIntervalSince1970)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02dZ", parts.tm_year + 1900, parts.tm_mon + 1, parts.tm_mday, parts.tm_hour, parts.tm_min, parts.tm_sec)
    }
}

extension Duration {
    var seconds: Double { Double(self.components.seconds) + Double(self.components.attoseconds) / 1e18 }
}

/// What a publisher can aim the bridge at, and what a hanging webhook host can hold.
@Suite(.serialized, .timeLimit(.minutes(3))) struct ReviewFindingsTests {
    @Test func replyToMayNameOnlyReplyQueues() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let victim = try await bridge.connection.openChannel()
        try await victim.declareQueue("billing.commands", durable: false, exclusive: true)
        let aq = try await AsyncQueue(connection: bridge.connection)
        _ = try await aq.tasks.create(callbackUrl: receiver.url("/ok"), payload: ["x": 1], failureWebhookUrl: receiver.url("/failed"),
                                      replyTo: "billing.commands")
        let failed = try await receiver.wait("/failed", count: 1)
        #expect(((failed[0].request.json?["error"] as? [String: Any])?["message"] as? String)?.contains("is not allowed") == true)
        #expect(receiver.requests("/ok").isEmpty, "the task did not run")
        #expect(try await victim.declareQueue("billing.commands", passive: true).messageCount == 0, "nothing was published into another application's queue")
        await bridge.stop()
    }

    @Test func aHangingWebhookHostDoesNotHoldThePrefetchWindow() async throws {
        let receiver = try Receiver(), hanging = try Receiver()
        hanging.on("/hook") { _, _ in nil }  // never answers
        let bridge = try await BridgeHarness.start { config in
            config.prefetch = 4
            config.maxPerHost = 1
            config.maxHostWait = .seconds(1)
            config.webhookTimeout = .seconds(60)
        }
        for n in 0..<6 {
            try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/fast"))","payload":{"n":\#(n)},"webhookUrl":"\#(hanging.url("/hook"))"}"#)
        }
        _ = try await receiver.wait("/fast", count: 4)
        // The window (4) is full of tasks waiting for the hanging webhook host; parking their
        // webhooks as webhook jobs lets the next tasks in.
        for n in 0..<5 { try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/other"))","payload":{"n":\#(n)}}"#) }
        _ = try await receiver.wait("/other", count: 5, timeout: .seconds(30))
        #expect(bridge.service.metrics.value(.tasksParked) >= 1)
        #expect(receiver.requests("/fast").count == 6, "each callback ran once; only the webhooks wait")
        await bridge.stop()
    }

    @Test func theHealthServerRefusesABody() async throws {
        let bridge = try await BridgeHarness.start()
        let port = try #require(bridge.service.healthPort)
        let response = try await BlockingHTTP.request(method: "POST", url: "http://127.0.0.1:\(port)/healthz", body: [UInt8](repeating: 0x61, count: 100_000))
        #expect(response.status == 413)
        await bridge.stop()
    }
}
