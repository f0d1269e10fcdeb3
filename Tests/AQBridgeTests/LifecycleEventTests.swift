import AMQPClient
@testable import AQBridge
import AQTestSupport
import Foundation
import Testing

/// Lifecycle events on aq.events, against the real broker.
@Suite(.serialized, .timeLimit(.minutes(2))) struct LifecycleEventTests {
    /// The events of `taskId` in `queue` (bound to aq.events), waiting until `count` arrived.
    func events(_ channel: AMQPChannel, _ queue: String, taskId: String, count: Int) async throws -> [[String: Any]] {
        var found: [[String: Any]] = []
        let deadline = ContinuousClock.now + .seconds(20)
        while found.count < count {
            guard let message = try await channel.get(queue, noAck: true) else {
                if ContinuousClock.now > deadline { throw HarnessError(description: "only \(found.count) events for \(taskId)") }
                try await Task.sleep(for: .milliseconds(20))
                continue
            }
            if let event = try JSONSerialization.jsonObject(with: Data(message.body)) as? [String: Any], event["taskId"] as? String == taskId {
                found.append(event)
            }
        }
        return found
    }

    @Test func theEventsOfOneTaskComeInOrder() async throws {
        let receiver = try Receiver()
        receiver.on("/flaky") { _, nth in nth == 1 ? .text("busy", status: 503) : .json(#"{"ok":true}"#) }
        let bridge = try await BridgeHarness.start { $0.events = .all }
        let watch = "events-\(UInt32.random(in: 0...UInt32.max))"
        _ = try await bridge.channel.declareQueue(watch, durable: false, exclusive: true)
        try await bridge.channel.bindQueue(watch, to: "aq.events", routingKey: "#.default")
        let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/flaky"))","webhookUrl":"\#(receiver.url("/hook"))","retries":2,"traceparent":"\#(trace)"}"#, id: "ev-1")
        let events = try await self.events(bridge.channel, watch, taskId: "ev-1", count: 5)
        #expect(events.map { $0["event"] as? String } == ["task.received", "task.retried", "task.received", "task.completed", "webhook.delivered"])
        #expect(events.map { $0["attempt"] as? Int } == [1, 1, 2, 2, 1])
        #expect(events[1]["reason"] as? String == "HTTP 503" && (events[1]["delayMs"] as? Int ?? 0) > 0)
        #expect(events[3]["traceparent"] as? String == trace && events[3]["durationMs"] is Int)
        await bridge.stop()
    }

    @Test func failuresOnlyByDefaultAndTailPrintsThem() async throws {
        let receiver = try Receiver()
        receiver.on("/ok") { _, _ in .json("{}") }
        receiver.on("/no") { _, _ in .text("no", status: 422) }
        let bridge = try await BridgeHarness.start()
        let watch = "events-\(UInt32.random(in: 0...UInt32.max))"
        _ = try await bridge.channel.declareQueue(watch, durable: false, exclusive: true)
        try await bridge.channel.bindQueue(watch, to: "aq.events", routingKey: "#")
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/ok"))"}"#, id: "fine")
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/no"))"}"#, id: "broken")
        let events = try await self.events(bridge.channel, watch, taskId: "broken", count: 2)
        #expect(events.map { $0["event"] as? String } == ["task.failed", "task.dead-lettered"])
        #expect(events[0]["reason"] as? String == "not-retryable")
        try await bridge.waitIdle()
        var others = 0
        while let message = try await bridge.channel.get(watch, noAck: true) {
            if message.bodyString.contains("\"fine\"") { others += 1 }
        }
        #expect(others == 0, "a task that succeeds publishes no event with events: failures")

        // aq events tail, as an operator runs it: the failures of one queue, live.
        let process = Process()
        process.executableURL = TestEnvironment.builtProgram("aq")
        process.arguments = ["events", "tail", "--filter", "task.failed.default", "--count", "1", "--timeout", "30",
                             "--url", bridge.amqpURL, "-f", bridge.topologyDir.path]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Until tail has bound its queue and seen one, failures keep coming.
        var n = 0
        while process.isRunning, n < 100 {
            n += 1
            try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/no"))"}"#, id: "tail-\(n)")
            try await Task.sleep(for: .milliseconds(100))
        }
        process.waitUntilExit()
        let printed = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(process.terminationStatus == 0 && printed.contains(" task.failed default tail-") && printed.contains("reason=not-retryable"), "\(printed)")
        await bridge.stop()
    }
}
