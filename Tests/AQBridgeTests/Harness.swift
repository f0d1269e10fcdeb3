import AMQPClient
import AQBridge
import AQHTTP
import AQTestSupport
import AQTopology
import Foundation
import Logging
import Synchronization
import Testing

/// An HTTP receiver on 127.0.0.1 that records every request and answers per path.
final class Receiver: Sendable {
    typealias Behaviour = @Sendable (_ request: HTTPServer.Request, _ nth: Int) -> HTTPServer.Response?

    struct Recorded: Sendable {
        var request: HTTPServer.Request
        var at: ContinuousClock.Instant
    }

    private let log = Mutex<[String: [Recorded]]>([:])
    private let behaviours = Mutex<[String: Behaviour]>([:])
    private let server = Mutex<HTTPServer?>(nil)
    let port: Int

    init() throws {
        _ = TestEnvironment.ignoresSIGPIPE
        let holder = ReceiverHolder()
        let server = try HTTPServer { request, responder in
            guard let receiver = holder.receiver else { return responder.respond(.text("gone", status: 503)) }
            let nth = receiver.log.withLock { log -> Int in
                log[request.path, default: []].append(Recorded(request: request, at: .now))
                return log[request.path]?.count ?? 1
            }
            let behaviour = receiver.behaviours.withLock { $0[request.path] }
            if let (delay, response) = receiver.delayed.withLock({ $0[request.path] }) {
                let (seconds, attoseconds) = delay.components
                DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(seconds) * 1_000_000_000 + Int(attoseconds / 1_000_000_000))) {
                    responder.respond(response)
                }
            } else if let behaviour {
                if let response = behaviour(request, nth) { responder.respond(response) }  // nil: never answer
            } else {
                responder.respond(.json(#"{"ok":true}"#))
            }
        }
        self.port = server.port
        self.server.withLock { $0 = server }
        holder.receiver = self
    }

    func url(_ path: String) -> String { "http://127.0.0.1:\(self.port)\(path)" }

    func on(_ path: String, _ behaviour: @escaping Behaviour) {
        self.behaviours.withLock { $0[path] = behaviour }
    }

    /// Answers `path` after `delay` (the request is recorded when it arrives).
    func onDelayed(_ path: String, by delay: Duration, _ response: HTTPServer.Response = .json(#"{"ok":true}"#)) {
        self.delayed.withLock { $0[path] = (delay, response) }
        self.on(path) { _, _ in nil }
    }

    private let delayed = Mutex<[String: (Duration, HTTPServer.Response)]>([:])

    func requests(_ path: String) -> [Recorded] { self.log.withLock { $0[path] ?? [] } }

    func wait(_ path: String, count: Int, timeout: Duration = .seconds(30)) async throws -> [Recorded] {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let got = self.requests(path)
            if got.count >= count { return got }
            try await Task.sleep(for: .milliseconds(10))
        }
        Issue.record("timed out waiting for \(count) request(s) on \(path); got \(self.requests(path).count)")
        throw HarnessError(description: "timeout on \(path)")
    }

    func shutdown() { self.server.withLock { $0 }?.shutdown() }

    deinit { self.shutdown() }
}

/// Breaks the receiver ↔ server reference cycle; set once before any request can arrive.
final class ReceiverHolder: @unchecked Sendable {
    // Written once, right after the server starts and before the receiver's URL is handed to
    // anyone, so no request can read it concurrently with the write.
    weak var receiver: Receiver?
}

struct HarnessError: Error, CustomStringConvertible { var description: String }

/// A fresh virtual host with the AsyncQueue topology (fast retry tiers) and a running bridge.
final class BridgeHarness: Sendable {
    let vhost: String
    let amqpURL: String
    let topologyDir: URL
    let service: BridgeService
    let runTask: Task<Void, any Error>
    let connection: AMQPConnection
    let channel: AMQPChannel

    static var baseURL: String { TestEnvironment.amqpURL }
    static var managementURL: String { TestEnvironment.managementURL }

    static let topologyYAML = """
        work_queues:
          default: {delivery_limit: 20, task_timeout: 10s, retries: 3}
          reports: {delivery_limit: 20, task_timeout: 30s, retries: 2}
        retry:
          tiers: [1s, 3s]
        """

    static func management(_ method: String, _ path: String, _ body: String? = nil) async throws {
        let base = try AMQPConfiguration(url: self.baseURL)
        let response = try await BlockingHTTP.request(method: method, url: self.managementURL + path, headers: ["Content-Type: application/json"],
                                                      body: body.map { Array($0.utf8) }, username: base.user, password: base.password)
        guard (200..<300).contains(response.status) else { throw HarnessError(description: "\(method) \(path): \(response.status)") }
    }

    /// A fresh virtual host with the topology applied: (vhost, AMQP URL, topology directory).
    static func prepareVHost(topology: String = BridgeHarness.topologyYAML) async throws -> (String, String, URL) {
        let vhost = "aq-bridge-test-\(UUID().uuidString.prefix(8).lowercased())"
        try await self.management("PUT", "/api/vhosts/\(vhost)")
        let base = try AMQPConfiguration(url: self.baseURL)
        try await self.management("PUT", "/api/permissions/\(vhost)/\(base.user)", #"{"configure":".*","write":".*","read":".*"}"#)
        let url = "amqp://\(base.user):\(base.password)@\(base.host):\(base.port)/\(vhost)"
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(vhost)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try topology.write(to: dir.appendingPathComponent("asyncqueue.yaml"), atomically: true, encoding: .utf8)
        let spec = try TopologyLoader.load(paths: [dir.path])
        try await TopologyApplier.apply(spec, on: try BrokerTarget(amqpURL: url, managementURL: self.managementURL))
        return (vhost, url, dir)
    }

    static func start(topology: String = BridgeHarness.topologyYAML, configure: (inout BridgeConfiguration) -> Void = { _ in }) async throws -> BridgeHarness {
        let (vhost, url, dir) = try await self.prepareVHost(topology: topology)

        var configuration = BridgeConfiguration()
        configuration.amqpURL = url
        configuration.topology = [dir.path]
        configuration.listen = "127.0.0.1:0"
        configuration.retryJitter = false
        configuration.webhookTimeout = .seconds(5)
        configuration.shutdownGrace = .seconds(5)
        configure(&configuration)
        var logger = Logger(label: "aq-bridge-test")
        logger.logLevel = .warning
        let service = BridgeService(configuration: configuration, logger: logger)
        let task = Task { try await service.run(handleSignals: false) }
        // Ready when /readyz says so.
        let deadline = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < deadline {
            if let port = service.healthPort,
               let response = try? await BlockingHTTP.request(method: "GET", url: "http://127.0.0.1:\(port)/readyz"), response.status == 200 {
                break
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        let connection = try await AMQPConnection.connect(url)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        return BridgeHarness(vhost: vhost, amqpURL: url, topologyDir: dir, service: service, runTask: task, connection: connection, channel: channel)
    }

    private init(vhost: String, amqpURL: String, topologyDir: URL, service: BridgeService, runTask: Task<Void, any Error>,
                 connection: AMQPConnection, channel: AMQPChannel) {
        self.vhost = vhost
        self.amqpURL = amqpURL
        self.topologyDir = topologyDir
        self.service = service
        self.runTask = runTask
        self.connection = connection
        self.channel = channel
    }

    /// Publishes a raw task body to the task exchange.
    @discardableResult
    func publish(_ body: String, queue: String = "default", id: String? = nil, headers: AMQPTable? = nil) async throws -> String {
        let id = id ?? UUID().uuidString.lowercased()
        try await self.channel.publish(Array(body.utf8), exchange: "aq.tasks", routingKey: queue,
                                       properties: AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent, messageId: id))
        return id
    }

    func depth(_ queue: String) async throws -> UInt32 {
        try await self.channel.declareQueue(queue, passive: true).messageCount
    }

    func waitDepth(_ queue: String, _ count: UInt32, timeout: Duration = .seconds(30)) async throws {
        let deadline = ContinuousClock.now + timeout
        while try await self.depth(queue) < count {
            guard ContinuousClock.now < deadline else {
                Issue.record("\(queue) never reached \(count) messages")
                throw HarnessError(description: "timeout")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// Reads every message in the dead-letter queue.
    func deadLetters() async throws -> [AMQPDelivery] {
        var all: [AMQPDelivery] = []
        while let message = try await self.channel.get("aq.dead") {
            all.append(message)
            try message.ack()
        }
        return all
    }

    /// Waits until nothing is in flight or waiting in the work and retry queues.
    func waitIdle(timeout: Duration = .seconds(30)) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            var busy = self.service.metrics.inFlight.load(ordering: .relaxed) > 0
            for queue in ["aq.work.default", "aq.work.reports", "aq.retry.1s", "aq.retry.3s"] where !busy {
                busy = try await self.depth(queue) > 0
            }
            if !busy { return }
            try await Task.sleep(for: .milliseconds(20))
        }
        Issue.record("the bridge never became idle")
    }

    /// Another aq-bridge on the same virtual host and topology (a restart, or a second bridge).
    /// Stop it with `service.stop()` and await `task`.
    func anotherBridge(configure: (inout BridgeConfiguration) -> Void = { _ in }) async throws -> (service: BridgeService, task: Task<Void, any Error>) {
        var configuration = BridgeConfiguration()
        configuration.amqpURL = self.amqpURL
        configuration.topology = [self.topologyDir.path]
        configuration.listen = "127.0.0.1:0"
        configuration.retryJitter = false
        configuration.webhookTimeout = .seconds(5)
        configuration.shutdownGrace = .seconds(5)
        configure(&configuration)
        var logger = Logger(label: "aq-bridge-test-2")
        logger.logLevel = .warning
        let service = BridgeService(configuration: configuration, logger: logger)
        let task = Task { try await service.run(handleSignals: false) }
        let deadline = ContinuousClock.now + .seconds(20)
        while ContinuousClock.now < deadline, !service.metrics.consuming.load(ordering: .relaxed) {
            try await Task.sleep(for: .milliseconds(20))
        }
        return (service, task)
    }

    /// A connection as another AMQP user (an application, not the bridge), with write access to
    /// this virtual host: what it publishes carries its own validated `user_id`, if any.
    /// Publishes a raw body to the task exchange as an application's own user (`user_id` set,
    /// which the broker checks against its login).
    func publish(_ body: String, as app: (user: String, connection: AMQPConnection, channel: AMQPChannel), queue: String = "default") async throws {
        try await app.channel.publish(Array(body.utf8), exchange: "aq.tasks", routingKey: queue,
                                      properties: AMQPProperties(contentType: "application/json", deliveryMode: .persistent, userId: app.user))
    }

    func appConnection() async throws -> (user: String, connection: AMQPConnection, channel: AMQPChannel) {
        let user = "aq-app-\(UUID().uuidString.prefix(8).lowercased())"
        try await Self.management("PUT", "/api/users/\(user)", #"{"password":"app-secret","tags":""}"#)
        try await Self.management("PUT", "/api/permissions/\(self.vhost)/\(user)", #"{"configure":".*","write":".*","read":".*"}"#)
        self.appUsers.withLock { $0.append(user) }
        let base = try AMQPConfiguration(url: self.amqpURL)
        let connection = try await AMQPConnection.connect("amqp://\(user):app-secret@\(base.host):\(base.port)/\(self.vhost)")
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        return (user, connection, channel)
    }

    private let appUsers = Mutex<[String]>([])

    func stop() async {
        self.service.stop()
        _ = try? await self.runTask.value
        await self.connection.close()
        for user in self.appUsers.withLock({ $0 }) { try? await Self.management("DELETE", "/api/users/\(user)") }
        try? await Self.management("DELETE", "/api/vhosts/\(self.vhost)")
        try? FileManager.default.removeItem(at: self.topologyDir)
    }
}

extension HTTPServer.Request {
    var json: [String: Any]? { (try? JSONSerialization.jsonObject(with: Data(self.body))) as? [String: Any] }
}
