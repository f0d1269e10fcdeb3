import AQTopology
import Foundation
import Testing

@Suite struct TopologyFileTests {
    static let repositoryRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()

    func parse(_ files: (String, String)...) throws(TopologyError) -> TopologySpec {
        try TopologyLoader.parse(files.map { (name: $0.0, text: $0.1) })
    }

    func issues(_ files: (String, String)...) -> [TopologyIssue] {
        do {
            _ = try TopologyLoader.parse(files.map { (name: $0.0, text: $0.1) })
            return []
        } catch {
            return error.issues
        }
    }

    @Test func theShippedTopologyIsValidAndWarningFree() throws {
        let spec = try TopologyLoader.load(paths: [Self.repositoryRoot.appendingPathComponent("topology").path])
        #expect(spec.workQueues.map(\.name) == ["default", "reports"])
        #expect(spec.checks().isEmpty, "\(spec.checks())")
        let topology = spec.expand()
        #expect(topology.queue(named: "aq.work.default")?.type == "quorum")
        #expect(topology.policy(named: "aq.work.reports")?.definition["delivery-limit"] == 5)
    }

    @Test func minimalFileGetsTheDefaults() throws {
        let spec = try self.parse(("t.yaml", "work_queues:\n  default:\n"))
        #expect(spec.taskExchange == "aq.tasks")
        #expect(spec.queueName(forWorkQueue: "default") == "aq.work.default")
        #expect(spec.retryTiers.map(\.description) == ["1s", "5s", "30s", "2m", "10m"])
        #expect(spec.workQueue(named: "default")?.deliveryLimit == 10)
        #expect(spec.retryTier(forRetry: 1)?.description == "1s")
        #expect(spec.retryTier(forRetry: 99)?.description == "10m")
    }

    @Test func expansionMapsEachPatternOntoObjects() throws {
        let spec = try self.parse(("t.yaml", """
            work_queues:
              default: {delivery_limit: 4, max_length: 1000}
            retry: {tiers: [1s, 1m]}
            """))
        let t = spec.expand()
        // Tasks: direct exchange, work queue bound by its name, alternate exchange by policy.
        #expect(t.exchange(named: "aq.tasks")?.type == "direct")
        #expect(t.bindings.contains(Topology.Binding(source: "aq.tasks", destination: "aq.work.default", routingKey: "default")))
        #expect(t.policy(named: "aq.tasks.unrouted")?.definition == ["alternate-exchange": "aq.unrouted"])
        #expect(t.policy(named: "aq.tasks.unrouted")?.applyTo == "exchanges")
        // Work queue: quorum; tunables in its policy.
        #expect(t.queue(named: "aq.work.default")?.arguments == ["x-queue-type": "quorum"])
        #expect(t.policy(named: "aq.work.default")?.definition == [
            "delivery-limit": 4, "max-length": 1000, "dead-letter-exchange": "aq.dlx",
            "dead-letter-strategy": "at-least-once", "overflow": "reject-publish", "queue-leader-locator": "balanced",
        ])
        // Every quorum queue's policy spreads leaders over a cluster's nodes.
        for name in ["aq.unrouted", "aq.retry.1s", "aq.dead"] {
            let policies = t.policies.filter { policy in
                (try? Regex(policy.pattern).wholeMatch(in: name)) != nil || (try? Regex(policy.pattern).prefixMatch(in: name)) != nil
            }
            #expect(policies.count == 1, "\(name): \(policies.map(\.name))")
            #expect(policies.first?.definition["queue-leader-locator"] == "balanced", "\(name)")
        }
        // Retry tiers: one fixed-TTL queue each, back through the default exchange.
        #expect(t.queue(named: "aq.retry.1m")?.arguments["x-message-ttl"] == 60000)
        #expect(t.queue(named: "aq.retry.1m")?.arguments["x-dead-letter-exchange"] == "")
        #expect(t.queue(named: "aq.retry.1m")?.arguments["x-dead-letter-routing-key"] == nil)
        #expect(t.bindings.contains(Topology.Binding(source: "aq.retry", destination: "aq.retry.1s",
                                                     arguments: ["x-match": "all", "retry-tier": "1s"])))
        // Fan-in and chains.
        #expect(t.policy(named: "aq.batches")?.pattern == "^aq\\.batch\\.")
        #expect(spec.batchQueueArguments["x-single-active-consumer"] == true)
        #expect(t.bindings.contains(Topology.Binding(source: "aq.chain", destination: "aq.work.default", routingKey: "default.*.*")))
    }

    @Test func unknownKeysWrongTypesAndBadNamesAreReportedWithTheirLocation() {
        let found = self.issues(("a.yaml", """
            tasks:
              exchange: amq.mine
              exchnage: typo
            work_queues:
              default:
                delivery_limit: many
                task_timeout: 5 minutes
            retry:
              tiers: [5s, 1s]
            """))
        func has(_ line: Int, _ path: String, _ text: String) -> Bool {
            found.contains { $0.location?.line == line && $0.location?.keyPath == path && $0.message.contains(text) }
        }
        #expect(has(2, "tasks.exchange", "reserves"), "\(found)")
        #expect(has(3, "tasks.exchnage", "unknown key 'exchnage'; expected one of: exchange"), "\(found)")
        #expect(has(6, "work_queues.default.delivery_limit", "expected an integer"), "\(found)")
        #expect(has(7, "work_queues.default.task_timeout", "expected a duration"), "\(found)")
        #expect(has(9, "retry.tiers[1]", "must grow"), "\(found)")
        #expect(found.allSatisfy { $0.location?.file == "a.yaml" })
    }

    @Test func duplicatesAcrossFilesAndKeysAreErrors() {
        let found = self.issues(
            ("a.yaml", "work_queues:\n  default: {}\nretry: {tiers: [1s]}\n"),
            ("b.yaml", "work_queues:\n  default: {}\nretry: {tiers: [2s]}\n"))
        #expect(found.contains { $0.message.contains("work queue 'default' is already defined at a.yaml:2") }, "\(found)")
        #expect(found.contains { $0.message.contains("section 'retry' is already defined in a.yaml") })
        let keys = self.issues(("c.yaml", "work_queues: {default: {}}\nchains: {exchange: x}\nchains: {exchange: y}\n"))
        #expect(keys.contains { $0.message.contains("duplicate key 'chains'") && [2, 3].contains($0.location?.line ?? 0) }, "\(keys)")
        let clash = self.issues(("a.yaml", "work_queues: {default: {}}\ndead_letter: {queue: aq.unrouted}\n"))
        #expect(clash.contains { $0.message.contains("queue 'aq.unrouted' is defined twice") }, "\(clash)")
    }

    @Test func rawObjectsAreCheckedForDanglingBindingsAndRabbitMQRules() {
        let found = self.issues(("o.yaml", """
            work_queues: {default: {}}
            objects:
              queues:
                - {name: tap, type: classic, durable: false}
                - {name: lazy, type: lazy}
              bindings:
                - {source: aq.tasks, destination: tap, routing_key: "#"}
                - {source: aq.nowhere, destination: tap}
                - {source: aq.tasks, destination: ghost}
              policies:
                - {name: p, pattern: "(", definition: {x-max-length: 1}}
            """))
        #expect(found.contains { $0.message.contains("queue type must be quorum, classic or stream, not 'lazy'") })
        #expect(found.contains { $0.message.contains("source exchange 'aq.nowhere' is not defined") })
        #expect(found.contains { $0.message.contains("destination queue 'ghost' is not defined") })
        #expect(found.contains { $0.message.contains("not a valid regular expression") })
        #expect(found.contains { $0.message.contains("policy keys have no 'x-' prefix") })
        #expect(!found.contains { $0.message.contains("'tap'") })
    }

    @Test func brokenYAMLIsOneClearError() {
        let found = self.issues(("c.yaml", "tasks: [\n"))
        #expect(found.count == 1)
        #expect(found.first?.message.hasPrefix("not valid YAML") == true)
        #expect(found.first?.location?.file == "c.yaml")
        #expect(self.issues(("e.yaml", "")).contains { $0.message.contains("at least one work queue") })
    }

    @Test func checksWarnWhereASettingDefeatsTheDesign() throws {
        let spec = try self.parse(("w.yaml", """
            work_queues:
              slow: {task_timeout: 45m, retries: 5, delivery_limit: 3}
            retry: {tiers: [1s, 20d]}
            dead_letter: {expires_after: 14d}
            fan_in: {batch_lifetime: 2h, queue_expires: 1h}
            """))
        let warnings = spec.checks().map(\.message)
        #expect(warnings.contains { $0.contains("task_timeout 45m of work queue 'slow' reaches the broker's consumer_timeout (30m)") })
        #expect(!warnings.contains { $0.contains("batch_lifetime 2h reaches consumer_timeout") }, "an aggregator checkpoints: long batches are fine")
        #expect(warnings.contains { $0.contains("queue_expires 1h is not longer than batch_lifetime 2h") })
        #expect(warnings.contains { $0.contains("longest retry tier (20d) is not shorter than dead_letter.expires_after (14d)") })
        #expect(warnings.contains { $0.contains("delivery_limit 3 of work queue 'slow' is not above its retries (5)") })
    }

    @Test func timeSpansParseAndPrintCanonically() {
        #expect(TimeSpan("500ms")?.milliseconds == 500)
        #expect(TimeSpan("90s")?.description == "90s")
        #expect(TimeSpan("120s")?.description == "2m")
        #expect(TimeSpan("7d")?.milliseconds == 604_800_000)
        #expect(TimeSpan("5 minutes") == nil)
        #expect(TimeSpan("-1s") == nil)
        #expect(TimeSpan("") == nil)
    }

    @Test func exportIsDefinitionsJSONWithQueueTypesInArguments() throws {
        let spec = try self.parse(("t.yaml", "work_queues: {default: {}}\n"))
        let json = try Definitions(spec.expand(), vhost: "shop").json()
        let decoded = try Definitions.decode(Data(json.utf8))
        #expect(decoded.queues.allSatisfy { $0.arguments["x-queue-type"] != nil && $0.vhost == "shop" })
        #expect(decoded.policies.contains { $0.name == "aq.work.default" && $0.applyTo == "queues" })
        #expect(json.contains("\"apply-to\" : \"queues\""))
        #expect(decoded.topology == Topology(exchanges: spec.expand().exchanges, queues: spec.expand().queues,
                                             bindings: spec.expand().bindings, policies: spec.expand().policies))
    }

    @Test func planSeesMissingDifferentAndExtra() throws {
        let spec = try self.parse(("t.yaml", "work_queues: {default: {}}\n"))
        let desired = spec.expand()
        var live = desired
        live.queues.removeAll { $0.name == "aq.dead" }
        live.queues[live.queues.firstIndex { $0.name == "aq.work.default" }!].arguments["x-queue-type"] = "classic"
        live.policies[live.policies.firstIndex { $0.name == "aq.work.default" }!].definition["delivery-limit"] = 99
        live.queues.append(Topology.Queue(name: "leftover"))
        live.queues.append(Topology.Queue(name: "aq.batch.123"))
        live.exchanges.append(Topology.Exchange(name: "amq.direct", type: "direct"))
        let plan = TopologyPlan.compute(desired: desired, live: live, runtimeQueuePrefix: spec.batchQueuePrefix)
        #expect(plan.missing.map(\.name) == ["aq.dead"])
        #expect(plan.updates.map(\.name) == ["aq.work.default"])
        #expect(plan.conflicts.map(\.name) == ["aq.work.default"])
        #expect(plan.conflicts.first?.detail.contains("x-queue-type is \"classic\", files say \"quorum\"") == true)
        #expect(plan.conflicts.first?.detail.contains("cannot change a queue's arguments in place") == true)
        #expect(plan.extra.map(\.name) == ["leftover"])
        #expect(plan.runtimeQueues == 1)
        #expect(!plan.isInSync)
        #expect(TopologyPlan.compute(desired: desired, live: desired, runtimeQueuePrefix: "aq.batch.").isInSync)
    }
}
