import AMQPClient
import AQHTTP
import AQTopology
import Dispatch
import Foundation
import Logging
import Synchronization

/// aq-bridge as a service: connects, serves the work queues, answers health checks, and shuts
/// down gracefully.
public final class BridgeService: Sendable {
    public let configuration: BridgeConfiguration
    public let metrics = BridgeMetrics()
    let logger: Logger
    private let state = Mutex<State>(State())

    struct State {
        var connection: AMQPConnection?
        var server: HTTPServer?
        var stopping = false
        var stopWaiters: [CheckedContinuation<Void, Never>] = []
    }

    public init(configuration: BridgeConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    public struct StartupError: Error, CustomStringConvertible {
        public var description: String
    }

    /// The work queues to serve, with their task defaults, from the topology.
    public static func servedQueues(_ spec: TopologySpec, configuration: BridgeConfiguration) throws -> [ServedQueue] {
        let selected: [TopologySpec.WorkQueue]
        if configuration.queues.isEmpty {
            selected = spec.workQueues
        } else {
            selected = try configuration.queues.map { wanted in
                if let queue = spec.workQueue(named: wanted) ?? spec.workQueues.first(where: { spec.queueName(forWorkQueue: $0.name) == wanted }) {
                    return queue
                }
                throw StartupError(description: "work queue '\(wanted)' is not in the topology (known: \(spec.workQueues.map(\.name).joined(separator: ", ")))")
            }
        }
        return selected.map { queue in
            ServedQueue(name: queue.name, queueName: spec.queueName(forWorkQueue: queue.name),
                        defaults: TaskDefaults(retries: queue.retries, timeout: min(queue.taskTimeout.duration, configuration.maxTaskTimeout),
                                               maxTimeout: configuration.maxTaskTimeout, maxPayloadBytes: configuration.maxPayloadBytes),
                        concurrency: queue.concurrency)
        }
    }

    /// Runs until `stop()` (or SIGTERM/SIGINT when `handleSignals`), then shuts down gracefully.
    public func run(handleSignals: Bool = true) async throws {
        let config = self.configuration
        do { try config.validate() } catch { throw StartupError(description: "\(error)") }
        let spec: TopologySpec
        do {
            spec = try TopologyLoader.load(paths: config.topology)
        } catch {
            throw StartupError(description: "the topology files are invalid:\n\(error)")
        }
        var queues = try Self.servedQueues(spec, configuration: config)
        // Tasks whose routing key named no work queue: dead-lettered with the reason, not left
        // unnoticed in the alternate exchange's queue.
        queues.append(ServedQueue(name: "unrouted", queueName: spec.unroutedQueue,
                                  defaults: TaskDefaults(maxTimeout: config.maxTaskTimeout, maxPayloadBytes: config.maxPayloadBytes),
                                  concurrency: 8, isUnrouted: true))
        let signer: WebhookSigner
        do { signer = try WebhookSigner(secrets: config.signingSecrets) } catch { throw StartupError(description: "\(error)") }
        var amqp = try AMQPConfiguration(url: config.amqpURL)
        amqp.connectionName = amqp.connectionName ?? "aq-bridge"
        // A TLS file that cannot be read will not become readable by retrying.
        for (what, path) in [("cacertfile", amqp.tls?.caFile), ("certfile", amqp.tls?.certificateFile), ("keyfile", amqp.tls?.keyFile)] {
            if let path, !FileManager.default.isReadableFile(atPath: path) {
                throw StartupError(description: "the broker URL's \(what) '\(path)' cannot be read")
            }
        }
        // Signals from the start: a SIGTERM while the broker is still unreachable is a clean stop.
        if handleSignals {
            Task { [weak self] in
                await Self.waitForSignal()
                self?.stop()
            }
        }
        self.logger.info("aq-bridge starting", metadata: ["config": "\(config.redactedDescription)", "queues": "\(queues.map(\.queueName).joined(separator: ","))"])

        if !config.listen.isEmpty { try self.startHealthServer() }

        // The broker may not be up yet: keep trying (readiness stays false meanwhile).
        var connection: AMQPConnection?
        var delay = Duration.milliseconds(200)
        while connection == nil {
            if self.state.withLock({ $0.stopping }) {
                self.logger.info("aq-bridge stopped before the broker was reached")
                self.state.withLock { $0.server }?.shutdown()
                return
            }
            do {
                connection = try await AMQPConnection.connect(configuration: amqp, logger: self.logger)
            } catch let error as AMQPError where error.code == .authenticationFailed || error.code == .accessRefused || error.code == .invalidURL
                || error.code == .invalidArgument || (error.code == .tlsFailed && error.message.hasPrefix("could not load")) {
                throw StartupError(description: "cannot connect: \(error)")
            } catch {
                self.logger.warning("broker unreachable, retrying", metadata: ["error": "\(error)", "retry_in": "\(delay)"])
                let until = ContinuousClock.now + delay
                while ContinuousClock.now < until, !self.state.withLock({ $0.stopping }) {
                    try? await Task.sleep(for: .milliseconds(50))
                }
                delay = min(delay * 2, .seconds(5))
            }
        }
        guard let connection else { return }
        self.state.withLock { $0.connection = connection }
        let trusted = Set(config.trustedPublishers.isEmpty ? [amqp.user] : config.trustedPublishers + [amqp.user])
        let settings = BridgeEngine.Settings(
            spec: spec, queues: queues, prefetch: config.prefetch, signer: signer, maxResponseBytes: config.maxResponseBytes,
            webhookTimeout: config.webhookTimeout, webhookAttempts: config.webhookAttempts, httpConnections: config.httpConnections,
            maxPerHost: config.maxPerHost, httpClient: config.httpClient, maxInFlightBytes: config.maxInFlightBytes, maxHostWait: config.maxHostWait, retryJitter: config.retryJitter,
            policy: try config.addressPolicy(), bridgeUser: amqp.user, trustedPublishers: trusted, replyToAllow: config.replyToAllow,
            events: config.events)
        let metrics = self.metrics
        let logger = self.logger
        try await connection.withThreadContext { context in
            let engine = BridgeEngine(context: context, settings: settings, metrics: metrics, logger: logger)
            context.install(engine)
            try engine.start()
        }
        metrics.connected.store(true, ordering: .relaxed)
        self.logger.info("aq-bridge ready", metadata: ["queues": "\(queues.map(\.name).joined(separator: ","))", "prefetch": "\(config.prefetch)"])

        await self.waitForStop()
        await self.shutdown(connection)
    }

    /// Asks a running service to shut down gracefully.
    public func stop() {
        let waiters = self.state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.stopping = true
            defer { state.stopWaiters.removeAll() }
            return state.stopWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    private func waitForStop() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let already = self.state.withLock { state -> Bool in
                if state.stopping { return true }
                state.stopWaiters.append(continuation)
                return false
            }
            if already { continuation.resume() }
        }
    }

    static func waitForSignal() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let once = Atomic<Bool>(false)
            signal(SIGTERM, SIG_IGN)
            signal(SIGINT, SIG_IGN)
            let queue = DispatchQueue(label: "aq-bridge-signals")
            let sources = [SIGTERM, SIGINT].map { DispatchSource.makeSignalSource(signal: $0, queue: queue) }
            for source in sources {
                source.setEventHandler {
                    guard !once.exchange(true, ordering: .relaxed) else { return }
                    for s in sources { s.cancel() }
                    continuation.resume()
                }
                source.resume()
            }
        }
    }

    /// Stop taking tasks, let in-flight ones finish (up to the grace period), hand back the rest.
    func shutdown(_ connection: AMQPConnection) async {
        self.state.withLock { $0.stopping = true }
        self.logger.info("aq-bridge shutting down: no new tasks; waiting for those in flight", metadata: ["in_flight": "\(self.metrics.inFlight.load(ordering: .relaxed))"])
        let drained = Atomic<Bool>(false)
        _ = try? await connection.withThreadContext { context in
            guard let engine = context.extensions.compactMap({ $0 as? BridgeEngine }).first else { return }
            engine.drain { drained.store(true, ordering: .relaxed) }
        }
        let deadline = ContinuousClock.now + self.configuration.shutdownGrace
        while !drained.load(ordering: .relaxed) && ContinuousClock.now < deadline && connection.isConnected {
            try? await Task.sleep(for: .milliseconds(20))
        }
        if !drained.load(ordering: .relaxed) {
            let handedBack = (try? await connection.withThreadContext { context -> Int in
                context.extensions.compactMap { $0 as? BridgeEngine }.first?.handBack() ?? 0
            }) ?? 0
            self.logger.warning("handed tasks back to the broker", metadata: ["count": "\(handedBack)"])
        }
        await connection.close()
        self.state.withLock { $0.server }?.shutdown()
        self.logger.info("aq-bridge stopped", metadata: ["completed": "\(self.metrics.value(.tasksCompleted))", "failed": "\(self.metrics.value(.tasksFailed))"])
    }

    private func startHealthServer() throws {
        let parts = self.configuration.listen.split(separator: ":")
        guard parts.count == 2, let port = Int(parts[1]) else {
            throw StartupError(description: "listen must be HOST:PORT, not '\(self.configuration.listen)'")
        }
        let metrics = self.metrics
        let server: HTTPServer
        do {
            // Health checks carry no body: a client that announces one gets 413, not 16 MiB of buffer.
            server = try HTTPServer(host: String(parts[0]), port: port, maxBodyBytes: 4096) { [weak self] request, responder in
                switch (request.method, request.path) {
                case ("GET", "/healthz"):
                    responder.respond(.json(#"{"status":"ok"}"#))
                case ("GET", "/readyz"):
                    let stopping = self?.state.withLock { $0.stopping } ?? true
                    let ready = !stopping && metrics.connected.load(ordering: .relaxed) && metrics.consuming.load(ordering: .relaxed)
                    responder.respond(.json(ready ? #"{"status":"ready"}"# : #"{"status":"not ready"}"#, status: ready ? 200 : 503))
                case ("GET", "/metrics"):
                    responder.respond(.text(metrics.prometheus(), contentType: "text/plain; version=0.0.4"))
                default:
                    responder.respond(.text("not found\n", status: 404))
                }
            }
        } catch {
            throw StartupError(description: "cannot serve health checks on \(self.configuration.listen): \(error)")
        }
        self.state.withLock { $0.server = server }
    }

    /// The port the health server listens on (useful with port 0).
    public var healthPort: Int? { self.state.withLock { $0.server?.port } }
}
