import AQTopology
import Testing

/// `aq topology plan`'s cluster warnings, from views shaped like the management API's answers.
@Suite struct ClusterCheckTests {
    let spec: TopologySpec = {
        var spec = TopologySpec()
        spec.workQueues = [.init(name: "default"), .init(name: "reports")]
        return spec
    }()
    let nodes = ["rabbit@a", "rabbit@b", "rabbit@c"]

    /// Every queue of the expansion as a healthy quorum queue with replicas everywhere; leaders
    /// taken in turn from `leaders`.
    func view(leaders: [String]? = nil, running: Set<String>? = nil) -> ClusterView {
        let leaders = leaders ?? self.nodes
        let up = running ?? Set(self.nodes)
        let queues = self.spec.expand().queues.enumerated().map { index, queue in
            ClusterView.Queue(name: queue.name, type: queue.type, node: leaders[index % leaders.count],
                              members: self.nodes, online: self.nodes.filter(up.contains))
        }
        return ClusterView(nodes: self.nodes.map { .init(name: $0, running: up.contains($0)) }, queues: queues)
    }

    func warnings(_ view: ClusterView) -> [String] {
        self.spec.clusterChecks(desired: self.spec.expand(), view: view).map(\.message)
    }

    @Test func aHealthyClusterWithSpreadLeadersHasNoWarningAndOneNodeIsNeverACluster() {
        #expect(self.warnings(self.view()) == [])
        let single = ClusterView(nodes: [.init(name: "rabbit@a", running: true)],
                                 queues: [.init(name: "aq.work.default", type: "classic", node: "rabbit@a")])
        #expect(self.warnings(single) == [])
    }

    @Test func everyLeaderOnOneNodeIsReportedWithTheCommandThatSpreadsThem() {
        let found = self.warnings(self.view(leaders: ["rabbit@a"]))
        #expect(found.count == 1)
        #expect(found.first?.contains("leaders of all") == true)
        #expect(found.first?.contains("rabbitmq-queues rebalance quorum") == true)
    }

    @Test func aNodeDownAndAQueueWithoutItsMajorityAreReported() {
        var view = self.view(running: ["rabbit@a"])
        let found = self.warnings(view)
        #expect(found.contains { $0.contains("not running: rabbit@b, rabbit@c") })
        #expect(found.contains { $0.contains("'aq.work.default' has 2 of 3 replicas offline") })
        // One replica down of three: the queue still has its majority; only the node is reported.
        view = self.view(running: ["rabbit@a", "rabbit@b"])
        #expect(self.warnings(view).filter { $0.contains("replicas offline (") }.isEmpty)
        #expect(self.warnings(view).contains { $0.contains("not running: rabbit@c") })
    }

    @Test func aQuorumQueueDeclaredBeforeANodeJoinedIsMissingReplicas() throws {
        var view = self.view()
        let index = try #require(view.queues.firstIndex { $0.name == "aq.work.reports" })
        view.queues[index].members = ["rabbit@a"]
        let found = self.warnings(view)
        #expect(found == ["quorum queue 'aq.work.reports' has replicas on 1 of 3 nodes (none on rabbit@b, rabbit@c): it was declared before those nodes joined; `rabbitmq-queues grow <node> all` adds them"])
    }

    @Test func twoOrFourNodesAClassicQueueInTheFilesAndBatchesOnADownNodeAreReported() {
        var view = self.view()
        view.nodes.removeLast()
        #expect(self.warnings(view).contains { $0.contains("2 nodes") && $0.contains("losing either node") })
        view = self.view()
        view.nodes.append(.init(name: "rabbit@d", running: true))
        #expect(self.warnings(view).contains { $0.contains("4 nodes") })

        var spec = self.spec
        spec.extra.queues = [.init(name: "legacy", arguments: ["x-queue-type": "classic"])]
        view = self.view(running: ["rabbit@a", "rabbit@b"])
        view.queues.append(.init(name: "legacy", type: "classic", node: "rabbit@c"))
        view.queues.append(.init(name: "aq.batch.b1.replies", type: "classic", node: "rabbit@c"))
        view.queues.append(.init(name: "aq.batch.b1.results", type: "classic", node: "rabbit@c"))
        view.queues.append(.init(name: "aq.batch.b2.replies", type: "classic", node: "rabbit@a"))
        let found = spec.clusterChecks(desired: spec.expand(), view: view).map(\.message)
        #expect(found.contains { $0.hasPrefix("classic queue 'legacy' lives on one node (rabbit@c)") })
        #expect(found.contains { $0.hasPrefix("2 per-batch queue(s) are on node(s) not running (rabbit@c)") })
    }
}
