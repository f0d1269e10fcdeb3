import AQBridge
import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Logging

@main
struct BridgeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "aq-bridge",
        abstract: "Consume AsyncQueue tasks from RabbitMQ and deliver them to HTTP callbacks and webhooks.",
        discussion: """
            Settings come from, later winning: defaults, --config FILE, the environment (AQ_AMQP_URL, AQ_TOPOLOGY, \
            AQ_QUEUES, AQ_PREFETCH, AQ_SIGNING_SECRETS, AQ_LISTEN, AQ_LOG_LEVEL, AQ_CALLBACK_ALLOW, AQ_CALLBACK_DENY, \
            AQ_TRUSTED_PUBLISHERS), then these flags. \
            SIGTERM or SIGINT stops it gracefully: no new tasks, in-flight tasks finish or go back to the broker.
            """)

    @Option(help: "A configuration file (YAML: amqp_url, topology, queues, prefetch, signing_secrets, listen, …).")
    var config: String?

    @Option(name: .customLong("amqp"), help: ArgumentHelp("The broker's AMQP URL (default $AQ_AMQP_URL).", valueName: "url"))
    var amqpURL: String?

    @Option(name: .customLong("topology"), help: "Topology files or directories (repeatable; default topology/).")
    var topology: [String] = []

    @Option(name: .customLong("queue"), help: "A work queue to serve, by name or queue name (repeatable; default: all in the topology).")
    var queues: [String] = []

    @Option(help: "Tasks in flight per queue (consumer prefetch).")
    var prefetch: Int?

    @Option(help: ArgumentHelp("Where to serve /healthz, /readyz and /metrics (HOST:PORT; empty disables).", valueName: "host:port"))
    var listen: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String?

    @Option(help: ArgumentHelp("Longest per-attempt timeout a task may ask for: 90 (seconds), 20m… (keep under the broker's consumer_timeout).", valueName: "duration"))
    var maxTaskTimeout: String?

    @Option(help: "HTTP requests in flight to one host (scheme://host:port), all queues together.")
    var maxPerHost: Int?

    @Option(help: "HTTP requests in flight in all (each work queue also has its topology concurrency).")
    var httpConnections: Int?

    @Option(help: "Bytes of tasks held in memory at once; past it new deliveries wait in the broker.")
    var maxInflightBytes: Int?

    @Option(help: "Largest task body accepted, in bytes; larger ones are dead-lettered.")
    var maxPayloadBytes: Int?

    @Option(help: "Largest callback answer read, in bytes; a larger one fails the attempt without retry.")
    var maxResponseBytes: Int?

    @Option(help: ArgumentHelp("How long SIGTERM waits for in-flight tasks before handing them back: 30 (seconds), 1m…", valueName: "duration"))
    var shutdownGrace: String?

    /// glibc's `mallopt(M_MMAP_THRESHOLD, bytes)`; `<malloc.h>` is not in Swift's Glibc module.
    static func fixMmapThreshold(_ bytes: Int32) {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }  // RTLD_DEFAULT
        typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
        let M_MMAP_THRESHOLD: Int32 = -3
        _ = unsafeBitCast(symbol, to: Mallopt.self)(M_MMAP_THRESHOLD, bytes)
    }

    func run() async throws {
        // A peer that closes its socket while we write to it is an error to handle, not a
        // reason to die: without this, SIGPIPE ends the process silently (no log, no backtrace).
        signal(SIGPIPE, SIG_IGN)
        var configuration = BridgeConfiguration()
        do {
            if let config = self.config { try configuration.apply(file: config) }
            try configuration.apply(environment: ProcessInfo.processInfo.environment)
        } catch {
            FileHandle.standardError.write(Data("aq-bridge: \(error)\n".utf8))
            throw ExitCode.failure
        }
        if let v = self.amqpURL { configuration.amqpURL = v }
        if !self.topology.isEmpty { configuration.topology = self.topology }
        if !self.queues.isEmpty { configuration.queues = self.queues }
        if let v = self.prefetch { configuration.prefetch = v }
        if let v = self.listen { configuration.listen = v }
        if let v = self.logLevel { configuration.logLevel = v }
        if let v = self.maxPayloadBytes { configuration.maxPayloadBytes = v }
        if let v = self.maxResponseBytes { configuration.maxResponseBytes = v }
        if let v = self.maxPerHost { configuration.maxPerHost = v }
        if let v = self.httpConnections { configuration.httpConnections = v }
        if let v = self.maxInflightBytes { configuration.maxInFlightBytes = v }
        for (flag, value, apply) in [("--max-task-timeout", self.maxTaskTimeout, { (d: Duration) in configuration.maxTaskTimeout = d }),
                                     ("--shutdown-grace", self.shutdownGrace, { (d: Duration) in configuration.shutdownGrace = d })] {
            guard let value else { continue }
            guard let duration = BridgeConfiguration.parseDuration(value) else {
                FileHandle.standardError.write(Data("aq-bridge: \(flag) must be a duration like 30s, 20m or 90, not '\(value)'\n".utf8))
                throw ExitCode.failure
            }
            apply(duration)
        }
        // The same checks for every source: a flag is held to what the file and environment are.
        do { try configuration.validate() } catch {
            FileHandle.standardError.write(Data("aq-bridge: \(error)\n".utf8))
            throw ExitCode.failure
        }
        guard let level = Logger.Level(rawValue: configuration.logLevel) else {
            FileHandle.standardError.write(Data("aq-bridge: unknown log level '\(configuration.logLevel)'\n".utf8))
            throw ExitCode.failure
        }
        // Task bodies of 128 KiB and more always get their own mapping, returned when freed:
        // glibc otherwise raises this threshold after the first such free and keeps freed large
        // bodies in its heaps (200 tasks of 1 MiB peaked at 305 MB instead of 106 MB).
        Self.fixMmapThreshold(128 * 1024)
        LoggingSystem.bootstrap { label in LogfmtHandler(label: label, level: level) }
        let logger = Logger(label: "aq-bridge")
        let service = BridgeService(configuration: configuration, logger: logger)
        do {
            try await service.run()
        } catch {
            logger.critical("aq-bridge cannot run", metadata: ["error": "\(error)"])
            throw ExitCode.failure
        }
    }
}
