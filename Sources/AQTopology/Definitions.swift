import Foundation

/// RabbitMQ definitions JSON: what `rabbitmqctl export_definitions` writes and
/// `rabbitmqctl import_definitions` and the management API's `/api/definitions` read.
public struct Definitions: Sendable, Codable, Equatable {
    public struct Exchange: Sendable, Codable, Equatable {
        public var name: String
        public var vhost: String?
        public var type: String
        public var durable: Bool
        public var auto_delete: Bool
        public var `internal`: Bool
        public var arguments: [String: JSONValue]
    }
    public struct Queue: Sendable, Codable, Equatable {
        public var name: String
        public var vhost: String?
        public var durable: Bool
        public var auto_delete: Bool
        public var arguments: [String: JSONValue]
        /// Written by export for reading; RabbitMQ 3.10 ignores it on import (`x-queue-type` counts).
        public var type: String?
    }
    public struct Binding: Sendable, Codable, Equatable {
        public var source: String
        public var vhost: String?
        public var destination: String
        public var destination_type: String
        public var routing_key: String
        public var arguments: [String: JSONValue]
    }
    public struct Policy: Sendable, Codable, Equatable {
        public var vhost: String?
        public var name: String
        public var pattern: String
        public var applyTo: String
        public var priority: Int
        public var definition: [String: JSONValue]

        enum CodingKeys: String, CodingKey {
            case vhost, name, pattern, applyTo = "apply-to", priority, definition
        }
    }

    public var exchanges: [Exchange]
    public var queues: [Queue]
    public var bindings: [Binding]
    public var policies: [Policy]

    public init(exchanges: [Exchange] = [], queues: [Queue] = [], bindings: [Binding] = [], policies: [Policy] = []) {
        self.exchanges = exchanges
        self.queues = queues
        self.bindings = bindings
        self.policies = policies
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.exchanges = try c.decodeIfPresent([Exchange].self, forKey: .exchanges) ?? []
        self.queues = try c.decodeIfPresent([Queue].self, forKey: .queues) ?? []
        self.bindings = try c.decodeIfPresent([Binding].self, forKey: .bindings) ?? []
        self.policies = try c.decodeIfPresent([Policy].self, forKey: .policies) ?? []
    }

    /// The definitions of a topology for one virtual host.
    public init(_ topology: Topology, vhost: String) {
        self.exchanges = topology.exchanges.map {
            Exchange(name: $0.name, vhost: vhost, type: $0.type, durable: $0.durable, auto_delete: $0.autoDelete,
                     internal: $0.isInternal, arguments: $0.arguments)
        }
        self.queues = topology.queues.map {
            Queue(name: $0.name, vhost: vhost, durable: $0.durable, auto_delete: $0.autoDelete, arguments: $0.arguments, type: $0.type)
        }
        self.bindings = topology.bindings.map {
            Binding(source: $0.source, vhost: vhost, destination: $0.destination, destination_type: $0.destinationType.rawValue,
                    routing_key: $0.routingKey, arguments: $0.arguments)
        }
        self.policies = topology.policies.map {
            Policy(vhost: vhost, name: $0.name, pattern: $0.pattern, applyTo: $0.applyTo, priority: $0.priority, definition: $0.definition)
        }
    }

    /// Pretty JSON with sorted keys, importable by `rabbitmqctl import_definitions`.
    public func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(self), as: UTF8.self) + "\n"
    }

    public static func decode(_ data: Data) throws -> Definitions {
        try JSONDecoder().decode(Definitions.self, from: data)
    }

    /// The definitions as a topology (to compare with the files).
    public var topology: Topology {
        Topology(
            exchanges: self.exchanges.map {
                Topology.Exchange(name: $0.name, type: $0.type, durable: $0.durable, autoDelete: $0.auto_delete,
                                  isInternal: $0.internal, arguments: $0.arguments)
            },
            queues: self.queues.map {
                var arguments = $0.arguments
                // A classic queue may carry no x-queue-type at all.
                if arguments["x-queue-type"] == nil { arguments["x-queue-type"] = .string($0.type ?? "classic") }
                return Topology.Queue(name: $0.name, durable: $0.durable, autoDelete: $0.auto_delete, arguments: arguments)
            },
            bindings: self.bindings.map {
                Topology.Binding(source: $0.source, destination: $0.destination,
                                 destinationType: Topology.Binding.DestinationType(rawValue: $0.destination_type) ?? .queue,
                                 routingKey: $0.routing_key, arguments: $0.arguments)
            },
            policies: self.policies.map {
                Topology.Policy(name: $0.name, pattern: $0.pattern, applyTo: $0.applyTo, priority: $0.priority, definition: $0.definition)
            })
    }
}
