/// What `apply` would change on a broker to make it match the files.
public struct TopologyPlan: Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable { case exchange, queue, binding, policy }

    public struct Item: Sendable, CustomStringConvertible {
        public var kind: Kind
        public var name: String
        public var detail: String
        public var description: String { "\(self.kind) \(self.name)\(self.detail.isEmpty ? "" : ": \(self.detail)")" }
    }

    /// Missing on the broker; `apply` creates them.
    public var missing: [Item] = []
    /// Policies whose definition differs; `apply` updates them in place.
    public var updates: [Item] = []
    /// Exchanges and queues whose settings differ and cannot change in place. `apply` refuses.
    public var conflicts: [Item] = []
    /// On the broker but not in the files; `apply --delete-extra` removes them.
    public var extra: [Item] = []
    /// Per-batch reply queues that exist right now (created at run time; never extra).
    public var runtimeQueues = 0
    /// What is wrong for a cluster (``TopologySpec/clusterChecks(desired:view:)``); empty on one node.
    public var clusterWarnings: [TopologyWarning] = []
    /// Nodes in the cluster; nil when the user may not list them.
    public var clusterNodes: Int?

    // For apply.
    var exchangesToCreate: [Topology.Exchange] = []
    var queuesToCreate: [Topology.Queue] = []
    var bindingsToCreate: [Topology.Binding] = []
    var policiesToPut: [Topology.Policy] = []
    var extraExchanges: [String] = []
    var extraQueues: [String] = []
    var extraBindings: [Topology.Binding] = []
    var extraPolicies: [String] = []

    /// True when the broker matches the files (extra objects aside).
    public var isInSync: Bool { self.missing.isEmpty && self.updates.isEmpty && self.conflicts.isEmpty }

    public static func compute(desired: Topology, live: Topology, runtimeQueuePrefix: String) -> TopologyPlan {
        var plan = TopologyPlan()
        func show(_ args: [String: JSONValue]) -> String { JSONValue.object(args).description }

        for exchange in desired.exchanges {
            guard let current = live.exchange(named: exchange.name) else {
                plan.missing.append(Item(kind: .exchange, name: exchange.name, detail: "\(exchange.type)\(exchange.arguments.isEmpty ? "" : " " + show(exchange.arguments))"))
                plan.exchangesToCreate.append(exchange)
                continue
            }
            var differences: [String] = []
            if current.type != exchange.type { differences.append("type is \(current.type), files say \(exchange.type)") }
            if current.durable != exchange.durable { differences.append("durable is \(current.durable), files say \(exchange.durable)") }
            if current.autoDelete != exchange.autoDelete { differences.append("auto_delete is \(current.autoDelete), files say \(exchange.autoDelete)") }
            if current.isInternal != exchange.isInternal { differences.append("internal is \(current.isInternal), files say \(exchange.isInternal)") }
            if current.arguments != exchange.arguments { differences.append("arguments are \(show(current.arguments)), files say \(show(exchange.arguments))") }
            if !differences.isEmpty {
                plan.conflicts.append(Item(kind: .exchange, name: exchange.name, detail: differences.joined(separator: "; ")
                    + ". RabbitMQ cannot change an exchange in place: during a pause in publishing, delete it (`rabbitmqctl delete_exchange` or the management UI; its bindings go with it) and apply again."))
            }
        }
        for queue in desired.queues {
            guard let current = live.queue(named: queue.name) else {
                plan.missing.append(Item(kind: .queue, name: queue.name, detail: "\(queue.type) \(show(queue.arguments))"))
                plan.queuesToCreate.append(queue)
                continue
            }
            var differences: [String] = []
            if current.durable != queue.durable { differences.append("durable is \(current.durable), files say \(queue.durable)") }
            if current.autoDelete != queue.autoDelete { differences.append("auto_delete is \(current.autoDelete), files say \(queue.autoDelete)") }
            for key in Set(current.arguments.keys).union(queue.arguments.keys).sorted() where current.arguments[key] != queue.arguments[key] {
                differences.append("\(key) is \(current.arguments[key]?.description ?? "unset"), files say \(queue.arguments[key]?.description ?? "unset")")
            }
            if !differences.isEmpty {
                plan.conflicts.append(Item(kind: .queue, name: queue.name, detail: differences.joined(separator: "; ")
                    + ". RabbitMQ cannot change a queue's arguments in place. To migrate: stop publishers and bridges for it, let it drain (or move its messages with a shovel), delete it (`rabbitmqctl delete_queue \(queue.name)`), apply, and restart. Settings that must change in place belong in a policy."))
            }
        }
        for binding in desired.bindings where !live.bindings.contains(binding) {
            let args = binding.arguments.isEmpty ? "" : " " + show(binding.arguments)
            plan.missing.append(Item(kind: .binding, name: "\(binding.source) → \(binding.destination)",
                                     detail: "routing key '\(binding.routingKey)'\(args)"))
            plan.bindingsToCreate.append(binding)
        }
        for policy in desired.policies {
            guard let current = live.policy(named: policy.name) else {
                plan.missing.append(Item(kind: .policy, name: policy.name, detail: "\(policy.pattern) → \(show(policy.definition))"))
                plan.policiesToPut.append(policy)
                continue
            }
            if current != policy {
                var differences: [String] = []
                if current.pattern != policy.pattern { differences.append("pattern '\(current.pattern)' → '\(policy.pattern)'") }
                if current.applyTo != policy.applyTo { differences.append("apply-to \(current.applyTo) → \(policy.applyTo)") }
                if current.priority != policy.priority { differences.append("priority \(current.priority) → \(policy.priority)") }
                if current.definition != policy.definition { differences.append("definition \(show(current.definition)) → \(show(policy.definition))") }
                plan.updates.append(Item(kind: .policy, name: policy.name, detail: differences.joined(separator: "; ")))
                plan.policiesToPut.append(policy)
            }
        }

        // Extra: what the broker has beyond the files (not RabbitMQ's own, not run-time batches).
        let desiredExchanges = Set(desired.exchanges.map(\.name))
        let desiredQueues = Set(desired.queues.map(\.name))
        for exchange in live.exchanges where !exchange.name.isEmpty && !exchange.name.hasPrefix("amq.") && !desiredExchanges.contains(exchange.name) {
            plan.extra.append(Item(kind: .exchange, name: exchange.name, detail: exchange.type))
            plan.extraExchanges.append(exchange.name)
        }
        for queue in live.queues where !desiredQueues.contains(queue.name) && !queue.name.hasPrefix("amq.") {
            if queue.name.hasPrefix(runtimeQueuePrefix) {
                plan.runtimeQueues += 1
                continue
            }
            plan.extra.append(Item(kind: .queue, name: queue.name, detail: queue.type))
            plan.extraQueues.append(queue.name)
        }
        for binding in live.bindings where !desired.bindings.contains(binding) && !binding.source.isEmpty
            && desiredExchanges.contains(binding.source) && !binding.destination.hasPrefix(runtimeQueuePrefix)
        {
            plan.extra.append(Item(kind: .binding, name: "\(binding.source) → \(binding.destination)", detail: "routing key '\(binding.routingKey)'"))
            plan.extraBindings.append(binding)
        }
        let desiredPolicies = Set(desired.policies.map(\.name))
        for policy in live.policies where !desiredPolicies.contains(policy.name) {
            plan.extra.append(Item(kind: .policy, name: policy.name, detail: policy.pattern))
            plan.extraPolicies.append(policy.name)
        }
        return plan
    }

    public var description: String {
        var lines: [String] = []
        func section(_ title: String, _ mark: String, _ items: [Item]) {
            guard !items.isEmpty else { return }
            lines.append("\(title) (\(items.count)):")
            lines += items.map { "  \(mark) \($0)" }
        }
        section("Missing — apply creates", "+", self.missing)
        section("Different — apply updates in place", "~", self.updates)
        section("Different — cannot change in place, apply refuses", "!", self.conflicts)
        section("Extra — on the broker, not in the files (apply --delete-extra removes)", "-", self.extra)
        if self.runtimeQueues > 0 { lines.append("Run-time per-batch reply queues: \(self.runtimeQueues) (left alone)") }
        if let nodes = self.clusterNodes, nodes > 1 {
            lines.append("Cluster of \(nodes) nodes: \(self.clusterWarnings.isEmpty ? "no warnings." : "\(self.clusterWarnings.count) warning(s):")")
            lines += self.clusterWarnings.map { "  \($0)" }
        } else if self.clusterNodes == nil {
            lines.append("Cluster checks skipped: this user may not list the broker's nodes (needs the 'monitoring' tag).")
        }
        if self.isInSync { lines.append(self.extra.isEmpty ? "Nothing to do: the broker matches the files." : "Nothing to apply: the broker has everything the files define.") }
        return lines.joined(separator: "\n")
    }
}
