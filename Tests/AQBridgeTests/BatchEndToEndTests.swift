import AMQPClient
import AQBridge
import AQHTTP
import AQTestSupport
import AsyncQueue
import Foundation
import Testing

/// Fan-out / fan-in done by the bridge, against the real broker and HTTP servers.
@Suite(.serialized, .timeLimit(.minutes(3))) struct BatchEndToEndTests {
    /// The names of the batch queues in the test's virtual host (management API).
    static func batchQueues(_ bridge: BridgeHarness) async throws -> [String] {
        let base = try AMQPConfiguration(url: BridgeHarness.baseURL)
        let response = try await BlockingHTTP.request(method: "GET", url: BridgeHarness.managementURL + "/api/queues/\(bridge.vhost)?columns=name",
                                                      username: base.user, password: base.password)
        let list = (try? JSONSerialization.jsonObject(with: Data(response.body))) as? [[String: Any]] ?? []
        return list.compactMap { $0["name"] as? String }.filter { $0.hasPrefix("aq.batch.") }.sorted()
    }

    static func waitGone(_ bridge: BridgeHarness, timeout: Duration = .seconds(15)) async throws -> [String] {
        let deadline = ContinuousClock.now + timeout
        var left = try await self.batchQueues(bridge)
        while !left.isEmpty, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(100))
            left = try await self.batchQueues(bridge)
        }
        return left
    }

    static func child(_ url: String, _ payload: String = "{}", extra: String = "") -> String {
        #"{"callbackUrl":"\#(url)","payload":\#(payload)\#(extra)}"#
    }

    @Test func allSettledReportsEveryChildInOrderOnceAndCleansUp() async throws {
        let receiver = try Receiver()
        receiver.on("/price") { request, _ in
            let symbol = request.json?["symbol"] as? String ?? "?"
            return .json(#"{"symbol":"\#(symbol)","score":\#(symbol.count)}"#)
        }
        receiver.on("/refuses") { _, _ in .text("unknown symbol", status: 422) }
        receiver.on("/unavailable") { _, _ in .text("try later", status: 503) }
        let bridge = try await BridgeHarness.start()
        // Seed step 3 as a native batch: five stocks, two of which fail (one at once, one after
        // its retries); one child keeps its own
        // webhook (the seed's on-stock-analyzed), as code migrating step by step would.
        let tasks = [
            Self.child(receiver.url("/price"), #"{"symbol":"AAPL"}"#, extra: #","webhookUrl":"\#(receiver.url("/on-stock-analyzed"))""#),
            Self.child(receiver.url("/refuses"), #"{"symbol":"XXXX"}"#),
            Self.child(receiver.url("/price"), #"{"symbol":"MSFT"}"#),
            Self.child(receiver.url("/unavailable"), #"{"symbol":"YYYY"}"#, extra: #","retries":1"#),
            Self.child(receiver.url("/price"), #"{"symbol":"GOOG"}"#, extra: #","queue":"reports""#),
        ]
        try await bridge.publish(#"{"batch":{"id":"portfolio-1","webhookUrl":"\#(receiver.url("/on-portfolio-done"))"},"tasks":[\#(tasks.joined(separator: ","))]}"#)
        let done = try await receiver.wait("/on-portfolio-done", count: 1)
        let report = try #require(done[0].request.json)
        #expect(report["batchId"] as? String == "portfolio-1")
        #expect(report["status"] as? String == "completed", "allSettled completes even when children failed")
        #expect(report["counts"] as? [String: Int] == ["completed": 3, "failed": 2, "skipped": 0])
        let children = try #require(report["children"] as? [[String: Any]])
        #expect(children.map { $0["index"] as? Int } == [0, 1, 2, 3, 4])
        #expect(children.map { $0["taskId"] as? String } == (0..<5).map { "portfolio-1:\($0)" })
        #expect(children.map { $0["status"] as? String } == ["completed", "failed", "completed", "failed", "completed"])
        #expect((children[2]["result"] as? [String: Any])?["symbol"] as? String == "MSFT")
        #expect((children[1]["error"] as? [String: Any])?["reason"] as? String == "not-retryable")
        #expect((children[3]["error"] as? [String: Any])?["reason"] as? String == "retries-exhausted")
        #expect(children[3]["attempts"] as? Int == 2 && receiver.requests("/unavailable").count == 2)
        #expect(done[0].request.header("webhook-id") == "portfolio-1", "the batch webhook's id is the batch id")
        let perChild = try await receiver.wait("/on-stock-analyzed", count: 1)
        #expect(perChild[0].request.json?["taskId"] as? String == "portfolio-1:0")
        #expect(try await Self.waitGone(bridge).isEmpty, "the batch's queues are deleted once its webhook is out")
        try await bridge.waitIdle()
        #expect(receiver.requests("/on-portfolio-done").count == 1, "one batch webhook")
        #expect(bridge.service.metrics.value(.batchesCreated) == 1 && bridge.service.metrics.value(.batchesEnded) == 1)
        await bridge.stop()
    }

    @Test func allFailsFastAndSkipsChildrenNotYetStarted() async throws {
        let receiver = try Receiver()
        receiver.on("/refuses") { _, _ in .text("no", status: 422) }
        let bridge = try await BridgeHarness.start()
        // The failing child runs at once; the others wait 3 s (a delay) and find their batch over.
        var tasks = [Self.child(receiver.url("/refuses"))]
        tasks += (0..<3).map { _ in Self.child(receiver.url("/later"), extra: #","delay":3"#) }
        let created = ContinuousClock.now
        try await bridge.publish(#"{"batch":{"id":"fast","join":"all","webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(tasks.joined(separator: ","))]}"#)
        let done = try await receiver.wait("/done", count: 1)
        #expect(done[0].at - created < .seconds(3), "the batch fails at the first failure, not when the rest are done")
        let report = try #require(done[0].request.json)
        #expect(report["status"] as? String == "failed")
        #expect(report["counts"] as? [String: Int] == ["completed": 0, "failed": 1, "skipped": 3])
        let deadline = ContinuousClock.now + .seconds(20)
        while bridge.service.metrics.value(.batchChildrenSkipped) < 3, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
        #expect(bridge.service.metrics.value(.batchChildrenSkipped) == 3)
        #expect(receiver.requests("/later").isEmpty, "skipped children never run")
        #expect(try await Self.waitGone(bridge).isEmpty)
        await bridge.stop()
    }

    @Test func aDeadlineEndsTheBatchAsExpiredWithWhatArrived() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/slow", by: .seconds(8))
        let bridge = try await BridgeHarness.start()
        let tasks = [Self.child(receiver.url("/quick")), Self.child(receiver.url("/slow"), extra: #","timeout":10"#)]
        let created = ContinuousClock.now
        try await bridge.publish(#"{"batch":{"id":"late","deadline":2,"webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(tasks.joined(separator: ","))]}"#)
        let done = try await receiver.wait("/done", count: 1)
        #expect(done[0].at - created >= .seconds(2) && done[0].at - created < .seconds(6), "ended at its deadline: \(done[0].at - created)")
        let report = try #require(done[0].request.json)
        #expect(report["status"] as? String == "expired")
        #expect(report["counts"] as? [String: Int] == ["completed": 1, "failed": 0, "pending": 1])
        #expect(((report["children"] as? [[String: Any]])?.map { $0["status"] as? String }) == ["completed", "pending"])
        #expect(try await Self.waitGone(bridge).isEmpty)
        await bridge.stop()
    }

    @Test func aBigBatchComesInPartsAndCountsEachChildOnce() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let size = 2500
        let child = Self.child(receiver.url("/work"))
        func tasks(_ count: Int) -> String { Array(repeating: child, count: count).joined(separator: ",") }
        try await bridge.publish(#"{"batch":{"id":"big","size":\#(size),"webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(tasks(1000))]}"#)
        try await bridge.publish(#"{"batchPart":{"id":"big","offset":1000},"tasks":[\#(tasks(1000))]}"#)
        // A part sent twice (a publisher retrying) runs its children again but counts them once.
        try await bridge.publish(#"{"batchPart":{"id":"big","offset":2000},"tasks":[\#(tasks(500))]}"#)
        try await bridge.publish(#"{"batchPart":{"id":"big","offset":2000},"tasks":[\#(tasks(500))]}"#)
        let done = try await receiver.wait("/done", count: 1, timeout: .seconds(90))
        let report = try #require(done[0].request.json)
        #expect(report["status"] as? String == "completed")
        #expect(report["counts"] as? [String: Int] == ["completed": size, "failed": 0, "skipped": 0])
        #expect((report["children"] as? [[String: Any]])?.map { $0["index"] as? Int } == Array(0..<size))
        #expect(try await Self.waitGone(bridge).isEmpty)
        await bridge.stop()
    }

    @Test func aMalformedBatchRunsNoChildAndIsDeadLetteredWithItsReason() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let tasks = [Self.child(receiver.url("/work")), #"{"payload":1}"#]
        try await bridge.publish(#"{"batch":{"id":"bad","webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(tasks.joined(separator: ","))]}"#, id: "bad")
        let told = try await receiver.wait("/done", count: 1)
        #expect(told[0].request.json?["status"] as? String == "failed")
        #expect(((told[0].request.json?["error"] as? [String: Any])?["message"] as? String)?.contains("tasks[1]: callbackUrl is missing") == true)
        try await bridge.waitIdle()
        let dead = try await bridge.deadLetters()
        #expect(dead.count == 1 && dead[0].properties.headers?["aq-reason"]?.stringValue == "malformed")
        #expect(receiver.requests("/work").isEmpty, "no child ran")
        #expect(try await Self.batchQueues(bridge).isEmpty, "nothing was created")
        await bridge.stop()
    }

    @Test func theSwiftClientCreatesABatchOfTwelveThousandChildren() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let aq = try await AsyncQueue(connection: bridge.connection)
        let size = 12_000  // over one message's 10,000: the client sends an opening message and a part
        let tasks = (0..<size).map { AsyncQueue.BatchTask(callbackUrl: receiver.url("/work"), payload: ["n": $0]) }
        let id = try await aq.batches.create(tasks, webhookUrl: receiver.url("/done"), deadline: 300)
        let done: [Receiver.Recorded]
        do { done = try await receiver.wait("/done", count: 1, timeout: .seconds(40)) } catch {
            Issue.record("no report: work=\(receiver.requests("/work").count) queues=\(try await Self.batchQueues(bridge)) metrics created=\(bridge.service.metrics.value(.batchesCreated)) outcomes=\(bridge.service.metrics.value(.batchOutcomes)) malformed=\(bridge.service.metrics.value(.tasksMalformed)) unreadable=\(bridge.service.metrics.value(.tasksUnreadable))")
            for queue in try await Self.batchQueues(bridge) { Issue.record("\(queue) holds \(try await bridge.depth(queue))") }
            throw error
        }
        let report = try #require(done[0].request.json)
        #expect(report["batchId"] as? String == id)
        #expect(report["counts"] as? [String: Int] == ["completed": size, "failed": 0, "skipped": 0])
        #expect(done[0].request.body.count <= 1 << 20, "the report stays within max_payload_bytes")
        #expect(report["resultsOmitted"] as? Bool == true, "12,000 results do not fit 1 MiB: they are left out, the list is whole")
        #expect((report["children"] as? [[String: Any]])?.count == size)
        #expect(receiver.requests("/work").count >= size)
        #expect(try await Self.waitGone(bridge).isEmpty)
        await bridge.stop()
    }

    @Test func theSwiftClientRefusesAnUnknownChildQueue() async throws {
        let bridge = try await BridgeHarness.start()
        let aq = try await AsyncQueue(connection: bridge.connection)
        await #expect(throws: AMQPError.self) {
            try await aq.batches.create([AsyncQueue.BatchTask(callbackUrl: "http://127.0.0.1:1/x", payload: 1, queue: "nope")])
        }
        await bridge.stop()
    }

    @Test func aqBatchStatusTellsHowFarABatchIsWithoutDisturbingIt() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/slow", by: .seconds(4))
        let bridge = try await BridgeHarness.start()
        let tasks = (0..<3).map { _ in Self.child(receiver.url("/quick")) } + [Self.child(receiver.url("/slow"))]
        try await bridge.publish(#"{"batch":{"id":"watched","join":"all","webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(tasks.joined(separator: ","))]}"#)
        _ = try await receiver.wait("/slow", count: 1)
        func status() throws -> (Int32, [String: Any]?, String) {
            let result = try TestEnvironment.run(TestEnvironment.builtProgram("aq"), [
                "batch", "status", "watched", "--json", "--url", bridge.amqpURL, "-f", bridge.topologyDir.path,
                "--management-url", BridgeHarness.managementURL,
            ])
            return (result.status, try? JSONSerialization.jsonObject(with: Data(result.out.utf8)) as? [String: Any], result.out + result.err)
        }
        // The three quick children are folded into the checkpoint within a moment.
        var seen: [String: Any]?
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            let (code, json, text) = try status()
            #expect(code == 0, "\(text)")
            seen = json
            if json?["settled"] as? Int == 3 { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(seen?["state"] as? String == "open")
        #expect(seen?["size"] as? Int == 4 && seen?["settled"] as? Int == 3 && seen?["completed"] as? Int == 3)
        #expect(seen?["join"] as? String == "all")
        // Looking did not disturb it: it completes, once.
        let done = try await receiver.wait("/done", count: 1)
        #expect(done[0].request.json?["status"] as? String == "completed")
        #expect(try await Self.waitGone(bridge).isEmpty)
        let (code, _, text) = try status()
        #expect(code == 1 && text.contains("not found"), "\(text)")
        await bridge.stop()
    }

    /// The aggregator reads its checkpoint back for a moment each time it writes one; `aq batch
    /// status` looking in that moment waits for it instead of saying there is none.
    @Test func aqBatchStatusWaitsOutACheckpointBeingReadBack() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/slow", by: .seconds(3))
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"batch":{"id":"held","webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(Self.child(receiver.url("/slow")))]}"#)
        _ = try await receiver.wait("/slow", count: 1)
        // Hold the checkpoint the way the aggregator does while it rotates it: read, unacked.
        let holder = try await bridge.connection.openChannel()
        let held = try await holder.get("aq.batch.held.state")
        #expect(held != nil)
        let (url, topology) = (bridge.amqpURL, bridge.topologyDir.path)
        let looking = Task.detached {
            try TestEnvironment.run(TestEnvironment.builtProgram("aq"), [
                "batch", "status", "held", "--json", "--url", url, "-f", topology, "--management-url", BridgeHarness.managementURL,
            ])
        }
        try await Task.sleep(for: .milliseconds(300))
        try await holder.close()  // given back, as the aggregator's nack does
        let result = try await looking.value
        #expect(result.status == 0, "\(result.out)\(result.err)")
        #expect(result.out.contains(#""batchId":"held""#) || result.out.contains(#""batchId" : "held""#), "\(result.out)")
        _ = try await receiver.wait("/done", count: 1)
        await bridge.stop()
    }

    /// While a batch's checkpoint cannot be read (another bridge reads it back that very moment),
    /// nobody can be checked against its creator: a part waits in the broker instead of being
    /// taken unchecked, and a stranger's part is refused once the checkpoint is back.
    @Test func aPartArrivingWhileTheCheckpointIsReadBackWaitsAndIsStillChecked() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/slow", by: .seconds(12))
        let bridge = try await BridgeHarness.start()
        let owner = try await bridge.appConnection()
        let stranger = try await bridge.appConnection()
        try await bridge.publish(#"{"batch":{"id":"guarded","size":2},"tasks":[\#(Self.child(receiver.url("/slow")))]}"#, as: owner)
        _ = try await receiver.wait("/slow", count: 1)
        let holder = try await bridge.connection.openChannel()
        #expect(try await holder.get("aq.batch.guarded.state") != nil)
        try await bridge.publish(#"{"batchPart":{"id":"guarded","offset":1},"tasks":[\#(Self.child(receiver.url("/intruder")))]}"#, as: stranger)
        var deadline = ContinuousClock.now + .seconds(10)
        while bridge.service.metrics.value(.tasksParked) < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(bridge.service.metrics.value(.tasksParked) == 1, "the part waits")
        try await holder.close()
        deadline = ContinuousClock.now + .seconds(20)
        while bridge.service.metrics.value(.tasksMalformed) < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
        let dead = try await bridge.deadLetters()
        #expect(dead.compactMap { $0.properties.headers?["aq-error"]?.stringValue } == ["batchPart from another publisher than the batch's creator"])
        #expect(receiver.requests("/intruder").isEmpty)
        await bridge.stop()
    }

    @Test func onlyTheCreatorMayAddPartsOrReuseTheId() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/slow", by: .seconds(2))
        let bridge = try await BridgeHarness.start()
        let owner = try await bridge.appConnection()
        let stranger = try await bridge.appConnection()
        try await bridge.publish(#"{"batch":{"id":"mine","size":2,"webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(Self.child(receiver.url("/slow")))]}"#, as: owner)
        _ = try await receiver.wait("/slow", count: 1)
        // A stranger's part (even a refused one, which would report its children as failed)
        // and a stranger's create with the same id are refused; nothing of theirs runs or counts.
        try await bridge.publish(#"{"batchPart":{"id":"mine","offset":1},"tasks":[\#(Self.child(receiver.url("/intruder")))]}"#, as: stranger)
        try await bridge.publish(#"{"batchPart":{"id":"mine","offset":1},"tasks":[{}]}"#, as: stranger)
        try await bridge.publish(#"{"batch":{"id":"mine","webhookUrl":"\#(receiver.url("/stolen"))"},"tasks":[\#(Self.child(receiver.url("/intruder")))]}"#, as: stranger)
        let deadline = ContinuousClock.now + .seconds(10)
        while bridge.service.metrics.value(.tasksMalformed) < 3, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
        #expect(bridge.service.metrics.value(.tasksMalformed) == 3)
        // The owner's part completes it.
        try await bridge.publish(#"{"batchPart":{"id":"mine","offset":1},"tasks":[\#(Self.child(receiver.url("/work")))]}"#, as: owner)
        let done = try await receiver.wait("/done", count: 1)
        #expect(done[0].request.json?["counts"] as? [String: Int] == ["completed": 2, "failed": 0, "skipped": 0])
        #expect(receiver.requests("/intruder").isEmpty)
        // The stranger is told why its create was refused; it never gets the owner's report.
        #expect(receiver.requests("/stolen").map { $0.request.json?["status"] as? String } == ["failed"])
        #expect(((receiver.requests("/stolen").first?.request.json?["error"] as? [String: Any])?["message"] as? String)?.contains("in use by another publisher") == true)
        await owner.connection.close()
        await stranger.connection.close()
        await bridge.stop()
    }

    @Test func aPartForABatchThatIsNotOpenWaitsABitThenIsDeadLettered() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"batchPart":{"id":"nobody","offset":0},"tasks":[\#(Self.child(receiver.url("/work")))]}"#, id: "orphan")
        let deadline = ContinuousClock.now + .seconds(40)
        while bridge.service.metrics.value(.tasksMalformed) < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(100)) }
        #expect(bridge.service.metrics.value(.tasksParked) == 3, "parked while its create might still be on its way")
        try await bridge.waitIdle()
        let dead = try await bridge.deadLetters()
        #expect(dead.count == 1)
        #expect(dead.first?.properties.headers?["aq-error"]?.stringValue?.contains("not open") == true)
        #expect(receiver.requests("/work").isEmpty)
        #expect(try await Self.batchQueues(bridge).isEmpty, "a stray part creates nothing")
        await bridge.stop()
    }

    @Test func aBatchCompletesWhenTheBrokerClosesTheBridgesConnectionMidBatch() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/work", by: .milliseconds(200))  // 32 at a time per host: several seconds in all
        let bridge = try await BridgeHarness.start()
        let size = 1000
        let tasks = Array(repeating: Self.child(receiver.url("/work")), count: size).joined(separator: ",")
        try await bridge.publish(#"{"batch":{"id":"bumpy","webhookUrl":"\#(receiver.url("/done"))"},"tasks":[\#(tasks)]}"#)
        // Mid-batch, with outcomes folded and held: the broker closes the bridge's connection.
        let deadline = ContinuousClock.now + .seconds(30)
        while receiver.requests("/work").count < 300, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        let listing = try TestEnvironment.rabbitmqctl("-q", "list_connections", "pid", "vhost", "client_properties")
        let line = try #require(listing.split(separator: "\n").first { $0.contains("\t\(bridge.vhost)\t") && $0.contains("aq-bridge") })
        try TestEnvironment.rabbitmqctl("close_connection", String(line.split(separator: "\t")[0]), "test: mid-batch")
        #expect(receiver.requests("/done").isEmpty, "the connection closed mid-batch")
        let done = try await receiver.wait("/done", count: 1, timeout: .seconds(90))
        try await Task.sleep(for: .seconds(1))
        let reports = receiver.requests("/done").map(\.request.body)
        #expect(Set(reports).count == 1, "a repeated report (possible after a connection loss) is the same report")
        let report = try #require(done[0].request.json)
        #expect(report["counts"] as? [String: Int] == ["completed": size, "failed": 0, "skipped": 0], "every child counted once")
        #expect(try await Self.waitGone(bridge).isEmpty)
        await bridge.stop()
    }
}
