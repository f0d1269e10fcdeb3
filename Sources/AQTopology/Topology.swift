/// Concrete AMQP objects: what `aq topology apply` declares and `export` writes.
public struct Topology: Sendable, Equatable {
    public struct Exchange: Sendable, Hashable {
        public var name: String
        public var type: String
        public var durable: Bool = true
        public var autoDelete: Bool = false
        public var isInternal: Bool = false
        public var arguments: [String: JSONValue] = [:]
        /// Where it came from, for error messages.
        public var origin: SourceLocation?

        public init(name: String, type: String, durable: Bool = true, autoDelete: Bool = false, isInternal: Bool = false,
                    arguments: [String: JSONValue] = [:], origin: SourceLocation? = nil) {
            self.name = name
            self.type = type
            self.durable = durable
            self.autoDelete = autoDelete
            self.isInternal = isInternal
            self.arguments = arguments
            self.origin = origin
        }

        public static func == (a: Self, b: Self) -> Bool {
            a.name == b.name && a.type == b.type && a.durable == b.durable && a.autoDelete == b.autoDelete
                && a.isInternal == b.isInternal && a.arguments == b.arguments
        }
        public func hash(into hasher: inout Hasher) { hasher.combine(self.name) }
    }

    public struct Queue: Sendable, Hashable {
        public var name: String
        public var durable: Bool = true
        public var autoDelete: Bool = false
        /// Fixed at creation; RabbitMQ cannot change them in place. `x-queue-type` is always set.
        public var arguments: [String: JSONValue] = [:]
        public var origin: SourceLocation?

        public init(name: String, durable: Bool = true, autoDelete: Bool = false, arguments: [String: JSONValue] = [:],
                    origin: SourceLocation? = nil) {
            self.name = name
            self.durable = durable
            self.autoDelete = autoDelete
            self.arguments = arguments
            self.origin = origin
        }

        public var type: String { self.arguments["x-queue-type"]?.stringValue ?? "classic" }

        public static func == (a: Self, b: Self) -> Bool {
            a.name == b.name && a.durable == b.durable && a.autoDelete == b.autoDelete && a.arguments == b.arguments
        }
        public func hash(into hasher: inout Hasher) { hasher.combine(self.name) }
    }

    public struct Binding: Sendable, Hashable {
        public enum DestinationType: String, Sendable, Hashable { case queue, exchange }
        public var source: String
        public var destination: String
        public var destinationType: DestinationType
        public var routingKey: String
        public var arguments: [String: JSONValue] = [:]
        public var origin: SourceLocation?

        public init(source: String, destination: String, destinationType: DestinationType = .queue, routingKey: String = "",
                    arguments: [String: JSONValue] = [:], origin: SourceLocation? = nil) {
            self.source = source
            self.destination = destination
            self.destinationType = destinationType
            self.routingKey = routingKey
            self.arguments = arguments
            self.origin = origin
        }

        public static func == (a: Self, b: Self) -> Bool {
            a.source == b.source && a.destination == b.destination && a.destinationType == b.destinationType
                && a.routingKey == b.routingKey && a.arguments == b.arguments
        }
        public func hash(into hasher: inout Hasher) {
            hasher.combine(self.source)
            hasher.combine(self.destination)
            hasher.combine(self.routingKey)
        }
    }

    /// Operator-tunable settings (delivery limit, lengths, TTLs, dead-lettering, alternate
    /// exchange): RabbitMQ applies and changes them in place.
    public struct Policy: Sendable, Hashable {
        public var name: String
        public var pattern: String
        public var applyTo: String
        public var priority: Int
        /// Keys without the `x-` prefix (`delivery-limit`, `message-ttl`).
        public var definition: [String: JSONValue]
        public var origin: SourceLocation?

        public init(name: String, pattern: String, applyTo: String = "queues", priority: Int = 10,
                    definition: [String: JSONValue], origin: SourceLocation? = nil) {
            self.name = name
            self.pattern = pattern
            self.applyTo = applyTo
            self.priority = priority
            self.definition = definition
            self.origin = origin
        }

        public static func == (a: Self, b: Self) -> Bool {
            a.name == b.name && a.pattern == b.pattern && a.applyTo == b.applyTo && a.priority == b.priority
                && a.definition == b.definition
        }
        public func hash(into hasher: inout Hasher) { hasher.combine(self.name) }
    }

    public var exchanges: [Exchange] = []
    public var queues: [Queue] = []
    public var bindings: [Binding] = []
    public var policies: [Policy] = []

    public init(exchanges: [Exchange] = [], queues: [Queue] = [], bindings: [Binding] = [], policies: [Policy] = []) {
        self.exchanges = exchanges
        self.queues = queues
        self.bindings = bindings
        self.policies = policies
    }

    public func exchange(named name: String) -> Exchange? { self.exchanges.first { $0.name == name } }
    public func queue(named name: String) -> Queue? { self.queues.first { $0.name == name } }
    public func policy(named name: String) -> Policy? { self.policies.first { $0.name == name } }
}

/// Where something was written: file, line, column, key path.
public struct SourceLocation: Sendable, Hashable, CustomStringConvertible {
    public var file: String
    public var line: Int?
    public var column: Int?
    public var keyPath: String

    public init(file: String, line: Int? = nil, column: Int? = nil, keyPath: String) {
        self.file = file
        self.line = line
        self.column = column
        self.keyPath = keyPath
    }

    public var description: String {
        var text = self.file
        if let line { text += ":\(line)" }
        if let column { text += ":\(column)" }
        if !self.keyPath.isEmpty { text += " (\(self.keyPath))" }
        return text
    }
}
