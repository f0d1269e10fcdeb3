import AMQPClient
import AQHTTP
import AQTestSupport
import Foundation
import Synchronization
import Testing

/// The real aq-bridge binary, killed and restarted: nothing is lost.
@Suite(.serialized, .timeLimit(.minutes(3))) struct CrashSafetyTests {
    static var binary: URL { TestEnvironment.builtProgram("aq-bridge") }

    func launch(url: String, topology: URL, prefetch: Int = 500) throws -> Process {
        let process = Process()
        process.executableURL = Self.binary
        process.arguments = ["--prefetch", "\(prefetch)", "--listen", "", "--log-level", "warning", "--shutdown-grace", "20"]
        process.environment = ["AQ_AMQP_URL": url, "AQ_TOPOLOGY": topology.path, "PATH": "/usr/bin:/bin"]
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        return process
    }


    @Test func killDashNineWithThousandsInFlightLosesNothing() async throws {
        let (vhost, url, dir) = try await BridgeHarness.prepareVHost()
        let received = Mutex<[String: Int]>([:])
        let server = try HTTPServer { request, responder in
            if request.path == "/hook", let id = request.header("AsyncQueue-Task-Id") {
                received.withLock { $0[id, default: 0] += 1 }
                return responder.respond(.json("{}"))
            }
            // Callbacks answer after 20 ms, from another thread.
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(20)) { responder.respond(.json(#"{"ok":true}"#)) }
        }
        defer { server.shutdown() }
        let connection = try await AMQPConnection.connect(url)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let total = 5000
        var confirms: [AMQPPublishConfirm] = []
        for index in 0..<total {
            let body = #"{"callbackUrl":"http://127.0.0.1:\#(server.port)/cb","payload":{"i":\#(index)},"webhookUrl":"http://127.0.0.1:\#(server.port)/hook"}"#
            confirms.append(channel.beginPublish(Array(body.utf8), exchange: "aq.tasks", routingKey: "default",
                                                 properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: "t-\(index)")))
        }
        for confirm in confirms { _ = try await confirm.result() }

        var bridge = try self.launch(url: url, topology: dir, prefetch: 2000)
        // Let it get going, then kill it with thousands of tasks in flight or queued.
        let deadline = ContinuousClock.now + .seconds(60)
        while received.withLock({ $0.count }) < 500 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        kill(bridge.processIdentifier, SIGKILL)
        bridge.waitUntilExit()
        let beforeRestart = received.withLock { $0.count }
        #expect(beforeRestart < total, "the kill came while work was left")

        bridge = try self.launch(url: url, topology: dir)
        let finish = ContinuousClock.now + .seconds(90)
        while received.withLock({ $0.count }) < total && ContinuousClock.now < finish { try await Task.sleep(for: .milliseconds(20)) }
        let delivered = received.withLock { $0 }
        #expect(delivered.count == total, "every task's webhook arrived at least once (\(delivered.count) of \(total))")
        let missing = (0..<total).map { "t-\($0)" }.filter { delivered[$0] == nil }
        #expect(missing.count == 0, "\(missing.count) missing, e.g. \(missing.prefix(5))")
        // Nothing left behind, nothing dead-lettered.
        for queue in ["aq.work.default", "aq.retry.1s", "aq.retry.3s", "aq.dead"] {
            #expect(try await channel.declareQueue(queue, passive: true).messageCount == 0, "\(queue) is empty")
        }

        // SIGTERM: a graceful stop, exit status 0.
        bridge.terminate()
        bridge.waitUntilExit()
        #expect(bridge.terminationStatus == 0)
        await connection.close()
        try? await BridgeHarness.management("DELETE", "/api/vhosts/\(vhost)")
    }

    @Test func sigtermFinishesTheTasksInFlightAndLeavesTheRestQueued() async throws {
        let (vhost, url, dir) = try await BridgeHarness.prepareVHost()
        let started = Atomic<Int>(0)
        let finished = Atomic<Int>(0)
        let server = try HTTPServer { request, responder in
            started.add(1, ordering: .relaxed)
            // Each callback takes 1.5 s: SIGTERM arrives while they run.
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(1500)) {
                finished.add(1, ordering: .relaxed)
                responder.respond(.json("{}"))
            }
        }
        defer { server.shutdown() }
        let connection = try await AMQPConnection.connect(url)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        for index in 0..<20 {
            try await channel.publish(#"{"callbackUrl":"http://127.0.0.1:\#(server.port)/cb","payload":{}}"#, exchange: "aq.tasks", routingKey: "default",
                                      properties: AMQPProperties(deliveryMode: .persistent, messageId: "g-\(index)"))
        }
        let bridge = try self.launch(url: url, topology: dir, prefetch: 5)
        while started.load(ordering: .relaxed) < 5 { try await Task.sleep(for: .milliseconds(10)) }
        bridge.terminate()
        bridge.waitUntilExit()
        #expect(bridge.terminationStatus == 0)
        #expect(finished.load(ordering: .relaxed) >= 5, "the tasks in flight finished before exit")
        // Those done were acked; the rest wait in the queue for the next bridge.
        let left = try await channel.declareQueue("aq.work.default", passive: true).messageCount
        #expect(Int(left) + started.load(ordering: .relaxed) >= 20)
        #expect(Int(left) == 20 - finished.load(ordering: .relaxed))
        await connection.close()
        try? await BridgeHarness.management("DELETE", "/api/vhosts/\(vhost)")
    }

    @Test func aBatchSurvivesKillDashNineOfItsAggregatorAndThenOfEveryBridge() async throws {
        let (vhost, url, dir) = try await BridgeHarness.prepareVHost()
        let callbacks = Atomic<Int>(0)
        let reports = Mutex<[[UInt8]]>([])
        let webhookIds = Mutex<[String]>([])
        let server = try HTTPServer { request, responder in
            if request.path == "/done" {
                reports.withLock { $0.append(request.body) }
                webhookIds.withLock { $0.append(request.header("webhook-id") ?? "-") }
                return responder.respond(.json("{}"))
            }
            callbacks.add(1, ordering: .relaxed)
            // Each child takes 300 ms: the batch runs for several seconds.
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(300)) { responder.respond(.json(#"{"ok":1}"#)) }
        }
        defer { server.shutdown() }
        let connection = try await AMQPConnection.connect(url)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let size = 1000
        let child = #"{"callbackUrl":"http://127.0.0.1:\#(server.port)/cb","payload":{}}"#
        let body = #"{"batch":{"id":"survivor","webhookUrl":"http://127.0.0.1:\#(server.port)/done"},"tasks":[\#(Array(repeating: child, count: size).joined(separator: ","))]}"#
        try await channel.publish(Array(body.utf8), exchange: "aq.tasks", routingKey: "default",
                                  properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent))
        func waitCallbacks(_ count: Int) async throws {
            let deadline = ContinuousClock.now + .seconds(60)
            while callbacks.load(ordering: .relaxed) < count, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        }
        // A creates the batch and aggregates it; B joins; A is killed mid-batch.
        let a = try self.launch(url: url, topology: dir)
        try await waitCallbacks(150)
        let b = try self.launch(url: url, topology: dir)
        try await waitCallbacks(400)
        kill(a.processIdentifier, SIGKILL)
        a.waitUntilExit()
        #expect(reports.withLock { $0.isEmpty }, "the kill came mid-batch")
        // Then every bridge dies, and a new one is started.
        try await waitCallbacks(600)
        kill(b.processIdentifier, SIGKILL)
        b.waitUntilExit()
        let c = try self.launch(url: url, topology: dir)
        let deadline = ContinuousClock.now + .seconds(90)
        while reports.withLock({ $0.isEmpty }), ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        try await Task.sleep(for: .seconds(1))
        let all = reports.withLock { $0 }
        #expect(all.count >= 1, "the batch completed")
        #expect(Set(all).count == 1, "a duplicate webhook (possible after a crash) carries the same body")
        #expect(Set(webhookIds.withLock { $0 }) == ["survivor"])
        let report = try #require(all.first.flatMap { try? JSONSerialization.jsonObject(with: Data($0)) as? [String: Any] })
        #expect(report["status"] as? String == "completed")
        #expect(report["counts"] as? [String: Int] == ["completed": size, "failed": 0, "skipped": 0], "every child counted once")
        // Its queues are gone.
        let base = try AMQPConfiguration(url: BridgeHarness.baseURL)
        let listing = try await BlockingHTTP.request(method: "GET", url: BridgeHarness.managementURL + "/api/queues/\(vhost)?columns=name",
                                                     username: base.user, password: base.password)
        let names = ((try? JSONSerialization.jsonObject(with: Data(listing.body))) as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
        #expect(names.filter { $0.hasPrefix("aq.batch.") }.isEmpty, "left: \(names.filter { $0.hasPrefix("aq.batch.") })")
        c.terminate()
        c.waitUntilExit()
        await connection.close()
        try? await BridgeHarness.management("DELETE", "/api/vhosts/\(vhost)")
    }

    @Test func aThousandChainsSurviveKillDashNineLoops() async throws {
        let (vhost, url, dir) = try await BridgeHarness.prepareVHost()
        let finals = Mutex<[String: Int]>([:])
        let server = try HTTPServer { request, responder in
            if request.path == "/done", let chain = (try? JSONSerialization.jsonObject(with: Data(request.body)) as? [String: Any])?["chainId"] as? String {
                finals.withLock { $0[chain, default: 0] += 1 }
                return responder.respond(.json("{}"))
            }
            // Steps answer after 5 ms, from another thread, with the step number.
            let step = (try? JSONSerialization.jsonObject(with: Data(request.body)) as? [String: Any])?["step"] as? Int ?? 0
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(5)) { responder.respond(.json(#"{"did":\#(step)}"#)) }
        }
        defer { server.shutdown() }
        let connection = try await AMQPConnection.connect(url)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let total = 1000
        let step = #"{"callbackUrl":"http://127.0.0.1:\#(server.port)/step"}"#
        var confirms: [AMQPPublishConfirm] = []
        for index in 0..<total {
            let body = #"{"chain":{"id":"c-\#(index)","webhookUrl":"http://127.0.0.1:\#(server.port)/done"},"payload":{"i":\#(index)},"steps":[\#(step),\#(step),\#(step)]}"#
            confirms.append(channel.beginPublish(Array(body.utf8), exchange: "aq.tasks", routingKey: "default",
                                                 properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent)))
        }
        for confirm in confirms { _ = try await confirm.result() }
        // Three kills, each with chains in flight, then a bridge that is left to finish.
        for round in 1...3 {
            let bridge = try self.launch(url: url, topology: dir, prefetch: 300)
            let target = min(total, round * 200)
            let deadline = ContinuousClock.now + .seconds(60)
            while finals.withLock({ $0.count }) < target && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
            kill(bridge.processIdentifier, SIGKILL)
            bridge.waitUntilExit()
        }
        #expect(finals.withLock { $0.count } < total, "the kills came with chains in flight")
        let bridge = try self.launch(url: url, topology: dir)
        let finish = ContinuousClock.now + .seconds(120)
        while finals.withLock({ $0.count }) < total && ContinuousClock.now < finish { try await Task.sleep(for: .milliseconds(20)) }
        let ended = finals.withLock { $0 }
        #expect(ended.count == total, "every chain ended (\(ended.count) of \(total)); none stalled")
        let twice = ended.values.filter { $0 > 1 }.count
        #expect(twice <= 3 * 300, "a final webhook repeats only for chains caught by a kill (\(twice))")
        for queue in ["aq.work.default", "aq.retry.1s", "aq.retry.3s", "aq.dead"] {
            #expect(try await channel.declareQueue(queue, passive: true).messageCount == 0, "\(queue) is empty")
        }
        bridge.terminate()
        bridge.waitUntilExit()
        await connection.close()
        try? await BridgeHarness.management("DELETE", "/api/vhosts/\(vhost)")
    }
}
