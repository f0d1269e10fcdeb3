import AQHTTP
import Foundation

/// The parts of RabbitMQ's management HTTP API the topology tool needs: definitions, policies,
/// permissions. (AMQP 0-9-1 cannot list bindings or policies, or read a queue's arguments.)
///
/// On a cluster it is given every node's API: a call goes to the first node that answers (a node
/// that cannot be reached is passed over; an answer, even an error, is final).
public struct ManagementClient: Sendable {
    /// The nodes' API addresses, in the order they are tried.
    public var baseURLs: [String]
    public var user: String
    public var password: String

    /// The first address.
    public var baseURL: String { self.baseURLs.first ?? "" }

    public init(baseURL: String, user: String, password: String) {
        self.init(baseURLs: [baseURL], user: user, password: password)
    }

    public init(baseURLs: [String], user: String, password: String) {
        self.baseURLs = baseURLs.map { $0.hasSuffix("/") ? String($0.dropLast()) : $0 }
        self.user = user
        self.password = password
    }

    /// Splits `AQ_MANAGEMENT_URL`: one URL, or several separated by spaces or commas.
    public static func splitURLs(_ text: String) -> [String] {
        text.split(whereSeparator: { $0 == " " || $0 == "," || $0 == "\n" || $0 == "\t" }).map(String.init)
    }

    public struct Failure: Error, Sendable, CustomStringConvertible {
        public var description: String
    }

    static func escape(_ component: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        return component.addingPercentEncoding(withAllowedCharacters: allowed) ?? component
    }

    private func call(_ method: String, _ path: String, body: JSONValue? = nil, okStatuses: Set<Int> = [200, 201, 204]) async throws -> HTTPResponse {
        var data: [UInt8]?
        if let body {
            let encoder = JSONEncoder()
            data = Array(try encoder.encode(body))
        }
        var response: HTTPResponse?
        var failures: [String] = []
        var answeredBy = self.baseURL
        for base in self.baseURLs {
            do {
                response = try await BlockingHTTP.request(
                    method: method, url: base + path, headers: ["Content-Type: application/json", "Accept: application/json"], body: data,
                    username: self.user, password: self.password)
                answeredBy = base
                break
            } catch let error as HTTPError {
                failures.append(self.baseURLs.count > 1 ? "\(base): \(error.message)" : error.message)
            }
        }
        guard let response else {
            let target = self.baseURLs.count > 1 ? "at any of \(self.baseURLs.joined(separator: ", "))" : "at \(self.baseURL)"
            throw Failure(description: "cannot reach the RabbitMQ management API \(target) (is the rabbitmq_management plugin enabled? set --management-url): \(failures.joined(separator: "; "))")
        }
        if response.status == 401 && !okStatuses.contains(401) {
            throw Failure(description: "the management API at \(answeredBy) refused user '\(self.user)' (401): wrong password, or the user lacks the 'management' tag")
        }
        guard okStatuses.contains(response.status) else {
            throw Failure(description: "\(method) \(path) on the management API answered \(response.status): \(response.bodyString.prefix(300))")
        }
        return response
    }

    /// One queue's numbers, as the management API shows them.
    public struct QueueStats: Sendable {
        public var name: String
        public var ready: Int
        public var unacknowledged: Int
        public var consumers: Int
        /// Messages per second in (published) and out (acknowledged), over the last few seconds.
        public var rateIn: Double
        public var rateOut: Double
    }

    /// The queues of `vhost` with their depth, consumers and rates.
    public func queueStats(vhost: String) async throws -> [QueueStats] {
        let columns = "name,messages_ready,messages_unacknowledged,consumers,message_stats.publish_details.rate,message_stats.ack_details.rate"
        let body = try await self.call("GET", "/api/queues/\(Self.escape(vhost))?columns=\(columns)").body
        guard case .array(let list) = try JSONDecoder().decode(JSONValue.self, from: Data(body)) else { return [] }
        func number(_ value: JSONValue?) -> Double {
            switch value {
            case .int(let v)?: return Double(v)
            case .double(let v)?: return v
            default: return 0
            }
        }
        return list.compactMap { item in
            guard let object = item.objectValue, let name = object["name"]?.stringValue else { return nil }
            let stats = object["message_stats"]?.objectValue
            return QueueStats(name: name, ready: Int(number(object["messages_ready"])), unacknowledged: Int(number(object["messages_unacknowledged"])),
                              consumers: Int(number(object["consumers"])),
                              rateIn: number(stats?["publish_details"]?.objectValue?["rate"]), rateOut: number(stats?["ack_details"]?.objectValue?["rate"]))
        }
    }

    /// What one virtual host holds (exchanges, queues, bindings, policies); nil when it does not
    /// exist. Uses the per-kind endpoints, which a `policymaker` user may read (the
    /// `/api/definitions` export needs `administrator`).
    public func definitions(vhost: String) async throws -> Definitions? {
        let v = Self.escape(vhost)
        let decoder = JSONDecoder()
        // Listing works for every management user (it shows the virtual hosts they may use).
        let vhosts = try decoder.decode(JSONValue.self, from: Data(try await self.call("GET", "/api/vhosts").body))
        guard case .array(let list) = vhosts, list.contains(where: { $0.objectValue?["name"]?.stringValue == vhost }) else { return nil }
        var definitions = Definitions()
        definitions.exchanges = try decoder.decode([Definitions.Exchange].self, from: Data(try await self.call("GET", "/api/exchanges/\(v)").body))
        definitions.queues = try decoder.decode([Definitions.Queue].self, from: Data(try await self.call("GET", "/api/queues/\(v)").body))
        definitions.bindings = try decoder.decode([Definitions.Binding].self, from: Data(try await self.call("GET", "/api/bindings/\(v)").body))
            .filter { !$0.source.isEmpty }  // the implicit default-exchange bindings
        let policies = try await self.call("GET", "/api/policies/\(v)", okStatuses: [200, 401])
        if policies.status == 401 {
            throw Failure(description: "user '\(self.user)' may not read policies on virtual host '\(vhost)' (needs the 'policymaker' or 'administrator' tag)")
        }
        definitions.policies = try decoder.decode([Definitions.Policy].self, from: Data(policies.body))
        return definitions
    }

    /// The cluster's nodes and where the queues of `vhost` live; nil when the user may not list
    /// nodes (that needs the `monitoring` or `administrator` tag).
    public func clusterView(vhost: String) async throws -> ClusterView? {
        let nodes = try await self.call("GET", "/api/nodes?columns=name,running", okStatuses: [200, 401, 403])
        guard nodes.status == 200 else { return nil }
        let decoder = JSONDecoder()
        guard case .array(let nodeList) = try decoder.decode(JSONValue.self, from: Data(nodes.body)) else { return nil }
        let queues = try await self.call("GET", "/api/queues/\(Self.escape(vhost))?columns=name,type,node,leader,members,online")
        guard case .array(let queueList) = try decoder.decode(JSONValue.self, from: Data(queues.body)) else { return nil }
        func strings(_ value: JSONValue?) -> [String] {
            guard case .array(let items)? = value else { return [] }
            return items.compactMap(\.stringValue)
        }
        return ClusterView(
            nodes: nodeList.compactMap { item in
                guard let object = item.objectValue, let name = object["name"]?.stringValue else { return nil }
                return ClusterView.Node(name: name, running: object["running"] == .bool(true))
            },
            queues: queueList.compactMap { item in
                guard let object = item.objectValue, let name = object["name"]?.stringValue else { return nil }
                return ClusterView.Queue(name: name, type: object["type"]?.stringValue ?? "classic",
                                         node: object["leader"]?.stringValue ?? object["node"]?.stringValue,
                                         members: strings(object["members"]), online: strings(object["online"]))
            })
    }

    public func putPolicy(_ policy: Topology.Policy, vhost: String) async throws {
        let body: JSONValue = [
            "pattern": .string(policy.pattern), "apply-to": .string(policy.applyTo), "priority": .int(Int64(policy.priority)),
            "definition": .object(policy.definition),
        ]
        _ = try await self.call("PUT", "/api/policies/\(Self.escape(vhost))/\(Self.escape(policy.name))", body: body)
    }

    public func deletePolicy(_ name: String, vhost: String) async throws {
        _ = try await self.call("DELETE", "/api/policies/\(Self.escape(vhost))/\(Self.escape(name))", okStatuses: [204, 404])
    }

    public struct Permissions: Sendable {
        public var configure: String
        public var write: String
        public var read: String
        public var tags: [String]
    }

    /// The current user's tags and permissions on a virtual host. nil: none there.
    /// Throws ``Unreadable`` when the user may not read permissions (only administrators may).
    public struct Unreadable: Error {}

    public func permissions(vhost: String) async throws -> Permissions? {
        let whoami = try await self.call("GET", "/api/whoami")
        let me = try JSONDecoder().decode(JSONValue.self, from: Data(whoami.body)).objectValue ?? [:]
        var tags: [String] = []
        switch me["tags"] {
        case .array(let values)?: tags = values.compactMap(\.stringValue)
        case .string(let text)?: tags = text.split(separator: ",").map { String($0) }
        default: break
        }
        let response = try await self.call("GET", "/api/permissions/\(Self.escape(vhost))/\(Self.escape(self.user))", okStatuses: [200, 401, 404])
        if response.status == 401 { throw Unreadable() }
        if response.status == 404 { return nil }
        let object = try JSONDecoder().decode(JSONValue.self, from: Data(response.body)).objectValue ?? [:]
        return Permissions(configure: object["configure"]?.stringValue ?? "", write: object["write"]?.stringValue ?? "",
                           read: object["read"]?.stringValue ?? "", tags: tags)
    }
}
