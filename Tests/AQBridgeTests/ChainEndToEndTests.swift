import AMQPClient
@testable import AQBridge
import AQHTTP
import AQTestSupport
import AsyncQueue
import Foundation
import Synchronization
import Testing

/// Chaining done by the bridge, against the real broker and HTTP servers.
@Suite(.serialized, .timeLimit(.minutes(3))) struct ChainEndToEndTests {
    @Test func eachStepGetsThePreviousResultAndTheFinalWebhookTellsEveryStep() async throws {
        let receiver = try Receiver()
        for step in 1...3 {
            receiver.on("/s\(step)") { request, _ in
                let previous = (request.json?["previousResult"] as? [String: Any])?["total"] as? Int ?? 0
                return .json(#"{"total":\#(previous + step)}"#)
            }
        }
        let bridge = try await BridgeHarness.start()
        let steps = [
            #"{"callbackUrl":"\#(receiver.url("/s1"))"}"#,
            #"{"callbackUrl":"\#(receiver.url("/s2"))","queue":"reports","retries":1}"#,
            #"{"callbackUrl":"\#(receiver.url("/s3"))"}"#,
        ]
        try await bridge.publish(#"{"chain":{"id":"order-7","webhookUrl":"\#(receiver.url("/done"))","stepWebhookUrl":"\#(receiver.url("/on-step-done"))"},"payload":{"orderId":7},"steps":[\#(steps.joined(separator: ","))]}"#)
        let done = try await receiver.wait("/done", count: 1)
        let first = try #require(receiver.requests("/s1").first?.request.json)
        #expect(first["chainId"] as? String == "order-7" && first["step"] as? Int == 1)
        #expect((first["payload"] as? [String: Any])?["orderId"] as? Int == 7)
        #expect(first["previousResult"] is NSNull)
        let third = try #require(receiver.requests("/s3").first?.request.json)
        #expect(third["step"] as? Int == 3 && (third["previousResult"] as? [String: Any])?["total"] as? Int == 3)
        #expect(receiver.requests("/s2").first?.request.header("AsyncQueue-Queue") == "reports", "a step runs on its own work queue")
        let report = try #require(done[0].request.json)
        #expect(report["chainId"] as? String == "order-7" && report["status"] as? String == "completed")
        #expect((report["result"] as? [String: Any])?["total"] as? Int == 6)
        let history = try #require(report["steps"] as? [[String: Any]])
        #expect(history.map { $0["taskId"] as? String } == ["order-7:1", "order-7:2", "order-7:3"])
        #expect(history.allSatisfy { ($0["status"] as? String) == "completed" && ($0["attempts"] as? Int) == 1 })
        #expect(history.allSatisfy { ($0["startedAt"] as? Int ?? 0) <= ($0["endedAt"] as? Int ?? -1) })
        #expect(done[0].request.header("webhook-id") == "order-7")
        let stepHooks = try await receiver.wait("/on-step-done", count: 3)
        #expect(Set(stepHooks.compactMap { $0.request.json?["step"] as? Int }) == [1, 2, 3])
        #expect(receiver.requests("/s1").count == 1 && receiver.requests("/s2").count == 1 && receiver.requests("/s3").count == 1)
        await bridge.stop()
    }

    @Test func aFailedStepEndsTheChainAndItsDeadLetterResumesItThere() async throws {
        let receiver = try Receiver()
        let healthy = Atomic<Bool>(false)
        receiver.on("/s1") { _, _ in .json(#"{"reserved":true}"#) }
        receiver.on("/s2") { _, _ in healthy.load(ordering: .relaxed) ? .json(#"{"charged":true}"#) : .text("card declined", status: 422) }
        let bridge = try await BridgeHarness.start()
        let steps = [#"{"callbackUrl":"\#(receiver.url("/s1"))"}"#, #"{"callbackUrl":"\#(receiver.url("/s2"))"}"#]
        try await bridge.publish(#"{"chain":{"id":"order-8","webhookUrl":"\#(receiver.url("/done"))","failureWebhookUrl":"\#(receiver.url("/failed"))"},"payload":{},"steps":[\#(steps.joined(separator: ","))]}"#)
        let failed = try await receiver.wait("/failed", count: 1)
        let report = try #require(failed[0].request.json)
        #expect(report["status"] as? String == "failed" && report["failedStep"] as? Int == 2)
        #expect((report["error"] as? [String: Any])?["reason"] as? String == "not-retryable")
        #expect((report["results"] as? [[String: Any]])?.first?["reserved"] as? Bool == true, "the results so far")
        #expect((report["steps"] as? [[String: Any]])?.map { $0["status"] as? String } == ["completed", "failed"])
        // The failed step waits in the dead-letter queue with the whole chain; fixed, and
        // published back, it resumes the chain at step 2 without running step 1 again.
        try await bridge.waitIdle()
        let dead = try await bridge.deadLetters()
        let letter = try #require(dead.first)
        #expect(dead.count == 1 && letter.properties.messageId == "order-8:2")
        healthy.store(true, ordering: .relaxed)
        try await bridge.channel.publish(letter.body, exchange: "aq.chain", routingKey: "default.order-8.2",
                                         properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: "order-8:2"))
        let done = try await receiver.wait("/done", count: 1)
        #expect(done[0].request.json?["status"] as? String == "completed")
        #expect(((done[0].request.json?["steps"] as? [[String: Any]])?.count) == 2)
        #expect(receiver.requests("/s1").count == 1, "step 1 did not run again")
        await bridge.stop()
    }

    @Test func theFirstStepRunsFromTheCreateAndItsRetryAndDeadLetterAreStepMessages() async throws {
        let receiver = try Receiver()
        let calls = Atomic<Int>(0)
        let healthy = Atomic<Bool>(false)
        receiver.on("/s1") { _, _ in
            if healthy.load(ordering: .relaxed) { return .json(#"{"first":true}"#) }
            // Once unavailable (retried), then refused (failed for good).
            return calls.add(1, ordering: .relaxed).newValue == 1 ? .text("busy", status: 503) : .text("no", status: 422)
        }
        receiver.on("/s2") { _, _ in .json(#"{"second":true}"#) }
        let bridge = try await BridgeHarness.start()
        // A spy on aq.chain: step 1 never goes through the broker (the create is its message),
        // step 2 does.
        let spy = "chain-spy-\(UInt32.random(in: 0...UInt32.max))"
        _ = try await bridge.channel.declareQueue(spy, durable: false, exclusive: true)
        try await bridge.channel.bindQueue(spy, to: "aq.chain", routingKey: "default.first.*")
        let steps = [#"{"callbackUrl":"\#(receiver.url("/s1"))","retries":2}"#, #"{"callbackUrl":"\#(receiver.url("/s2"))"}"#]
        try await bridge.publish(#"{"chain":{"id":"first","webhookUrl":"\#(receiver.url("/done"))","failureWebhookUrl":"\#(receiver.url("/failed"))"},"payload":{"n":1},"steps":[\#(steps.joined(separator: ","))]}"#)
        let failed = try await receiver.wait("/failed", count: 1)
        #expect(failed[0].request.json?["failedStep"] as? Int == 1)
        #expect((failed[0].request.json?["steps"] as? [[String: Any]])?.first?["attempts"] as? Int == 2, "the retry ran step 1 again")
        let attempts = receiver.requests("/s1").map { $0.request.header("AsyncQueue-Attempt") }
        #expect(attempts == ["1", "2"])
        #expect(receiver.requests("/s1").allSatisfy { $0.request.json?["chainId"] as? String == "first" && $0.request.json?["step"] as? Int == 1 })
        try await bridge.waitIdle()
        let dead = try await bridge.deadLetters()
        let letter = try #require(dead.first)
        let body = try #require(try JSONSerialization.jsonObject(with: Data(letter.body)) as? [String: Any])
        #expect(dead.count == 1 && letter.properties.messageId == "first:1")
        #expect(body["step"] as? Int == 1 && (body["chain"] as? [String: Any])?["id"] as? String == "first", "the dead letter is step 1's message")
        // Published back, it resumes the chain at step 1.
        healthy.store(true, ordering: .relaxed)
        try await bridge.channel.publish(letter.body, exchange: "aq.chain", routingKey: "default.first.1",
                                         properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent))
        let done = try await receiver.wait("/done", count: 1)
        #expect((done[0].request.json?["result"] as? [String: Any])?["second"] as? Bool == true)
        var seen: [String] = []
        while let message = try await bridge.channel.get(spy, noAck: true) { seen.append(message.routingKey) }
        #expect(seen == ["default.first.1", "default.first.2"], "only the replayed step 1 and step 2 passed through aq.chain")
        await bridge.stop()
    }

    @Test func aStepMayFanOutAndTheNextGetsItsAggregatedOutcome() async throws {
        let receiver = try Receiver()
        receiver.on("/start") { _, _ in .json(#"{"n":10}"#) }
        receiver.on("/part") { request, _ in
            let envelope = request.json ?? [:]
            let n = (envelope["previousResult"] as? [String: Any])?["n"] as? Int ?? -1
            let index = envelope["index"] as? Int ?? -1
            let own = (envelope["payload"] as? [String: Any])?["k"] as? Int ?? -1
            return .json(#"{"value":\#(n * 100 + index * 10 + own)}"#)
        }
        receiver.on("/sum") { request, _ in
            let children = ((request.json?["previousResult"] as? [String: Any])?["children"] as? [[String: Any]]) ?? []
            let total = children.compactMap { ($0["result"] as? [String: Any])?["value"] as? Int }.reduce(0, +)
            return .json(#"{"total":\#(total)}"#)
        }
        let bridge = try await BridgeHarness.start()
        // A 100-child batch as step 2; child i has k = i + 1.
        let children = (0..<100).map { #"{"callbackUrl":"\#(receiver.url("/part"))","payload":{"k":\#($0 + 1)}}"# }
        let fanOut = #"{"batch":{"join":"all","deadline":60},"tasks":[\#(children.joined(separator: ","))]}"#
        let steps = [#"{"callbackUrl":"\#(receiver.url("/start"))"}"#, fanOut, #"{"callbackUrl":"\#(receiver.url("/sum"))"}"#]
        try await bridge.publish(#"{"chain":{"id":"fan","webhookUrl":"\#(receiver.url("/done"))"},"payload":{},"steps":[\#(steps.joined(separator: ","))]}"#)
        let done = try await receiver.wait("/done", count: 1)
        // Child i got step 1's result (10) and its own k = i + 1: the sum of 1000 + 10 i + i + 1.
        #expect((done[0].request.json?["result"] as? [String: Any])?["total"] as? Int == (0..<100).map { 1000 + 11 * $0 + 1 }.reduce(0, +))
        #expect(receiver.requests("/part").count == 100)
        let history = try #require(done[0].request.json?["steps"] as? [[String: Any]])
        #expect(history.map { $0["taskId"] as? String } == ["fan:1", "fan:2", "fan:3"])
        #expect(receiver.requests("/part").first?.request.json?["chainId"] as? String == "fan")
        #expect(try await BatchEndToEndTests.waitGone(bridge).isEmpty)
        await bridge.stop()
    }

    @Test func aBatchStepThatFailsEndsTheChainAndWaitsInTheDeadLetters() async throws {
        let receiver = try Receiver()
        receiver.on("/bad") { _, _ in .text("no", status: 422) }
        let bridge = try await BridgeHarness.start()
        let fanOut = #"{"batch":{"join":"all"},"tasks":[{"callbackUrl":"\#(receiver.url("/ok"))"},{"callbackUrl":"\#(receiver.url("/bad"))"}]}"#
        let steps = [fanOut, #"{"callbackUrl":"\#(receiver.url("/never"))"}"#]
        try await bridge.publish(#"{"chain":{"id":"fanfail","webhookUrl":"\#(receiver.url("/done"))"},"payload":{},"steps":[\#(steps.joined(separator: ","))]}"#)
        let done = try await receiver.wait("/done", count: 1)
        let report = try #require(done[0].request.json)
        #expect(report["status"] as? String == "failed" && report["failedStep"] as? Int == 1)
        #expect((report["error"] as? [String: Any])?["reason"] as? String == "batch-failed")
        try await bridge.waitIdle()
        let dead = try await bridge.deadLetters()
        #expect(dead.contains { $0.properties.messageId == "fanfail:1" && $0.properties.headers?["aq-reason"]?.stringValue == "batch-failed" },
                "the step waits in the dead letters with its chain, to be published back")
        #expect(receiver.requests("/never").isEmpty)
        #expect(try await BatchEndToEndTests.waitGone(bridge).isEmpty)
        await bridge.stop()
    }

    /// A batch step whose id (`<chain id>:<step>`) names someone else's batch fails the chain,
    /// also when that batch's checkpoint cannot be read at the moment the step looks (another
    /// bridge reads it back): the step waits instead of launching into it.
    @Test func aBatchStepNeverLaunchesIntoAnotherBatchWhoseCheckpointIsBeingRead() async throws {
        let receiver = try Receiver()
        receiver.onDelayed("/slow", by: .seconds(12))
        let bridge = try await BridgeHarness.start()
        let stranger = try await bridge.appConnection()
        try await bridge.publish(#"{"batch":{"id":"squat:1"},"tasks":[{"callbackUrl":"\#(receiver.url("/slow"))"}]}"#, as: stranger)
        _ = try await receiver.wait("/slow", count: 1)
        let holder = try await bridge.connection.openChannel()
        #expect(try await holder.get("aq.batch.squat:1.state") != nil)
        let fanOut = #"{"batch":{},"tasks":[{"callbackUrl":"\#(receiver.url("/child"))"}]}"#
        try await bridge.publish(#"{"chain":{"id":"squat","failureWebhookUrl":"\#(receiver.url("/failed"))"},"payload":{},"steps":[\#(fanOut)]}"#)
        let deadline = ContinuousClock.now + .seconds(10)
        while bridge.service.metrics.value(.tasksParked) < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(bridge.service.metrics.value(.tasksParked) == 1, "the step waits")
        try await holder.close()
        let failed = try await receiver.wait("/failed", count: 1)
        #expect(((failed[0].request.json?["error"] as? [String: Any])?["message"] as? String)?.contains("not this chain's step") == true)
        #expect(receiver.requests("/child").isEmpty, "nothing of the chain ran inside the other batch")
        await bridge.stop()
    }

    @Test func aHostileStepMessageCostsOnlyItself() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        // A step published by hand with an AMQP timestamp far in the future (once a trap), and a
        // chain id with a dot (it would cross into another queue's steps on the topic exchange).
        let step = #"{"chain":{"id":"h1","webhookUrl":"\#(receiver.url("/h1"))"},"payload":{},"steps":[{"callbackUrl":"\#(receiver.url("/s"))"}],"step":1,"history":[],"results":[]}"#
        try await bridge.channel.publish(Array(step.utf8), exchange: "aq.chain", routingKey: "default.h1.1",
                                         properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: "h1:1",
                                                                    timestamp: UInt64.max))
        try await bridge.publish(#"{"chain":{"id":"a.b","webhookUrl":"\#(receiver.url("/dotted"))"},"payload":{},"steps":[{"callbackUrl":"\#(receiver.url("/s"))"}]}"#)
        let done = try await receiver.wait("/h1", count: 1)
        #expect(done[0].request.json?["status"] as? String == "completed", "the hand-published step ran; the bridge lives")
        let told = try await receiver.wait("/dotted", count: 1)
        #expect(((told[0].request.json?["error"] as? [String: Any])?["message"] as? String)?.contains("'.'") == true)
        #expect(receiver.requests("/s").count == 1)
        await bridge.stop()
    }

    @Test func malformedChainsAreRefusedWhole() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        try await bridge.publish(#"{"chain":{"id":"c","webhookUrl":"\#(receiver.url("/told"))"},"payload":{},"steps":[{"callbackUrl":"\#(receiver.url("/s1"))"},{"callbackUrl":"ftp://x"}]}"#)
        try await bridge.publish(#"{"chain":{"id":"c2"},"steps":[]}"#)
        try await bridge.publish(#"{"chain":{"id":"c3","colour":"red"},"steps":[{"callbackUrl":"\#(receiver.url("/s1"))"}]}"#)
        let told = try await receiver.wait("/told", count: 1)
        #expect(((told[0].request.json?["error"] as? [String: Any])?["message"] as? String)?.contains("steps[1]") == true)
        try await bridge.waitIdle()
        #expect(try await bridge.deadLetters().count == 3)
        #expect(receiver.requests("/s1").isEmpty, "no step ran")
        await bridge.stop()
    }

    /// Step messages the bridge published skip the task reader (the broker vouches for the
    /// publisher); a body that is not what the header says still gets a reason, alone.
    @Test func aTrustedStepHeaderOnABadBodyIsDeadLetteredAndOthersRun() async throws {
        let receiver = try Receiver()
        let bridge = try await BridgeHarness.start()
        let user = try AMQPConfiguration(url: bridge.amqpURL).user
        let headers: AMQPTable = ["aq-chain": .string("x"), "aq-chain-step": .int32(2)]
        let bodies = ["not json", #"{"callbackUrl":"\#(receiver.url("/task"))"}"#, #"{"chain":{"id":"x"},"steps":[{"callbackUrl":"\#(receiver.url("/s"))"}],"step":1,"history":[],"results":[],"extra":1}"#]
        for (i, body) in bodies.enumerated() {
            try await bridge.channel.publish(Array(body.utf8), exchange: "aq.tasks", routingKey: "default",
                                             properties: AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent,
                                                                        messageId: "x:\(i)", userId: user))
        }
        try await bridge.publish(#"{"callbackUrl":"\#(receiver.url("/fine"))"}"#)
        _ = try await receiver.wait("/fine", count: 1)
        try await bridge.waitIdle()
        let dead = try await bridge.deadLetters()
        #expect(dead.count == 3)
        #expect(dead.allSatisfy { $0.properties.headers?["aq-reason"]?.stringValue == "malformed" })
        let errors = dead.compactMap { $0.properties.headers?["aq-error"]?.stringValue }
        #expect(errors.contains { $0.contains("not a JSON object") } && errors.contains { $0.contains("chain must be an object") }
                && errors.contains { $0.contains("unknown key 'extra'") }, "\(errors)")
        #expect(receiver.requests("/task").isEmpty && receiver.requests("/s").isEmpty)
        await bridge.stop()
    }

    @Test func theSwiftClientCreatesAChain() async throws {
        let receiver = try Receiver()
        receiver.on("/double") { request, _ in
            let previous = (request.json?["previousResult"] as? [String: Any])?["n"] as? Int
            let start = (request.json?["payload"] as? [String: Any])?["n"] as? Int ?? 0
            return .json(#"{"n":\#((previous ?? start) * 2)}"#)
        }
        let bridge = try await BridgeHarness.start()
        let aq = try await AsyncQueue(connection: bridge.connection)
        let id = try await aq.chains.create(Array(repeating: AsyncQueue.ChainStep(callbackUrl: receiver.url("/double")), count: 4),
                                            payload: ["n": 3], webhookUrl: receiver.url("/done"))
        let done = try await receiver.wait("/done", count: 1)
        #expect(done[0].request.json?["chainId"] as? String == id)
        #expect((done[0].request.json?["result"] as? [String: Any])?["n"] as? Int == 48)
        await bridge.stop()
    }
}

@Suite struct ChainParserTests {
    static func parse(_ json: String, messageId: String? = nil) -> Result<ChainMessage, MalformedTask> {
        ChainParser.parse(Array(json.utf8), messageId: messageId, defaults: TaskDefaults(), isWorkQueue: { ["default", "reports"].contains($0) })
    }

    @Test func aStepMessageCarriesTheWholeChainAndReadsBack() throws {
        let create = try Self.parse(#"{"chain":{"id":"c","webhookUrl":"http://app/done"},"payload":{"x":1},"steps":[{"callbackUrl":"http://s/1"},{"callbackUrl":"http://s/2","queue":"reports","retries":0}]}"#).get()
        #expect(create.step == nil && create.specs.count == 2 && create.queues == [nil, "reports"])
        var withHome = create
        withHome.queue = "default"
        let next = withHome.stepMessage(step: 2, history: [Array(#"{"step":1}"#.utf8)[...]], results: [Array(#"{"r":1}"#.utf8)[...]])
        let step = try ChainParser.parse(next, messageId: nil, defaults: TaskDefaults(), isWorkQueue: { _ in true }).get()
        #expect(step.id == "c" && step.step == 2 && step.queue == "default" && step.webhookURL == "http://app/done")
        #expect(String(decoding: step.callbackBody(step: 2), as: UTF8.self) == #"{"chainId":"c","step":2,"payload":{"x":1},"previousResult":{"r":1}}"#)
        #expect(step.specs[1]?.retries == 0)
    }

    /// The reader finds members in place: keys written with escapes are decoded, the last of
    /// duplicate keys wins, and an unknown key is named decoded.
    @Test func keysAreReadAsJSONSaysWithoutADictionary() throws {
        let escaped = try Self.parse(#"{"\u0063hain":{"\u0069d":"c","queue":"reports"},"st\u0065ps":[{"callback\u0055rl":"http://s/1"}]}"#).get()
        #expect(escaped.id == "c" && escaped.queue == "reports" && escaped.specs[0]?.callbackURL == "http://s/1")
        let twice = try Self.parse(#"{"chain":{"id":"a"},"steps":[{"callbackUrl":"http://s/1"}],"chain":{"id":"b"}}"#).get()
        #expect(twice.id == "b")
        switch Self.parse(#"{"chain":{},"steps":[{"callbackUrl":"http://s/1"}],"z\u0065d":1,"colour":2}"#) {
        case .success: Issue.record("an unknown key was accepted")
        case .failure(let error): #expect(error.reason.contains("unknown key 'colour'"), "\(error.reason)")
        }
        switch Self.parse(#"{"chain":{"\u0063olour":1},"steps":[{"callbackUrl":"http://s/1"}]}"#) {
        case .success: Issue.record("an unknown option was accepted")
        case .failure(let error): #expect(error.reason.contains("unknown chain option 'colour'"), "\(error.reason)")
        }
        // A step message: the step it runs is read in place inside the message, the next one's queue too.
        let message = #"{"chain":{"id":"c"},"payload":[1],"steps":[{"callbackUrl":"http://s/1"},{"callbackUrl":"http://s/2","retries":1},{"callbackUrl":"http://s/3","queue":"reports"}],"step":2,"history":[{"step":1}],"results":[{"r":1}]}"#
        let step = try Self.parse(message, messageId: "c:2").get()
        #expect(step.step == 2 && step.specs[1]?.callbackURL == "http://s/2" && step.specs[1]?.retries == 1 && step.specs[1]?.id == "c:2")
        #expect(step.specs[0] == nil && step.queues == [nil, nil, "reports"])
        #expect(step.steps.map { String(decoding: $0, as: UTF8.self) } == [#"{"callbackUrl":"http://s/1"}"#, #"{"callbackUrl":"http://s/2","retries":1}"#, #"{"callbackUrl":"http://s/3","queue":"reports"}"#])
        #expect(step.results.map { String(decoding: $0, as: UTF8.self) } == [#"{"r":1}"#] && String(decoding: step.payload, as: UTF8.self) == "[1]")
    }

    @Test func aHistoryEntryIsTheSameJSONItAlwaysWas() throws {
        let message = try Self.parse(#"{"chain":{"id":"a\"b\\c"},"steps":[{"callbackUrl":"http://s/1"}]}"#).get()
        for completed in [true, false] {
            let entry = message.historyEntry(step: 12, attempts: 3, completed: completed, startedAt: 1_700_000_000_123, endedAt: -1)
            let old = "{\"step\":12,\"taskId\":\(JSONScan.quote("\(message.id):12")),\"attempts\":3,\"status\":\"\(completed ? "completed" : "failed")\",\"startedAt\":1700000000123,\"endedAt\":-1}"
            #expect(String(decoding: entry, as: UTF8.self) == old)
            #expect(JSONScan.isValid(Array(entry)))
        }
    }

    @Test func aPartOfADocumentIsReadInPlaceAndMustEndWhereItsRangeEnds() throws {
        let bytes = Array(#"xx{"a":1,"b":"\u00e9"}yy"#.utf8)
        let fields = try JSONScan.Fields(bytes, in: 2..<(bytes.count - 2))
        let b = try #require(fields["b"])
        #expect(fields["a"]?.range == 7..<8 && fields.string(b) == "é")
        #expect(throws: JSONScan.Failure.self) { try JSONScan.Fields(bytes, in: 2..<(bytes.count - 1)) }
        // A \u escape cut by the range's end is an error, not a read past it.
        let cut = Array(#"{"a":"\u00"}"#.utf8)
        #expect(throws: JSONScan.Failure.self) { try JSONScan.Fields(cut, in: 0..<9) }
        var elements: [Range<Int>] = []
        try JSONScan.forEachElement(Array("[1, [2], 3]".utf8), in: 4..<7) { (member: JSONScan.Member) throws(JSONScan.Failure) in elements.append(member.range) }
        #expect(elements == [5..<6])
    }

    @Test func badChainsAreRefusedWithAReason() {
        let cases: [(String, String)] = [
            (#"{"chain":{},"steps":[]}"#, "1 to 100 steps"),
            (#"{"chain":{},"steps":[{"callbackUrl":"http://s/1","payload":1}]}"#, "'payload' is not allowed in a step"),
            (#"{"chain":{},"steps":[{"callbackUrl":"http://s/1","queue":"nope"}]}"#, "must name a work queue"),
            (#"{"chain":{"colour":1},"steps":[{"callbackUrl":"http://s/1"}]}"#, "unknown chain option"),
            (#"{"chain":{},"steps":[{"callbackUrl":"http://s/1"}],"step":2,"history":[],"results":[]}"#, "step must be a step number"),
            (#"{"chain":{},"steps":[{"callbackUrl":"http://s/1"},{"callbackUrl":"http://s/2"}],"step":2,"history":[],"results":[]}"#, "earlier steps' history"),
            (#"{"chain":"x","steps":[]}"#, "chain must be an object"),
            // A '.' followed by a combining mark is one Character but still a '.' in the routing key.
            ("{\"chain\":{\"id\":\"a.\u{301}b\"},\"steps\":[{\"callbackUrl\":\"http://s/1\"}]}", "without control characters, '.', '*' or '#'"),
            // Escaped duplicates: each key is decoded once; the last chain wins and is checked.
            (#"{"ch\u0061in":{},"ch\u0061in":{"c\u006flour":1},"steps":[{"callbackUrl":"http://s/1"}]}"#, "unknown chain option 'colour'"),
        ]
        for (json, reason) in cases {
            switch Self.parse(json) {
            case .success: Issue.record("accepted: \(json)")
            case .failure(let error): #expect(error.reason.contains(reason), "\(error.reason) — wanted \(reason)")
            }
        }
    }
}
