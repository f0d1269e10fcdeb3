import AMQPClient
@testable import AQBridge
import AQTestSupport
import Foundation
import Testing

/// Lifecycle events on aq.events, against the real broker.
@Suite(.serialized, .timeLimit(.minutes(2))) struct LifecycleEventTests {
    /// A queue bound to aq.events with `pattern`, read as events arrive.
    final class Watch {
        var iterator: AMQPConsumer.AsyncIterator
        /// Every event read so far, in order.
        var seen: [[String: Any]] = []

        init(_ bridge: BridgeHarness, _ pattern: String) async throws {
            let queue = "events-\(UInt32.random(in: 0...UInt32.max))"
            _ = try await bridge.channel.declareQueue(queue, durable: false, exclusive: true)
            try await bridge.channel.bindQueue(queue, to: "aq.events", routingKey: pattern)
            self.iterator = try await bridge.channel.consume(queue, exclusive: true, noAck: true).makeAsyncIterator()
        }

        /// The next `count` events of `taskId` (the suite's time limit bounds the wait).
        func events(of taskId: String, count: Int) async throws -> [[String: Any]] {
            var found: [[String: Any]] = []
            while found.count < count, let message = try await self.iterator.next() {
                guard let event = try JSONSerialization.jsonObject(with: Data(message.body)) as? [String: Any] else { continue }
                self.seen.append(event)
                if event["taskId"] as? String == taskId { found.append(event) }
            }
            return found
        }
    }

    @Test func theEventsOfOneTaskComeInOrder() async throws {
        let receiver = try Receiver()
        receiver.on("/flaky") { _, nth in nth == 1 ? .text("busy", status: 503) : .json(#"{"ok":true}"#) }
        let bridge = try await BridgeHarness.start { $0.events = .all }
        let watch = try await Watch(bridge, "#.default")
        let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/flaky"))","webhookUrl":"\#(receiver.url("/hook"))","retries":2,"traceparent":"\#(trace)"}"#, id: "ev-1")
        let events = try await watch.events(of: "ev-1", count: 5)
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
        let watch = try await Watch(bridge, "#")
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/ok"))"}"#, id: "fine")
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/no"))"}"#, id: "broken")
        let events = try await watch.events(of: "broken", count: 2)
        #expect(events.map { $0["event"] as? String } == ["task.failed", "task.dead-lettered"])
        #expect(events[0]["reason"] as? String == "not-retryable")
        // One more failure, published after "fine" ended: every event "fine" could have caused
        // comes before its events.
        try await bridge.waitIdle()
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/no"))"}"#, id: "last")
        _ = try await watch.events(of: "last", count: 1)
        let others = watch.seen.filter { $0["taskId"] as? String == "fine" }.count
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
