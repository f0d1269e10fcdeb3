import AMQPClient
@testable import AQBridge
import AQTestSupport
import Foundation
import Synchronization
import Testing

/// `aq dlq` as an operator runs it (the built binary), against the real broker and a bridge.
@Suite(.serialized, .timeLimit(.minutes(4))) struct DeadLetterCommandTests {
    func aq(_ bridge: BridgeHarness, _ arguments: [String]) throws -> (status: Int32, out: String, err: String) {
        try TestEnvironment.run(TestEnvironment.builtProgram("aq"), ["dlq"] + arguments + ["--url", bridge.amqpURL, "-f", bridge.topologyDir.path])
    }

    @Test func listShowReplayAndPurgeAFailureAsAnOperatorWould() async throws {
        let receiver = try Receiver()
        let healthy = Atomic<Bool>(false)
        receiver.on("/charge") { _, _ in healthy.load(ordering: .relaxed) ? .json(#"{"charged":true}"#) : .text("card declined", status: 422) }
        receiver.on("/s1") { _, _ in .json(#"{"reserved":true}"#) }
        let bridge = try await BridgeHarness.start()
        for i in 1...3 {
            try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/charge"))","webhookUrl":"\#(receiver.url("/hook"))","payload":{"n":\#(i)}}"#, id: "t-\(i)")
        }
        let steps = [#"{"callbackUrl":"\#(receiver.url("/s1"))"}"#, #"{"callbackUrl":"\#(receiver.url("/charge"))"}"#]
        try await bridge.publish(#"{"chain":{"id":"c1","webhookUrl":"\#(receiver.url("/done"))"},"payload":{},"steps":[\#(steps.joined(separator: ","))]}"#)
        try await bridge.publish(#"{"payload":{"no":"callback"}}"#, id: "bad-1")
        try await bridge.waitDepth("aq.dead", 5)
        try await bridge.waitIdle()

        // list: every letter, nothing taken away, the same order twice.
        let list = try self.aq(bridge, ["list"])
        #expect(list.status == 0, "\(list.err)")
        #expect(list.out.contains("5 dead letter(s) in aq.dead; 5 matching, 5 shown: not-retryable 4, malformed 1"), "\(list.out)")
        for id in ["t-1", "t-2", "t-3", "c1:2", "bad-1"] { #expect(list.out.contains(id), "\(id) listed") }
        #expect(list.out.contains("HTTP 422") && list.out.contains("422  "), "\(list.out)")
        #expect(try self.aq(bridge, ["list"]).out == list.out, "reading did not disturb the order")
        #expect(try await bridge.depth("aq.dead") == 5)
        let json = try self.aq(bridge, ["list", "--reason", "malformed", "--json"])
        let lines = json.out.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        #expect(lines.count == 2 && lines[0]["taskId"] as? String == "bad-1" && lines[0]["reason"] as? String == "malformed")
        #expect((lines[1]["summary"] as? [String: Any])?["matching"] as? Int == 1)
        #expect(try self.aq(bridge, ["list", "--task", "t-*", "--limit", "2"]).out.contains("3 matching, 2 shown"))

        // show: one letter whole, its chain context.
        let show = try self.aq(bridge, ["show", "c1:2"])
        #expect(show.status == 0, "\(show.err)")
        #expect(show.out.contains("chain c1, step 2") && show.out.contains("aq-reason: not-retryable") && show.out.contains("\"reserved\" : true"), "\(show.out)")
        #expect(try self.aq(bridge, ["show", "nope"]).status == 1)

        // replay: the cause fixed, the tasks run again, the chain resumes at step 2.
        healthy.store(true, ordering: .relaxed)
        let dry = try self.aq(bridge, ["replay", "--dry-run"])
        #expect(dry.out.contains("would replay 4 of 5") && dry.out.contains("left 1: malformed"), "\(dry.out)")
        #expect(try await bridge.depth("aq.dead") == 5)
        let replay = try self.aq(bridge, ["replay"])
        #expect(replay.status == 0 && replay.out.contains("replayed 4 of 5"), "\(replay.out)\(replay.err)")
        // The webhooks heard of the failures first, now of the successes.
        let hooks = try await receiver.wait("/hook", count: 6).dropFirst(3)
        #expect(Set(hooks.compactMap { $0.request.header("AsyncQueue-Task-Id") }) == ["t-1", "t-2", "t-3"])
        #expect(hooks.allSatisfy { ($0.request.json?["result"] as? [String: Any])?["charged"] as? Bool == true })
        let done = try await receiver.wait("/done", count: 2)
        #expect(done[0].request.json?["status"] as? String == "failed" && done[1].request.json?["status"] as? String == "completed")
        #expect(receiver.requests("/s1").count == 1, "the chain resumed at step 2")
        try await bridge.waitIdle()
        #expect(try await bridge.depth("aq.dead") == 1)

        // purge: counted first, deleted with --yes.
        let count = try self.aq(bridge, ["purge"])
        #expect(count.status == 2 && count.out.contains("1 of 1 dead letter(s) match (malformed 1)"), "\(count.out)")
        #expect(try await bridge.depth("aq.dead") == 1)
        let purge = try self.aq(bridge, ["purge", "--reason", "malformed", "--yes"])
        #expect(purge.status == 0 && purge.out.contains("deleted 1 of 1"), "\(purge.out)")
        #expect(try await bridge.depth("aq.dead") == 0)
        await bridge.stop()
    }

    @Test func aReplayKilledThreeTimesLosesNothingAndRepeatsNothing() async throws {
        let receiver = try Receiver()
        receiver.on("/ok") { _, _ in .json("{}") }
        let bridge = try await BridgeHarness.start()
        // 400 dead letters as the bridge writes them.
        let count = 400
        for i in 0..<count {
            let headers: AMQPTable = ["aq-reason": "retries-exhausted", "aq-queue": "default", "aq-task-id": .string("r-\(i)"), "aq-attempts": .int32(4),
                                      "aq-error": "HTTP 503", "aq-dead-lettered-at": .timestamp(UInt64(Date().timeIntervalSince1970))]
            try await bridge.channel.publish(#"{"callbackUrl":"\#(receiver.url("/ok"))","payload":{"i":\#(i)}}"#, exchange: "aq.dlx", routingKey: "aq.work.default",
                                             properties: AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent, messageId: "r-\(i)", userId: try AMQPConfiguration(url: bridge.amqpURL).user))
        }
        try await bridge.waitDepth("aq.dead", UInt32(count))
        // Replay slowly, kill -9 it three times at different points.
        var killedAt: [Int] = []
        for round in 1...3 {
            let process = Process()
            process.executableURL = TestEnvironment.builtProgram("aq")
            process.arguments = ["dlq", "replay", "--rate", "400", "--window", "16", "--url", bridge.amqpURL, "-f", bridge.topologyDir.path]
            process.standardOutput = FileHandle.nullDevice
            try process.run()
            _ = try await receiver.wait("/ok", count: round * count / 5 + 7 * round)
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            killedAt.append(receiver.requests("/ok").count)
            // The broker gives the dead run's unacked letters back once it sees its connection
            // closed: wait until aq.dead's depth holds still (AMQP shows no unacked count).
            var last: UInt32 = .max, still = 0
            while still < 5 {
                let depth = try await bridge.depth("aq.dead")
                still = depth == last ? still + 1 : 0
                last = depth
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        #expect(killedAt.last ?? count < count, "killed before the end (\(killedAt) callbacks)")
        // Run again to the end: every letter replayed once, none left.
        let again = try self.aq(bridge, ["replay"])
        #expect(again.status == 0, "\(again.out)\(again.err)")
        _ = try await receiver.wait("/ok", count: count)
        try await bridge.waitIdle()
        let left = try await bridge.depth("aq.dead")
        #expect(left == 0, "killed at \(killedAt) callbacks, second run: \(again.out)")
        let ids = receiver.requests("/ok").compactMap { $0.request.header("AsyncQueue-Task-Id") }
        #expect(Set(ids) == Set((0..<count).map { "r-\($0)" }), "nothing lost")
        #expect(ids.count == count, "nothing twice: \(ids.count - count) callbacks more than letters (killed at \(killedAt))")
        await bridge.stop()
    }
}

extension DeadLetterCommandTests {
    /// RabbitMQ 3.10 applies a channel's acks to a quorum queue asynchronously: the last window's
    /// acks, sent just before the channel closed, were lost (30 letters came back after a replay).
    @Test func aReplayRemovesEveryLetterItReplayedTheLastWindowToo() async throws {
        let receiver = try Receiver()
        receiver.on("/ok") { _, _ in .json("{}") }
        let bridge = try await BridgeHarness.start()
        let count = 400
        for i in 0..<count {
            let headers: AMQPTable = ["aq-reason": "retries-exhausted", "aq-queue": "default", "aq-task-id": .string("r-\(i)")]
            try await bridge.channel.publish(#"{"callbackUrl":"\#(receiver.url("/ok"))","payload":{"i":\#(i)}}"#, exchange: "aq.dlx", routingKey: "aq.work.default",
                                             properties: AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent, messageId: "r-\(i)", userId: try AMQPConfiguration(url: bridge.amqpURL).user))
        }
        try await bridge.waitDepth("aq.dead", UInt32(count))
        let again = try self.aq(bridge, ["replay", "--window", "64"])
        _ = try await receiver.wait("/ok", count: count)
        let left = try await bridge.depth("aq.dead")
        #expect(left == 0, "\(again.out) \(again.err)")
        await bridge.stop()
    }
}

extension DeadLetterCommandTests {
    /// More letters than one consumer may hold (5,000): the scan reads them through several
    /// channels, all of them, and removes exactly the ones asked for.
    @Test func aQueueLargerThanOneConsumerIsReadWhole() async throws {
        let bridge = try await BridgeHarness.start()
        try await bridge.channel.enableConfirms()
        let count = 11_000
        let user = try AMQPConfiguration(url: bridge.amqpURL).user  // as the bridge writes them
        var pending: [AMQPPublishConfirm] = []
        for i in 0..<count {
            let headers: AMQPTable = ["aq-reason": .string(i % 2 == 0 ? "not-retryable" : "malformed"), "aq-queue": "default", "aq-task-id": .string("big-\(i)")]
            pending.append(bridge.channel.beginPublish(Array(#"{"callbackUrl":"http://127.0.0.1:9/x"}"#.utf8), exchange: "aq.dlx", routingKey: "aq.work.default",
                                                       properties: AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent, userId: user)))
            if pending.count >= 500 {
                for confirm in pending { _ = try await confirm.result() }
                pending.removeAll()
            }
        }
        for confirm in pending { _ = try await confirm.result() }
        try await bridge.waitDepth("aq.dead", UInt32(count))
        let list = try self.aq(bridge, ["list", "--limit", "1"])
        #expect(list.out.contains("11000 dead letter(s) in aq.dead; 11000 matching, 1 shown: malformed 5500, not-retryable 5500"), "\(list.out)\(list.err)")
        #expect(try await bridge.depth("aq.dead") == UInt32(count))
        let purge = try self.aq(bridge, ["purge", "--reason", "malformed", "--yes"])
        #expect(purge.out.contains("deleted 5500 of 11000"), "\(purge.out)\(purge.err)")
        let left = try await bridge.depth("aq.dead")
        #expect(left == 5500, "\(left) letters left")
        await bridge.stop()
    }
}

extension DeadLetterCommandTests {
    @Test func aWebhookThatWasGivenUpIsReplayedAsTheWebhookOnly() async throws {
        let receiver = try Receiver()
        let healthy = Atomic<Bool>(false)
        receiver.on("/cb") { _, _ in .json(#"{"made":1}"#) }
        receiver.on("/hook") { _, _ in healthy.load(ordering: .relaxed) ? .json("{}") : .text("down", status: 500) }
        let bridge = try await BridgeHarness.start { $0.webhookAttempts = 1 }
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/cb"))","webhookUrl":"\#(receiver.url("/hook"))"}"#, id: "wh-1")
        try await bridge.waitDepth("aq.dead", 1)
        try await bridge.waitIdle()
        #expect(try self.aq(bridge, ["list"]).out.contains("webhook-failed"))
        healthy.store(true, ordering: .relaxed)
        let replay = try self.aq(bridge, ["replay"])
        #expect(replay.out.contains("replayed 1 of 1"), "\(replay.out)\(replay.err)")
        let hooks = try await receiver.wait("/hook", count: 2)
        #expect((hooks[1].request.json?["result"] as? [String: Any])?["made"] as? Int == 1)
        #expect(hooks[1].request.header("webhook-id") == "wh-1:result")
        try await bridge.waitIdle()
        #expect(receiver.requests("/cb").count == 1, "the callback did not run again")
        #expect(try await bridge.depth("aq.dead") == 0)
        await bridge.stop()
    }
}

extension DeadLetterCommandTests {
    /// A letter whose work queue was deleted stays (exit status 1); the others are replayed.
    @Test func aLetterWhoseQueueIsGoneStaysAndTheOthersAreReplayed() async throws {
        let receiver = try Receiver()
        receiver.on("/ok") { _, _ in .json("{}") }
        let bridge = try await BridgeHarness.start()
        let user = try AMQPConfiguration(url: bridge.amqpURL).user
        for (id, queue) in [("gone-1", "reports"), ("here-1", "default")] {
            let headers: AMQPTable = ["aq-reason": "retries-exhausted", "aq-queue": .string(queue), "aq-task-id": .string(id)]
            try await bridge.channel.publish(#"{"callbackUrl":"\#(receiver.url("/ok"))"}"#, exchange: "aq.dlx", routingKey: "aq.work.\(queue)",
                                             properties: AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent, messageId: id, userId: user))
        }
        try await bridge.waitDepth("aq.dead", 2)
        _ = try await bridge.channel.deleteQueue("aq.work.reports")
        let replay = try self.aq(bridge, ["replay"])
        #expect(replay.status == 1, "\(replay.out)")
        #expect(replay.err.contains("gone-1: queue 'aq.work.reports' does not exist; the dead letter stays"), "\(replay.err)")
        #expect(replay.out.contains("replayed 1 of 2") && replay.out.contains("1 could not be published"), "\(replay.out)")
        let done = try await receiver.wait("/ok", count: 1)
        #expect(done.first?.request.header("AsyncQueue-Task-Id") == "here-1")
        let left = try self.aq(bridge, ["list", "--json"])
        #expect(left.out.contains("\"gone-1\"") && !left.out.contains("\"here-1\""), "\(left.out)")
        await bridge.stop()
    }
}

extension DeadLetterCommandTests {
    /// More letters left behind than one consumer may hold (malformed ones stay unacknowledged)
    /// while others are replayed in transactions: the acks a transaction holds count against the
    /// prefetch until the commit, so the scan must open its next channel in time. It hung here.
    @Test func aReplayThatLeavesMoreThanAChannelHoldsFinishes() async throws {
        let receiver = try Receiver()
        receiver.on("/ok") { _, _ in .json("{}") }
        let bridge = try await BridgeHarness.start()
        try await bridge.channel.enableConfirms()
        let user = try AMQPConfiguration(url: bridge.amqpURL).user
        var pending: [AMQPPublishConfirm] = []
        let stays = 5_100, tasks = 300
        for i in 0..<(stays + tasks) {
            // Mostly malformed ones with a task every 18th letter, so tasks sit in open transactions.
            let isTask = i % 18 == 17 && i / 18 < tasks
            let headers: AMQPTable = ["aq-reason": .string(isTask ? "retries-exhausted" : "malformed"), "aq-queue": "default", "aq-task-id": .string("s-\(i)")]
            let body = isTask ? #"{"callbackUrl":"\#(receiver.url("/ok"))"}"# : "{}"
            pending.append(bridge.channel.beginPublish(Array(body.utf8), exchange: "aq.dlx", routingKey: "aq.work.default",
                                                       properties: AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent, userId: user)))
            if pending.count >= 500 {
                for confirm in pending { _ = try await confirm.result() }
                pending.removeAll()
            }
        }
        for confirm in pending { _ = try await confirm.result() }
        let replayed = (stays + tasks) / 18
        try await bridge.waitDepth("aq.dead", UInt32(stays + tasks))
        let replay = try TestEnvironment.run(URL(fileURLWithPath: "/usr/bin/timeout"),
                                             ["60", TestEnvironment.builtProgram("aq").path, "dlq", "replay", "--url", bridge.amqpURL, "-f", bridge.topologyDir.path])
        #expect(replay.status == 0 && replay.out.contains("replayed \(replayed) of \(stays + tasks)"), "status \(replay.status): \(replay.out)\(replay.err)")
        _ = try await receiver.wait("/ok", count: replayed)
        await bridge.stop()
    }
}

extension DeadLetterCommandTests {
    /// A failed child replayed while its batch is open re-joins it: its new outcome replaces the
    /// failure in the batch's count and report. Once the batch has ended, a child stays.
    @Test func aFailedChildReplayedIntoItsOpenBatchReplacesItsFailure() async throws {
        let receiver = try Receiver()
        let fixed = Atomic<Bool>(false), slowReady = Atomic<Bool>(false)
        receiver.on("/ok") { _, _ in .json(#"{"n":0}"#) }
        receiver.on("/flaky") { _, _ in fixed.load(ordering: .relaxed) ? .json(#"{"n":1}"#) : .text("bad input", status: 422) }
        // Keeps the batch open (retried every 1-3 s) until the replayed child has re-joined.
        receiver.on("/slow") { _, _ in slowReady.load(ordering: .relaxed) ? .json(#"{"n":2}"#) : .text("busy", status: 503) }
        let bridge = try await BridgeHarness.start()
        let tasks = [#"{"callbackUrl":"\#(receiver.url("/ok"))"}"#, #"{"callbackUrl":"\#(receiver.url("/flaky"))"}"#,
                     #"{"callbackUrl":"\#(receiver.url("/slow"))","retries":3}"#]
        try await bridge.publish(#"{"batch":{"id":"b-rejoin","webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(tasks.joined(separator: ","))]}"#)
        try await bridge.waitDepth("aq.dead", 1)
        let list = try self.aq(bridge, ["list", "--json"])
        #expect(list.out.contains("\"b-rejoin:1\""), "\(list.out)")
        fixed.store(true, ordering: .relaxed)
        let replay = try self.aq(bridge, ["replay"])
        #expect(replay.status == 0 && replay.out.contains("replayed 1 of 1"), "\(replay.out)\(replay.err)")
        _ = try await receiver.wait("/flaky", count: 2)
        // Its outcome is in the batch's reply queue, ahead of the last child's.
        try await waitForMetric(bridge, .batchOutcomes, atLeast: 3)
        slowReady.store(true, ordering: .relaxed)
        let done = try await receiver.wait("/done", count: 1)
        let report = try #require(done[0].request.json)
        #expect(report["counts"] as? [String: Int] == ["completed": 3, "failed": 0, "skipped": 0], "\(report)")
        let children = try #require(report["children"] as? [[String: Any]])
        #expect(children.map { $0["status"] as? String } == ["completed", "completed", "completed"])
        #expect((children[1]["result"] as? [String: Int]) == ["n": 1] && children[1]["rejoined"] as? Bool == true)
        #expect(try await bridge.depth("aq.dead") == 0)

        // The batch has ended: a child of it that fails again stays where it is.
        let user = try AMQPConfiguration(url: bridge.amqpURL).user
        let headers: AMQPTable = ["aq-reason": "retries-exhausted", "aq-queue": "default", "aq-task-id": "b-rejoin:1",
                                  "aq-batch": "b-rejoin", "aq-batch-index": .int64(1), "aq-batch-join": "allSettled"]
        try await bridge.channel.publish(#"{"callbackUrl":"\#(receiver.url("/flaky"))"}"#, exchange: "aq.dlx", routingKey: "aq.work.default",
                                         properties: AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent, userId: user))
        try await bridge.waitDepth("aq.dead", 1)
        let late = try self.aq(bridge, ["replay"])
        #expect(late.status == 0 && late.out.contains("replayed 0 of 1") && late.out.contains("a batch that has ended"), "\(late.out)")
        #expect(try await bridge.depth("aq.dead") == 1)
        await bridge.stop()
    }
}
