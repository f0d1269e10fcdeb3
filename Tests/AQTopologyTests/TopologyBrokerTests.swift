import AMQPClient
import AQHTTP
import AQTestSupport
import AQTopology
import Foundation
import Testing

/// A fresh virtual host on the test broker per test, deleted afterwards.
struct TestVHost {
    let name: String
    let amqpURL: String
    let managementURL: String
    var target: BrokerTarget { get throws { try BrokerTarget(amqpURL: self.amqpURL, managementURL: self.managementURL) } }

    static var baseAMQP: String { TestEnvironment.amqpURL }
    static var management: String { TestEnvironment.managementURL }

    static func make() async throws -> TestVHost {
        let name = "aq-test-\(UUID().uuidString.prefix(8).lowercased())"
        let config = try AMQPConfiguration(url: self.baseAMQP)
        try await self.call("PUT", "/api/vhosts/\(name)", nil)
        try await self.call("PUT", "/api/permissions/\(name)/\(config.user)", #"{"configure":".*","write":".*","read":".*"}"#)
        return TestVHost(name: name, amqpURL: "amqp://\(config.user):\(config.password)@\(config.host):\(config.port)/\(name)",
                         managementURL: self.management)
    }

    func delete() async {
        _ = try? await Self.call("DELETE", "/api/vhosts/\(self.name)", nil)
    }

    @discardableResult
    static func call(_ method: String, _ path: String, _ body: String?) async throws -> HTTPResponse {
        let config = try AMQPConfiguration(url: self.baseAMQP)
        let response = try await BlockingHTTP.request(method: method, url: self.management + path, headers: ["Content-Type: application/json"],
                                                      body: body.map { Array($0.utf8) }, username: config.user, password: config.password)
        guard (200..<300).contains(response.status) else {
            throw ApplyFailure(description: "\(method) \(path): \(response.status) \(response.bodyString)")
        }
        return response
    }
}

@Suite(.serialized, .timeLimit(.minutes(2))) struct TopologyBrokerTests {
    static let defaultSpec: TopologySpec = {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        do { return try TopologyLoader.load(paths: [root.appendingPathComponent("topology").path]) } catch { fatalError("\(error)") }
    }()

    @Test func applyTwiceChangesNothingTheSecondTime() async throws {
        let vhost = try await TestVHost.make()
        defer { Task { await vhost.delete() } }
        let target = try vhost.target
        let first = try await TopologyApplier.apply(Self.defaultSpec, on: target)
        #expect(first.missing.count == Self.defaultSpec.expand().exchanges.count + Self.defaultSpec.expand().queues.count
            + Self.defaultSpec.expand().bindings.count + Self.defaultSpec.expand().policies.count)
        let second = try await TopologyApplier.apply(Self.defaultSpec, on: target)
        #expect(second.isInSync)
        #expect(second.missing.isEmpty && second.updates.isEmpty && second.extra.isEmpty)
    }

    @Test func planShowsChangesMadeBehindItsBack() async throws {
        let vhost = try await TestVHost.make()
        defer { Task { await vhost.delete() } }
        let target = try vhost.target
        try await TopologyApplier.apply(Self.defaultSpec, on: target)
        // Behind its back: delete a queue, edit a policy, add a stray queue.
        let connection = try await AMQPConnection.connect(vhost.amqpURL)
        let channel = try await connection.openChannel()
        try await channel.deleteQueue("aq.dead")
        try await channel.declareQueue("stray", durable: true)
        await connection.close()
        try await TestVHost.call("PUT", "/api/policies/\(vhost.name)/aq.work.default",
                                 #"{"pattern":"^aq\\.work\\.default$","apply-to":"queues","priority":10,"definition":{"delivery-limit":99}}"#)

        let plan = try await TopologyApplier.plan(Self.defaultSpec, on: target)
        #expect(plan.missing.map(\.name).contains("aq.dead"))
        #expect(plan.missing.contains { $0.kind == .binding && $0.name == "aq.dlx → aq.dead" })
        #expect(plan.updates.map(\.name) == ["aq.work.default"])
        #expect(plan.updates.first?.detail.contains("\"delivery-limit\":99") == true)
        #expect(plan.extra.map(\.name) == ["stray"])
        #expect(!plan.isInSync)

        // Apply repairs it, and leaves the stray queue unless asked.
        try await TopologyApplier.apply(Self.defaultSpec, on: target)
        let repaired = try await TopologyApplier.plan(Self.defaultSpec, on: target)
        #expect(repaired.isInSync)
        #expect(repaired.extra.map(\.name) == ["stray"])
        try await TopologyApplier.apply(Self.defaultSpec, on: target, deleteExtra: true)
        #expect(try await TopologyApplier.plan(Self.defaultSpec, on: target).extra.isEmpty)
    }

    @Test func aQueueThatCannotChangeInPlaceStopsApplyBeforeAnyChange() async throws {
        let vhost = try await TestVHost.make()
        defer { Task { await vhost.delete() } }
        let target = try vhost.target
        let connection = try await AMQPConnection.connect(vhost.amqpURL)
        let channel = try await connection.openChannel()
        try await channel.declareQueue("aq.work.default", durable: true, arguments: ["x-queue-type": "classic"])
        await connection.close()
        let error = await #expect(throws: ApplyFailure.self) {
            try await TopologyApplier.apply(Self.defaultSpec, on: target)
        }
        #expect(error?.description.contains("nothing was applied") == true)
        #expect(error?.description.contains("aq.work.default") == true)
        #expect(error?.description.contains("cannot change a queue's arguments in place") == true)
        // Nothing half-applied: the task exchange was not created.
        let plan = try await TopologyApplier.plan(Self.defaultSpec, on: target)
        #expect(plan.missing.contains { $0.kind == .exchange && $0.name == "aq.tasks" })
    }

    @Test func exportImportedIntoAFreshVHostMatchesThePlan() async throws {
        let vhost = try await TestVHost.make()
        defer { Task { await vhost.delete() } }
        let json = try Definitions(Self.defaultSpec.expand(), vhost: vhost.name).json()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("\(vhost.name).json")
        try json.write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        try rabbitmqctl("import_definitions", file.path)
        // Import is asynchronous: wait for it, then nothing is left to do.
        let target = try vhost.target
        let deadline = ContinuousClock.now + .seconds(30)
        var plan = try await TopologyApplier.plan(Self.defaultSpec, on: target)
        while !plan.isInSync && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(200))
            plan = try await TopologyApplier.plan(Self.defaultSpec, on: target)
        }
        #expect(plan.isInSync, "\(plan)")
        #expect(plan.extra.isEmpty)
    }

    @Test func everyPatternRoutesAsDesigned() async throws {
        let vhost = try await TestVHost.make()
        defer { Task { await vhost.delete() } }
        var spec = Self.defaultSpec
        spec.retryTiers = [.seconds(1)]
        try await TopologyApplier.apply(spec, on: try vhost.target)
        let connection = try await AMQPConnection.connect(vhost.amqpURL)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        func depth(_ queue: String) async throws -> UInt32 { try await channel.declareQueue(queue, passive: true).messageCount }
        func waitFor(_ queue: String, _ count: UInt32) async throws {
            let deadline = ContinuousClock.now + .seconds(20)
            while try await depth(queue) < count {
                guard ContinuousClock.now < deadline else {
                    Issue.record("\(queue) never reached \(count)")
                    return
                }
                try await Task.sleep(for: .milliseconds(50))
            }
        }

        // Task exchange: the routing key names the work queue.
        try await channel.publish("{}", exchange: "aq.tasks", routingKey: "default")
        try await channel.publish("{}", exchange: "aq.tasks", routingKey: "reports")
        #expect(try await depth("aq.work.default") == 1)
        #expect(try await depth("aq.work.reports") == 1)
        // Unknown routing key: the alternate exchange catches it.
        try await channel.publish("{}", exchange: "aq.tasks", routingKey: "no-such-queue")
        try await waitFor("aq.unrouted", 1)
        // Chains: <queue>.<chain>.<step> reaches the queue.
        try await channel.publish("{}", exchange: "aq.chain", routingKey: "reports.chain-1.step-2")
        #expect(try await depth("aq.work.reports") == 2)
        // Retry tier: back in the origin queue after the tier's TTL.
        try await channel.publish("retry me", exchange: "aq.retry", routingKey: "aq.work.default",
                                  properties: AMQPProperties(headers: ["retry-tier": "1s"], deliveryMode: .persistent))
        #expect(try await depth("aq.retry.1s") == 1)
        try await waitFor("aq.work.default", 2)
        #expect(try await depth("aq.retry.1s") == 0)
        // Rejected: dead-lettered with its reason.
        _ = try #require(try await channel.get("aq.work.default")).ack()
        let rejected = try #require(try await channel.get("aq.work.default"))
        #expect(rejected.bodyString == "retry me")
        try rejected.reject(requeue: false)
        try await waitFor("aq.dead", 1)
        let dead = try #require(try await channel.get("aq.dead"))
        #expect(dead.bodyString == "retry me")
        // x-death lists the most recent death first: rejected from the work queue, after the
        // earlier expiry from the retry tier.
        guard case .array(let deaths)? = dead.properties.headers?["x-death"], case .table(let last)? = deaths.first else {
            Issue.record("no x-death header")
            return
        }
        #expect(last["reason"]?.stringValue == "rejected")
        #expect(last["queue"]?.stringValue == "aq.work.default")
        try dead.ack()
        await connection.close()
    }

    @Test func unreachableBrokerAndMissingVHostAreClearErrors() async throws {
        let unreachable = try BrokerTarget(amqpURL: "amqp://guest:guest@127.0.0.1:1/%2F", managementURL: "http://127.0.0.1:1")
        let error = await #expect(throws: (any Error).self) { try await TopologyApplier.plan(Self.defaultSpec, on: unreachable) }
        #expect("\(error!)".contains("cannot reach the RabbitMQ management API at http://127.0.0.1:1"))
        let config = try AMQPConfiguration(url: TestVHost.baseAMQP)
        let missing = try BrokerTarget(amqpURL: "amqp://\(config.user):\(config.password)@\(config.host):\(config.port)/nope-\(UUID().uuidString.prefix(6))",
                                       managementURL: TestVHost.management)
        let vhostError = await #expect(throws: ApplyFailure.self) { try await TopologyApplier.apply(Self.defaultSpec, on: missing) }
        #expect(vhostError?.description.contains("does not exist") == true)
    }

    @Test func missingPermissionsRefuseBeforeAnyChange() async throws {
        let vhost = try await TestVHost.make()
        defer { Task { await vhost.delete() } }
        let user = "aq-limited-\(UUID().uuidString.prefix(6).lowercased())"
        try await TestVHost.call("PUT", "/api/users/\(user)", #"{"password":"pw","tags":"administrator"}"#)
        defer { Task { _ = try? await TestVHost.call("DELETE", "/api/users/\(user)", nil) } }
        try await TestVHost.call("PUT", "/api/permissions/\(vhost.name)/\(user)", #"{"configure":"^aq\\.work\\.","write":".*","read":".*"}"#)
        let config = try AMQPConfiguration(url: TestVHost.baseAMQP)
        let target = try BrokerTarget(amqpURL: "amqp://\(user):pw@\(config.host):\(config.port)/\(vhost.name)", managementURL: TestVHost.management)
        let error = await #expect(throws: ApplyFailure.self) { try await TopologyApplier.apply(Self.defaultSpec, on: target) }
        #expect(error?.description.contains("nothing was applied") == true)
        #expect(error?.description.contains("configure 'aq.tasks'") == true)
        #expect(error?.description.contains("configure 'aq.work.default'") == false)
        let plan = try await TopologyApplier.plan(Self.defaultSpec, on: try vhost.target)
        #expect(plan.missing.count == Self.defaultSpec.expand().exchanges.count + Self.defaultSpec.expand().queues.count
            + Self.defaultSpec.expand().bindings.count + Self.defaultSpec.expand().policies.count)
    }
}

@discardableResult
func rabbitmqctl(_ arguments: String...) throws -> String {
    try TestEnvironment.rabbitmqctl(arguments: arguments)
}
