import AMQPClient
import Foundation

/// Where the broker is: AMQP for declarations, the management API for what AMQP cannot do.
public struct BrokerTarget: Sendable {
    public var amqp: AMQPConfiguration
    public var management: ManagementClient

    /// `managementURL` may name several nodes (spaces or commas). Without it, port 15672 of
    /// every AMQP address is used (`http`), in the order of the AMQP list.
    public init(amqpURL: String, managementURL: String?) throws {
        self.amqp = try AMQPConfiguration(url: amqpURL)
        var bases = managementURL.map(ManagementClient.splitURLs) ?? []
        if bases.isEmpty {
            var seen = Set<String>()
            bases = self.amqp.endpoints.map { "http://\(AMQPConfiguration.Endpoint(host: $0.host, port: 15672))" }.filter { seen.insert($0).inserted }
        }
        self.management = ManagementClient(baseURLs: bases, user: self.amqp.user, password: self.amqp.password)
    }

    public var vhost: String { self.amqp.virtualHost }
}

public struct ApplyFailure: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(description: String) { self.description = description }
}

public enum TopologyApplier {
    /// Compares the files with the broker. Reads only.
    public static func plan(_ spec: TopologySpec, on target: BrokerTarget) async throws -> TopologyPlan {
        guard let live = try await target.management.definitions(vhost: target.vhost) else {
            throw ApplyFailure(description: "virtual host '\(target.vhost)' does not exist on the broker (create it with `rabbitmqctl add_vhost`)")
        }
        let desired = spec.expand()
        var plan = TopologyPlan.compute(desired: desired, live: live.topology, runtimeQueuePrefix: spec.batchQueuePrefix)
        if let view = try await target.management.clusterView(vhost: target.vhost) {
            plan.clusterNodes = view.nodes.count
            plan.clusterWarnings = spec.clusterChecks(desired: desired, view: view)
        }
        return plan
    }

    /// Makes the broker match the files. Validates and checks everything (conflicts, permissions)
    /// before the first change; creates what is missing, updates policies, and deletes extra
    /// objects only when `deleteExtra` is set. Returns the plan it carried out.
    @discardableResult
    public static func apply(_ spec: TopologySpec, on target: BrokerTarget, deleteExtra: Bool = false,
                             log: @Sendable (String) -> Void = { _ in }) async throws -> TopologyPlan {
        let plan = try await self.plan(spec, on: target)
        if !plan.conflicts.isEmpty {
            throw ApplyFailure(description: "nothing was applied: \(plan.conflicts.count) object(s) on the broker differ in ways RabbitMQ cannot change in place:\n"
                + plan.conflicts.map { "  ! \($0)" }.joined(separator: "\n"))
        }
        let hasWork = !plan.isInSync || (deleteExtra && !plan.extra.isEmpty)
        guard hasWork else { return plan }
        try await self.checkPermissions(plan, deleteExtra: deleteExtra, on: target)

        let connection: AMQPConnection
        do {
            var configuration = target.amqp
            configuration.connectionName = configuration.connectionName ?? "aq topology apply"
            configuration.recovery.enabled = false
            connection = try await AMQPConnection.connect(configuration: configuration)
        } catch {
            throw ApplyFailure(description: "nothing was applied: \(error)")
        }
        var done = 0
        do {
            let channel = try await connection.openChannel()
            for exchange in plan.exchangesToCreate {
                try await channel.declareExchange(exchange.name, type: AMQPExchangeType(rawValue: exchange.type), durable: exchange.durable,
                                                  autoDelete: exchange.autoDelete, internal: exchange.isInternal,
                                                  arguments: exchange.arguments.amqpTable)
                log("+ exchange \(exchange.name)")
                done += 1
            }
            // Policies before queues: a queue takes its policy's settings at declaration (on a
            // cluster, `queue-leader-locator` picks its leader's node then).
            for policy in plan.policiesToPut {
                try await target.management.putPolicy(policy, vhost: target.vhost)
                log("~ policy \(policy.name)")
                done += 1
            }
            for queue in plan.queuesToCreate {
                try await channel.declareQueue(queue.name, durable: queue.durable, autoDelete: queue.autoDelete, arguments: queue.arguments.amqpTable)
                log("+ queue \(queue.name)")
                done += 1
            }
            for binding in plan.bindingsToCreate {
                try await Self.bind(binding, on: channel, unbind: false)
                log("+ binding \(binding.source) → \(binding.destination) '\(binding.routingKey)'")
                done += 1
            }
            if deleteExtra {
                for binding in plan.extraBindings {
                    try await Self.bind(binding, on: channel, unbind: true)
                    log("- binding \(binding.source) → \(binding.destination)")
                    done += 1
                }
                for queue in plan.extraQueues {
                    try await channel.deleteQueue(queue)
                    log("- queue \(queue)")
                    done += 1
                }
                for exchange in plan.extraExchanges {
                    try await channel.deleteExchange(exchange)
                    log("- exchange \(exchange)")
                    done += 1
                }
                for policy in plan.extraPolicies {
                    try await target.management.deletePolicy(policy, vhost: target.vhost)
                    log("- policy \(policy)")
                    done += 1
                }
            }
        } catch {
            await connection.close()
            throw ApplyFailure(description: "apply stopped after \(done) change(s): \(error). Run `aq topology plan` to see what is left.")
        }
        await connection.close()
        return plan
    }

    private static func bind(_ b: Topology.Binding, on channel: AMQPChannel, unbind: Bool) async throws {
        let args = b.arguments.amqpTable
        switch (b.destinationType, unbind) {
        case (.queue, false): try await channel.bindQueue(b.destination, to: b.source, routingKey: b.routingKey, arguments: args)
        case (.queue, true): try await channel.unbindQueue(b.destination, from: b.source, routingKey: b.routingKey, arguments: args)
        case (.exchange, false): try await channel.bindExchange(b.destination, to: b.source, routingKey: b.routingKey, arguments: args)
        case (.exchange, true): try await channel.unbindExchange(b.destination, from: b.source, routingKey: b.routingKey, arguments: args)
        }
    }

    /// Refuses before any change when the user may not make all of them.
    static func checkPermissions(_ plan: TopologyPlan, deleteExtra: Bool, on target: BrokerTarget) async throws {
        let readable: ManagementClient.Permissions?
        do {
            readable = try await target.management.permissions(vhost: target.vhost)
        } catch is ManagementClient.Unreadable {
            // Only administrators may read permissions; the broker checks each change instead,
            // and a refusal stops apply with what was done so far.
            return
        }
        guard let permissions = readable else {
            throw ApplyFailure(description: "nothing was applied: user '\(target.amqp.user)' has no permissions on virtual host '\(target.vhost)'")
        }
        func allows(_ pattern: String, _ name: String) -> Bool {
            guard !pattern.isEmpty, let regex = try? NSRegularExpression(pattern: pattern) else { return false }
            return regex.firstMatch(in: name, range: NSRange(name.startIndex..., in: name)) != nil
        }
        var refused: [String] = []
        for name in plan.exchangesToCreate.map(\.name) + plan.queuesToCreate.map(\.name) where !allows(permissions.configure, name) {
            refused.append("configure '\(name)' (configure permission '\(permissions.configure)')")
        }
        for binding in plan.bindingsToCreate {
            if !allows(permissions.write, binding.destination) {
                refused.append("bind to '\(binding.destination)' (write permission '\(permissions.write)')")
            }
            if !allows(permissions.read, binding.source) {
                refused.append("bind from '\(binding.source)' (read permission '\(permissions.read)')")
            }
        }
        let needsPolicies = !plan.policiesToPut.isEmpty || (deleteExtra && !plan.extraPolicies.isEmpty)
        if needsPolicies && !permissions.tags.contains(where: { $0 == "policymaker" || $0 == "administrator" }) {
            refused.append("set policies (needs the 'policymaker' or 'administrator' tag; user has \(permissions.tags.isEmpty ? "none" : permissions.tags.joined(separator: ", ")))")
        }
        if !refused.isEmpty {
            throw ApplyFailure(description: "nothing was applied: user '\(target.amqp.user)' may not:\n" + refused.map { "  \($0)" }.joined(separator: "\n"))
        }
    }
}

extension Dictionary where Key == String, Value == JSONValue {
    /// As an AMQP argument table (integers as 64-bit, objects as tables).
    public var amqpTable: AMQPTable {
        AMQPTable(self.sorted(by: { $0.key < $1.key }).map { AMQPTable.Entry(key: $0.key, value: $0.value.amqpValue) })
    }
}

extension JSONValue {
    public var amqpValue: AMQPFieldValue {
        switch self {
        case .null: return .void
        case .bool(let b): return .bool(b)
        case .int(let i): return .int64(i)
        case .double(let d): return .double(d)
        case .string(let s): return .string(s)
        case .array(let a): return .array(a.map(\.amqpValue))
        case .object(let o): return .table(o.amqpTable)
        }
    }
}
