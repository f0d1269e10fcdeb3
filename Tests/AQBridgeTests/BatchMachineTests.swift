import Foundation
import Testing

@testable import AQBridge

/// The batch wire format and the fan-in state machine, without a broker.
@Suite struct BatchParserTests {
    static let defaults = TaskDefaults()
    static func parse(_ json: String, messageId: String? = nil, queues: Set<String> = ["default", "reports"]) -> Result<BatchMessage, MalformedBatch> {
        BatchParser.parse(Array(json.utf8), messageId: messageId, queue: "default", defaults: Self.defaults,
                          isWorkQueue: { queues.contains($0) }, now: Date(timeIntervalSince1970: 1_000_000))
    }

    @Test func aBatchInOneMessage() throws {
        let message = try Self.parse("""
            {"batch": {"id": "p-42", "webhookUrl": "http://app/done", "join": "all", "deadline": 600},
             "tasks": [{"callbackUrl": "http://svc/a", "payload": {"s": "AAPL"}},
                       {"callbackUrl": "http://svc/b", "payload": 2, "queue": "reports", "retries": 1, "webhookUrl": "http://app/one"}]}
            """).get()
        guard case .create(let manifest) = message.kind else { Issue.record("not a create"); return }
        #expect(manifest == BatchManifest(id: "p-42", size: 2, join: .all, webhookURL: "http://app/done", deadline: 1_000_600_000,
                                          createdAt: 1_000_000_000, queue: "default"))
        #expect(message.children.map(\.index) == [0, 1])
        #expect(message.children.map(\.spec.id) == ["p-42:0", "p-42:1"], "child ids are deterministic")
        #expect(message.children.map(\.queue) == [nil, "reports"])
        #expect(message.children[1].spec.retries == 1 && message.children[1].spec.webhookURL == "http://app/one", "per-child webhooks still work")
        #expect(String(decoding: message.children[0].spec.payload, as: UTF8.self) == #"{"s": "AAPL"}"#)
    }

    @Test func theIdComesFromTheMessageIdWhenTheBodyHasNone() throws {
        let message = try Self.parse(#"{"batch": {}, "tasks": [{"callbackUrl": "http://svc/a"}]}"#, messageId: "m-1").get()
        #expect(message.batchId == "m-1")
        guard case .create(let manifest) = message.kind else { Issue.record("not a create"); return }
        #expect(manifest.join == .allSettled && manifest.deadline == nil && manifest.size == 1)
    }

    @Test func aBigBatchOpensWithItsSizeAndContinuesInParts() throws {
        let open = try Self.parse(#"{"batch": {"id": "big", "size": 25000}, "tasks": [{"callbackUrl": "http://svc/a"}]}"#).get()
        guard case .create(let manifest) = open.kind else { Issue.record("not a create"); return }
        #expect(manifest.size == 25000 && open.children.count == 1)
        let part = try Self.parse(#"{"batchPart": {"id": "big", "offset": 1}, "tasks": [{"callbackUrl": "http://svc/a"}, {"callbackUrl": "http://svc/b"}]}"#).get()
        #expect(part.kind == .part(batchId: "big", offset: 1))
        #expect(part.children.map(\.spec.id) == ["big:1", "big:2"])
    }

    @Test func badBatchesAreRefusedWholeWithAReason() {
        let cases: [(String, String)] = [
            (#"{"batch": {"id": "b", "webhookUrl": "http://app/done"}, "tasks": []}"#, "at least one child"),
            (#"{"batch": {"id": "b", "colour": "red"}, "tasks": [{"callbackUrl": "http://svc/a"}]}"#, "unknown batch option 'colour'"),
            (#"{"batch": {"id": "b"}, "tasks": [{"callbackUrl": "http://svc/a"}], "extra": 1}"#, "unknown key 'extra'"),
            (#"{"batch": {"id": "b", "join": "any"}, "tasks": [{"callbackUrl": "http://svc/a"}]}"#, "allSettled or all"),
            (#"{"batch": {"id": "b", "deadline": -1}, "tasks": [{"callbackUrl": "http://svc/a"}]}"#, "batch.deadline"),
            (#"{"batch": {"id": "b"}, "tasks": [{"callbackUrl": "http://svc/a"}, {"payload": 1}]}"#, "tasks[1]: callbackUrl is missing"),
            (#"{"batch": {"id": "b"}, "tasks": [{"callbackUrl": "http://svc/a", "taskId": "x"}]}"#, "taskId is not allowed"),
            (#"{"batch": {"id": "b"}, "tasks": [{"callbackUrl": "http://svc/a", "queue": "nope"}]}"#, "names no work queue: 'nope'"),
            (#"{"batch": {"id": "b", "size": 1}, "tasks": [{"callbackUrl": "http://svc/a"}, {"callbackUrl": "http://svc/b"}]}"#, "size is 1 but tasks holds 2"),
            (#"{"batch": {"id": "b"}, "tasks": {"callbackUrl": "http://svc/a"}}"#, "tasks must be an array"),
            (#"{"batch": {"id": "b"}, "batchPart": {"id": "b", "offset": 0}}"#, "not both"),
            (#"{"batch": {"id": "\#(String(repeating: "x", count: 193))"}, "tasks": [{"callbackUrl": "http://svc/a"}]}"#, "the batch id must be at most 192 bytes"),
        ]
        for (json, reason) in cases {
            switch Self.parse(json) {
            case .success: Issue.record("accepted: \(json)")
            case .failure(let error): #expect(error.reason.contains(reason), "\(error.reason) — wanted \(reason)")
            }
        }
    }

    @Test func aRefusedBatchStillTellsItsWebhook() {
        guard case .failure(let error) = Self.parse(#"{"batch": {"id": "b", "webhookUrl": "http://app/done", "failureWebhookUrl": "http://app/failed"}, "tasks": [{}]}"#) else {
            Issue.record("accepted"); return
        }
        #expect(error.notify == "http://app/failed")
    }

    @Test func tooManyChildrenInOneMessageAreRefusedWithTheWayOut() {
        let child = #"{"callbackUrl":"http://svc/a"}"#
        let json = #"{"batch": {"id": "b"}, "tasks": ["# + Array(repeating: child, count: BatchParser.maxChildrenPerMessage + 1).joined(separator: ",") + "]}"
        guard case .failure(let error) = Self.parse(json) else { Issue.record("accepted"); return }
        #expect(error.reason.contains("batchPart"))
    }

    @Test func aRefusedPartNamesTheChildrenItShouldHaveCarried() {
        guard case .failure(let error) = Self.parse(#"{"batchPart": {"id": "big", "offset": 100}, "tasks": [{"callbackUrl": "http://svc/a"}, {"callbackUrl": 5}, {}]}"#) else {
            Issue.record("accepted"); return
        }
        #expect(error.part?.batchId == "big" && error.part?.offset == 100 && error.part?.count == 3)
    }
}

@Suite struct BatchAggregatorTests {
    static let t0 = ContinuousClock.now

    static func manifest(size: Int, join: BatchJoin = .allSettled) -> BatchManifest {
        BatchManifest(id: "b", size: size, join: join, webhookURL: "http://app/done", createdAt: 0, queue: "default")
    }

    static func outcome(_ index: Int, _ status: ChildOutcome.Status = .completed, result: String = "1") -> AQBridge.BatchAggregator.Input {
        .outcome(ChildOutcome.make(index: index, taskId: "b:\(index)", status: status, attempts: 1,
                                   result: status == .completed ? Array(result.utf8) : nil,
                                   error: status == .failed ? Array(#"{"reason":"retries-exhausted"}"#.utf8) : nil))
    }

    @Test func bitmapsCountAndSurviveEncoding() throws {
        var bits = Bitmap(count: 130)
        #expect(bits.insert(0) && bits.insert(129) && bits.insert(64))
        #expect(!bits.insert(64) && !bits.insert(130) && !bits.insert(-1))
        #expect(bits.population == 3 && bits[129] && !bits[1])
        let decoded = try JSONDecoder().decode(Bitmap.self, from: JSONEncoder().encode(bits))
        #expect(decoded == bits && decoded.population == 3)
        var other = Bitmap(count: 130)
        other.insert(1)
        other.insert(0)
        bits.formUnion(other)
        #expect(bits.population == 4)
    }

    @Test func checkpointsRoundTripAndNonsenseIsRefused() {
        var checkpoint = BatchCheckpoint(manifest: Self.manifest(size: 10))
        checkpoint.settled.insert(3)
        checkpoint.version = 7
        #expect(BatchCheckpoint.decode(checkpoint.encoded()) == checkpoint)
        #expect(BatchCheckpoint.decode(Array("{}".utf8)) == nil)
        #expect(BatchCheckpoint.decode(Array(#"{"version":1}"#.utf8)) == nil)
    }

    @Test func outcomesAreReadBack() {
        let made = ChildOutcome.make(index: 4, taskId: "b:4", status: .failed, attempts: 3, result: nil, error: Array(#"{"reason":"x"}"#.utf8))
        #expect(ChildOutcome.parse(made.json) == made)
        #expect(ChildOutcome.parse(Array(#"{"index":-1,"status":"completed"}"#.utf8)) == nil)
        #expect(ChildOutcome.parse(Array(#"{"index":1,"status":"maybe"}"#.utf8)) == nil)
        #expect(ChildOutcome.parse(Array(#"{"index":1.5,"status":"completed"}"#.utf8)) == nil)
        #expect(ChildOutcome.parse(Array("[1]".utf8)) == nil)
    }

    @Test func allSettledEndsWhenEveryChildHasAnOutcomeAndCountsEachOnce() {
        var policy = BatchAggregator.Policy()
        policy.maxPending = 2
        let (initial, start) = BatchAggregator.restore(BatchCheckpoint(manifest: Self.manifest(size: 3)), policy: policy, now: Self.t0)
        var machine = initial
        #expect(start.isEmpty)
        #expect(machine.receive(Self.outcome(0), tag: 1, now: Self.t0).isEmpty)
        #expect(machine.receive(Self.outcome(0), tag: 2, now: Self.t0).isEmpty, "a child that ran twice counts once")
        let persist = machine.receive(Self.outcome(1, .failed), tag: 3, now: Self.t0)
        guard case .persist(let segment?, let checkpoint, let ack)? = persist.first else { Issue.record("no persist: \(persist)"); return }
        #expect(ack == 3, "the duplicate is acked with the rest")
        #expect(checkpoint.version == 1 && checkpoint.segments == 1 && checkpoint.settled.population == 2 && checkpoint.failed.population == 1)
        #expect(checkpoint.status == nil)
        #expect(String(decoding: segment, as: UTF8.self).hasPrefix(#"[{"index":0,"#))
        #expect(machine.receive(Self.outcome(2), tag: 4, now: Self.t0).isEmpty, "one persist at a time")
        let final = machine.persisted(now: Self.t0)
        guard case .persist(_, let last, let lastAck)? = final.first else { Issue.record("no final persist: \(final)"); return }
        #expect(last.status == .completed && lastAck == 4, "allSettled completes even with a failed child")
        #expect(machine.persisted(now: Self.t0) == [.finish(last)])
        #expect(machine.isFinished)
        #expect(machine.receive(Self.outcome(2), tag: 5, now: Self.t0).isEmpty)
    }

    @Test func outcomesPublishedTogetherAreAllFoldedBeforeTheirDeliveryIsAcked() {
        var policy = BatchAggregator.Policy()
        policy.maxPending = 2
        var (machine, _) = BatchAggregator.restore(BatchCheckpoint(manifest: Self.manifest(size: 10)), policy: policy, now: Self.t0)
        let actions = machine.receive([Self.outcome(1), Self.outcome(2), Self.outcome(3)], tag: 7, now: Self.t0)
        guard case .persist(_, let checkpoint, let ack)? = actions.first, actions.count == 1 else { Issue.record("\(actions)"); return }
        #expect(checkpoint.settled.population == 3 && ack == 7, "one persist, holding all three, acks their message")
    }

    @Test func outcomeBuffersAreOneObjectOrAnArray() {
        var buffer = OutcomeBuffer()
        buffer.add(Array(#"{"index":1}"#.utf8)) { _ in }
        #expect(String(decoding: buffer.body, as: UTF8.self) == #"{"index":1}"#)
        buffer.add(Array(#"{"index":2}"#.utf8)) { _ in }
        buffer.add(Array(#"{"index":3}"#.utf8)) { _ in }
        #expect(String(decoding: buffer.body, as: UTF8.self) == #"[{"index":1},{"index":2},{"index":3}]"#)
        #expect(buffer.waiting.count == 3)
    }

    @Test func allFailsAtTheFirstFailure() {
        var (machine, _) = BatchAggregator.restore(BatchCheckpoint(manifest: Self.manifest(size: 100, join: .all)), now: Self.t0)
        #expect(machine.receive(Self.outcome(5), tag: 1, now: Self.t0).isEmpty)
        let actions = machine.receive(Self.outcome(9, .failed), tag: 2, now: Self.t0)
        guard case .persist(_, let checkpoint, _)? = actions.first else { Issue.record("no persist"); return }
        #expect(checkpoint.status == .failed && checkpoint.settled.population == 2)
        #expect(machine.persisted(now: Self.t0) == [.finish(checkpoint)])
    }

    @Test func theDeadlineEndsTheBatchWithWhatArrived() {
        var (machine, _) = BatchAggregator.restore(BatchCheckpoint(manifest: Self.manifest(size: 10)), now: Self.t0)
        _ = machine.receive(Self.outcome(1), tag: 1, now: Self.t0)
        guard case .persist(_, let checkpoint, _)? = machine.receive(.deadline, tag: 2, now: Self.t0).first else { Issue.record("no persist"); return }
        #expect(checkpoint.status == .expired && checkpoint.settled.population == 1)
    }

    @Test func pendingOutcomesArePersistedAfterTheirAgeAndHeldDeliveriesAreRefreshed() {
        var (machine, _) = BatchAggregator.restore(BatchCheckpoint(manifest: Self.manifest(size: 10)), now: Self.t0)
        #expect(machine.receive(Self.outcome(1), tag: 1, now: Self.t0).isEmpty)
        #expect(machine.tick(now: Self.t0 + .milliseconds(100)).isEmpty)
        #expect(machine.tick(now: Self.t0 + .milliseconds(250)).count == 1, "the webhook waits at most maxPendingAge for a fold")
        _ = machine.persisted(now: Self.t0 + .milliseconds(300))
        // An ignored delivery holds a tag: it is acked by a refresh before consumer_timeout.
        #expect(machine.receive(.ignored, tag: 2, now: Self.t0 + .seconds(1)).isEmpty)
        #expect(machine.tick(now: Self.t0 + .seconds(300)).isEmpty)
        guard case .persist(nil, _, 2)? = machine.tick(now: Self.t0 + .seconds(601)).first else { Issue.record("no refresh"); return }
    }

    @Test func aBatchThatEndedBeforeACrashIsFinishedAgain() {
        var checkpoint = BatchCheckpoint(manifest: Self.manifest(size: 1))
        checkpoint.status = .completed
        let (_, actions) = BatchAggregator.restore(checkpoint, now: Self.t0)
        #expect(actions == [.finish(checkpoint)])
    }

    /// The broker's three queues modelled in memory, the aggregator crashed at random points:
    /// every run ends with each child reported exactly once.
    @Test func crashesAtAnyPointLoseNothingAndCountNothingTwice() throws {
        var generator = SystemRandomNumberGenerator()
        for round in 0..<200 {
            let size = Int.random(in: 1...60, using: &generator)
            var reply: [(tag: UInt64, inputs: [BatchAggregator.Input])] = []
            var tag: UInt64 = 0
            // Children finish in a random order; some run twice; a bridge may publish several
            // outcomes in one message.
            var order = Array(0..<size).shuffled(using: &generator)
            order += order.filter { _ in Int.random(in: 0..<5, using: &generator) == 0 }
            while !order.isEmpty {
                let take = min(order.count, Int.random(in: 0..<4, using: &generator) == 0 ? Int.random(in: 2...5, using: &generator) : 1)
                tag += 1
                reply.append((tag, order.prefix(take).map { Self.outcome($0, $0 % 7 == 3 ? .failed : .completed, result: "\($0)") }))
                order.removeFirst(take)
            }
            var state: [BatchCheckpoint] = [BatchCheckpoint(manifest: Self.manifest(size: size))]
            var results: [[UInt8]] = []
            var policy = BatchAggregator.Policy()
            policy.maxPending = Int.random(in: 1...10, using: &generator)
            var finished: BatchCheckpoint?
            var crashes = 0
            while finished == nil {
                guard crashes < 50 else { Issue.record("round \(round): no end after 50 crashes"); return }
                let newest = try #require(state.max(by: { $0.version < $1.version }))
                let (initial, actions) = BatchAggregator.restore(newest, policy: policy, now: Self.t0)
                var machine = initial
                var lastDelivered: UInt64 = 0
                var crashed = false
                // A persist takes a while: deliveries keep arriving until it is carried out, and a
                // crash may strike between any two of its broker operations.
                var inFlight: (segment: [UInt8]?, checkpoint: BatchCheckpoint, ackUpTo: UInt64?)?
                func handle(_ actions: [BatchAggregator.Action]) {
                    for action in actions {
                        switch action {
                        case .finish(let checkpoint): finished = checkpoint
                        case .persist(let segment, let checkpoint, let ackUpTo):
                            #expect(inFlight == nil, "one persist at a time")
                            inFlight = (segment, checkpoint, ackUpTo)
                        }
                    }
                }
                func crash() -> Bool {
                    if Int.random(in: 0..<10, using: &generator) == 0 { crashed = true }
                    return crashed
                }
                handle(actions)
                while !crashed, finished == nil {
                    let next = reply.first(where: { $0.tag > lastDelivered })
                    if let persist = inFlight, next == nil || Bool.random(using: &generator) {
                        inFlight = nil
                        if let segment = persist.segment { results.append(segment) }
                        if crash() { break }
                        state.append(persist.checkpoint)
                        if crash() { break }
                        state.removeFirst()
                        if let ackUpTo = persist.ackUpTo { reply.removeAll { $0.tag <= ackUpTo } }
                        if crash() { break }
                        handle(machine.persisted(now: Self.t0))
                    } else if let next {
                        lastDelivered = next.tag
                        handle(machine.receive(next.inputs, tag: next.tag, now: Self.t0))
                        if Int.random(in: 0..<40, using: &generator) == 0 { crashed = true }
                    } else {
                        handle(machine.tick(now: Self.t0 + .seconds(1)))
                        if inFlight == nil, finished == nil { Issue.record("round \(round): idle without an end"); return }
                    }
                }
                if crashed { crashes += 1 }
            }
            let checkpoint = try #require(finished)
            #expect(checkpoint.status == .completed)
            let report = BatchReport.build(checkpoint, segments: results, maxBytes: 1 << 20)
            let object = try #require(try JSONSerialization.jsonObject(with: Data(report)) as? [String: Any])
            let children = try #require(object["children"] as? [[String: Any]])
            #expect(children.map { $0["index"] as? Int } == Array(0..<size), "round \(round): each child once, in input order")
            #expect(children.allSatisfy { ($0["status"] as? String) == (($0["index"] as? Int ?? 0) % 7 == 3 ? "failed" : "completed") })
        }
    }
}

@Suite struct BatchReportTests {
    static func checkpoint(size: Int, status: BatchStatus) -> BatchCheckpoint {
        var checkpoint = BatchCheckpoint(manifest: BatchManifest(id: "r", size: size, createdAt: 0, queue: "default"))
        checkpoint.status = status
        return checkpoint
    }

    static func segment(_ outcomes: [ChildOutcome]) -> [UInt8] {
        Array("[".utf8) + outcomes.map(\.json).joined(separator: Array(",".utf8)) + Array("]".utf8)
    }

    static func json(_ bytes: [UInt8]) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
    }

    @Test func childrenComeInInputOrderWithTheirFirstOutcome() throws {
        let a = ChildOutcome.make(index: 1, taskId: "r:1", status: .completed, attempts: 2, result: Array(#"{"price":1}"#.utf8), error: nil)
        let b = ChildOutcome.make(index: 0, taskId: "r:0", status: .failed, attempts: 4, result: nil, error: Array(#"{"reason":"retries-exhausted"}"#.utf8))
        let again = ChildOutcome.make(index: 1, taskId: "r:1", status: .completed, attempts: 3, result: Array("2".utf8), error: nil)
        let report = try Self.json(BatchReport.build(Self.checkpoint(size: 3, status: .expired), segments: [Self.segment([a, b]), Self.segment([again])], maxBytes: 1 << 20))
        #expect(report["batchId"] as? String == "r" && report["status"] as? String == "expired")
        #expect(report["counts"] as? [String: Int] == ["completed": 1, "failed": 1, "pending": 1])
        let children = try #require(report["children"] as? [[String: Any]])
        #expect(children.map { $0["status"] as? String } == ["failed", "completed", "pending"])
        #expect(children[1]["attempts"] as? Int == 2, "the first outcome wins")
        #expect((children[1]["result"] as? [String: Int]) == ["price": 1])
        #expect(children[2]["taskId"] as? String == "r:2")
    }

    @Test func aReportOverItsLimitLeavesOutResultsThenStops() throws {
        let big = (0..<50).map { ChildOutcome.make(index: $0, taskId: "r:\($0)", status: .completed, attempts: 1, result: Array("\"\(String(repeating: "x", count: 200))\"".utf8), error: nil) }
        let checkpoint = Self.checkpoint(size: 50, status: .completed)
        let lean = try Self.json(BatchReport.build(checkpoint, segments: [Self.segment(big)], maxBytes: 5000))
        #expect(lean["resultsOmitted"] as? Bool == true && lean["truncated"] == nil)
        #expect((lean["children"] as? [Any])?.count == 50)
        let cut = try Self.json(BatchReport.build(checkpoint, segments: [Self.segment(big)], maxBytes: 1000))
        #expect(cut["truncated"] as? Bool == true)
        #expect((cut["counts"] as? [String: Int])?["completed"] == 50, "counts stay complete")
        #expect(BatchReport.build(checkpoint, segments: [Self.segment(big)], maxBytes: 1000).count <= 1000)
    }
}

@Suite struct BatchRejoinTests {
    static func outcome(_ index: Int, _ status: ChildOutcome.Status, rejoined: Bool = false, result: String = "1") -> ChildOutcome {
        ChildOutcome.make(index: index, taskId: "b:\(index)", status: status, attempts: 1,
                          result: status == .completed ? Array(result.utf8) : nil,
                          error: status == .failed ? Array(#"{"reason":"not-retryable"}"#.utf8) : nil, rejoined: rejoined)
    }

    @Test func aRejoinedOutcomeReplacesAFailureAndNothingElse() throws {
        #expect(ChildOutcome.parse(Self.outcome(1, .completed, rejoined: true).json)?.rejoined == true)
        #expect(ChildOutcome.parse(Self.outcome(1, .completed).json)?.rejoined == false)
        var policy = BatchAggregator.Policy()
        policy.maxPending = 1
        var (machine, _) = BatchAggregator.restore(BatchCheckpoint(manifest: BatchAggregatorTests.manifest(size: 3)), policy: policy, now: BatchAggregatorTests.t0)
        let t = BatchAggregatorTests.t0
        _ = machine.receive(.outcome(Self.outcome(0, .completed)), tag: 1, now: t)
        _ = machine.persisted(now: t)
        _ = machine.receive(.outcome(Self.outcome(1, .failed)), tag: 2, now: t)
        _ = machine.persisted(now: t)
        #expect(machine.checkpoint.failed.population == 1 && machine.checkpoint.settled.population == 2)
        // Its duplicate (not re-joined) changes nothing; the re-joined success replaces the failure.
        #expect(machine.receive(.outcome(Self.outcome(1, .completed)), tag: 3, now: t).first.map { if case .persist(nil, _, _) = $0 { true } else { false } } ?? true)
        _ = machine.persisted(now: t)
        #expect(machine.checkpoint.failed.population == 1)
        _ = machine.receive(.outcome(Self.outcome(1, .completed, rejoined: true)), tag: 4, now: t)
        _ = machine.persisted(now: t)
        #expect(machine.checkpoint.failed.population == 0 && machine.checkpoint.settled.population == 2)
        // A re-joined outcome of a child that succeeded already is a duplicate.
        _ = machine.receive(.outcome(Self.outcome(0, .failed, rejoined: true)), tag: 5, now: t)
        _ = machine.persisted(now: t)
        #expect(machine.checkpoint.failed.population == 0)
        let end = machine.receive(.outcome(Self.outcome(2, .completed)), tag: 6, now: t)
        guard case .persist(_, let last, _)? = end.first else { Issue.record("no final persist: \(end)"); return }
        #expect(last.status == .completed && last.failed.population == 0)

        // The report: the first outcome wins, except that a re-joined one replaces a failure
        // (segments in the order written; a crash may repeat one).
        let segments = [[Self.outcome(0, .completed), Self.outcome(1, .failed)], [Self.outcome(1, .completed)],
                        [Self.outcome(1, .failed), Self.outcome(1, .completed, rejoined: true, result: "7")],
                        [Self.outcome(0, .failed, rejoined: true), Self.outcome(2, .completed)]].map(BatchReportTests.segment)
        let report = try BatchReportTests.json(BatchReport.build(last, segments: segments, maxBytes: 1 << 20))
        #expect(report["counts"] as? [String: Int] == ["completed": 3, "failed": 0, "skipped": 0])
        let children = try #require(report["children"] as? [[String: Any]])
        #expect(children.map { $0["status"] as? String } == ["completed", "completed", "completed"])
        #expect(children[1]["result"] as? Int == 7 && children[1]["rejoined"] as? Bool == true)
    }
}
