/// What a cluster looks like to `aq topology plan`: its nodes and where each queue's replicas are.
/// Read from the management API (`/api/nodes`, `/api/queues`); checked by
/// ``TopologySpec/clusterChecks(desired:view:)`` without a broker.
public struct ClusterView: Sendable, Equatable {
    public struct Node: Sendable, Equatable {
        public var name: String
        public var running: Bool
        public init(name: String, running: Bool) {
            self.name = name
            self.running = running
        }
    }

    public struct Queue: Sendable, Equatable {
        public var name: String
        /// `quorum` or `classic` (or `stream`).
        public var type: String
        /// The quorum queue's leader, or the classic queue's home node.
        public var node: String?
        /// A quorum queue's replicas (empty for a classic queue).
        public var members: [String]
        /// The replicas that are up.
        public var online: [String]
        public init(name: String, type: String, node: String?, members: [String] = [], online: [String] = []) {
            self.name = name
            self.type = type
            self.node = node
            self.members = members
            self.online = online
        }
    }

    public var nodes: [Node]
    public var queues: [Queue]
    public init(nodes: [Node], queues: [Queue]) {
        self.nodes = nodes
        self.queues = queues
    }
}

extension TopologySpec {
    /// Settings and states that are wrong for a cluster (none for a single node): too few nodes
    /// for a majority, nodes down, quorum queues missing replicas on some nodes (declared before a
    /// node joined), every leader on one node, classic queues in the files (one node holds them),
    /// batches whose reply queue's node is down.
    public func clusterChecks(desired: Topology, view: ClusterView) -> [TopologyWarning] {
        guard view.nodes.count > 1 else { return [] }
        var warnings: [TopologyWarning] = []
        func warn(_ text: String) { warnings.append(TopologyWarning(location: nil, message: text)) }
        let all = view.nodes.map(\.name)
        let down = view.nodes.filter { !$0.running }.map(\.name)
        let live = Dictionary(view.queues.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })

        if view.nodes.count == 2 {
            warn("the cluster has 2 nodes: a quorum queue needs a majority of its replicas, so losing either node stops every work queue (2 of 2); run 3 or 5 nodes")
        } else if view.nodes.count % 2 == 0 {
            warn("the cluster has \(view.nodes.count) nodes: an even number tolerates no more lost nodes than \(view.nodes.count - 1) would; run an odd number")
        }
        if !down.isEmpty {
            warn("node(s) not running: \(down.joined(separator: ", ")). Their replicas are offline; a quorum queue stops when it loses its majority")
        }

        var leaders: [String: Int] = [:]
        var quorumCount = 0
        for queue in desired.queues {
            guard let current = live[queue.name] else { continue }
            if current.type == "quorum" {
                quorumCount += 1
                if let leader = current.node { leaders[leader, default: 0] += 1 }
                let missing = all.filter { !current.members.contains($0) }
                if !missing.isEmpty {
                    warn("quorum queue '\(queue.name)' has replicas on \(current.members.count) of \(all.count) nodes (none on \(missing.joined(separator: ", "))): it was declared before those nodes joined; `rabbitmq-queues grow <node> all` adds them")
                }
                let offline = current.members.filter { !current.online.contains($0) }
                if !offline.isEmpty && offline.count * 2 >= current.members.count {
                    warn("quorum queue '\(queue.name)' has \(offline.count) of \(current.members.count) replicas offline (\(offline.joined(separator: ", "))): it has no majority and accepts nothing until they return")
                }
            } else if current.type == "classic" {
                warn("classic queue '\(queue.name)' lives on one node (\(current.node ?? "?")): its messages are unavailable while that node is down and lost with it; make it a quorum queue (`x-queue-type: quorum` in the files)")
            }
        }
        if quorumCount > 2, leaders.count == 1, let only = leaders.keys.first {
            warn("the leaders of all \(quorumCount) quorum queues of these files are on \(only): that node does the work of every one of them while the others only replicate (RabbitMQ's `balanced` placement counts every virtual host's leaders, so a new virtual host's queues can all land on the least loaded node); `rabbitmq-queues rebalance quorum` spreads them")
        }

        let waiting = view.queues.filter { $0.name.hasPrefix(self.batchQueuePrefix) && $0.node.map(down.contains) == true }
        if !waiting.isEmpty {
            let nodes = Set(waiting.compactMap(\.node)).sorted().joined(separator: ", ")
            warn("\(waiting.count) per-batch queue(s) are on node(s) not running (\(nodes)): those batches wait until the node returns (they are not lost while its data is kept)")
        }
        return warnings
    }
}
