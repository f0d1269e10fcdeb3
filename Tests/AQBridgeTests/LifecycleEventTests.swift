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

        /// The next `count` events of `taskId` (or of the chain of that id; the suite's time
        /// limit bounds the wait).
        func events(of taskId: String, count: Int) async throws -> [[String: Any]] {
            var found: [[String: Any]] = []
            while found.count < count, let message = try await self.iterator.next() {
                guard let event = try JSONSerialization.jsonObject(with: Data(message.body)) as? [String: Any] else { continue }
                self.seen.append(event)
                if event["taskId"] as? String == taskId || event["chainId"] as? String == taskId { found.append(event) }
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

    /// A batch's progress as its outcomes are folded, then its end; a chain's steps, then its end.
    @Test func batchesAndChainsReportProgressAndTheirEnd() async throws {
        let receiver = try Receiver()
        receiver.on("/ok") { _, _ in .json(#"{"v":1}"#) }
        receiver.on("/later") { _, nth in nth == 1 ? .text("busy", status: 503) : .json(#"{"v":2}"#) }
        let bridge = try await BridgeHarness.start { $0.events = .all }
        // The batch's webhook job is a task too (its id is the batch's): batch events only.
        let watch = try await Watch(bridge, "batch.#"), chains = try await Watch(bridge, "chain.#")
        let children = [#"{"callbackUrl":"\#(receiver.url("/ok"))"}"#, #"{"callbackUrl":"\#(receiver.url("/ok"))"}"#,
                        #"{"callbackUrl":"\#(receiver.url("/later"))"}"#]
        try await bridge.publish(#"{"batch":{"id":"ev-b","webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(children.joined(separator: ","))]}"#)
        // The batch's events carry its id as taskId: progress (once or more: outcomes are folded
        // as they come), then the end.
        var batch: [[String: Any]] = []
        while batch.last?["event"] as? String != "batch.ended" { batch += try await watch.events(of: "ev-b", count: 1) }
        let progress = batch.dropLast()
        #expect(!progress.isEmpty && progress.allSatisfy { $0["event"] as? String == "batch.progress" && $0["size"] as? Int == 3 && $0["failed"] as? Int == 0 }, "\(batch)")
        #expect(progress.last?["settled"] as? Int == 2, "the last child is retried first: \(batch)")
        #expect(batch.last?["settled"] as? Int == 3 && batch.last?["status"] as? String == "completed")

        let steps = [#"{"callbackUrl":"\#(receiver.url("/ok"))"}"#, #"{"callbackUrl":"\#(receiver.url("/ok"))"}"#]
        try await bridge.publish(#"{"chain":{"id":"ev-c","webhookUrl":"\#(receiver.url("/chain-done"))"},"payload":{},"steps":[\#(steps.joined(separator: ","))]}"#)
        let chain = try await chains.events(of: "ev-c", count: 3)
        #expect(chain.map { $0["event"] as? String } == ["chain.step-completed", "chain.step-completed", "chain.completed"], "\(chain)")
        #expect(chain.map { $0["step"] as? Int } == [1, 2, nil] && chain[2]["steps"] as? Int == 2, "\(chain)")
        await bridge.stop()
    }
}
