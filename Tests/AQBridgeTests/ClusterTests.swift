import AMQPClient
import AQHTTP
import AQTestSupport
import AQTopology
import Foundation
import Synchronization
import Testing

/// AsyncQueue on a 3-node RabbitMQ cluster (`scripts/cluster`, started by `scripts/test`) with
/// three aq-bridge processes: nodes and bridges are killed under load and nothing is lost.
///
/// Needs `AQ_TEST_CLUSTER_URLS` (the nodes' AMQP URLs) and `AQ_TEST_CLUSTER_MANAGEMENT` (their
/// management APIs), in the same order as `scripts/cluster`'s node numbers; without them it
/// fails, saying so (`scripts/test` runs it on a cluster of its own; the single-node run skips
/// the suite by name, `--skip ClusterTests`).
@Suite(.serialized, .timeLimit(.minutes(8))) struct ClusterTests {
    struct Cluster {
        var urls: [String]
        var management: [String]

        static func fromEnvironment() throws -> Cluster {
            let environment = ProcessInfo.processInfo.environment
            let urls = (environment["AQ_TEST_CLUSTER_URLS"] ?? "").split(separator: " ").map(String.init)
            let management = (environment["AQ_TEST_CLUSTER_MANAGEMENT"] ?? "").split(separator: " ").map(String.init)
            guard urls.count >= 3, management.count == urls.count else {
                throw HarnessError(description: "AQ_TEST_CLUSTER_URLS and AQ_TEST_CLUSTER_MANAGEMENT must name 3 nodes (scripts/test starts them)")
            }
            return Cluster(urls: urls, management: management)
        }

        /// The URL list for a virtual host, starting at node `first` (0-based).
        func list(vhost: String, startingAt first: Int = 0) -> String {
            (0..<self.urls.count).map { index -> String in
                let url = self.urls[(first + index) % self.urls.count]
                return url.replacingOccurrences(of: "/%2F", with: "/\(vhost)")
            }.joined(separator: " ")
        }

        /// A management API call to the first node that answers.
        @discardableResult
        func call(_ method: String, _ path: String, _ body: String? = nil) async throws -> [UInt8] {
            var last: (any Error)?
            for base in self.management {
                do {
                    let response = try await BlockingHTTP.request(method: method, url: base + path, headers: ["Content-Type: application/json"],
                                                                  body: body.map { Array($0.utf8) }, username: "guest", password: "guest", timeout: .seconds(10))
                    guard (200..<300).contains(response.status) else { throw HarnessError(description: "\(method) \(path): \(response.status)") }
                    return response.body
                } catch { last = error }
            }
            throw last ?? HarnessError(description: "no node answered")
        }

        /// `scripts/cluster kill|restart K` (1-based node numbers).
        func script(_ verb: String, node: Int) async throws {
            let log = FileManager.default.temporaryDirectory.appendingPathComponent("aq-cluster-script.log").path
            let status = try await TestEnvironment.spawnAndWait(TestEnvironment.repositoryRoot.appendingPathComponent("scripts/cluster").path, [verb, "\(node)"], log: log)
            guard status == 0 else { throw HarnessError(description: "scripts/cluster \(verb) \(node) exited with \(status) (output in \(log))") }
        }

        /// The node (1-based) that leads a quorum queue.
        func leader(of queue: String, vhost: String) async throws -> Int {
            let body = try await self.call("GET", "/api/queues/\(vhost)/\(queue)")
            let object = try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any]
            let leader = (object?["leader"] as? String) ?? (object?["node"] as? String) ?? ""
            // Node names are aqc<port>n<K>@localhost.
            guard let k = leader.split(separator: "@").first?.split(separator: "n").last.flatMap({ Int($0) }) else {
                throw HarnessError(description: "no leader for \(queue): '\(leader)'")
            }
            return k
        }

        /// Messages still held in the virtual host's queues (ready and unacknowledged), by queue.
        func held(vhost: String) async throws -> [String: Int] {
            let body = try await self.call("GET", "/api/queues/\(vhost)?columns=name,messages")
            let list = try JSONSerialization.jsonObject(with: Data(body)) as? [[String: Any]] ?? []
            var out: [String: Int] = [:]
            for queue in list { if let name = queue["name"] as? String { out[name] = queue["messages"] as? Int ?? 0 } }
            return out
        }
    }

    static let topology = """
        work_queues:
          default: {delivery_limit: 50, task_timeout: 10s, retries: 5}
        retry:
          tiers: [1s, 5s]
        """

    func launchBridge(list: String, topology: URL) throws -> Process {
        let process = Process()
        process.executableURL = TestEnvironment.builtProgram("aq-bridge")
        process.arguments = ["--prefetch", "300", "--listen", "", "--log-level", "info", "--shutdown-grace", "10"]
        // A crash prints its backtrace into the log.
        process.environment = ["AQ_AMQP_URL": list, "AQ_TOPOLOGY": topology.path, "PATH": "/usr/bin:/bin",
                               "SWIFT_BACKTRACE": "enable=yes,interactive=no,color=no"]
        process.standardOutput = FileHandle.nullDevice
        // Each bridge's log in the run's folder (printed when a test fails there).
        let log = topology.appendingPathComponent("bridge-\(UUID().uuidString.prefix(6)).log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        process.standardError = try FileHandle(forWritingTo: log)
        try process.run()
        return process
    }

    /// What one run of the cluster tests sees: webhooks by kind, callbacks, a probe's arrival.
    final class Seen: Sendable {
        let tasks = Mutex<Set<String>>([])
        /// Every report each batch's webhook got (a duplicate after a crash is allowed).
        let batches = Mutex<[String: [[String: Int]]]>([:])
        let chains = Mutex<[String: String]>([:])
        let callbacks = Atomic<Int>(0)
        let probes = Mutex<[String: ContinuousClock.Instant]>([:])
    }

    struct Sink {
        let seen = Seen()
        let server: HTTPServer

        init() throws {
            let seen = self.seen
            self.server = try HTTPServer { request, responder in
                switch request.path {
                case "/task-done":
                    if let id = request.header("AsyncQueue-Task-Id") { seen.tasks.withLock { _ = $0.insert(id) } }
                    return responder.respond(.json("{}"))
                case "/batch-done":
                    let report = (try? JSONSerialization.jsonObject(with: Data(request.body))) as? [String: Any]
                    if let id = report?["batchId"] as? String { seen.batches.withLock { $0[id, default: []].append(report?["counts"] as? [String: Int] ?? [:]) } }
                    return responder.respond(.json("{}"))
                case "/chain-done":
                    let report = (try? JSONSerialization.jsonObject(with: Data(request.body))) as? [String: Any]
                    if let id = report?["chainId"] as? String { seen.chains.withLock { $0[id] = report?["status"] as? String ?? "?" } }
                    return responder.respond(.json("{}"))
                case "/probe":
                    if let id = request.header("AsyncQueue-Task-Id") { seen.probes.withLock { $0[id] = $0[id] ?? .now } }
                    return responder.respond(.json("{}"))
                default:
                    seen.callbacks.add(1, ordering: .relaxed)
                    // Callbacks answer after 5 ms, from another thread.
                    DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(5)) { responder.respond(.json(#"{"ok":true}"#)) }
                }
            }
        }

        var base: String { "http://127.0.0.1:\(self.server.port)" }
    }

    /// A fresh virtual host on the cluster with the topology applied, three bridges (each
    /// starting at another node), and a confirming publisher.
    struct Run {
        let cluster: Cluster
        let vhost: String
        let dir: URL
        var bridges: [Process]
        let connection: AMQPConnection
        let channel: AMQPChannel
    }

    func start(_ cluster: Cluster) async throws -> Run {
        // Every node up (an earlier test may have stopped at a fault).
        try await cluster.script("start", node: cluster.urls.count)
        let vhost = "aq-cluster-\(UUID().uuidString.prefix(8).lowercased())"
        try await cluster.call("PUT", "/api/vhosts/\(vhost)")
        try await cluster.call("PUT", "/api/permissions/\(vhost)/guest", #"{"configure":".*","write":".*","read":".*"}"#)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(vhost)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try Self.topology.write(to: dir.appendingPathComponent("asyncqueue.yaml"), atomically: true, encoding: .utf8)
        let spec = try TopologyLoader.load(paths: [dir.path])
        let target = try BrokerTarget(amqpURL: cluster.list(vhost: vhost), managementURL: cluster.management.joined(separator: " "))
        try await TopologyApplier.apply(spec, on: target)
        // Every queue has a replica on every node and every node runs: `aq topology plan` has
        // nothing to say about them. (Where the leaders went depends on the other virtual hosts
        // of the cluster — `balanced` counts them all — so a one-node-leaders warning may come.)
        let plan = try await TopologyApplier.plan(spec, on: target)
        #expect(plan.clusterNodes == cluster.urls.count)
        #expect(plan.clusterWarnings.filter { !$0.message.contains("the leaders of all") }.isEmpty, "\(plan.clusterWarnings)")
        let bridges = try (0..<3).map { try self.launchBridge(list: cluster.list(vhost: vhost, startingAt: $0), topology: dir) }
        var configuration = try AMQPConfiguration(url: cluster.list(vhost: vhost))
        configuration.recovery.initialDelay = .milliseconds(50)
        let connection = try await AMQPConnection.connect(configuration: configuration)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        return Run(cluster: cluster, vhost: vhost, dir: dir, bridges: bridges, connection: connection, channel: channel)
    }

    /// Publishes `tasks` plain tasks, `batches` batches of 20 and `chains` three-step chains
    /// whose second step fans out to 5, shuffled, confirmed.
    func publishMix(_ run: Run, _ sink: Sink, tasks: Int, batches: Int, chains: Int) async throws {
        let base = sink.base
        var bodies: [(String, String)] = []
        for index in 0..<tasks {
            bodies.append(("t-\(index)", #"{"callbackUrl":"\#(base)/cb","payload":{"i":\#(index)},"webhookUrl":"\#(base)/task-done"}"#))
        }
        let child = #"{"callbackUrl":"\#(base)/child","payload":{}}"#
        for index in 0..<batches {
            bodies.append(("b-\(index)", #"{"batch":{"id":"b-\#(index)","webhookUrl":"\#(base)/batch-done"},"tasks":[\#(Array(repeating: child, count: 20).joined(separator: ","))]}"#))
        }
        let step = #"{"callbackUrl":"\#(base)/step"}"#
        let fanOut = #"{"batch":{"join":"all"},"tasks":[\#(Array(repeating: child, count: 5).joined(separator: ","))]}"#
        for index in 0..<chains {
            bodies.append(("c-\(index)", #"{"chain":{"id":"c-\#(index)","webhookUrl":"\#(base)/chain-done"},"payload":{"i":\#(index)},"steps":[\#(step),\#(fanOut),\#(step)]}"#))
        }
        // Interleaved, so that every kind is in flight when the faults come.
        bodies.shuffle()
        var confirms: [AMQPPublishConfirm] = []
        for (id, body) in bodies {
            confirms.append(run.channel.beginPublish(Array(body.utf8), exchange: "aq.tasks", routingKey: "default",
                                                     properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: id)))
        }
        for confirm in confirms { #expect(try await confirm.result() == .confirmed) }
    }

    func waitFor(_ what: @autoclosure () -> String, timeout: Duration, _ done: () -> Bool) async throws {
        let deadline = ContinuousClock.now + timeout
        while !done() {
            guard ContinuousClock.now < deadline else { throw HarnessError(description: "timed out waiting for \(what()) (bridge logs in \(FileManager.default.temporaryDirectory.path)/aq-cluster-*)") }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// Every webhook arrived with the right counts, and the broker holds nothing.
    func expectEverythingEnded(_ run: Run, _ sink: Sink, tasks: Int, batches: Int, chains: Int) async throws {
        try await self.waitFor("every task, batch and chain webhook (seen: \(sink.seen.tasks.withLock { $0.count }) tasks, \(sink.seen.batches.withLock { $0.count }) batches, \(sink.seen.chains.withLock { $0.count }) chains)", timeout: .seconds(360)) {
            sink.seen.tasks.withLock { $0.count } == tasks && sink.seen.batches.withLock { $0.count } == batches && sink.seen.chains.withLock { $0.count } == chains
        }
        for (id, reports) in sink.seen.batches.withLock({ $0 }) {
            #expect(reports.contains { $0["completed"] == 20 && $0["failed"] == 0 }, "batch \(id): \(reports)")
            // A duplicate (possible after a crash) says the same.
            #expect(Set(reports).count == 1, "batch \(id): \(reports)")
        }
        for (id, status) in sink.seen.chains.withLock({ $0 }) { #expect(status == "completed", "chain \(id): \(status)") }
        // Nothing left: quorum queues' counts lag a few seconds, so wait for them to settle.
        var held: [String: Int] = [:]
        let deadline = ContinuousClock.now + .seconds(60)
        repeat {
            // An ended batch's bookkeeping queues (its checkpoint, its results) can outlive a
            // bridge killed while it deleted them: the batch policy expires them. Not tasks.
            held = try await run.cluster.held(vhost: run.vhost).filter {
                $0.value > 0 && !($0.key.hasPrefix("aq.batch.") && ($0.key.hasSuffix(".state") || $0.key.hasSuffix(".results")))
            }
            if held.isEmpty { break }
            try await Task.sleep(for: .seconds(1))
        } while ContinuousClock.now < deadline
        #expect(held.isEmpty, "the broker still holds \(held)")
    }

    func finish(_ run: Run) async {
        // No bridge died on its own along the way (a killed one was replaced).
        for bridge in run.bridges where !bridge.isRunning {
            Issue.record("a bridge ended by itself: \(bridge.terminationReason == .uncaughtSignal ? "signal" : "status") \(bridge.terminationStatus) (logs in \(run.dir.path))")
        }
        for bridge in run.bridges where bridge.isRunning {
            bridge.terminate()
            bridge.waitUntilExit()
        }
        await run.connection.close()
        _ = try? await run.cluster.call("DELETE", "/api/vhosts/\(run.vhost)")
    }

    /// One scenario: a fresh vhost and three bridges on the cluster, the mix published, the
    /// faults `during` brings while it runs; then every webhook arrived, nothing is left, no
    /// bridge ended by itself.
    func scenario(tasks: Int, batches: Int = 30, chains: Int = 100,
                  during faults: (Cluster, inout Run, Sink) async throws -> Void) async throws {
        let cluster = try Cluster.fromEnvironment()
        let sink = try Sink()
        defer { sink.server.shutdown() }
        var run = try await self.start(cluster)
        defer { for bridge in run.bridges where bridge.isRunning { kill(bridge.processIdentifier, SIGKILL) } }
        try await self.publishMix(run, sink, tasks: tasks, batches: batches, chains: chains)
        try await faults(cluster, &run, sink)
        try await self.expectEverythingEnded(run, sink, tasks: tasks, batches: batches, chains: chains)
        await self.finish(run)
    }

    /// Plain tasks, batches and chains (one step of each chain fans out) in flight on three
    /// bridges; the node leading the work queue is killed, later a bridge; both come back. Every
    /// task, batch and chain ends (its webhook arrives), and the broker holds nothing at the end.
    @Test func aNodeAndABridgeKilledUnderLoadLoseNothing() async throws {
        let tasks = 3000
        try await self.scenario(tasks: tasks) { cluster, run, sink in
            // The node leading the work queue dies with work in flight; later a bridge.
            let leader = try await cluster.leader(of: "aq.work.default", vhost: run.vhost)
            try await self.waitFor("a fifth of the tasks", timeout: .seconds(120)) { sink.seen.tasks.withLock { $0.count } >= tasks / 5 }
            try await cluster.script("kill", node: leader)
            let killedAt = ContinuousClock.now
            // How long until a task published after the kill is called back (publisher and bridges
            // move to another node, the queue elects a new leader).
            // (Published until confirmed: the publisher's own node may be the one that died.)
            while true {
                let probe = run.channel.beginPublish(Array(#"{"callbackUrl":"\#(sink.base)/probe","payload":{}}"#.utf8), exchange: "aq.tasks", routingKey: "default",
                                                     properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: "probe-1"))
                if (try? await probe.result()) == .confirmed { break }
                guard ContinuousClock.now - killedAt < .seconds(60) else { throw HarnessError(description: "the probe could not be published") }
                try await Task.sleep(for: .milliseconds(20))
            }
            try await self.waitFor("the probe", timeout: .seconds(60)) { sink.seen.probes.withLock { $0["probe-1"] != nil } }
            // `aq topology plan` on the management APIs, the dead node's first: it passes over it
            // and says the node is down.
            let spec = try TopologyLoader.load(paths: [run.dir.path])
            let management = ([cluster.management[leader - 1]] + cluster.management.enumerated().filter { $0.offset != leader - 1 }.map(\.element))
            let plan = try await TopologyApplier.plan(spec, on: try BrokerTarget(amqpURL: cluster.list(vhost: run.vhost), managementURL: management.joined(separator: ",")))
            #expect(plan.clusterWarnings.contains { $0.message.hasPrefix("node(s) not running: ") }, "\(plan.clusterWarnings)")
            let flowingAgain = (sink.seen.probes.withLock { $0["probe-1"] } ?? .now) - killedAt
            try await self.waitFor("half of the tasks", timeout: .seconds(120)) { sink.seen.tasks.withLock { $0.count } >= tasks / 2 }
            kill(run.bridges[1].processIdentifier, SIGKILL)
            run.bridges[1].waitUntilExit()
            // (Not a synchronisation: the node stays down a moment with a bridge fewer.)
            try await Task.sleep(for: .seconds(2))
            try await cluster.script("restart", node: leader)
            run.bridges[1] = try self.launchBridge(list: cluster.list(vhost: run.vhost, startingAt: 1), topology: run.dir)
            print("cluster: a task published after the kill of the work queue's leader node was called back \(flowingAgain) later")
        }
    }

    /// Every node stopped cleanly and started again, one after the other, while tasks, batches
    /// and chains run: nothing is lost.
    @Test func aRollingRestartOfEveryNodeUnderLoadLosesNothing() async throws {
        try await self.scenario(tasks: 4000) { cluster, _, sink in
            try await self.waitFor("the first tasks", timeout: .seconds(120)) { sink.seen.tasks.withLock { $0.count } >= 200 }
            let started = ContinuousClock.now
            for node in 1...cluster.urls.count {
                try await cluster.script("bounce", node: node)
            }
            print("cluster: rolling restart of \(cluster.urls.count) nodes took \(ContinuousClock.now - started)")
        }
    }
}
