import Foundation
import Yams

extension Reader {
    /// `[A-Za-z0-9][A-Za-z0-9_.-]*`, checked without a regular-expression engine.
    static func isRoutingKeyName(_ name: String) -> Bool {
        func alnum(_ b: UInt8) -> Bool { (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) }
        let bytes = Array(name.utf8)
        guard let first = bytes.first, alnum(first) else { return false }
        return bytes.allSatisfy { alnum($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }
    }

    static let topKeys = ["tasks", "work_queues", "retry", "dead_letter", "fan_in", "chains", "events", "broker", "objects"]

    mutating func readDocument(_ node: Node, into spec: inout TopologySpec, sectionOwners: inout [String: SourceLocation]) {
        guard let sections = self.mapping(node, "", allowed: Self.topKeys) else { return }
        for section in sections {
            if section.key != "work_queues" && section.key != "objects" {
                let here = self.location(section.node, section.key)
                if let owner = sectionOwners[section.key] {
                    self.fail("section '\(section.key)' is already defined in \(owner); define it in one file only", at: here)
                    continue
                }
                sectionOwners[section.key] = here
            }
            switch section.key {
            case "tasks": self.readTasks(section.node, section.path, &spec)
            case "work_queues": self.readWorkQueues(section.node, section.path, &spec)
            case "retry": self.readRetry(section.node, section.path, &spec)
            case "dead_letter": self.readDeadLetter(section.node, section.path, &spec)
            case "fan_in": self.readFanIn(section.node, section.path, &spec)
            case "chains":
                for entry in self.mapping(section.node, section.path, allowed: ["exchange"]) ?? [] {
                    if let v = self.name(entry.node, entry.path) { spec.chainExchange = v }
                }
            case "events":
                for entry in self.mapping(section.node, section.path, allowed: ["exchange"]) ?? [] {
                    if let v = self.name(entry.node, entry.path) { spec.eventsExchange = v }
                }
            case "broker":
                for entry in self.mapping(section.node, section.path, allowed: ["consumer_timeout"]) ?? [] {
                    if let v = self.timeSpan(entry.node, entry.path) { spec.consumerTimeout = v }
                }
            case "objects": self.readObjects(section.node, section.path, &spec)
            default: break
            }
        }
    }

    private mutating func readTasks(_ node: Node, _ path: String, _ spec: inout TopologySpec) {
        for entry in self.mapping(node, path, allowed: ["exchange", "queue_prefix", "unrouted_exchange", "unrouted_queue"]) ?? [] {
            switch entry.key {
            case "exchange": if let v = self.name(entry.node, entry.path) { spec.taskExchange = v }
            case "queue_prefix": if let v = self.name(entry.node, entry.path) { spec.workQueuePrefix = v }
            case "unrouted_exchange": if let v = self.name(entry.node, entry.path) { spec.unroutedExchange = v }
            default: if let v = self.name(entry.node, entry.path) { spec.unroutedQueue = v }
            }
        }
    }

    private mutating func readWorkQueues(_ node: Node, _ path: String, _ spec: inout TopologySpec) {
        for entry in self.mapping(node, path, allowed: nil) ?? [] {
            let here = self.location(entry.node, entry.path)
            guard Self.isRoutingKeyName(entry.key) else {
                self.fail("work queue names use letters, digits, '.', '_' and '-' (they are routing keys), not '\(entry.key)'", at: here)
                continue
            }
            if let existing = spec.workQueue(named: entry.key) {
                self.fail("work queue '\(entry.key)' is already defined at \(existing.origin.map(\.description) ?? "?")", at: here)
                continue
            }
            var queue = TopologySpec.WorkQueue(name: entry.key, origin: here)
            if case .scalar(let s) = entry.node, s.string.isEmpty || entry.node.tag.description == Tag.Name.null.rawValue {
                spec.workQueues.append(queue)  // `default:` with no settings
                continue
            }
            for setting in self.mapping(entry.node, entry.path, allowed: ["delivery_limit", "max_length", "task_timeout", "retries", "concurrency"]) ?? [] {
                switch setting.key {
                case "delivery_limit": if let v = self.int(setting.node, setting.path, min: 1, max: 1_000_000) { queue.deliveryLimit = v }
                case "concurrency": if let v = self.int(setting.node, setting.path, min: 1, max: 10_000) { queue.concurrency = v }
                case "max_length": if let v = self.int(setting.node, setting.path, min: 1) { queue.maxLength = v }
                case "task_timeout": if let v = self.timeSpan(setting.node, setting.path) { queue.taskTimeout = v }
                default: if let v = self.int(setting.node, setting.path, min: 0, max: 100) { queue.retries = v }
                }
            }
            spec.workQueues.append(queue)
        }
    }

    private mutating func readRetry(_ node: Node, _ path: String, _ spec: inout TopologySpec) {
        for entry in self.mapping(node, path, allowed: ["exchange", "queue_prefix", "tiers"]) ?? [] {
            switch entry.key {
            case "exchange": if let v = self.name(entry.node, entry.path) { spec.retryExchange = v }
            case "queue_prefix": if let v = self.name(entry.node, entry.path) { spec.retryQueuePrefix = v }
            default:
                guard let items = self.list(entry.node, entry.path) else { continue }
                var tiers: [TimeSpan] = []
                for item in items {
                    guard let tier = self.timeSpan(item.node, item.path) else { continue }
                    if let last = tiers.last, tier <= last {
                        self.fail("retry tiers must grow: \(tier) comes after \(last)", at: self.location(item.node, item.path))
                        continue
                    }
                    tiers.append(tier)
                }
                if items.isEmpty { self.fail("give at least one retry tier", at: self.location(entry.node, entry.path)) }
                spec.retryTiers = tiers
            }
        }
    }

    private mutating func readDeadLetter(_ node: Node, _ path: String, _ spec: inout TopologySpec) {
        for entry in self.mapping(node, path, allowed: ["exchange", "queue", "expires_after", "max_length"]) ?? [] {
            switch entry.key {
            case "exchange": if let v = self.name(entry.node, entry.path) { spec.deadLetterExchange = v }
            case "queue": if let v = self.name(entry.node, entry.path) { spec.deadLetterQueue = v }
            case "expires_after":
                if case .scalar(let s) = entry.node, s.string == "never" { spec.deadLetterExpiry = nil }
                else if let v = self.timeSpan(entry.node, entry.path) { spec.deadLetterExpiry = v }
            default: if let v = self.int(entry.node, entry.path, min: 1) { spec.deadLetterMaxLength = v }
            }
        }
    }

    private mutating func readFanIn(_ node: Node, _ path: String, _ spec: inout TopologySpec) {
        for entry in self.mapping(node, path, allowed: ["exchange", "queue_prefix", "batch_lifetime", "queue_expires"]) ?? [] {
            switch entry.key {
            case "exchange": if let v = self.name(entry.node, entry.path) { spec.batchExchange = v }
            case "queue_prefix": if let v = self.name(entry.node, entry.path) { spec.batchQueuePrefix = v }
            case "batch_lifetime": if let v = self.timeSpan(entry.node, entry.path) { spec.batchLifetime = v }
            default: if let v = self.timeSpan(entry.node, entry.path) { spec.batchQueueExpiry = v }
            }
        }
    }

    private mutating func readObjects(_ node: Node, _ path: String, _ spec: inout TopologySpec) {
        for section in self.mapping(node, path, allowed: ["exchanges", "queues", "bindings", "policies"]) ?? [] {
            for item in self.list(section.node, section.path) ?? [] {
                let here = self.location(item.node, item.path)
                switch section.key {
                case "exchanges":
                    var exchange = Topology.Exchange(name: "", type: "", origin: here)
                    var hasType = false
                    for f in self.mapping(item.node, item.path, allowed: ["name", "type", "durable", "auto_delete", "internal", "arguments"]) ?? [] {
                        switch f.key {
                        case "name": exchange.name = self.name(f.node, f.path) ?? ""
                        case "type":
                            let type = self.string(f.node, f.path) ?? ""
                            if ["direct", "fanout", "topic", "headers"].contains(type) || type.hasPrefix("x-") {
                                exchange.type = type
                                hasType = true
                            } else {
                                self.fail("exchange type must be direct, fanout, topic, headers or a plugin type (x-…), not '\(type)'", at: self.location(f.node, f.path))
                            }
                        case "durable": exchange.durable = self.bool(f.node, f.path) ?? true
                        case "auto_delete": exchange.autoDelete = self.bool(f.node, f.path) ?? false
                        case "internal": exchange.isInternal = self.bool(f.node, f.path) ?? false
                        default: exchange.arguments = self.arguments(f.node, f.path)
                        }
                    }
                    if exchange.name.isEmpty { self.fail("an exchange needs a name", at: here) }
                    if !hasType { self.fail("exchange '\(exchange.name)' needs a type", at: here) }
                    spec.extra.exchanges.append(exchange)
                case "queues":
                    var queue = Topology.Queue(name: "", origin: here)
                    var type = "quorum"
                    for f in self.mapping(item.node, item.path, allowed: ["name", "type", "durable", "arguments"]) ?? [] {
                        switch f.key {
                        case "name": queue.name = self.name(f.node, f.path) ?? ""
                        case "type":
                            let t = self.string(f.node, f.path) ?? ""
                            if ["quorum", "classic", "stream"].contains(t) { type = t } else {
                                self.fail("queue type must be quorum, classic or stream, not '\(t)'", at: self.location(f.node, f.path))
                            }
                        case "durable": queue.durable = self.bool(f.node, f.path) ?? true
                        default: queue.arguments = self.arguments(f.node, f.path)
                        }
                    }
                    if let declared = queue.arguments["x-queue-type"]?.stringValue, declared != type {
                        self.fail("x-queue-type '\(declared)' contradicts type '\(type)'; use type only", at: here)
                    }
                    queue.arguments["x-queue-type"] = .string(type)
                    if type != "classic" && !queue.durable {
                        self.fail("\(type) queues must be durable", at: here)
                    }
                    if queue.name.isEmpty { self.fail("a queue needs a name", at: here) }
                    spec.extra.queues.append(queue)
                case "bindings":
                    var binding = Topology.Binding(source: "", destination: "", origin: here)
                    for f in self.mapping(item.node, item.path, allowed: ["source", "destination", "destination_type", "routing_key", "arguments"]) ?? [] {
                        switch f.key {
                        case "source": binding.source = self.string(f.node, f.path) ?? ""
                        case "destination": binding.destination = self.string(f.node, f.path) ?? ""
                        case "destination_type":
                            let t = self.string(f.node, f.path) ?? ""
                            if let type = Topology.Binding.DestinationType(rawValue: t) { binding.destinationType = type } else {
                                self.fail("destination_type must be queue or exchange, not '\(t)'", at: self.location(f.node, f.path))
                            }
                        case "routing_key": binding.routingKey = self.string(f.node, f.path) ?? ""
                        default: binding.arguments = self.arguments(f.node, f.path)
                        }
                    }
                    if binding.destination.isEmpty { self.fail("a binding needs a destination", at: here) }
                    spec.extra.bindings.append(binding)
                default:
                    var policy = Topology.Policy(name: "", pattern: "", definition: [:], origin: here)
                    for f in self.mapping(item.node, item.path, allowed: ["name", "pattern", "apply_to", "priority", "definition"]) ?? [] {
                        switch f.key {
                        case "name": policy.name = self.string(f.node, f.path) ?? ""
                        case "pattern":
                            policy.pattern = self.string(f.node, f.path) ?? ""
                            if (try? NSRegularExpression(pattern: policy.pattern)) == nil {
                                self.fail("'\(policy.pattern)' is not a valid regular expression", at: self.location(f.node, f.path))
                            }
                        case "apply_to":
                            let t = self.string(f.node, f.path) ?? ""
                            if ["queues", "exchanges", "all"].contains(t) { policy.applyTo = t } else {
                                self.fail("apply_to must be queues, exchanges or all (RabbitMQ 3.10), not '\(t)'", at: self.location(f.node, f.path))
                            }
                        case "priority": policy.priority = self.int(f.node, f.path, min: -1000, max: 1000) ?? 0
                        default:
                            policy.definition = self.arguments(f.node, f.path)
                            for key in policy.definition.keys where key.hasPrefix("x-") {
                                self.fail("policy keys have no 'x-' prefix: write '\(key.dropFirst(2))'", at: self.location(f.node, f.path))
                            }
                        }
                    }
                    if policy.name.isEmpty { self.fail("a policy needs a name", at: here) }
                    if policy.pattern.isEmpty { self.fail("policy '\(policy.name)' needs a pattern", at: here) }
                    if policy.definition.isEmpty { self.fail("policy '\(policy.name)' needs a definition", at: here) }
                    spec.extra.policies.append(policy)
                }
            }
        }
    }

    /// Checks across files: duplicate names, bindings to objects that do not exist.
    mutating func validate(_ spec: TopologySpec) {
        let topology = spec.expand()
        func here(_ origin: SourceLocation?) -> SourceLocation? { origin }
        var exchanges: [String: Topology.Exchange] = [:]
        for exchange in topology.exchanges where !exchange.name.isEmpty {
            if let first = exchanges[exchange.name] {
                self.fail("exchange '\(exchange.name)' is defined twice (also \(first.origin.map(\.description) ?? "by the AsyncQueue sections"))",
                          at: exchange.origin ?? first.origin)
            }
            exchanges[exchange.name] = exchange
        }
        var queues: [String: Topology.Queue] = [:]
        for queue in topology.queues where !queue.name.isEmpty {
            if let first = queues[queue.name] {
                self.fail("queue '\(queue.name)' is defined twice (also \(first.origin.map(\.description) ?? "by the AsyncQueue sections"))",
                          at: queue.origin ?? first.origin)
            }
            queues[queue.name] = queue
        }
        var policies: Set<String> = []
        for policy in topology.policies where !policy.name.isEmpty {
            if !policies.insert(policy.name).inserted {
                self.fail("policy '\(policy.name)' is defined twice", at: policy.origin)
            }
        }
        for binding in topology.bindings {
            let sourceExists = binding.source.isEmpty || binding.source.hasPrefix("amq.") || exchanges[binding.source] != nil
            if !sourceExists {
                self.fail("binding source exchange '\(binding.source)' is not defined in the topology", at: binding.origin)
            }
            switch binding.destinationType {
            case .queue where queues[binding.destination] == nil && !binding.destination.isEmpty:
                self.fail("binding destination queue '\(binding.destination)' is not defined in the topology", at: binding.origin)
            case .exchange where exchanges[binding.destination] == nil && !binding.destination.hasPrefix("amq."):
                self.fail("binding destination exchange '\(binding.destination)' is not defined in the topology", at: binding.origin)
            default: break
            }
            if binding.source.isEmpty {
                self.fail("bindings to the default exchange are implicit; RabbitMQ refuses explicit ones", at: binding.origin)
            }
        }
        if spec.workQueues.isEmpty {
            self.fail("define at least one work queue under work_queues (e.g. 'default:')", at: nil)
        }
    }
}
